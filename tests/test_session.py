"""The candidate session, engine selection and the import layout (mnemo_fast.session, engines)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mnemo_fast as mf
import mnemo_fast.reference as ref
from mnemo_fast import engines
from mnemo_fast.evaluation import models
from mnemo_fast.calibration import Calibration, CalibrationWarning, calibrate
from mnemo_fast.fast import _ext
from mnemo_fast.fast.engine import EXTENSION, HOOKS_ATEN
from mnemo_fast.reference.engine import REFERENCE
from mnemo_fast.session import CandidateSession

ROOT = Path(__file__).resolve().parents[1]


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def _tiny():
    torch.manual_seed(0)
    model = models.MLP((1, 4, 4), 4, hidden=6)
    codes = mf.MnemonicCodes.generate(4, (1, 4, 4), per_class=2, seed=0)
    return model, codes


class Counting:
    """An engine that counts the Fisher passes of the engine it wraps."""

    def __init__(self, inner):
        self.inner, self.fisher_calls = inner, 0

    def sum_squared_grads(self, *args, **kwargs):
        self.fisher_calls += 1
        return self.inner.sum_squared_grads(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_reference_namespace_never_loads_the_extension():
    done = _fresh("""
        import sys, torch
        import mnemo_fast.reference as mf
        from mnemo_fast.evaluation import models
        torch.manual_seed(0)
        model = models.MLP((1, 4, 4), 4, hidden=6)
        codes = mf.MnemonicCodes.generate(4, (1, 4, 4), seed=0)
        x, y = codes.batch(range(4))
        mf.fisher_diagonal(model, x, y)
        f, r = mf.class_fishers(model, codes, [0])
        mf.perturb_(model, mf.perturbation(f, r, 1e-3, 10), 1)
        acc = mf.code_accuracy(model, codes, [0])
        result = mf.forget(model, codes, [0], lambda1=1e-3, lambda2=10)
        mf.evaluate(model, torch.utils.data.TensorDataset(x, y), [0])
        assert result.backend == "reference" and mf.backend() == "reference", result.backend
        assert "mnemo_fast._C" not in sys.modules, "the reference namespace loaded the compiled extension"
        print("ok")
    """)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_low_level_engines_do_not_pull_in_the_public_api():
    done = _fresh("""
        import sys
        import mnemo_fast.reference.engine, mnemo_fast.engines
        assert "mnemo_fast.api" not in sys.modules, sorted(m for m in sys.modules if m.startswith("mnemo_fast"))
        print("ok")
    """)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_auto_lambda1_computes_the_fisher_pair_once():
    model, codes = _tiny()
    counting = Counting(REFERENCE)
    result = mf.forget(model, codes, [1], lambda1="auto", lambda2=10.0, engine=counting)
    assert counting.fisher_calls == 2  # f_F and f_R, shared by the calibration and the choice
    assert isinstance(result.calibration, Calibration) and result.lambda1 == result.calibration.lambda1
    separate = calibrate(model, codes, [1], lambda2=10.0, engine=REFERENCE)
    assert separate.lambda1 == result.calibration.lambda1 and separate.lambda2 == result.lambda2


def test_calibration_scores_in_chunks():
    model, codes = _tiny()
    sizes = []
    handle = model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    calibrate(model, codes, [1], chunk_size=3, engine=REFERENCE, steps=2)
    handle.remove()
    assert sizes and max(sizes) <= 3


def test_unreached_criterion_warns_and_is_not_feasible():
    model, codes = _tiny()
    before = [p.detach().clone() for p in model.parameters()]
    # search="scale" (the default): the best-effort step among the trials, never past the range
    # (this untrained model misclassifies some retained code before any step: every step
    # "breaks" the retain side, so the smallest step is taken)
    with pytest.warns(CalibrationWarning, match="no trial .* reached the forgetting criterion.*the smallest step tried"):
        cal = calibrate(model, codes, [1], lambda1_range=(1e-12, 1e-11), engine=REFERENCE)
    assert not cal.feasible and not cal.forget_reached and cal.diagnostics["best_effort"]
    assert cal.chosen is not None and not cal.chosen.retain_ok and not cal.chosen.forget_ok
    assert (cal.lambda1, cal.lambda2, cal.sign) == (cal.chosen.lambda1, cal.chosen.lambda2, cal.chosen.sign)
    assert cal.lambda1 == 1e-12
    assert cal.diagnostics["feasible"] is False and cal.trials == cal.diagnostics["trials"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # search="lambda1": its lambda2 is fixed and bounds the step, so the top of the range
    with pytest.warns(CalibrationWarning, match="top of the range"):
        first = calibrate(model, codes, [1], lambda1_range=(1e-12, 1e-11), search="lambda1", engine=REFERENCE)
    assert first.lambda1 == 1e-11 and not first.forget_reached and first.chosen is None
    assert not first.diagnostics["best_effort"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("engine", [
    pytest.param(REFERENCE, id="reference"), pytest.param(HOOKS_ATEN, id="hooks-aten"),
    pytest.param(EXTENSION, id="extension", marks=pytest.mark.skipif(not _ext.available(), reason="extension disabled or not built")),
])
def test_before_accuracy_is_the_models(engine):
    """The code accuracy before forgetting, read off the Fisher's forwards where the engine runs
    plain ones, equals a separate scoring pass."""
    model, codes = _tiny()
    result = mf.forget(model, codes, [2], lambda1=1e-2, lambda2=10.0, engine=engine)
    assert result.code_accuracy_before == ref.code_accuracy(model, codes, [2])


def test_hooks_engine_gives_the_before_logits_without_a_forward_of_their_own():
    model, codes = _tiny()
    session = CandidateSession(model, codes, [2], engine=HOOKS_ATEN)
    assert session.logits_before is not None
    torch.testing.assert_close(session.logits_before, session.logits())


def test_session_restores_after_candidates():
    model, codes = _tiny()
    before = [p.detach().clone() for p in model.parameters()]
    session = CandidateSession(model, codes, [0], engine=REFERENCE)
    session.shift(1e-1, 10.0, -1)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    session.restore()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_device_without_kernels_falls_back_to_the_hooks_engine(monkeypatch):
    """Where the compiled kernels do not run, the Fisher takes the layer rules on ATen ops,
    not torch.func (shown on the CPU by pretending the kernels do not run here)."""
    monkeypatch.setattr(EXTENSION, "runs_on", lambda device: False)
    calls = []
    real = HOOKS_ATEN.sum_squared_grads
    monkeypatch.setattr(HOOKS_ATEN, "sum_squared_grads", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(REFERENCE, "sum_squared_grads", lambda *a, **k: pytest.fail("fell back to torch.func"))
    assert engines.select(EXTENSION, device=torch.device("cpu")) is HOOKS_ATEN
    assert EXTENSION.backend_for(torch.device("cpu")) == "hooks-aten"
    model, codes = _tiny()
    x, y = codes.batch(range(4))
    EXTENSION.sum_squared_grads(model.eval(), x, y)
    assert calls


def test_select_is_the_one_place():
    assert engines.select(REFERENCE) is REFERENCE
    assert engines.select(None) is engines.default_engine()
    assert engines.select(REFERENCE, sharded=True) is HOOKS_ATEN  # torch.func cannot run on shards
    assert engines.select(EXTENSION, sharded=True) is EXTENSION
    for engine in (REFERENCE, HOOKS_ATEN, EXTENSION):
        assert isinstance(engine, engines.Engine)


@pytest.mark.parametrize("engine", [pytest.param(REFERENCE, id="reference"), pytest.param(HOOKS_ATEN, id="hooks-aten")])
def test_a_copy_session_takes_the_fisher_on_its_source(engine):
    """With ``source`` (forget, inplace=False) the Fisher's forwards run on the source model:
    the same Fisher pair and before-logits as on the copy, the source left as it was (values,
    requires_grad flags, modes, no hooks left), the candidates applied to the copy only."""
    import copy

    model, codes = _tiny()
    model.train()
    model[1].bias.requires_grad_(False)
    target = copy.deepcopy(model)
    before = [(p.detach().clone(), p.requires_grad) for p in model.parameters()]
    on_copy = CandidateSession(copy.deepcopy(model), codes, [2], engine=engine)
    session = CandidateSession(target, codes, [2], engine=engine, source=model)
    for a, b in zip(session.forget_fisher + session.remain_fisher, on_copy.forget_fisher + on_copy.remain_fisher):
        assert torch.equal(a, b)
    assert (session.logits_before is None) == (on_copy.logits_before is None)
    if session.logits_before is not None:
        assert torch.equal(session.logits_before, on_copy.logits_before)
    session.shift(1e-1, 10.0, -1)
    assert all(torch.equal(p, b) and p.requires_grad == g for p, (b, g) in zip(model.parameters(), before))
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert any(not torch.equal(p, b) for p, (b, _) in zip(target.parameters(), before))


def test_code_logits_in_eval_mode_whatever_the_mode_and_chunks():
    """code_logits scores in eval mode (dropout off) and restores the modes; one chunk or
    several give the same logits."""
    from mnemo_fast.session import code_logits

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Dropout(0.9), torch.nn.Linear(7, 3)).train()
    x = torch.randn(6, 5)
    with torch.no_grad():
        expected = model.eval()(x)
    model.train()
    got = code_logits(model, x)
    assert torch.equal(got, expected) and all(m.training for m in model.modules())
    model.eval()
    for chunk in (None, 6, 10):
        assert torch.equal(code_logits(model, x, chunk), expected), chunk
    for chunk in (4, 1):  # other batch sizes: the GEMMs may round differently
        torch.testing.assert_close(code_logits(model, x, chunk), expected)
    assert not any(m.training for m in model.modules())


def test_calibration_trial_statistics_are_the_masks():
    """A trial's statistics, read in one transfer, equal the same quantities taken with the
    forget/retain masks one at a time."""
    from mnemo_fast.calibration.search import _margins, _Prober

    model, codes = _tiny()
    session = CandidateSession(model, codes, [1, 2], engine=REFERENCE)
    prober = _Prober(session, lambda t: t, "margin")
    for lambda1, sign in ((1e-3, 1), (1e-1, -1), (3.0, 1)):
        trial = prober._one(lambda1, 10.0 * lambda1 / 1e-3, sign)
        margin, prob = _margins(session.logits(), session.labels)
        f, r = session.is_forget, ~session.is_forget
        correct = margin > 0
        assert trial.forget_max_margin == margin[f].max().item()
        assert trial.forget_max_prob == prob[f].max().item()
        assert trial.forget_depth == (-margin[f] / prober.margin0[f].clamp_min(1e-6)).min().item()
        assert trial.retain_margin_ratio == (margin[r] / prober.margin0[r].clamp_min(1e-6)).median().item()
        assert trial.retain_all_correct == bool((margin[r] > 0).all())
        assert trial.score == correct[r].float().mean().item() + (1.0 - correct[f].float().mean().item())
    session.restore()
