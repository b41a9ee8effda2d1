"""Unlearning baselines (mnemo_fast.evaluation.baselines): contracts, estimators, the with-data ablation."""

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

import mnemo_fast as mf
from mnemo_fast.evaluation import baselines as B
from mnemo_fast.evaluation.baselines.ssd import dampen_, lfssd_importance, ssd_importance
from mnemo_fast.evaluation.resnet import resnet18


@pytest.fixture(scope="module")
def setup(trained_digits_mlp, digits_split):
    """The conftest's session model (MLP on digits, 40 epochs with codes): trained once."""
    model, codes = trained_digits_mlp
    train, test = digits_split
    base = mf.evaluate(model, test, [0])
    return model, codes, train, test, base


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["finetune", "neggrad_plus", "fisher_forgetting", "ssd", "ssd_orig", "mnemonic", "with_data"])
def test_input_model_untouched_and_class_forgotten(setup, name):
    model, codes, train, test, base = setup
    before = _snapshot(model)
    fn = {
        "finetune": lambda: B.finetune(model, train, [0], epochs=2),
        "neggrad_plus": lambda: B.neggrad_plus(model, train, [0], epochs=2),
        "fisher_forgetting": lambda: B.fisher_forgetting(model, train, [0]),
        "ssd": lambda: B.ssd(model, train, [0]),
        "ssd_orig": lambda: B.ssd(model, train, [0], estimator="original_batch"),
        "mnemonic": lambda: B.mnemonic(model, codes, [0], lambda1="auto"),
        "with_data": lambda: B.mnemonic_with_data(model, train, [0], k=1),
    }[name]
    out = fn()
    assert out is not model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    ev = mf.evaluate(out, test, [0])
    # every method must move the forget class; the loose bounds hold for the defaults on digits
    assert ev.forget_accuracy < base.forget_accuracy
    if name != "ssd_orig":  # the original SSD estimator can wreck A_R here (see UNLEARNING.md)
        assert ev.retain_accuracy > 0.8


def test_retrain_never_predicts_the_forget_class(setup):
    model, codes, train, test, _ = setup
    ref = B.retrain(model, train, [0], epochs=5, codes=codes)
    ev = mf.evaluate(ref, test, [0])
    assert ev.forget_accuracy <= 0.05
    assert not _same(ref, model)


def test_ssd_per_sample_importance_is_the_fisher_and_order_free(setup):
    model, _, train, _, _ = setup
    sub = Subset(train, list(range(200)))
    perm = Subset(train, list(torch.randperm(200, generator=torch.Generator().manual_seed(1)).tolist()))
    a = ssd_importance(model, sub)
    b = ssd_importance(model, perm)
    x, y = train.tensors[0][:200], train.tensors[1][:200]
    ref = mf.reference.fisher_diagonal(model, x, y, reduction="mean")
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(a[n], ref[n], rtol=1e-4, atol=1e-10)
    # the original estimator (square of batch-mean gradients) depends on the batches
    ao = ssd_importance(model, sub, estimator="original_batch")
    bo = ssd_importance(model, perm, estimator="original_batch")
    assert any(not torch.allclose(ao[n], bo[n], rtol=1e-3) for n in ao)


def test_lfssd_per_sample_importance(setup):
    model, _, train, _, _ = setup
    x = train.tensors[0][:20]
    imp = lfssd_importance(model, TensorDataset(x, train.tensors[1][:20]), chunk_size=7)
    params = dict(model.named_parameters())
    manual = {n: torch.zeros_like(p) for n, p in params.items()}
    for xi in x:
        out = model(xi[None]).pow(2).sum()
        for (n, _), g in zip(params.items(), torch.autograd.grad(out, list(params.values()))):
            manual[n] += g.abs()
    for n in imp:
        torch.testing.assert_close(imp[n], manual[n] / 20, rtol=1e-4, atol=1e-8)


def test_dampening_rule():
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, 3.0]]))
    forget = {"weight": torch.tensor([[100.0, 1.0]])}
    full = {"weight": torch.tensor([[5.0, 1.0]])}
    dampen_(lin, forget, full, alpha=10.0, lam=1.0)
    # 100 > 10 * 5: selected, scaled by min(1 * 5 / 100, 1); 1 < 10 * 1: untouched
    torch.testing.assert_close(lin.weight, torch.tensor([[2.0 * 0.05, 3.0]]))


def test_fisher_forgetting_zeroes_forget_rows_and_is_seeded(setup):
    model, _, train, _, _ = setup
    a = B.fisher_forgetting(model, train, [0], seed=3)
    b = B.fisher_forgetting(model, train, [0], seed=3)
    assert _same(a, b)
    head = a[3].weight
    assert head[0].abs().max() < 0.2  # mean 0, std sqrt(10 * 1e-4) = 0.032: 6 sigma


def test_sample_codes_are_real_samples(setup):
    _, _, train, _, _ = setup
    codes = B.sample_codes(train, 10, k=3, seed=0)
    assert codes.tensor.shape == (10, 3, 1, 8, 8)
    x, y = train.tensors
    for c in range(10):
        for k in range(3):
            match = (x == codes.tensor[c, k]).flatten(1).all(1)
            assert match.any() and (y[match] == c).all()


def test_resnet_shapes_and_fisher():
    net = resnet18((1, 8, 8), 10, width=4).eval()
    x = torch.rand(3, 1, 8, 8)
    assert net(x).shape == (3, 10)
    f = mf.fisher_diagonal(net, x, torch.tensor([0, 1, 2]))
    assert set(f) == {n for n, p in net.named_parameters()}
