"""Lambda calibration from the codes alone (mnemo_fast.calibration)."""

import copy

import pytest
import torch

import mnemo_fast as mf
from mnemo_fast.evaluation import data, models
from mnemo_fast.calibration import Calibration, calibrate


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
    if cal.diagnostics["feasible"]:
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
    if below:
        assert cal.lambda1 / max(below) <= 10 ** (1 / 64) * 1.0001
    assert cal.diagnostics["chosen"].forget_ok


def test_lambda2_search_returns_a_candidate(setup):
    model, codes, _ = setup
    cal = calibrate(model, codes, [1], lambda2=[1.0, 10.0, 100.0])
    assert cal.lambda2 in (1.0, 10.0, 100.0)
    assert len(cal.diagnostics["per_lambda2"]) == 3


def test_two_classes_at_once(setup):
    model, codes, _ = setup
    cal = calibrate(model, codes, [0, 1])
    result = mf.forget(model, codes, [0, 1], lambda1=cal.lambda1, lambda2=cal.lambda2)
    assert result.code_accuracy_after.forget == 0.0


def test_bad_input(setup):
    model, codes, _ = setup
    with pytest.raises(Exception):
        calibrate(model, codes, [10])
    with pytest.raises(ValueError):
        calibrate(model, codes, [0], lambda2=-1.0)
    with pytest.raises(ValueError):
        calibrate(model, codes, [0], lambda1_range=(1.0, 0.1))
