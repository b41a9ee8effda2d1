"""Lambda calibration from the codes alone (mnemo_fast.calibration)."""

import copy
import warnings

import pytest
import torch

import mnemo_fast as mf
from mnemo_fast.calibration import Calibration, CalibrationWarning, calibrate
from mnemo_fast.validation import UnlearningError


@pytest.fixture(scope="module")
def setup(trained_digits_mlp, digits_split):
    """The conftest's session model (MLP on digits, 40 epochs with codes): trained once."""
    model, codes = trained_digits_mlp
    train, test = digits_split
    return model, codes, test


def test_parameters_untouched_and_no_model_copy(setup, monkeypatch):
    model, codes, _ = setup
    before = [p.detach().clone() for p in model.parameters()]

    def no_copy(*args, **kwargs):
        raise AssertionError("calibrate must not copy the model")

    monkeypatch.setattr(copy, "deepcopy", no_copy)
    cal = calibrate(model, codes, [3])
    assert isinstance(cal, Calibration)
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [0, 7])
def test_choice_forgets_the_codes_and_keeps_the_rest(setup, cls):
    model, codes, test = setup
    cal = calibrate(model, codes, [cls])
    assert cal.diagnostics["forget_reached"]
    result = mf.forget(model, codes, [cls], lambda1=cal.lambda1, lambda2=cal.lambda2)
    assert result.code_accuracy_after.forget == 0.0
    assert result.sign == cal.diagnostics["chosen"].sign
    # the trained model can forget either class cleanly: no `if feasible` that could skip this
    assert cal.diagnostics["feasible"] and cal.feasible
    assert result.code_accuracy_after.retain == 1.0
    base = mf.evaluate(model, test, [cls])
    after = mf.evaluate(result.model, test, [cls])
    assert after.forget_accuracy <= 0.1
    assert after.retain_accuracy >= base.retain_accuracy - 0.03


def test_deeper_criterion_needs_larger_lambda(setup):
    model, codes, _ = setup
    shallow = calibrate(model, codes, [2], depth=0.0, max_forget_prob=1.0)
    deep = calibrate(model, codes, [2], depth=1.0)
    assert shallow.lambda1 <= deep.lambda1 * 1.0001


def test_bisection_brackets_the_threshold(setup):
    model, codes, _ = setup
    cal = calibrate(model, codes, [5], steps=6)
    trials = cal.diagnostics["trials"]
    failing = [t.lambda1 for t in trials if not t.forget_ok]
    # the chosen lambda1 meets the criterion; the largest failing trial below it is within 10^(1/64)
    below = [l for l in failing if l < cal.lambda1]
    assert below, "no failing trial below the choice: nothing was bracketed"
    assert cal.lambda1 / max(below) <= 10 ** (1 / 64) * 1.0001
    assert cal.diagnostics["chosen"].forget_ok
    # checked outside the calibration: forget() at each lambda1, margins of the forget codes
    assert forget_side_met(model, codes, 5, cal.lambda1)
    assert not forget_side_met(model, codes, 5, max(below))


def forget_side_met(model, codes, cls, lambda1, lambda2=10.0, depth=1.0, max_prob=1e-3):
    """The criterion's forget side, from forget()'s model: every code of ``cls`` ends at least
    ``depth`` times as confidently wrong as it was right, with true-class probability <= max_prob."""
    x, y = codes.batch([cls])

    def margins(m):
        with torch.no_grad():
            logits = m(x)
        true = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.scatter(1, y[:, None], float("-inf")).max(1).values
        return true - other, torch.softmax(logits, -1).gather(1, y[:, None]).squeeze(1)

    before, _ = margins(model)
    after, prob = margins(mf.forget(model, codes, [cls], lambda1=lambda1, lambda2=lambda2).model)
    return bool((-after >= depth * before.clamp_min(1e-6)).all() and (prob <= max_prob).all())


def test_lambda2_search_returns_a_candidate(setup):
    model, codes, _ = setup
    cal = calibrate(model, codes, [1], lambda2=[1.0, 10.0, 100.0], search="lambda1")  # lambda2 fixed per candidate
    assert cal.lambda2 in (1.0, 10.0, 100.0)
    assert len(cal.diagnostics["per_lambda2"]) == 3
    # the documented choice, re-derived: among the feasible candidates the largest median
    # remaining-code margin, ties to the smaller lambda2; each candidate's lambda1 its own search's
    assert [l2 for l2, _, _ in cal.per_lambda2] == [1.0, 10.0, 100.0]
    feasible = [(trial.retain_margin_ratio, -l2, l2, l1) for l2, l1, trial in cal.per_lambda2
                if trial is not None and trial.retain_ok]
    assert feasible, "no feasible lambda2: the choice below would not be tested"
    _, _, best_l2, best_l1 = max(feasible)
    assert (cal.lambda2, cal.lambda1) == (best_l2, best_l1)
    alone = calibrate(model, codes, [1], lambda2=best_l2)
    assert alone.lambda1 == pytest.approx(best_l1, rel=1e-12)


def test_two_classes_at_once(setup):
    model, codes, _ = setup
    cal = calibrate(model, codes, [0, 1])
    result = mf.forget(model, codes, [0, 1], lambda1=cal.lambda1, lambda2=cal.lambda2)
    assert result.code_accuracy_after.forget == 0.0


def test_bad_input(setup):
    model, codes, _ = setup
    with pytest.raises(UnlearningError, match=r"forget_classes.*\[10\]"):
        calibrate(model, codes, [10])
    with pytest.raises(ValueError):
        calibrate(model, codes, [0], lambda2=-1.0)
    with pytest.raises(ValueError):
        calibrate(model, codes, [0], lambda1_range=(1.0, 0.1))


# ---- the search over the effective step (search="scale", the default) ---------------------------

from mnemo_fast.calibration import PAIRED_LAMBDA1, calibrate_session  # noqa: E402


class _Scripted:
    """A stand-in for CandidateSession: one code per class (class 0 forgotten); the logits
    [C, C] are a scripted function of the step s = lambda1 / 1e-3 and the sign."""

    def __init__(self, logits_of):
        classes = logits_of(0.0, -1).shape[0]
        self.labels = torch.arange(classes)
        self.is_forget = self.labels == 0
        self.logits_of, self.state = logits_of, (0.0, -1)

    def before_logits(self):
        return self.logits_of(0.0, -1)

    def set_shift(self, lambda1, lambda2, sign):
        self.state = (lambda1 / PAIRED_LAMBDA1, sign)

    def logits(self):
        return self.logits_of(*self.state)

    def restore(self):
        self.state = (0.0, -1)


def _codes_forget_late(s, sign):
    """Sign -1: the forget code's margin 4 - 8s (wrong from s = 0.5, probability <= 1e-3 from
    s ~ 1.28) while the retained codes' margins fall as 4 (1 - s): the forget side is met only
    where the retained codes are wrong. Sign +1 moves nothing toward forgetting."""
    if sign == 1:
        return torch.tensor([[4 + s, 0, 0], [0, 4.0, 0], [0, 0, 4.0]])
    r = 4 * (1 - s)
    return torch.tensor([[4 - 8 * s, 0, 0], [0, r, 0], [0, 0, r]])


def _codes_never_forget(s, sign):
    """The forget code's margin falls as 4 - s but its class stays the most probable (no step
    misclassifies it), while the retained margins fall as 4 (1 - s / 3) for sign -1 and
    4 (1 - s / 30) for sign +1: large steps wreck the retained codes (what the top of the
    range did on a transformer: every input sent to one class)."""
    m = max(4 - s, 0.5)
    r = 4 * (1 - s / (3 if sign == -1 else 30))
    return torch.tensor([[m, 0, 0], [0, r, 0], [0, 0, r]])


def test_unreached_forget_side_takes_the_best_effort_step_not_the_top_of_the_range():
    session = _Scripted(_codes_never_forget)
    with pytest.warns(CalibrationWarning, match="deepest step that keeps the retained codes"):
        cal = calibrate_session(session, [10.0], lambda1_range=(1e-5, 1e2))
    assert not cal.forget_reached and not cal.feasible and cal.diagnostics["best_effort"]
    assert not cal.diagnostics["balanced"]
    t = cal.chosen
    # the deepest forgetting among the trials that keep every retained code right with half its margin
    safe = [x for x in cal.trials if x.retain_ok]
    assert t.retain_ok and t.forget_depth == max(x.forget_depth for x in safe)
    assert cal.lambda1 < 1e2 and cal.lambda1 / PAIRED_LAMBDA1 <= 15   # sign +1 keeps margins >= 0.5 up to s = 15
    assert session.state == (0.0, -1)   # restored
    # the retained codes of the chosen step are right: a top-of-range step (s = 1e5) would not be
    assert (_codes_never_forget(cal.lambda1 / PAIRED_LAMBDA1, cal.sign).argmax(-1) == torch.arange(3)).all()


def _codes_misclassified_shallowly(s, sign):
    """Sign -1: the forget code turns wrong from s = 1 but never deeply (margin >= -0.5, so the
    forget side's probability bound is never met), the retained margins fall as 4 (1 - s / 4)."""
    if sign == 1:
        return torch.tensor([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0]])
    r = 4 * (1 - s / 4)
    return torch.tensor([[max(4 - 4 * s, -0.5), 0, 0], [0, r, 0], [0, 0, r]])


def test_unreached_forget_side_prefers_a_balanced_step_that_misclassifies_the_forget_codes():
    cal = calibrate_session(_Scripted(_codes_misclassified_shallowly), [10.0], lambda1_range=(1e-5, 1e2))
    t = cal.chosen
    assert not cal.forget_reached and cal.diagnostics["best_effort"] and cal.sign == -1
    assert t.forget_max_margin < 0 and t.retain_margin_ratio > 0     # wrong, retained codes still right
    s = cal.lambda1 / PAIRED_LAMBDA1
    assert 1 < s < 4


def _codes_forget_only_by_wrecking(s, sign):
    """Sign -1: the forget code turns wrong (and deep) only from s = 2, where the retained
    codes' margins 4 (1 - s) are already negative: every step meeting the forget side sends
    most retained codes elsewhere. Sign +1 changes nothing."""
    if sign == 1:
        return torch.tensor([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0]])
    r = 4 * (1 - s)
    return torch.tensor([[4 - 2 * s if s < 2 else 40 * (2 - s), 0, 0], [0, r, 0], [0, 0, r]])


def test_a_balanced_step_that_wrecks_the_retained_codes_is_not_applied():
    with pytest.warns(CalibrationWarning, match="most retained codes are misclassified too.*deepest step that keeps"):
        cal = calibrate_session(_Scripted(_codes_forget_only_by_wrecking), [10.0], lambda1_range=(1e-5, 1e2))
    assert cal.forget_reached and not cal.feasible
    assert cal.diagnostics["best_effort"] and not cal.diagnostics["balanced"]
    assert cal.chosen.retain_ok and cal.lambda1 / PAIRED_LAMBDA1 <= 0.5     # margins keep half: s <= 1/2
    assert any(t.forget_ok for t in cal.trials)                           # the forget side was met, elsewhere
    # a balanced step that keeps the median retained margin positive is still applied, unwarned
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        late = calibrate_session(_Scripted(_codes_forget_late), [10.0], lambda1_range=(1e-5, 1e-1))
    assert not caught and late.diagnostics["balanced"] and not late.diagnostics["best_effort"]


def test_scale_search_moves_lambda2_with_lambda1(setup):
    model, codes, _ = setup
    cal = calibrate(model, codes, [3])
    assert cal.search == "scale" and cal.sign in (1, -1)
    assert cal.trials and all(t.lambda2 == pytest.approx(t.lambda1 * 10.0 / PAIRED_LAMBDA1) for t in cal.trials)
    assert cal.lambda2 == pytest.approx(cal.lambda1 * 10.0 / PAIRED_LAMBDA1)


def test_lambda1_search_is_one_option_away(setup):
    """search="lambda1": lambda2 fixed, the sign re-picked by forget (the first calibration)."""
    model, codes, _ = setup
    cal = calibrate(model, codes, [3], search="lambda1")
    assert cal.search == "lambda1" and cal.sign is None
    assert all(t.lambda2 == 10.0 for t in cal.trials) and cal.lambda2 == 10.0
    result = mf.forget(model, codes, [3], lambda1="auto", lambda2=10.0,
                       calibration={"search": "lambda1", "blocks": False})  # blocks: their sign, one candidate
    assert result.lambda1 == cal.lambda1 and len(result.candidate_scores) == 2
    with pytest.raises(ValueError, match="search"):
        calibrate(model, codes, [3], search="grid")


def test_forget_applies_the_calibrations_sign(setup):
    model, codes, test = setup
    result = mf.forget(model, codes, [6], lambda1="auto", lambda2=10.0)
    cal = result.calibration
    assert result.sign == cal.sign == cal.chosen.sign and len(result.candidate_scores) == 1
    assert (result.lambda1, result.lambda2) == (cal.lambda1, cal.lambda2)
    assert result.code_accuracy_after.forget == 0.0
    after = mf.evaluate(result.model, test, [6])
    assert after.forget_accuracy <= 0.02
    assert after.retain_accuracy >= mf.evaluate(model, test, [6]).retain_accuracy - 0.02


def test_margin_sign_rule_does_not_take_the_sign_whose_retained_codes_only_look_right():
    """Sign +1 keeps every retained code right by argmax but at 5% of its margin; sign -1 loses
    one retained code but keeps the median margin at 80%. Both forget. The accuracy rule (A_R +
    E_F) takes +1; the margin rule takes -1."""
    def logits_of(s, sign):
        if s == 0:
            return torch.diag(torch.full((4,), 4.0))
        if sign == 1:
            return torch.diag(torch.tensor([-20.0, 0.2, 0.2, 0.2]))
        return torch.diag(torch.tensor([-20.0, 3.2, 3.2, -1.0]))

    accuracy = calibrate_session(_Scripted(logits_of), [10.0], search="lambda1", lambda1_range=(1e-4, 1e-2))
    margin = calibrate_session(_Scripted(logits_of), [10.0], search="scale", lambda1_range=(1e-4, 1e-2))
    assert accuracy.chosen.sign == 1
    assert margin.chosen.sign == -1 and margin.sign == -1
    assert margin.chosen.retain_margin_ratio == pytest.approx(0.8)


def test_balanced_step_where_the_forget_side_breaks_the_retain_side():
    session = _Scripted(_codes_forget_late)
    cal = calibrate_session(session, [10.0], lambda1_range=(1e-5, 1e-1))
    assert cal.forget_reached and not cal.feasible and cal.diagnostics["balanced"]
    # depth 2s - 1 meets the retained ratio 1 - s at s = 2/3, where the forget code is wrong
    assert cal.lambda1 / PAIRED_LAMBDA1 == pytest.approx(2 / 3, rel=0.05)
    assert cal.chosen.forget_max_margin < 0 and cal.chosen.retain_margin_ratio > 0.25
    assert cal.sign == -1 and session.state == (0.0, -1)  # restored
    # the first calibration takes the smallest step meeting the forget side, retained codes wrong
    first = calibrate_session(_Scripted(_codes_forget_late), [10.0], search="lambda1", lambda1_range=(1e-5, 1e-1))
    assert first.lambda1 / PAIRED_LAMBDA1 > 1.2 and not first.chosen.retain_all_correct
