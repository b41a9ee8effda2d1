"""Forgetting-quality metrics: accuracies, membership inference, distance to the retrained model.

All take a model and map-style datasets of (x, y) (or DataLoaders for the accuracy helpers).
Accuracies are fractions in [0, 1]; the report multiplies by 100.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .accuracy import evaluate
from ..modeling import eval_mode, logits_of


def _classes(forget_classes) -> list[int]:
    return [int(forget_classes)] if isinstance(forget_classes, int) else sorted({int(c) for c in forget_classes})


@torch.no_grad()
def outputs(model: torch.nn.Module, dataset, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, C] float32 on CPU, labels [N]) of ``model`` on ``dataset`` (eval mode). The
    logits are :func:`mnemo_fast.modeling.logits_of` the output (a ``transformers`` model's
    ``.logits``); floating inputs take the model's dtype, token ids stay integers."""
    p = next(model.parameters())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    logits, labels = [], []
    with eval_mode(model):
        for x, y in loader:
            x = x.to(p.device, p.dtype) if x.is_floating_point() else x.to(p.device)
            logits.append(logits_of(model(x)).float().cpu())
            labels.append(torch.as_tensor(y))
    return torch.cat(logits), torch.cat(labels)


def _subset_by_class(dataset, classes, keep: bool):
    from .baselines._common import labels_of  # local import: baselines import metrics-free modules
    mask = torch.isin(labels_of(dataset), torch.tensor(classes))
    idx = torch.nonzero(mask if keep else ~mask).squeeze(1).tolist()
    return torch.utils.data.Subset(dataset, idx)


def forget_retain_accuracy(model, dataset, forget_classes) -> tuple[float, float]:
    """(accuracy on the forget classes, accuracy on the rest): 1 - E_F and A_R of the paper."""
    ev = evaluate(model, dataset, _classes(forget_classes))
    return ev.forget_accuracy, ev.retain_accuracy


def per_class_accuracy(model, dataset) -> dict[int, float]:
    return evaluate(model, dataset, []).per_class


def _features(logits: torch.Tensor, labels: torch.Tensor, feature: str) -> np.ndarray:
    if feature == "loss":
        f = F.cross_entropy(logits, labels, reduction="none")
        return torch.log(f + 1e-12).numpy()[:, None]  # log-loss spreads the tiny losses of members
    if feature == "entropy":
        logp = F.log_softmax(logits, -1)
        return (-(logp.exp() * logp).sum(-1)).clamp_min(1e-12).log().numpy()[:, None]
    raise ValueError(f"feature must be 'loss' or 'entropy', got {feature!r}")


@dataclass(frozen=True)
class MIAResult:
    """``auc``: cross-validated ROC AUC of the attack (0.5 = chance); ``accuracy``: its balanced
    cross-validated accuracy (0.5 = chance); ``n``: samples per side after balancing."""

    auc: float
    accuracy: float
    n: int


def membership_inference(
    model: torch.nn.Module,
    members,
    non_members,
    *,
    feature: str = "loss",
    folds: int = 5,
    seed: int = 0,
) -> MIAResult:
    """Can a logistic-regression attack on the per-sample loss (or entropy) tell ``members``
    (e.g. the forget classes' *training* samples) from ``non_members`` (the same classes' *test*
    samples)? The two sides are balanced by seeded subsampling and scored with stratified
    k-fold cross-validation. After perfect forgetting (or retraining) AUC ~ 0.5.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    lm, ym = outputs(model, members)
    ln, yn = outputs(model, non_members)
    fm, fn = _features(lm, ym, feature), _features(ln, yn, feature)
    rng = np.random.default_rng(seed)
    n = min(len(fm), len(fn))
    if n < folds:
        return MIAResult(float("nan"), float("nan"), n)
    fm = fm[rng.permutation(len(fm))[:n]]
    fn = fn[rng.permutation(len(fn))[:n]]
    x = np.concatenate([fm, fn])
    y = np.concatenate([np.ones(n), np.zeros(n)])
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    prob = cross_val_predict(LogisticRegression(), x, y, cv=cv, method="predict_proba")[:, 1]
    return MIAResult(float(roc_auc_score(y, prob)), float(((prob > 0.5) == y).mean()), n)


def forget_set_mia(model, train, test, forget_classes, *, feature: str = "loss", seed: int = 0) -> MIAResult:
    """:func:`membership_inference` with the forget classes' train samples against their test samples."""
    classes = _classes(forget_classes)
    return membership_inference(model, _subset_by_class(train, classes, True),
                                _subset_by_class(test, classes, True), feature=feature, seed=seed)


def member_rate(model, train, test, forget_classes, *, feature: str = "entropy", seed: int = 0) -> float:
    """The SSD paper's MIA: an attack trained on retained-train (members) vs test (non-members)
    predicts the forget training samples; the fraction called members (retrain gives ~0)."""
    from sklearn.linear_model import LogisticRegression

    classes = _classes(forget_classes)
    lr_, yr = outputs(model, _subset_by_class(train, classes, False))
    lt, yt = outputs(model, _subset_by_class(test, classes, False))
    lf, yf = outputs(model, _subset_by_class(train, classes, True))
    rng = np.random.default_rng(seed)
    fr, ft = _features(lr_, yr, feature), _features(lt, yt, feature)
    n = min(len(fr), len(ft))
    fr, ft = fr[rng.permutation(len(fr))[:n]], ft[rng.permutation(len(ft))[:n]]
    attack = LogisticRegression(class_weight="balanced").fit(
        np.concatenate([fr, ft]), np.concatenate([np.ones(n), np.zeros(n)]))
    return float(attack.predict(_features(lf, yf, feature)).mean())


@torch.no_grad()
def agreement(model_a, model_b, dataset) -> float:
    """Fraction of samples on which the two models predict the same class."""
    la, _ = outputs(model_a, dataset)
    lb, _ = outputs(model_b, dataset)
    return (la.argmax(-1) == lb.argmax(-1)).float().mean().item()


@torch.no_grad()
def js_divergence(model_a, model_b, dataset) -> float:
    """Mean Jensen-Shannon divergence (bits, in [0, 1]) between the two models' softmax outputs."""
    pa = F.softmax(outputs(model_a, dataset)[0], -1).double()
    pb = F.softmax(outputs(model_b, dataset)[0], -1).double()
    m = 0.5 * (pa + pb)

    def kl(p, q):
        return (p * (p.clamp_min(1e-300).log2() - q.clamp_min(1e-300).log2())).sum(-1)

    return (0.5 * kl(pa, m) + 0.5 * kl(pb, m)).mean().item()


def timed(fn: Callable, *args, **kwargs):
    """(result, wall seconds) of ``fn(*args, **kwargs)``: the forgetting wall time."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def report(model, train, test, forget_classes, *, reference=None, seed: int = 0) -> dict[str, float]:
    """All the metrics of one unlearned model (fractions), as a flat dict.

    ``reference``: the retrained model, for agreement and JS divergence on the forget classes'
    test samples (and agreement on the retained test samples).
    """
    classes = _classes(forget_classes)
    f_test, r_test = forget_retain_accuracy(model, test, classes)
    f_train, r_train = forget_retain_accuracy(model, train, classes)
    mia = forget_set_mia(model, train, test, classes, seed=seed)
    row = {
        "A_R": r_test, "E_F": 1.0 - f_test, "A_R_train": r_train, "E_F_train": 1.0 - f_train,
        "mia_auc": mia.auc, "mia_acc": mia.accuracy,
        "mia_entropy_auc": forget_set_mia(model, train, test, classes, feature="entropy", seed=seed).auc,
        "member_rate": member_rate(model, train, test, classes, seed=seed),
    }
    if reference is not None:
        forget_test = _subset_by_class(test, classes, True)
        row["agree_forget"] = agreement(model, reference, forget_test)
        row["agree_retain"] = agreement(model, reference, _subset_by_class(test, classes, False))
        row["js_forget"] = js_divergence(model, reference, forget_test)
    return row
