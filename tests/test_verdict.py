"""The verdict of every forget and the optional real retain sample (issue 26; mnemo_fast/verdict.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

import mnemo_fast as mf
import mnemo_fast.reference as ref
from mnemo_fast import verdict as verdicts
from mnemo_fast.calibration import Criterion
from mnemo_fast.evaluation import data


def _logits(rows):
    return torch.tensor(rows, dtype=torch.float32)


LABELS = torch.tensor([0, 1, 2])
IS_FORGET = torch.tensor([True, False, False])
BEFORE = _logits([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])  # every code right, margin 5


def test_a_deeply_forgotten_code_and_intact_retained_codes_are_clean():
    after = _logits([[-20.0, 0, 0], [0, 5.0, 0], [0, 0, 4.0]])
    v = verdicts.judge(BEFORE, after, LABELS, IS_FORGET, criterion=Criterion())
    assert v.clean and not v.flagged and v.reasons == () and v.evidence == "codes"
    assert v.codes_forget_ok and v.codes_retain_ok and v.details["retain_codes_lost"] == 0


def test_a_forget_code_still_right_is_flagged():
    after = _logits([[1.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    v = verdicts.judge(BEFORE, after, LABELS, IS_FORGET, criterion=Criterion())
    assert v.flagged and not v.codes_forget_ok
    assert v.reasons == ("codes: 1 of 1 forget codes still classified as their class",)


def test_a_shallow_forget_is_flagged_by_the_criterions_depth():
    after = _logits([[-1.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])  # wrong, but depth 0.2 < 1
    v = verdicts.judge(BEFORE, after, LABELS, IS_FORGET, criterion=Criterion())
    assert v.flagged and "not deeply (depth 0.20, criterion 1" in v.reasons[0]
    # the caller's criterion is the one judged
    assert verdicts.judge(BEFORE, after, LABELS, IS_FORGET, criterion=Criterion(depth=0.1, max_forget_prob=0.5)).clean


def test_the_retained_codes_figures_are_their_worst_margin_mean_probability_drop_and_logit_change():
    after = _logits([[-20.0, 0, 0], [0, 4.0, 0], [0, 0, 2.0]])  # retained margins 5 -> 4 and 5 -> 2
    v = verdicts.judge(BEFORE, after, LABELS, IS_FORGET, criterion=Criterion())
    d = v.details
    assert d["retain_margin_ratio"] == pytest.approx(0.4)  # the median of 0.8 and 0.4: torch takes the lower
    assert d["retain_margin_min"] == pytest.approx(0.4)
    p0 = torch.softmax(BEFORE[1:], -1)[[0, 1], [1, 2]]
    p1 = torch.softmax(after[1:], -1)[[0, 1], [1, 2]]
    assert d["retain_prob_drop"] == pytest.approx(float((p0 - p1).mean()), rel=1e-5)
    assert d["retain_logit_change"] == pytest.approx(float((after[1:] - BEFORE[1:]).norm() / BEFORE[1:].norm()), rel=1e-5)
    # no retained code: the neutral figures
    only_forget = verdicts.judge(BEFORE[:1], after[:1], LABELS[:1], IS_FORGET[:1], criterion=Criterion()).details
    assert only_forget["retain_margin_min"] == 1.0 and only_forget["retain_prob_drop"] == 0.0
    assert only_forget["retain_logit_change"] == 0.0


def test_a_lost_retained_code_is_flagged():
    after = _logits([[-20.0, 0, 0], [0, -1.0, 0], [0, 0, 5.0]])
    v = verdicts.judge(BEFORE, after, LABELS, IS_FORGET, criterion=Criterion())
    assert v.flagged and v.codes_forget_ok and not v.codes_retain_ok
    assert "codes: 1 of 2 retained codes misclassified after the step (0 before)" in v.reasons


def test_a_retain_sample_judges_the_retain_side_in_place_of_the_codes():
    after = _logits([[-20.0, 0, 0], [0, -1.0, 0], [0, 0, 5.0]])  # the codes' retain side fails
    kept = verdicts.SampleAccuracy(retain_before=0.95, retain_after=0.94, retain_rows=200)
    v = verdicts.judge(BEFORE, after, LABELS, IS_FORGET, criterion=Criterion(), sample=kept)
    assert v.clean and not v.codes_retain_ok and v.evidence == "codes and a retain sample of 200"
    lost = verdicts.SampleAccuracy(retain_before=0.95, retain_after=0.90, retain_rows=200)
    v = verdicts.judge(BEFORE, after, LABELS, IS_FORGET, criterion=Criterion(), sample=lost)
    assert v.flagged and v.reasons == ("retain sample: accuracy on the remaining classes 95.0% -> 90.0% "
                                       "(more than 2% lost)",)


def test_a_small_samples_drop_is_judged_with_its_standard_error():
    """A drop under 2 points that the sample's size cannot tell from a larger one is flagged:
    drop + RETAIN_DROP_Z * se must stay within MAX_RETAIN_DROP."""
    after = _logits([[-20.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    unsure = verdicts.SampleAccuracy(0.95, 0.94, 100, retain_drop_se=0.01)
    assert unsure.retain_drop_bound() == pytest.approx(0.01 + verdicts.RETAIN_DROP_Z * 0.01)
    v = verdicts.judge(BEFORE, after, LABELS, IS_FORGET, criterion=Criterion(), sample=unsure)
    assert v.flagged and v.reasons == ("retain sample: accuracy on the remaining classes 95.0% -> 94.0% (1.0% lost; "
                                       "on 100 rows a loss above 2% is not ruled out: bound 2.6% at 1.645 "
                                       "standard errors)",)
    sure = verdicts.SampleAccuracy(0.95, 0.94, 100, retain_drop_se=0.005)
    assert verdicts.judge(BEFORE, after, LABELS, IS_FORGET, criterion=Criterion(), sample=sure).clean
    assert verdicts.judge(BEFORE, after, LABELS, IS_FORGET, criterion=Criterion(), sample=unsure,
                          retain_drop_z=0.0).clean


def test_paired_drop_is_the_mean_change_and_its_standard_error():
    before = torch.tensor([True, True, True, True, False, True, True, True])
    after = torch.tensor([True, False, True, False, True, True, True, True])
    drop, se = verdicts.paired_drop(before, after)
    change = torch.tensor([0.0, 1, 0, 1, -1, 0, 0, 0])
    assert drop.item() == pytest.approx(change.mean().item()) == pytest.approx(1 / 8)
    assert se.item() == pytest.approx((change.var(correction=0) / 8).sqrt().item())
    same = torch.tensor([True, False, True])
    assert [t.item() for t in verdicts.paired_drop(same, same)] == [0.0, 0.0]
    one = verdicts.paired_drop(torch.tensor([True]), torch.tensor([False]))  # a single row: no spread
    assert [t.item() for t in one] == [1.0, 0.0]
    empty = verdicts.paired_drop(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool))
    assert [t.item() for t in empty] == [0.0, 0.0]


def test_sample_accuracy_gives_the_paired_standard_error():
    labels = torch.tensor([1, 1, 1, 1, 2, 2, 0])
    before = _logits([[0, 1.0, 0]] * 4 + [[0, 0, 1.0]] * 2 + [[1.0, 0, 0]])
    after = _logits([[0, 1.0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 1.0, 0], [0, 1.0, 0]])
    s = verdicts.sample_accuracy(before, after, labels, [0])
    change = torch.tensor([0.0, 1, 0, 0, 0, 1])
    assert s.retain_rows == 6 and s.retain_drop == pytest.approx(2 / 6)
    assert s.retain_drop_se == pytest.approx((change.var(correction=0) / 6).sqrt().item())


def test_a_retain_samples_forget_rows_must_end_forgotten():
    after = _logits([[-20.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    sample = verdicts.SampleAccuracy(0.9, 0.9, 100, forget_before=0.9, forget_after=0.05, forget_rows=20)
    v = verdicts.judge(BEFORE, after, LABELS, IS_FORGET, criterion=Criterion(), sample=sample)
    assert v.flagged and v.reasons == ("retain sample: 5.0% of its 20 forget-class rows still right "
                                       "(at most 1% allowed)",)


def test_sample_accuracy_splits_the_rows_by_class():
    labels = torch.tensor([0, 0, 1, 2])
    before = _logits([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0]])  # 0,0 right; 1 right; 2 wrong
    after = _logits([[0, 1.0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    s = verdicts.sample_accuracy(before, after, labels, [0])
    assert (s.retain_rows, s.forget_rows) == (2, 2)
    assert (s.retain_before, s.retain_after, s.forget_before, s.forget_after) == (0.5, 1.0, 1.0, 0.5)
    assert verdicts.sample_accuracy(before, after, labels, [3]).forget_after is None


# ---- on a trained model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_retain():
    """A real sample of digits: the test split's first 256 images (the test split stands in for a
    user's validation split here; the zoo draws it from held-out training data)."""
    _, test = data.digits()
    x, y = test.tensors
    return x[:256], y[:256]


@pytest.mark.parametrize("namespace", [mf, ref], ids=["fast", "reference"])
def test_a_working_forget_is_clean_and_a_forget_that_did_nothing_is_flagged_once(trained_digits_mlp, namespace):
    model, codes = trained_digits_mlp
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        good = namespace.forget(model, codes, [3], lambda1="auto")
    assert isinstance(good.verdict, mf.Verdict) and good.verdict.clean and not good.flagged, good.verdict
    assert not [w for w in caught if issubclass(w.category, mf.ForgetWarning)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bad = namespace.forget(model, codes, [3], lambda1=1e-9, lambda2=1e-9)
    assert bad.flagged and bad.verdict.reasons[0] == "codes: 1 of 1 forget codes still classified as their class"
    said = [w for w in caught if issubclass(w.category, mf.ForgetWarning)]
    assert len(said) == 1 and "still recognised" in str(said[0].message)  # the earlier warning, not a second


def test_the_verdicts_sample_figures_are_the_models_accuracies(trained_digits_mlp, digits_retain):
    model, codes = trained_digits_mlp
    x, y = digits_retain
    result = mf.forget(model, codes, [3], lambda1=1e-3, lambda2=10.0, retain=(x, y))
    s = result.verdict.sample
    keep, drop = y != 3, y == 3
    with torch.no_grad():
        hit0 = model.eval()(x).argmax(-1) == y
        hit1 = result.model.eval()(x).argmax(-1) == y
    assert s.retain_rows == int(keep.sum()) and s.forget_rows == int(drop.sum()) > 0
    assert s.retain_before == pytest.approx(hit0[keep].float().mean().item())
    assert s.retain_after == pytest.approx(hit1[keep].float().mean().item())
    assert s.forget_after == pytest.approx(hit1[drop].float().mean().item())
    assert result.verdict.evidence == f"codes and a retain sample of {len(y)}"


def test_auto_with_a_retain_sample_judges_every_trial_on_it(trained_digits_mlp, digits_retain):
    model, codes = trained_digits_mlp
    x, y = digits_retain
    result = mf.forget(model, codes, [5], lambda1="auto", retain=(x, y))
    trials = result.calibration.trials
    assert trials and all(t.retain_sample_drop is not None for t in trials)
    assert all(t.retain_sample_bound >= t.retain_sample_drop for t in trials)
    assert all(t.retain_ok == (t.retain_sample_bound <= verdicts.MAX_RETAIN_DROP) for t in trials)
    # the sample holds rows of class 5: the forget side asks them to end forgotten too
    assert all(t.forget_sample_accuracy is not None for t in trials)
    assert all(not t.forget_ok or t.forget_sample_accuracy <= verdicts.MAX_FORGET_ACCURACY for t in trials)
    if result.calibration.feasible:
        assert result.calibration.chosen.retain_sample_bound <= verdicts.MAX_RETAIN_DROP
        assert result.verdict.sample.forget_after <= verdicts.MAX_FORGET_ACCURACY
    plain = mf.forget(model, codes, [5], lambda1="auto")
    assert all(t.retain_sample_drop is None and t.forget_sample_accuracy is None for t in plain.calibration.trials)
    only_retained = mf.forget(model, codes, [5], lambda1="auto", retain=(x[y != 5], y[y != 5]))
    assert all(t.forget_sample_accuracy is None and t.retain_sample_bound is not None
               for t in only_retained.calibration.trials)


def _refused(model, codes, retain, error, match):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        mf.forget(model, codes, [3], lambda1="auto", retain=retain, inplace=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # untouched


def test_a_bad_retain_sample_is_refused_before_the_model_is_touched(trained_digits_mlp, digits_retain):
    model, codes = trained_digits_mlp
    x, y = digits_retain
    _refused(model, codes, x, TypeError, "retain must be a pair")
    _refused(model, codes, (x, y.tolist()), TypeError, "pair of tensors")
    _refused(model, codes, (x, y.float()), mf.UnlearningError, "1-D integer tensor")
    _refused(model, codes, (x[:10], y[:11]), mf.UnlearningError, "as many inputs as labels")
    _refused(model, codes, (x[:0], y[:0]), mf.UnlearningError, "at least one")
    _refused(model, codes, (x.reshape(len(x), -1), y), mf.UnlearningError, r"shape \[64\] per sample")
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    _refused(model, codes, (nan, y), mf.UnlearningError, "NaN or inf")
    _refused(model, codes, (x, torch.full_like(y, 10)), mf.UnlearningError, r"labels \[10\] are not classes")
    _refused(model, codes, (x[y == 3], y[y == 3]), mf.UnlearningError, "every retain sample is of a forget class")
    _refused(model, codes, (x.long(), y), mf.UnlearningError, "floating point like the codes")
