"""Forgetting metrics (mnemo_fast.evaluation.metrics)."""

import time

import pytest
import torch
from torch.utils.data import TensorDataset

import mnemo_fast as mf
from mnemo_fast.evaluation import metrics as M, models


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
    # against predictions computed here, not through evaluate()
    x, y = test.tensors
    with torch.no_grad():
        right = model(x).argmax(-1) == y
    assert f == pytest.approx(right[y == 0].float().mean().item(), abs=1e-6)
    assert r == pytest.approx(right[y != 0].float().mean().item(), abs=1e-6)
    for c in range(10):
        assert per[c] == pytest.approx(right[y == c].float().mean().item(), abs=1e-6)
    assert 0.5 < r < 1.0  # a trained model, not a constant: the checks above can tell


def test_agreement_and_js(setup):
    model, _, test = setup
    assert M.agreement(model, model, test) == 1.0
    assert M.js_divergence(model, model, test) == pytest.approx(0.0, abs=1e-9)
    other = models.build("mlp", (1, 8, 8), 10)
    js = M.js_divergence(model, other, test)
    assert 0.0 < js <= 1.0
    assert js == pytest.approx(M.js_divergence(other, model, test), rel=1e-9)
    # against an independent computation: argmax agreement and scipy's Jensen-Shannon distance
    scipy_distance = pytest.importorskip("scipy.spatial.distance")
    x, _ = test.tensors
    with torch.no_grad():
        la, lb = model(x), other(x)
    same = (la.argmax(-1) == lb.argmax(-1)).double().mean().item()
    assert M.agreement(model, other, test) == pytest.approx(same, abs=1e-6) and same < 1.0
    pa, pb = torch.softmax(la.double(), -1).numpy(), torch.softmax(lb.double(), -1).numpy()
    expected = (scipy_distance.jensenshannon(pa, pb, base=2, axis=1) ** 2).mean()
    assert js == pytest.approx(expected, rel=1e-4)


def test_js_divergence_of_known_distributions():
    """Disjoint one-hot outputs: 1 bit; equal halves vs one-hot: 1 - 0.5 * H(1/2, 1/4, 1/4)."""

    def constant(logits):
        layer = torch.nn.Linear(1, len(logits))
        with torch.no_grad():
            layer.weight.zero_()
            layer.bias.copy_(torch.tensor(logits))
        return layer

    data = TensorDataset(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))
    assert M.js_divergence(constant([100.0, -100.0]), constant([-100.0, 100.0]), data) == pytest.approx(1.0, abs=1e-9)
    assert M.agreement(constant([100.0, -100.0]), constant([-100.0, 100.0]), data) == 0.0
    # p = (1/2, 1/2), q = (1, 0): m = (3/4, 1/4); JS = 0.5 KL(p||m) + 0.5 KL(q||m)
    kl_p = 0.5 * torch.log2(torch.tensor(0.5 / 0.75)) + 0.5 * torch.log2(torch.tensor(0.5 / 0.25))
    kl_q = torch.log2(torch.tensor(1 / 0.75))
    expected = (0.5 * kl_p + 0.5 * kl_q).item()
    assert M.js_divergence(constant([0.0, 0.0]), constant([100.0, -100.0]), data) == pytest.approx(expected, abs=1e-6)


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
    f, r = M.forget_retain_accuracy(model, test, [0])
    assert row["A_R"] == r and row["E_F"] == pytest.approx(1.0 - f)
    other = models.build("mlp", (1, 8, 8), 10)
    x, y = test.tensors
    with torch.no_grad():
        same = model(x).argmax(-1) == other(x).argmax(-1)
    row = M.report(model, train, test, [0], reference=other)
    assert row["agree_forget"] == pytest.approx(same[y == 0].float().mean().item(), abs=1e-6)
    assert row["agree_retain"] == pytest.approx(same[y != 0].float().mean().item(), abs=1e-6)
    assert row["js_forget"] > 0.0
    _, seconds = M.timed(sum, [1, 2])
    assert seconds >= 0


def test_timed_returns_the_result_and_the_wall_time():
    result, seconds = M.timed(sum, [1, 2], start=4)
    assert result == 7
    result, seconds = M.timed(time.sleep, 0.05)
    assert result is None and 0.05 <= seconds < 5.0


def test_outputs_of_a_model_returning_an_object_on_token_ids():
    """A transformers-style model (an output object with .logits) on token ids: the ids stay
    integers and the logits are taken from the object."""
    from types import SimpleNamespace

    class TokenModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 3)

        def forward(self, ids):
            return SimpleNamespace(logits=self.head(self.embed(ids).mean(1)))

    torch.manual_seed(0)
    model = TokenModel()
    ids = torch.randint(0, 10, (7, 5))
    data = torch.utils.data.TensorDataset(ids, torch.randint(0, 3, (7,)))
    logits, labels = M.outputs(model, data)
    assert logits.shape == (7, 3) and logits.dtype == torch.float32 and labels.shape == (7,)
    torch.testing.assert_close(logits, model(ids).logits)
