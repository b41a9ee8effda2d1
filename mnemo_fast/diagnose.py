"""Do the codes stand for the class in this model? (docs/METHOD.md, "Checking the codes against real data").

The method shifts the parameters whose forget/remain Fisher ratio is high *on the codes*. That
forgets the class only if the same parameters carry the class on real data. This module
compares the two, per forget class ``c``, each against all the other classes:

    eta_codes = f_F / f_R from the codes           (the formula of docs/METHOD.md)
    eta_data  = f_F / f_R from real samples        (same formula, samples in place of codes)

- ``rank_correlation``: Spearman correlation of log eta_codes and log eta_data over every
  selected parameter element (average ranks for ties: elements at the epsilon floor tie);
- ``top_overlap``: the share of the top ``top`` fraction (default 1%) of elements by
  eta_data that are also in the top fraction by eta_codes (0: the shift misses the
  parameters that carry the class; a random choice gives about ``top``).

These two say *whether* codes and data agree on which parameters carry the class; measured on
small conv nets and MLPs they do not predict on their own whether forgetting will hold
(benchmarks/UNLEARNING.md, "Does the diagnostic predict the failures?"). The verdict therefore
rests on the effect itself, on the same real samples:

- ``forget_accuracy`` / ``retain_accuracy``: accuracy of the samples of the class and of the
  other classes before and after :func:`mnemo_fast.forget` of that class alone, with the
  given lambdas (default ``lambda1="auto"``, the codes-only calibration).

Verdict per class: ``"ok"`` (sample accuracy of the class <= ``max_forget_accuracy`` and the
other classes' accuracy within ``max_retain_drop``), ``"not forgotten"`` (the codes' shift does
not reach the class on real data) or ``"costly"`` (it forgets, but the parameters the codes
pick also carry other classes). Needs a few labelled *training* samples per class (``data``);
never the test set. Cost: per-sample Fisher passes over the codes and over at most
``per_class`` samples of every class, then one ``forget`` and one forward of the samples per
forget class.

With ``heldout`` (samples of the same classes the model was *not* trained on), one more
measure per class, about what forgetting leaves behind rather than what it removes:

- ``membership_auc``: (before, after) the probability that one of the class's training samples
  has a lower loss than one of its held-out samples (the ROC AUC of a loss-threshold
  membership attack; 0.5: the two cannot be told apart, as for a model never trained on the
  class). A class the model memorised sits well above 0.5 before forgetting; the one-shot
  shift changes which class the model predicts, not the ordering of these losses, so it
  usually stays there (benchmarks/UNLEARNING.md, "Membership: what diagnose says before
  forgetting"). ``membership_kept`` flags a class whose AUC after forgetting is still more than
  ``max_membership_gap`` from 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from . import engines, validation
from .codes import MnemonicCodes
from .method import forget
from .modeling import eval_mode, logits_of
from .session import code_inputs, code_logits, only_parameters

Tensor = torch.Tensor
VERDICTS = ("ok", "not forgotten", "costly")


@dataclass(frozen=True)
class ClassDiagnosis:
    """One forget class: how well the codes' Fisher ratio matches the data's."""

    cls: int
    rank_correlation: float   # Spearman, log eta_codes vs log eta_data, over all elements
    top_overlap: float        # |top(codes) & top(data)| / |top(data)|
    top_size: int             # elements in the top fraction
    forget_accuracy: tuple[float, float]   # (before, after) on the class's samples
    retain_accuracy: tuple[float, float]   # (before, after) on the other classes' samples
    lambdas: tuple[float, float]           # the (lambda1, lambda2) forget used
    verdict: str              # "ok", "not forgotten" or "costly"
    membership_auc: tuple[float, float] | None = None  # (before, after); None without ``heldout``
    membership_samples: int = 0             # training and held-out samples of the class, each
    max_membership_gap: float = 0.05

    @property
    def membership_kept(self) -> bool:
        """After forgetting, the class's training samples are still told apart from its
        held-out ones: |AUC - 0.5| > ``max_membership_gap`` (False without ``heldout``)."""
        return self.membership_auc is not None and abs(self.membership_auc[1] - 0.5) > self.max_membership_gap


@dataclass
class Diagnosis:
    """Per-class results of :func:`diagnose` and a one-line verdict (``str(diagnosis)``)."""

    classes: list[ClassDiagnosis]
    max_forget_accuracy: float
    max_retain_drop: float
    samples_per_class: dict[int, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every forget class is "ok"."""
        return all(c.verdict == "ok" for c in self.classes)

    @property
    def verdict(self) -> str:
        if self.ok:
            text = "the codes stand for every forget class in this model (forgotten on real samples, rest kept)"
        else:
            bad = "; ".join(
                f"class {c.cls}: {c.verdict} (sample accuracy {100 * c.forget_accuracy[1]:.0f}%, others "
                f"{100 * (c.retain_accuracy[1] - c.retain_accuracy[0]):+.1f} pts; Fisher rank correlation "
                f"{c.rank_correlation:.2f}, top overlap {c.top_overlap:.2f})"
                for c in self.classes if c.verdict != "ok")
            text = f"the codes do not stand for every forget class in this model: {bad}"
        kept = [c for c in self.classes if c.membership_kept]
        if kept:
            text += "; membership still visible after forgetting (memorised by this model: " + ", ".join(
                f"class {c.cls} AUC {c.membership_auc[0]:.2f} -> {c.membership_auc[1]:.2f}" for c in kept) + ")"
        return text

    def __str__(self) -> str:
        return self.verdict


def _ranks(values: Tensor) -> Tensor:
    """[M] average ranks (ties share the mean of their ranks), float64."""
    unique, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two [M] tensors (0 when either is constant)."""
    ra, rb = _ranks(a.flatten()), _ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.square().sum() * rb.square().sum()).sqrt()
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def top_overlap(codes_ratio: Tensor, data_ratio: Tensor, fraction: float) -> tuple[float, int]:
    """(share of the top ``fraction`` elements by data_ratio also in the top by codes_ratio, k)."""
    k = max(1, int(round(fraction * data_ratio.numel())))
    top_data = torch.topk(data_ratio, k).indices
    mask = torch.zeros(codes_ratio.numel(), dtype=torch.bool)
    mask[torch.topk(codes_ratio, k).indices] = True
    return mask[top_data].float().mean().item(), k


def membership_auc(member_losses: Tensor, heldout_losses: Tensor) -> float:
    """P(a member's loss < a held-out sample's loss), ties counted half: the ROC AUC of the
    attack "lower loss means member" (Mann-Whitney U from average ranks). [M], [H] -> float."""
    m, h = member_losses.numel(), heldout_losses.numel()
    if m == 0 or h == 0:
        raise ValueError(f"membership_auc needs samples on both sides, got {m} and {h}")
    ranks = _ranks(torch.cat([member_losses.flatten(), heldout_losses.flatten()]).double())
    return float((ranks[m:].sum() - h * (h + 1) / 2) / (m * h))


def _per_class_fishers(engine, model, groups: Sequence[tuple[Tensor, Tensor]], chunk_size, output_fn) -> list[Tensor]:
    """[C] flat mean per-sample Fisher of each group (inputs, labels); model in eval mode."""
    out = []
    for x, y in groups:
        sums = engine.sum_squared_grads(model, x, y, chunk_size, output_fn)
        out.append(torch.cat([s.flatten().double() for s in sums.values()]) / x.shape[0])
    return out


def _log_ratio(per_class: list[Tensor], c: int, eps: float) -> Tensor:
    """log(f_F / f_R) with f_F = eps + F_c, f_R = (eps + sum_{c' != c} F_c') / (C - 1)."""
    rest = sum(f for k, f in enumerate(per_class) if k != c)
    return torch.log(per_class[c] + eps) - torch.log((rest + eps) / (len(per_class) - 1))


def _tensors(data, name: str = "data") -> tuple[Tensor, Tensor]:
    """(inputs [N, ...], labels [N]) of a TensorDataset or of an (inputs, labels) pair; labels
    must be integer class indices (float labels would be read as class probabilities)."""
    if isinstance(data, torch.utils.data.TensorDataset):
        pair = data.tensors[:2]
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        pair = tuple(data)
    else:
        pair = ()
    if len(pair) != 2 or not all(torch.is_tensor(t) for t in pair):
        raise TypeError(f"diagnose: {name} must be (inputs, labels) tensors or a TensorDataset, "
                        f"got {type(data).__name__}")
    x, y = pair
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"diagnose: the labels of {name} must be integer class indices, got {y.dtype}")
    if y.dim() != 1 or x.shape[:1] != y.shape:
        raise ValueError(f"diagnose: {name} needs inputs [N, ...] and labels [N], got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    return x, y


def _data_groups(data, classes: Iterable[int], per_class: int, seed: int,
                 name: str = "data") -> list[tuple[Tensor, Tensor]]:
    """Per class of ``classes``: at most ``per_class`` of its samples, seeded."""
    x, y = _tensors(data, name)
    g = torch.Generator().manual_seed(seed)
    groups = []
    for c in classes:
        idx = torch.nonzero(y == c).flatten()
        if len(idx) == 0:
            raise validation.UnlearningError(f"diagnose: the {name} hold no sample of class {c}")
        idx = idx[torch.randperm(len(idx), generator=g)[:per_class]]
        groups.append((x[idx], y[idx]))
    return groups


def diagnose(
    model: torch.nn.Module,
    codes: MnemonicCodes,
    forget_classes: Iterable[int] | int,
    *,
    data,
    per_class: int = 64,
    top: float = 0.01,
    lambda1: float | str = "auto",
    lambda2: float = 10.0,
    max_forget_accuracy: float = 0.05,
    max_retain_drop: float = 0.02,
    heldout=None,
    membership_samples: int = 1000,
    max_membership_gap: float = 0.05,
    eps: float = 1e-16,
    seed: int = 0,
    chunk_size: int | None = None,
    output_fn: Callable = logits_of,
    params=None,
    engine=None,
) -> Diagnosis:
    """Compare the codes' forget/remain Fisher ratio with real data's, per forget class.

    ``data``: (inputs [N, *shape], integer labels [N]) or a TensorDataset of *training* samples with
    every class present; at most ``per_class`` per class are used (seeded). ``lambda1``,
    ``lambda2``: what :func:`mnemo_fast.forget` is run with for the check (default: the
    codes-only calibration). ``heldout``: (inputs, labels) or a TensorDataset of samples the
    model was not trained on (not the test set either, if that decides anything later); with
    it, the membership AUC of each forget class before and after, from at most
    ``membership_samples`` of the class's samples on each side (the same number on both).
    See the module docstring for the measures and the verdicts. The model's parameters are not
    changed.
    """
    wanted = [forget_classes] if isinstance(forget_classes, int) else list(forget_classes)
    classes = sorted({validation.forget_classes(codes, [c])[0] for c in wanted})  # each is checked alone
    if not classes:
        raise validation.UnlearningError("diagnose: no forget class given")
    engine = engines.resolve(engine)
    validation.trainable_model(model)
    if not 0 < top < 1:
        raise ValueError(f"top must be a fraction in (0, 1), got {top}")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if membership_samples < 1:
        raise ValueError(f"membership_samples must be >= 1, got {membership_samples}")
    if not 0 <= max_membership_gap < 0.5:
        raise ValueError(f"max_membership_gap must be in [0, 0.5), got {max_membership_gap}")
    groups = _data_groups(data, range(codes.num_classes), per_class, seed)
    # membership: the same number of the class's training and held-out samples (seeded)
    members = {}
    if heldout is not None:
        for c in classes:
            (xm, ym), = _data_groups(data, [c], membership_samples, seed + 1)
            (xh, yh), = _data_groups(heldout, [c], membership_samples, seed + 2, name="held-out samples")
            n = min(len(ym), len(yh))
            members[c] = (xm[:n], ym[:n], xh[:n], yh[:n])
    with engines.forwards(engine, model), eval_mode(model), only_parameters(model, params):
        code_groups = [code_inputs(model, codes, [c]) for c in range(codes.num_classes)]
        device = code_groups[0][0].device
        dtype = code_groups[0][0].dtype
        groups = [(x.to(device, dtype), y.to(device)) for x, y in groups]
        members = {c: tuple(t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in ts)
                   for c, ts in members.items()}
        from_codes = _per_class_fishers(engine, model, code_groups, chunk_size, output_fn)
        from_data = _per_class_fishers(engine, model, groups, chunk_size, output_fn)
    x = torch.cat([g[0] for g in groups])
    y = torch.cat([g[1] for g in groups])
    hits_before = _hits(model, x, y, chunk_size, output_fn)
    results = []
    for c in classes:
        rc, rd = _log_ratio(from_codes, c, eps).cpu(), _log_ratio(from_data, c, eps).cpu()
        rho = spearman(rc, rd)
        overlap, k = top_overlap(rc, rd, top)
        result = forget(model, codes, [c], lambda1=lambda1, lambda2=lambda2, eps=eps, chunk_size=chunk_size,
                        output_fn=output_fn, params=params, engine=engine)
        hits_after = _hits(result.model, x, y, chunk_size, output_fn)
        membership = None
        if c in members:
            membership = tuple(_membership(m, *members[c], chunk_size, output_fn) for m in (model, result.model))
        mine = y == c
        f = (hits_before[mine].mean().item(), hits_after[mine].mean().item())
        r = (hits_before[~mine].mean().item(), hits_after[~mine].mean().item())
        if f[1] > max_forget_accuracy:
            verdict = "not forgotten"
        elif r[1] < r[0] - max_retain_drop:
            verdict = "costly"
        else:
            verdict = "ok"
        results.append(ClassDiagnosis(c, rho, overlap, k, f, r, (result.lambda1, result.lambda2), verdict,
                                      membership, len(members[c][1]) if c in members else 0, max_membership_gap))
    return Diagnosis(results, max_forget_accuracy, max_retain_drop, {c: len(g[1]) for c, g in enumerate(groups)})


@torch.no_grad()
def _losses(model, x, y, chunk_size, output_fn) -> Tensor:
    """[N] float64 per-sample cross-entropy of the model (eval mode), on the CPU."""
    logits = code_logits(model, x, chunk_size or 1024, output_fn)
    return torch.nn.functional.cross_entropy(logits, y, reduction="none").double().cpu()


def _membership(model, xm, ym, xh, yh, chunk_size, output_fn) -> float:
    """:func:`membership_auc` of ``model`` on training (xm, ym) vs held-out (xh, yh) samples."""
    return membership_auc(_losses(model, xm, ym, chunk_size, output_fn), _losses(model, xh, yh, chunk_size, output_fn))


@torch.no_grad()
def _hits(model, x, y, chunk_size, output_fn) -> Tensor:
    """[N] float: 1 where the model (eval mode) classifies x[n] as y[n]."""
    return (code_logits(model, x, chunk_size or 1024, output_fn).argmax(-1) == y).float().cpu()
