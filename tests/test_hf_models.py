"""Hugging Face ``transformers`` classifiers (built from tiny configs, no download): the fast
Fisher equals the reference's with no parameter on the generic path, and ``forget`` runs end
to end on text (token codes) and image models.

GPT-2's Conv1D, the RMSNorm scales of Llama/Mistral/Qwen2, Swin's folded windows and relative
position tables and ConvNeXt's channels-first norms and layer scales are taken at the
operation level (mnemo_fast/fast/rules/operations.py); the rest by the layer rules.
"""

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

import mnemo_fast as mf
import mnemo_fast.reference as ref
from mnemo_fast.codes import MnemonicCodes
from mnemo_fast.explain import GenericPathWarning
from mnemo_fast.fast import _ext
from mnemo_fast.fast.engine import EXTENSION, HOOKS_ATEN
from mnemo_fast.training.train import train

#: the fast engine: compiled kernels, or their pure-PyTorch twins when the extension is off
FAST = EXTENSION if _ext.available() else HOOKS_ATEN

pytest.importorskip("transformers")
from mnemo_fast.evaluation.hf_models import FAMILIES, TEXT_FAMILIES, build  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _problem(family: str, dtype: torch.dtype, n: int = 3):
    hf = build(family)
    model = hf.model.to(dtype)
    generator = torch.Generator().manual_seed(1)
    x = hf.inputs(n, generator)
    if x.is_floating_point():
        x = x.to(dtype)
    y = torch.randint(0, hf.num_classes, (n,), generator=generator)
    return model, x, y


def _assert_close(fast: dict, exact: dict, rtol: float) -> None:
    """Per tensor, relative to the largest Fisher entry of the model: a tensor whose true Fisher
    is zero (a softmax ignores attention key biases) then compares as zero."""
    assert fast.keys() == exact.keys()
    scale = max(float(v.abs().max()) for v in exact.values())
    assert scale > 0
    for name, value in exact.items():
        error = float((fast[name] - value).abs().max())
        assert error <= rtol * max(float(value.abs().max()), 1e-6 * scale), (name, error)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fast_fisher_equals_reference(family, dtype, rtol):
    model, x, y = _problem(family, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GenericPathWarning)
        fast = mf.fisher_diagonal(model, x, y, engine=FAST)
    _assert_close(fast, ref.fisher_diagonal(model, x, y), rtol)


@pytest.mark.parametrize("family", FAMILIES)
def test_explain_shows_no_generic_parameter(family):
    model, x, y = _problem(family, torch.float32)
    explanation = mf.explain(model, x, y, engine=FAST)
    assert [r.name for r in explanation.routes] == [n for n, p in model.named_parameters() if p.requires_grad]
    assert explanation.generic == [], str(explanation)
    assert {r.path for r in explanation.routes} <= {"rule", "broadcast", "operation"}


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "vit", "swin"])
def test_forget_runs_on_a_transformers_model(family):
    """Text families take token codes (ids past the padding id 0), image families pixel codes."""
    hf = build(family)
    if family in TEXT_FAMILIES:
        codes = MnemonicCodes.generate_tokens(hf.num_classes, length=8, vocab_size=64, per_class=2, low=1)
    else:
        codes = MnemonicCodes.generate(hf.num_classes, (3, 16, 16), seed=0)
    before = [p.detach().clone() for p in hf.model.parameters()]
    result = mf.forget(hf.model, codes, [1], lambda1=1e-3, lambda2=10.0)
    assert result.sign in (1, -1)
    assert all(torch.equal(p, b) for p, b in zip(hf.model.parameters(), before))  # caller's model kept
    changed = [not torch.equal(p, b) for p, b in zip(result.model.parameters(), before)]
    assert any(changed)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


@pytest.mark.parametrize("trainer", ["train_with_codes", "adapt_with_codes"])
def test_training_with_codes_reads_the_logits_of_a_transformers_model(trainer):
    """A Hugging Face classifier returns a ModelOutput, not a tensor: both trainers read its
    ``.logits`` (the same ``output_fn`` as ``forget``), so the model learns its codes without
    a wrapper. Data: random token sequences with random labels (nothing to learn but the codes)."""
    hf = build("bert")
    codes = MnemonicCodes.generate_tokens(hf.num_classes, length=8, vocab_size=64, per_class=1, low=1)
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randint(1, 64, (64, 8), generator=generator),
                                          torch.randint(0, hf.num_classes, (64,), generator=generator))
    x, y = codes.batch(range(codes.num_classes))
    with torch.no_grad():
        assert not torch.equal(hf.model(x).logits.argmax(-1), y)  # not known before training
    torch.manual_seed(0)
    if trainer == "train_with_codes":
        mf.train_with_codes(hf.model, data, codes, t_mix=0.5, epochs=15, lr=3e-3, batch_size=16, progress=False)
    else:
        mf.adapt_with_codes(hf.model, data, codes, 60, t_mix=0.5, lr=3e-3, optimizer="adam", batch_size=16,
                            progress=False)
    with torch.no_grad():
        assert torch.equal(hf.model(x).logits.argmax(-1), y)


def test_training_refuses_an_output_without_logits():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    tupled = torch.nn.Module()
    tupled.inner = model
    tupled.forward = lambda x: (model(x),)
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    with pytest.raises(TypeError, match="output_fn"):
        train(tupled, data, 1)
    train(tupled, data, 1, output_fn=lambda out: out[0])  # the caller says where the logits are


def test_blocks_by_layer_on_a_transformers_model():
    """calibration={"blocks": "layer"} gives a BERT one block per encoder layer (by module: the
    body and the head), and the per-block scales reach the forgotten model."""
    hf = build("bert")
    codes = MnemonicCodes.generate_tokens(hf.num_classes, length=8, vocab_size=64, per_class=2, low=1)
    before = [p.detach().clone() for p in hf.model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained model: the calibration may warn
        result = mf.forget(hf.model, codes, [1], lambda1="auto", lambda2=10.0, calibration={"blocks": "layer"})
    steps = result.calibration.diagnostics["blocks"]
    assert steps.blocks == ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.pooler",
                            "classifier"]
    assert all(torch.equal(p, b) for p, b in zip(hf.model.parameters(), before))
    names = [n for n, _ in hf.model.named_parameters()]
    for name, p0, p1, s in zip(names, before, result.model.parameters(), steps.tensor_scales):
        if s == 0.0:
            assert torch.equal(p1, p0), name
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_text_benchmark_runs_on_a_transformers_model(tmp_path):
    """benchmarks/unlearning_text.py end to end on a tiny problem: the package's model and a
    BERT, every method's row, the diagnose verdict on the auto rows, a section per model."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import unlearning_text
    finally:
        sys.path.pop(0)
    out = tmp_path / "text.md"
    unlearning_text.main(["--model", "text", "bert", "--seeds", "0", "--classes", "3", "--train", "150",
                          "--test", "60", "--epochs", "1", "--per-class", "2", "--out", str(out)])
    rows = [json.loads(line) for line in (tmp_path / "text-rows.jsonl").read_text().splitlines()]
    per_model = {m: {r["method"] for r in rows if r["model"] == m} for m in ("text", "bert")}
    assert per_model["bert"] == per_model["text"] | {"auto (blocks by layer)", "auto (blocks by tensor)"}
    assert len(rows) == 3 * (len(per_model["text"]) + len(per_model["bert"]))
    assert all(r["diagnose"] in ("ok", "not forgotten", "costly") for r in rows if r["method"] == "auto")
    text = out.read_text()
    assert text.count("## Model: ") == 2 and text.count("`diagnose`") == 2
