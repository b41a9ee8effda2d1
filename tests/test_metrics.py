"""Forgetting metrics (mnemo_fast.evaluation.metrics)."""

import pytest
import torch
from torch.utils.data import TensorDataset

import mnemo_fast as mf
from mnemo_fast.evaluation import data, metrics as M, models


@pytest.fixture(scope="module")
def setup(trained_digits_mlp, digits_split):
    """The conftest's session model (MLP on digits, 40 epochs with codes): trained once."""
    model, codes = trained_digits_mlp
    train, test = digits_split
    return model, train, test


def test_accuracies_match_evaluate(setup):
    model, _, test = setup
    f, r = M.forget_retain_accuracy(model, test, [0])
    ev = mf.evaluate(model, test, [0])
    assert f == ev.forget_accuracy and r == ev.retain_accuracy
    per = M.per_class_accuracy(model, test)
    assert set(per) == set(range(10))


def test_agreement_and_js(setup):
    model, _, test = setup
    assert M.agreement(model, model, test) == 1.0
    assert M.js_divergence(model, model, test) == pytest.approx(0.0, abs=1e-9)
    other = models.build("mlp", (1, 8, 8), 10)
    js = M.js_divergence(model, other, test)
    assert 0.0 < js <= 1.0
    assert js == pytest.approx(M.js_divergence(other, model, test), rel=1e-9)


def test_mia_chance_when_sides_are_alike(setup):
    model, _, test = setup
    x, y = test.tensors
    half = len(y) // 2
    res = M.membership_inference(model, TensorDataset(x[:half], y[:half]),
                                 TensorDataset(x[half:2 * half], y[half:2 * half]))
    assert abs(res.auc - 0.5) < 0.12


def test_mia_detects_a_loss_gap(setup):
    model, _, test = setup
    x, y = test.tensors
    wrong = (y + 1) % 10  # high loss
    res = M.membership_inference(model, TensorDataset(x, y), TensorDataset(x, wrong))
    assert res.auc > 0.9 and res.accuracy > 0.8
    ent = M.membership_inference(model, TensorDataset(x, y), TensorDataset(x, wrong), feature="entropy")
    assert abs(ent.auc - 0.5) < 0.1  # entropy ignores labels: same inputs, no signal


def test_report(setup):
    model, train, test = setup
    row = M.report(model, train, test, [0], reference=model)
    for key in ("A_R", "E_F", "A_R_train", "mia_auc", "member_rate", "agree_forget", "js_forget"):
        assert key in row
    assert row["agree_forget"] == 1.0 and row["js_forget"] == pytest.approx(0.0, abs=1e-9)
    _, seconds = M.timed(sum, [1, 2])
    assert seconds >= 0
