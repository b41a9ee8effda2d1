"""float16/bfloat16 models: float32 Fisher, errors within 2x of the reference's, bf16 forgetting.

Tolerance rule (STYLE.md, flash-attention's): against the float64 ground truth, the fast
engine's error may be at most ~2x the error of the reference run in the same low precision,
plus a small atol. The ground truth is the float64 reference on the same (rounded) weights
and inputs, so it measures arithmetic error only.
"""

from __future__ import annotations

import copy

import pytest
import torch

import mnemo_fast as mf
from mnemo_fast import reference
from mnemo_fast.evaluation import models
from mnemo_fast.fast import _ext
from mnemo_fast.fast.engine import EXTENSION, HOOKS_ATEN

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MODELS = {
    "mlp": lambda: models.MLP((1, 8, 8), 10, hidden=32),
    "cnn": lambda: models.SmallCNN((1, 8, 8), 10, width=4),
}
ENGINES = [
    pytest.param(EXTENSION, id="extension",
                 marks=pytest.mark.skipif(not _ext.available(), reason="compiled extension not built")),
    pytest.param(HOOKS_ATEN, id="hooks-aten"),
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _problem(model_name: str, dtype: torch.dtype):
    torch.manual_seed(0)
    model = MODELS[model_name]().to(dtype)
    codes = mf.MnemonicCodes.generate(10, (1, 8, 8), per_class=2, seed=1)
    inputs, labels = codes.batch(range(10))
    return model, inputs.to(dtype), labels, codes


def _error(got: torch.Tensor, truth: torch.Tensor) -> float:
    return (got.double() - truth).abs().max().item()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_low_precision_fisher_within_twice_reference_error(dtype_name, model_name, engine):
    dtype = DTYPES[dtype_name]
    model, inputs, labels, _ = _problem(model_name, dtype)
    truth = reference.fisher_diagonal(copy.deepcopy(model).double(), inputs.double(), labels)
    baseline = reference.fisher_diagonal(model, inputs, labels)
    fast = mf.fisher_diagonal(model, inputs, labels, chunk_size=7, engine=engine)
    assert all(p.dtype == dtype for p in model.parameters()), "the model's dtype changed"
    for name, exact in truth.items():
        assert fast[name].dtype == torch.float32, f"{name}: Fisher is {fast[name].dtype}, want float32"
        assert baseline[name].dtype == torch.float32
        atol = torch.finfo(dtype).eps / 8 * exact.abs().max().item()
        fast_error, ref_error = _error(fast[name], exact), _error(baseline[name], exact)
        assert fast_error <= 2 * ref_error + atol, (
            f"{name}: fast error {fast_error:.3g} > 2 x reference error {ref_error:.3g} + {atol:.3g}"
        )


@pytest.mark.parametrize("model_name", list(MODELS))
def test_forget_bf16_model_stays_bf16(model_name):
    """The shift w_after - w_before obeys the same 2x rule against a float64 forget."""
    model, _, _, codes = _problem(model_name, torch.bfloat16)
    kwargs = dict(lambda1=1e-1, lambda2=10.0)
    fast = mf.forget(model, codes, [0], **kwargs)
    baseline = reference.forget(model, codes, [0], **kwargs)
    truth = reference.forget(copy.deepcopy(model).double(), codes, [0], **kwargs)
    assert fast.sign == baseline.sign == truth.sign
    changed = False
    for (name, original), p, q, exact in zip(
        model.named_parameters(), fast.model.parameters(), baseline.model.parameters(), truth.model.parameters()
    ):
        assert p.dtype == torch.bfloat16, f"{name} is {p.dtype} after forgetting"
        assert torch.isfinite(p).all(), f"{name} is not finite after forgetting"
        changed |= not torch.equal(p, original)
        # The result is stored in bf16: one rounding of the shifted weight is unavoidable (and
        # a shift of lambda1 * eta ~ 7 makes that rounding 0.03, larger than the Fisher's error).
        atol = torch.finfo(torch.bfloat16).eps * exact.abs().max().item()
        fast_error, ref_error = _error(p, exact), _error(q, exact)
        assert fast_error <= 2 * ref_error + atol, (
            f"{name}: fast forget error {fast_error:.3g} > 2 x reference error {ref_error:.3g} + {atol:.3g}"
        )
    assert changed, "forgetting left every parameter as it was"
