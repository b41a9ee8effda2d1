"""Per-block steps, held-out scoring (mnemo_fast.calibration.blocks) and the repair extension (mnemo_fast.training.repair)."""

import copy

import pytest
import torch

import mnemo_fast as mf
from mnemo_fast import engines
from mnemo_fast.calibration.blocks import BlockSteps, block_names, refinement_options, split_codes
from mnemo_fast.calibration import calibrate_session
from mnemo_fast.evaluation import models
from mnemo_fast.training.repair import repair
from mnemo_fast.session import CandidateSession
from mnemo_fast.validation import UnlearningError


@pytest.fixture(scope="module")
def cnn_k2(digits_split):
    """The package's small CNN on digits, trained 6 epochs with 2 codes per class (seconds)."""
    train, _ = digits_split
    torch.manual_seed(0)
    codes = mf.MnemonicCodes.generate(10, (1, 8, 8), per_class=2, seed=0)
    model = models.build("cnn", (1, 8, 8), 10)
    mf.train_with_codes(model, train, codes, 0.2, 6, seed=0, progress=False)
    return model.eval(), codes


@pytest.fixture
def mlp_k1():
    """An untrained MLP and one code per class: enough for the errors raised before any work."""
    torch.manual_seed(0)
    return models.build("mlp", (1, 8, 8), 10), mf.MnemonicCodes.generate(10, (1, 8, 8), seed=0)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# ---- options -----------------------------------------------------------------------------------

def test_refinement_options_split_and_check():
    search, refine = refinement_options({"depth": 0.5, "blocks": True, "heldout": 1})
    assert search == {"depth": 0.5} and refine == {"blocks": "module", "heldout": 1}
    assert refinement_options({"blocks": False, "heldout": False}) == ({}, {})
    assert refinement_options(None) == ({}, {})
    with pytest.raises(UnlearningError, match="blocks"):
        refinement_options({"blocks": "layers"})
    with pytest.raises(UnlearningError, match="heldout"):
        refinement_options({"heldout": 0})
    with pytest.raises(TypeError, match="heldout"):
        refinement_options({"heldout": 1.5})


def test_refinement_options_default_blocks():
    """forget passes blocks="module" as the default; a blocks key (False, None) overrides it."""
    assert refinement_options(None, "module") == ({}, {"blocks": "module"})
    assert refinement_options({"depth": 0.5}, "module") == ({"depth": 0.5}, {"blocks": "module"})
    assert refinement_options({"blocks": False}, "module") == ({}, {})
    assert refinement_options({"blocks": None, "heldout": 1}, "module") == ({}, {"heldout": 1})
    assert refinement_options({"blocks": "tensor"}, "module") == ({}, {"blocks": "tensor"})


def test_block_names_group_by_top_level_child_or_tensor():
    names = ["0.weight", "0.bias", "3.weight", "8.weight", "8.bias"]
    assert block_names(names, "module") == (["0", "3", "8"], [0, 0, 1, 2, 2])
    assert block_names(names, "tensor") == (names, [0, 1, 2, 3, 4])
    wrapped = ["net.0.weight", "net.0.bias", "net.2.weight"]  # one wrapper: group one level down
    assert block_names(wrapped, "module") == (["net.0", "net.2"], [0, 0, 1])
    assert block_names(["weight", "bias"], "module") == (["weight", "bias"], [0, 1])


def test_block_names_by_layer_split_a_stack_into_its_layers():
    """A Hugging Face BERT's parameter names: by module a body and a head; by layer the
    embeddings, each encoder layer, the pooler and the head."""
    names = ["bert.embeddings.word_embeddings.weight", "bert.embeddings.LayerNorm.weight",
             "bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.output.dense.bias",
             "bert.encoder.layer.1.attention.self.query.weight", "bert.encoder.layer.10.output.dense.bias",
             "bert.pooler.dense.weight", "classifier.weight", "classifier.bias"]
    assert block_names(names, "module") == (["bert", "classifier"], [0] * 7 + [1, 1])
    assert block_names(names, "layer") == (
        ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.10",
         "bert.pooler", "classifier"], [0, 0, 1, 1, 2, 3, 4, 5, 5])
    # nested stacks: the first number names the block (a Swin stage); a parameter beside a
    # stack, in a module that holds it, is its own block; no stack at all: the top-level children
    nested = ["enc.stages.0.blocks.1.weight", "enc.stages.1.blocks.0.weight", "enc.scale", "head.weight"]
    assert block_names(nested, "layer") == (["enc.stages.0", "enc.stages.1", "enc.scale", "head"], [0, 1, 2, 3])
    flat = ["0.weight", "0.bias", "3.weight", "8.weight", "8.bias"]  # nn.Sequential: its children
    assert block_names(flat, "layer") == block_names(flat, "module")
    plain = ["conv.weight", "conv.bias", "fc.weight", "cls"]
    assert block_names(plain, "layer") == (["conv", "fc", "cls"], [0, 0, 1, 2])


def test_split_codes_and_its_errors():
    codes = mf.MnemonicCodes.generate(3, (1, 4, 4), per_class=4, seed=0)
    fisher, scoring = split_codes(codes, True)
    assert fisher.per_class == 2 and scoring.per_class == 2
    assert torch.equal(torch.cat([fisher.tensor, scoring.tensor], 1), codes.tensor)
    fisher, scoring = split_codes(codes, 3)
    assert (fisher.per_class, scoring.per_class) == (1, 3)
    with pytest.raises(UnlearningError, match="at least one"):
        split_codes(codes, 4)
    with pytest.raises(UnlearningError, match="at least 2 codes per class"):
        split_codes(mf.MnemonicCodes.generate(3, (1, 4, 4), seed=0), True)


@pytest.mark.parametrize("calibration, error", [
    ({"heldout": True}, "at least 2 codes per class"),   # K = 1
    ({"blocks": "layers"}, "blocks"),
    ({"heldout": -1}, "heldout"),
])
def test_bad_refinements_raise_before_the_model_is_touched(mlp_k1, calibration, error):
    model, codes = mlp_k1
    before = _params(model)
    with pytest.raises(UnlearningError, match=error):
        mf.forget(model, codes, [0], lambda1="auto", lambda2=10.0, calibration=calibration, inplace=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_refinements_need_auto_and_blocks_need_shift(mlp_k1):
    model, codes = mlp_k1
    with pytest.raises(UnlearningError, match="lambda1='auto'"):
        mf.forget(model, codes, [0], lambda1=1e-3, lambda2=10.0, calibration={"blocks": True})
    with pytest.raises(UnlearningError, match="mode='shift'"):
        mf.forget(model, codes, [0], lambda1="auto", lambda2=10.0, mode="gaussian", calibration={"blocks": True})


# ---- held-out scoring --------------------------------------------------------------------------

def test_heldout_is_the_fisher_of_some_codes_scored_on_the_others(cnn_k2):
    """forget(calibration={"heldout": True}) == a session on the first code of each class whose
    search is scored on the second (what the sweep measured outside the package)."""
    model, codes = cnn_k2
    fisher_codes, scoring_codes = split_codes(codes, True)
    engine = engines.resolve(None)
    manual = copy.deepcopy(model)
    with engines.forwards(engine, manual):
        session = CandidateSession(manual, fisher_codes, [4], engine=engine)
        session.score_on(scoring_codes, [4])
        assert session.inputs.shape[0] == 10 and int(session.is_forget.sum()) == 1
        expected = calibrate_session(session, [10.0])
    result = mf.forget(model, codes, [4], lambda1="auto", lambda2=10.0, calibration={"heldout": True})
    assert result.lambda1 == expected.lambda1 and result.sign == expected.sign
    plain = mf.forget(model, codes, [4], lambda1="auto", lambda2=10.0)
    assert plain.calibration.trials != result.calibration.trials  # other codes, other statistics
    # the reported code accuracy is on the held-out codes
    after = mf.code_accuracy(result.model, scoring_codes, [4])
    assert result.code_accuracy_after == after


# ---- per-block steps ---------------------------------------------------------------------------

@pytest.mark.parametrize("by", ["module", "layer", "tensor"])
def test_blocks_scale_the_global_step_per_block(cnn_k2, by):
    model, codes = cnn_k2
    source = _params(model)
    plain = mf.forget(model, codes, [4], lambda1="auto", lambda2=10.0, calibration={"blocks": False})
    result = mf.forget(model, codes, [4], lambda1="auto", lambda2=10.0, calibration={"blocks": by})
    assert all(torch.equal(a, b) for a, b in zip(source, model.parameters()))  # the caller's model: read only
    steps = result.calibration.diagnostics["blocks"]
    assert isinstance(steps, BlockSteps)
    names = [n for n, _ in model.named_parameters()]
    assert len(steps.tensor_scales) == len(names)
    assert len(steps.blocks) == (len(names) if by == "tensor" else 6)  # the CNN's 6 layers with parameters
    assert (result.lambda1, result.lambda2, result.sign) == (plain.lambda1, plain.lambda2, plain.sign)
    for p0, p_plain, p_blocks, s in zip(source, plain.model.parameters(), result.model.parameters(),
                                        steps.tensor_scales):
        torch.testing.assert_close(p_blocks - p0, s * (p_plain - p0), atol=1e-6, rtol=1e-4)
    # never worse than the global step on the codes: the forget side holds, retained margins no lower
    start, end = steps.start, steps.end
    if start.forget_ok:
        assert end.forget_ok
    assert end.retain_margin_ratio >= start.retain_margin_ratio or end.forget_ok and not start.forget_ok
    assert result.code_accuracy_after == mf.code_accuracy(result.model, codes, [4])


def test_auto_defaults_to_blocks_by_module(cnn_k2):
    """forget(lambda1="auto") is calibration={"blocks": "module"} (bit for bit); {"blocks": False}
    is the global step alone, as before the default changed; Gaussian mode has no block steps."""
    model, codes = cnn_k2
    default = mf.forget(model, codes, [4], lambda1="auto", lambda2=10.0)
    blocks = mf.forget(model, codes, [4], lambda1="auto", lambda2=10.0, calibration={"blocks": "module"})
    plain = mf.forget(model, codes, [4], lambda1="auto", lambda2=10.0, calibration={"blocks": False})
    steps = default.calibration.diagnostics["blocks"]
    assert steps.scales == blocks.calibration.diagnostics["blocks"].scales and len(steps.blocks) == 6
    assert all(torch.equal(a, b) for a, b in zip(default.model.parameters(), blocks.model.parameters()))
    assert "blocks" not in plain.calibration.diagnostics
    assert (plain.lambda1, plain.lambda2, plain.sign) == (default.lambda1, default.lambda2, default.sign)
    if any(s != 1.0 for s in steps.scales):
        assert not all(torch.equal(a, b) for a, b in zip(default.model.parameters(), plain.model.parameters()))
    gaussian = mf.forget(model, codes, [4], lambda1="auto", lambda2=10.0, mode="gaussian", draws=1,
                         generator=torch.Generator().manual_seed(0))
    assert "blocks" not in gaussian.calibration.diagnostics


def test_blocks_leave_the_session_restored_and_are_deterministic(cnn_k2):
    model, codes = cnn_k2
    a = mf.forget(model, codes, [2], lambda1="auto", lambda2=10.0, calibration={"blocks": True})
    b = mf.forget(model, codes, [2], lambda1="auto", lambda2=10.0, calibration={"blocks": True})
    assert a.calibration.diagnostics["blocks"].scales == b.calibration.diagnostics["blocks"].scales
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))


# ---- repair (extension) ------------------------------------------------------------------------

def test_repair_keeps_forget_codes_wrong_and_lowers_the_retained_loss(cnn_k2):
    model, codes = cnn_k2
    result = mf.forget(model, codes, [4], lambda1="auto", lambda2=10.0)
    fixed = repair(result.model, codes, [4], steps=5, lr=1e-3)
    assert fixed.model is result.model and 0 < fixed.steps <= 5 or fixed.stopped == "forget"
    assert mf.code_accuracy(fixed.model, codes, [4]).forget == 0.0
    if fixed.steps >= 2:
        assert fixed.losses[-1] < fixed.losses[0]
    untouched = _params(result.model)
    none = repair(result.model, codes, [4], steps=0)
    assert none.steps == 0 and all(torch.equal(a, b) for a, b in zip(untouched, result.model.parameters()))


def test_repair_undoes_a_step_that_brings_a_forget_code_back(cnn_k2):
    """On a model that still knows the forget class, the first step keeps a forget code right:
    it is undone and the repair stops, leaving the model exactly as it was."""
    model, codes = cnn_k2
    copied = copy.deepcopy(model)
    before = _params(copied)
    fixed = repair(copied, codes, [4], steps=3, lr=1e-3)
    assert (fixed.stopped, fixed.steps, fixed.losses) == ("forget", 0, [])
    assert all(torch.equal(a, b) for a, b in zip(before, copied.parameters()))


def test_repair_distill_and_errors(cnn_k2):
    model, codes = cnn_k2
    result = mf.forget(model, codes, [4], lambda1="auto", lambda2=10.0)
    fixed = repair(result.model, codes, [4], steps=3, loss="distill", original=model)
    assert mf.code_accuracy(fixed.model, codes, [4]).forget == 0.0
    with pytest.raises(UnlearningError, match="original"):
        repair(result.model, codes, [4], loss="distill")
    with pytest.raises(UnlearningError, match="loss"):
        repair(result.model, codes, [4], loss="mse")
    with pytest.raises(UnlearningError, match="must remain"):
        repair(result.model, codes, list(range(10)))
    with pytest.raises(UnlearningError):
        repair(result.model, codes, [4], steps=-1)
    with pytest.raises(UnlearningError):
        repair(result.model, codes, [4], lr=0.0)


# ---- the sweep's methods -----------------------------------------------------------------------

def test_sweep_refined_methods_call_the_package(cnn_k2):
    """benchmarks/unlearning_sweep.py's auto-heldout, auto-blocks*, auto-repair* rows come from
    forget(calibration=...) and repair(); the caller's model is left as it was."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import unlearning_sweep as sweep

    model, codes = cnn_k2
    before = _params(model)
    for method in sweep.REFINED:
        out, info = sweep.refined(model, codes, 4, method)
        assert out is not model and info["sign"] in (1, -1), method
        assert ("scales" in info) == ("blocks" in method), method
        assert ("repair_steps" in info) == ("repair" in method), method
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    heldout, _ = sweep.refined(model, codes, 4, "auto-heldout")
    direct = mf.forget(model, codes, [4], lambda1="auto", lambda2=10.0,
                       calibration={"heldout": True, "blocks": False}).model
    assert all(torch.equal(a, b) for a, b in zip(heldout.parameters(), direct.parameters()))


def test_blocks_with_the_lambda1_search_apply_the_sign_they_were_searched_for(cnn_k2):
    """search="lambda1" leaves the sign to forget; with blocks, forget applies the blocks' sign."""
    model, codes = cnn_k2
    result = mf.forget(model, codes, [4], lambda1="auto", lambda2=10.0,
                       calibration={"search": "lambda1", "blocks": True})
    steps = result.calibration.diagnostics["blocks"]
    assert result.calibration.sign is None and result.sign == steps.sign


# ---- the block search's trials on input layers -------------------------------------------------

@pytest.fixture(scope="module")
def mlp_short(digits_mlp_with_codes):
    """The paper's MLP on digits, 3 epochs with codes (t_mix 0.2): its block search shrinks a block."""
    model, codes = digits_mlp_with_codes(0.2, 3)
    return model.eval(), codes


def test_block_search_chooses_the_same_with_and_without_the_input_layer_shortcut(mlp_short, monkeypatch):
    """On the MLP the block search scores the input layer as A + s g B (never writing its
    weight): the same scales, trials and history as scoring written parameters, statistics
    equal up to float rounding, and the same forgotten model (applied the plain way)."""
    from mnemo_fast import session as session_module

    model, codes = mlp_short
    results = []
    for shortcut in (True, False):
        if not shortcut:
            monkeypatch.setattr(session_module._InputLayers, "find", staticmethod(lambda session: None))
        results.append([mf.forget(model, codes, [c], lambda1="auto", lambda2=10.0) for c in (1, 7)])
    rescaled = 0
    for fast, slow in zip(*results):
        a, b = fast.calibration.diagnostics["blocks"], slow.calibration.diagnostics["blocks"]
        assert (a.blocks, a.scales, a.trials, [h[:2] for h in a.history]) == \
            (b.blocks, b.scales, b.trials, [h[:2] for h in b.history])
        for x, y in ((a.start, b.start), (a.end, b.end)):
            assert (x.forget_ok, x.retain_ok) == (y.forget_ok, y.retain_ok)
            assert x.retain_margin_ratio == pytest.approx(y.retain_margin_ratio, rel=1e-4, abs=1e-5)
            assert x.forget_depth == pytest.approx(y.forget_depth, rel=1e-4, abs=1e-5)
        assert (fast.lambda1, fast.sign, fast.candidate_scores) == (slow.lambda1, slow.sign, slow.candidate_scores)
        assert all(torch.equal(p, q) for p, q in zip(fast.model.parameters(), slow.model.parameters()))
        rescaled += any(s != 1.0 for s in a.scales)
    assert rescaled, "no block was rescaled: the comparison would be vacuous"
