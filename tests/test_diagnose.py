"""mnemo_fast.diagnose: do the codes stand for the class in this model? (tiny models, fast)."""

import pytest
import torch

import mnemo_fast as mf
import mnemo_fast.reference as ref
from mnemo_fast.diagnose import Diagnosis, spearman, top_overlap
from mnemo_fast.evaluation import models


@pytest.fixture(scope="module")
def tiny():
    """A 4-class MLP on 4x4 images (class k: a bright quadrant k plus noise), trained with
    codes for a few epochs: the codes and the data both teach it the classes."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat(60)
    x = 0.3 * torch.rand(len(y), 1, 4, 4, generator=g)
    for k in range(4):
        r, c = divmod(k, 2)
        x[y == k, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2] += 0.7
    data = torch.utils.data.TensorDataset(x, y)
    torch.manual_seed(0)
    model = models.MLP((1, 4, 4), 4, hidden=32)
    codes = mf.MnemonicCodes.generate(4, (1, 4, 4), seed=0)
    mf.train_with_codes(model, data, codes, t_mix=0.2, epochs=30, seed=0, progress=False)
    return model.eval(), codes, data


def test_spearman_and_overlap_by_hand():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ties share their average rank: [1, 1, 2, 3] ranks as [1.5, 1.5, 3, 4]
    b = torch.tensor([1.0, 1.0, 2.0, 3.0])
    ra = torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5
    rb = torch.tensor([1.5, 1.5, 3.0, 4.0]) - 2.5
    assert spearman(a, b) == pytest.approx(float((ra * rb).sum() / (ra.norm() * rb.norm())))
    assert spearman(a, torch.ones(4)) == 0.0
    assert top_overlap(a, a, 0.5) == (1.0, 2)
    assert top_overlap(a, -a, 0.5) == (0.0, 2)


def _rule(c) -> str:
    if c.forget_accuracy[1] > 0.05:
        return "not forgotten"
    return "costly" if c.retain_accuracy[1] < c.retain_accuracy[0] - 0.02 else "ok"


def test_diagnosis_of_a_model_trained_with_codes(tiny):
    model, codes, data = tiny
    before = [p.detach().clone() for p in model.parameters()]
    # each class alone, so all may be named; fixed lambdas that forget most classes of this model
    d = mf.diagnose(model, codes, [3, 2, 1, 0], data=data, per_class=40, lambda1=1e-2, lambda2=10.0)
    assert isinstance(d, Diagnosis) and [c.cls for c in d.classes] == [0, 1, 2, 3]
    assert d.samples_per_class == {0: 40, 1: 40, 2: 40, 3: 40}
    for c in d.classes:
        assert -1.0 <= c.rank_correlation <= 1.0 and 0.0 <= c.top_overlap <= 1.0
        assert c.top_size == max(1, round(0.01 * sum(p.numel() for p in model.parameters())))
        assert c.forget_accuracy[0] >= 0.9 and c.retain_accuracy[0] >= 0.9  # the model knew the class
        assert c.verdict == _rule(c)
    assert any(c.verdict == "ok" for c in d.classes)
    assert d.ok == all(c.verdict == "ok" for c in d.classes)
    for c in d.classes:
        assert (f"class {c.cls}: {c.verdict}" in str(d)) == (c.verdict != "ok")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    single = mf.diagnose(model, codes, 2, data=data, per_class=40, lambda1=1e-2, lambda2=10.0)
    assert single.classes == [d.classes[2]]
    auto = mf.diagnose(model, codes, 2, data=data, per_class=40)   # default: lambda1="auto"
    assert auto.classes[0].verdict == _rule(auto.classes[0]) and auto.classes[0].lambdas[0] > 0


def test_verdicts_follow_the_effect_on_the_samples(tiny):
    model, codes, data = tiny
    x, y = data.tensors
    # a step too small to change anything: the class is not forgotten
    none = mf.diagnose(model, codes, [0], data=(x, y), per_class=16, lambda1=1e-12, lambda2=1e-12)
    assert none.classes[0].verdict == "not forgotten" and not none.ok
    assert none.classes[0].forget_accuracy[1] == none.classes[0].forget_accuracy[0]
    assert "class 0: not forgotten" in str(none)
    # a huge step wrecks the model: never "ok"
    wreck = mf.diagnose(model, codes, [0], data=(x, y), per_class=16, lambda1=1e3, lambda2=1e3)
    c = wreck.classes[0]
    assert c.verdict in ("not forgotten", "costly") and c.verdict != "ok"
    if c.forget_accuracy[1] <= 0.05:
        assert c.verdict == "costly" and c.retain_accuracy[1] < c.retain_accuracy[0] - 0.02


def test_both_namespaces_agree(tiny):
    model, codes, data = tiny
    fast = mf.diagnose(model, codes, [3], data=data, per_class=8, lambda1=1e-2, lambda2=10.0)
    slow = ref.diagnose(model, codes, [3], data=data, per_class=8, lambda1=1e-2, lambda2=10.0)
    a, b = fast.classes[0], slow.classes[0]
    assert a.rank_correlation == pytest.approx(b.rank_correlation, abs=1e-3)
    assert a.verdict == b.verdict and a.forget_accuracy == b.forget_accuracy


def test_bad_input(tiny):
    model, codes, data = tiny
    x, y = data.tensors
    with pytest.raises(mf.UnlearningError):
        mf.diagnose(model, codes, [0], data=(x[y != 2], y[y != 2]))   # a class without samples
    with pytest.raises(mf.UnlearningError):
        mf.diagnose(model, codes, [7], data=data)                     # unknown class
    with pytest.raises(ValueError):
        mf.diagnose(model, codes, [0], data=data, top=1.5)


# ---- membership: what forgetting leaves behind (diagnose(heldout=...)) ------------------------
def test_membership_auc_by_hand_and_against_sklearn():
    from sklearn.metrics import roc_auc_score

    from mnemo_fast.diagnose import membership_auc

    # members' losses all below the held-out ones: certain; all above: never; equal sets: chance
    assert membership_auc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4, 0.5])) == 1.0
    assert membership_auc(torch.tensor([0.6, 0.7]), torch.tensor([0.3, 0.4])) == 0.0
    assert membership_auc(torch.tensor([0.2, 0.4]), torch.tensor([0.4, 0.2])) == 0.5
    # one tie of four pairs counts half: pairs (0.1<0.3), (0.1<0.5), (0.3=0.3), (0.3<0.5) -> 3.5/4
    assert membership_auc(torch.tensor([0.1, 0.3]), torch.tensor([0.3, 0.5])) == 0.875
    g = torch.Generator().manual_seed(0)
    for m, h in ((1, 1), (7, 13), (200, 150)):
        members = torch.randint(0, 6, (m,), generator=g).double()        # many ties
        heldout = torch.randint(1, 7, (h,), generator=g).double()
        labels = [1] * m + [0] * h
        expected = roc_auc_score(labels, (-torch.cat([members, heldout])).tolist())  # low loss -> member
        assert membership_auc(members, heldout) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError):
        membership_auc(torch.tensor([]), torch.tensor([1.0]))


@pytest.fixture(scope="module")
def memorised():
    """A 4-class MLP that can only memorise: pure-noise inputs with labels that carry no
    signal, 16 training samples a class, many epochs; ``heldout`` draws fresh samples of the
    same distribution (their loss is that of a guess)."""
    def draw(n_per_class, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(4).repeat(n_per_class)
        return torch.randn(len(y), 1, 4, 4, generator=g), y

    x, y = draw(16, 1)
    torch.manual_seed(0)
    model = models.MLP((1, 4, 4), 4, hidden=128)
    codes = mf.MnemonicCodes.generate(4, (1, 4, 4), seed=0)
    mf.train_with_codes(model, torch.utils.data.TensorDataset(x, y), codes, t_mix=0.2, epochs=300,
                        batch_size=16, lr=3e-3, seed=0, progress=False)
    return model.eval(), codes, (x, y), draw(64, 2)


def test_membership_of_a_memorised_class(memorised):
    model, codes, data, heldout = memorised
    before = [p.detach().clone() for p in model.parameters()]
    d = mf.diagnose(model, codes, [1, 0], data=data, heldout=heldout, per_class=16, lambda1=1e-2, lambda2=10.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for c in d.classes:
        assert c.membership_samples == 16   # all 16 training samples of the class, 16 held-out ones
        auc_before, auc_after = c.membership_auc
        assert auc_before > 0.65            # the training samples' losses are the lowest: memorised
        assert 0.0 <= auc_after <= 1.0
        assert c.membership_kept == (abs(auc_after - 0.5) > 0.05)
        assert (f"class {c.cls} AUC {auc_before:.2f} -> {auc_after:.2f}" in str(d)) == c.membership_kept
    # the same samples on both sides cannot be told apart: exactly chance, before and after
    same = mf.diagnose(model, codes, [0], data=data, heldout=data, per_class=16, lambda1=1e-2, lambda2=10.0)
    assert same.classes[0].membership_auc == (0.5, 0.5) and not same.classes[0].membership_kept
    assert "membership" not in str(same)
    # without held-out samples nothing is measured
    plain = mf.diagnose(model, codes, [0], data=data, per_class=16, lambda1=1e-2, lambda2=10.0)
    assert plain.classes[0].membership_auc is None and not plain.classes[0].membership_kept
    # membership_samples caps both sides at the same count
    few = mf.diagnose(model, codes, [0], data=data, heldout=heldout, per_class=16, membership_samples=5,
                      lambda1=1e-2, lambda2=10.0)
    assert few.classes[0].membership_samples == 5


def test_membership_bad_input(memorised):
    model, codes, data, (hx, hy) = memorised
    with pytest.raises(mf.UnlearningError, match="held-out samples hold no sample of class 2"):
        mf.diagnose(model, codes, [2], data=data, heldout=(hx[hy != 2], hy[hy != 2]), lambda1=1e-2, lambda2=10.0)
    with pytest.raises(ValueError, match="membership_samples"):
        mf.diagnose(model, codes, [0], data=data, heldout=(hx, hy), membership_samples=0)
    with pytest.raises(ValueError, match="max_membership_gap"):
        mf.diagnose(model, codes, [0], data=data, heldout=(hx, hy), max_membership_gap=0.5)
    # what a careless caller passes: float labels (cross-entropy would read them as class
    # probabilities), a list of (input, label) pairs, labels that do not match the inputs
    with pytest.raises(TypeError, match="labels of held-out samples must be integer class indices"):
        mf.diagnose(model, codes, [0], data=data, heldout=(hx, hy.float()), lambda1=1e-2, lambda2=10.0)
    with pytest.raises(TypeError, match="labels of data must be integer class indices"):
        mf.diagnose(model, codes, [0], data=(data[0], data[1].float()), lambda1=1e-2, lambda2=10.0)
    with pytest.raises(TypeError, match=r"held-out samples must be \(inputs, labels\) tensors"):
        mf.diagnose(model, codes, [0], data=data, heldout=[(hx[i], hy[i]) for i in range(4)])
    with pytest.raises(ValueError, match="needs inputs"):
        mf.diagnose(model, codes, [0], data=data, heldout=(hx, hy[:-1]))
