"""Whole models on the GPU: ``mnemo_fast`` (fused CUDA kernels) against ``mnemo_fast.reference``
on the same device, the drop-in promise end to end (runs only where a GPU and the CUDA kernels
are present; CI is CPU-only). tests/test_ops_cuda.py checks each op alone; this file checks
that the fast engine, its per-layer rules and the perturbation give the reference's Fisher
and the reference's forgotten model on real architectures: an MLP, a CNN with BatchNorm, and
Hugging Face ``transformers`` classifiers built from configs.

MNEMO_GPU_TEST_DEVICE=cpu dry-runs the file on a machine without a GPU (the CPU kernels).
"""

from __future__ import annotations

import os

import pytest
import torch

from mnemo_fast.fast import _ext

DEVICE = torch.device(os.environ.get("MNEMO_GPU_TEST_DEVICE", "cuda"))
if DEVICE.type == "cuda" and not (torch.cuda.is_available() and _ext.available() and _ext.has_cuda_kernels()):
    pytest.skip("needs a GPU and the CUDA build of mnemo_fast._C", allow_module_level=True)

import mnemo_fast as mf  # noqa: E402
import mnemo_fast.reference as ref  # noqa: E402
from mnemo_fast.evaluation.compare import max_relative_error  # noqa: E402

nn = torch.nn


def mlp(classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, classes))


def cnn(classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, classes),
    )


MODELS = {"mlp": mlp, "cnn": cnn}


def model_and_codes(kind: str, classes: int = 5, per_class: int = 2):
    torch.manual_seed(0)
    model = MODELS[kind](classes).to(DEVICE).eval()
    codes = mf.MnemonicCodes.generate(classes, (1, 8, 8), per_class=per_class, seed=0)
    return model, codes


def test_the_fast_path_runs_on_this_device():
    expected = "cuda-ext" if DEVICE.type == "cuda" else "cpu-ext"
    assert mf.backend(DEVICE) == expected
    assert ref.backend(DEVICE) == "reference"


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("n", [1, 7, 40])
def test_fisher_diagonal_matches_the_reference(kind, n):
    model, _ = model_and_codes(kind)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 1, 8, 8, generator=gen).to(DEVICE)
    y = torch.randint(0, 5, (n,), generator=gen).to(DEVICE)
    fast = mf.fisher_diagonal(model, x, y)
    want = ref.fisher_diagonal(model, x, y)
    assert fast.keys() == want.keys()
    assert all(v.device.type == DEVICE.type for v in fast.values())
    assert max_relative_error(fast, want) < 1e-4


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("per_class", [1, 3])
def test_forget_matches_the_reference(kind, per_class):
    model, codes = model_and_codes(kind, per_class=per_class)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = mf.forget(model, codes, [1], lambda1=1e-3, lambda2=10.0)
    want = ref.forget(model, codes, [1], lambda1=1e-3, lambda2=10.0)
    assert fast.backend == ("cuda-ext" if DEVICE.type == "cuda" else "cpu-ext")
    assert fast.sign == want.sign
    for (name, a), (_, b) in zip(fast.model.state_dict().items(), want.model.state_dict().items()):
        assert a.device.type == DEVICE.type
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    for name, value in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(value, before[name]), name


def test_forget_auto_runs_on_the_device_and_leaves_the_caller_alone():
    model, codes = model_and_codes("cnn", per_class=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = mf.forget(model, codes, [0, 3], lambda1="auto", lambda2=10.0)
    assert result.calibration is not None
    assert all(p.device.type == DEVICE.type for p in result.model.parameters())
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_gaussian_forget_is_reproducible_with_a_device_generator():
    model, codes = model_and_codes("mlp")

    def run(seed):
        gen = torch.Generator(DEVICE.type).manual_seed(seed)
        out = mf.forget(model, codes, [2], lambda1=1e-3, lambda2=10.0, mode="gaussian", generator=gen)
        return torch.cat([p.detach().flatten() for p in out.model.parameters()])

    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "vit"])
def test_transformers_fisher_matches_the_reference(family):
    pytest.importorskip("transformers")
    from mnemo_fast.evaluation.hf_models import build

    hf = build(family, num_classes=4, layers=2, width=32, heads=2, seq_len=8)
    model = hf.model.to(DEVICE)
    gen = torch.Generator().manual_seed(0)
    x = hf.inputs(6, gen).to(DEVICE)
    y = torch.randint(0, 4, (6,), generator=gen).to(DEVICE)
    fast = mf.fisher_diagonal(model, x, y)
    want = ref.fisher_diagonal(model, x, y)
    assert max_relative_error(fast, want) < 1e-3
