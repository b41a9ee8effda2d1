"""The verdict of a forget: is the result clean, by what the call can see? (docs/METHOD.md, "The verdict")

Every :func:`mnemo_fast.forget` returns one, in ``result.verdict``. It is computed from what the
call has, never from test data:

- **the codes** (always): after the step, every forget code must be misclassified with the
  depth of the criterion (its margin at most ``-depth`` times its margin before, its true-class
  probability at most ``max_forget_prob``), and the retained codes must all stay correct with
  their median margin keeping ``min_retain_margin`` of its value before. These are the
  criterion of ``lambda1="auto"`` (:class:`mnemo_fast.calibration.Criterion`, the caller's
  ``calibration=`` options where given), judged on the step applied, whichever way its lambdas
  were chosen.
- **a retain sample** (``forget(..., retain=(x, y))``, optional): real samples with their
  labels, e.g. a validation split. Those of the remaining classes must not lose more than
  ``max_retain_drop`` of accuracy (default 2 points) *with a margin for the sample's size*: the
  drop plus :data:`RETAIN_DROP_Z` standard errors of the paired per-row change must stay within
  it, so a sample of a few hundred rows cannot pass a step whose true loss is likely above the
  bound. Rows of a forget class, if any, must be at most ``max_forget_accuracy`` right
  (default 1%): a validation split with every class checks the real class, which the codes
  alone cannot (benchmarks/ZOO.md).

``mode="dampen"`` judges with its own criterion (mnemo_fast/calibration/dampen.py): with a sample
holding forget-class rows its search stops on those rows, and its verdict asks the codes' forget
side as well, since twenty-odd rows cannot show a class kept at a few percent.

A verdict that flags lists its reasons. A flagged result is returned all the same (the caller
decides) with a :class:`mnemo_fast.ForgetWarning`; the command line exits non-zero on it unless
``--accept-flagged``. How often a clean verdict hides a failure (a *silent failure*) is
measured on models trained in ways the package did not choose: benchmarks/ZOO.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor

#: A retain sample's accuracy on the remaining classes may drop this much (a fraction) and pass.
MAX_RETAIN_DROP = 0.02
#: A retain sample's rows of a forget class may be this much right (a fraction) and pass.
MAX_FORGET_ACCURACY = 0.01
#: One-sided z of the bound on a retain sample's drop (1.645: 95%). A step passes the sample
#: when drop + RETAIN_DROP_Z * se <= MAX_RETAIN_DROP, se the standard error of the mean of the
#: per-row change in correctness (before and after are the same rows: a paired difference).
RETAIN_DROP_Z = 1.645


def drop_bound(drop: float, se: float, z: float = RETAIN_DROP_Z) -> float:
    """The drop plus ``z`` standard errors: what the sample cannot rule out (the one formula of
    the verdict and of ``lambda1="auto"``'s trials)."""
    return drop + z * se


@dataclass(frozen=True)
class SampleAccuracy:
    """Accuracy of a real sample before and after the step: ``retain`` on the rows of the
    remaining classes (``retain_rows`` of them), ``forget`` on the rows of a forget class
    (None when it has none)."""

    retain_before: float
    retain_after: float
    retain_rows: int
    forget_before: float | None = None
    forget_after: float | None = None
    forget_rows: int = 0
    retain_drop_se: float = 0.0  # standard error of retain_drop (paired, per row)

    @property
    def retain_drop(self) -> float:
        return self.retain_before - self.retain_after

    def retain_drop_bound(self, z: float = RETAIN_DROP_Z) -> float:
        """:func:`drop_bound` of this sample's drop."""
        return drop_bound(self.retain_drop, self.retain_drop_se, z)


@dataclass(frozen=True)
class Verdict:
    """``flagged``: the call's evidence says the result may not be clean (``reasons`` say why);
    ``evidence``: "codes", or "codes and a retain sample of M"; ``codes_forget_ok`` /
    ``codes_retain_ok``: the two sides of the criterion on the codes after the step;
    ``sample``: the retain sample's accuracies (None without one); ``forget_ok`` / ``retain_ok``:
    the two sides as judged (the forget side: the codes' and the sample's forget-class rows; the
    retain side: the sample's remaining rows where it has some, else the codes')."""

    flagged: bool
    reasons: tuple[str, ...]
    evidence: str
    codes_forget_ok: bool
    codes_retain_ok: bool
    sample: SampleAccuracy | None = None
    details: dict = field(default_factory=dict)
    forget_ok: bool = False
    retain_ok: bool = False

    @property
    def clean(self) -> bool:
        return not self.flagged

    def __str__(self) -> str:
        head = "flagged" if self.flagged else "clean"
        return f"{head} (from {self.evidence})" + (": " + "; ".join(self.reasons) if self.reasons else "")


def margins(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """[N] margin (true-class logit minus the best other) and [N] true-class probability."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, labels[:, None], float("-inf"))
    prob = torch.softmax(logits.float(), -1).gather(1, labels[:, None]).squeeze(1)
    return true - other.max(1).values, prob


def code_sides(before: Tensor, after: Tensor, labels: Tensor, is_forget: Tensor, *, depth: float,
               max_forget_prob: float, min_retain_margin: float) -> tuple[list[str], list[str], dict]:
    """(what fails the forget side, what fails the retain side, figures) of the codes' logits ``before`` and
    ``after`` [N, C] with ``labels`` [N] and the forget mask ``is_forget`` [N]: the criterion of
    the module docstring. The figures are read in one host transfer."""
    before, after = before.float(), after.float()
    m0, p0 = margins(before, labels)
    m1, p1 = margins(after, labels)
    f, r = is_forget, ~is_forget
    floor = m0.clamp_min(1e-6)
    kept = m1[r] / floor[r]  # [R] each retained code's margin after / before
    one = m1.new_ones(())
    stats = torch.stack([
        (m1[f] > 0).float().sum() if f.any() else 0 * one,
        (-m1[f] / floor[f]).min() if f.any() else one * float("inf"),
        p1[f].max() if f.any() else 0 * one,
        (m1[r] <= 0).float().sum() if r.any() else 0 * one,
        kept.median() if r.any() else one,
        (m0[r] > 0).float().sum() if r.any() else 0 * one,
        kept.min() if r.any() else one,
        (p0[r] - p1[r]).mean() if r.any() else 0 * one,
        ((after[r] - before[r]).norm() / before[r].norm().clamp_min(1e-12)) if r.any() else 0 * one,
    ]).tolist()
    still, depth_after, prob_after, lost, ratio, right_before, ratio_min, prob_drop, logit_change = stats
    reasons = []
    if still > 0:
        reasons.append(f"{int(still)} of {int(f.sum())} forget codes still classified as their class")
    elif depth_after < depth or prob_after > max_forget_prob:
        reasons.append(f"the forget codes are misclassified, but not deeply (depth {depth_after:.2f}, criterion "
                       f"{depth:g}; largest true-class probability {prob_after:.2g}, criterion {max_forget_prob:g})")
    retain_reasons = []
    if lost > 0:
        retain_reasons.append(f"{int(lost)} of {int(r.sum())} retained codes misclassified after the step "
                              f"({int(r.sum() - right_before)} before)")
    if ratio < min_retain_margin:
        retain_reasons.append(f"the retained codes kept {ratio:.3g} of their median margin (criterion "
                              f"{min_retain_margin:g})")
    figures = {"forget_codes_still_right": int(still), "forget_depth": depth_after, "forget_max_prob": prob_after,
               "retain_codes_lost": int(lost), "retain_margin_ratio": ratio, "retain_margin_min": ratio_min,
               "retain_prob_drop": prob_drop, "retain_logit_change": logit_change}
    return reasons, retain_reasons, figures


def paired_drop(hits_before: Tensor, hits_after: Tensor) -> tuple[Tensor, Tensor]:
    """(drop, its standard error) of accuracy between two bool [M] hit vectors of the same rows,
    as 0-dim float32 tensors (no host transfer): the mean of ``before - after`` per row, and
    ``sqrt(var / M)`` of that per-row change (both 0 for M = 0)."""
    change = hits_before.float() - hits_after.float()
    if change.numel() == 0:
        zero = change.new_zeros(())
        return zero, zero
    return change.mean(), (change.var(correction=0) / change.numel()).sqrt()


def sample_accuracy(before: Tensor, after: Tensor, labels: Tensor, forget_classes) -> SampleAccuracy:
    """:class:`SampleAccuracy` of a real sample's logits ``before`` and ``after`` [M, C] with
    ``labels`` [M] (one host transfer)."""
    is_forget = torch.isin(labels, torch.tensor(list(forget_classes), device=labels.device))
    hit0, hit1 = before.argmax(-1) == labels, after.argmax(-1) == labels
    r, f = ~is_forget, is_forget
    n_r, n_f = int(r.sum()), int(f.sum())
    zero = hit0.new_zeros((), dtype=torch.float32)
    _, se = paired_drop(hit0[r], hit1[r])
    values = torch.stack([hit0[r].float().mean() if n_r else zero, hit1[r].float().mean() if n_r else zero,
                          hit0[f].float().mean() if n_f else zero, hit1[f].float().mean() if n_f else zero,
                          se]).tolist()
    return SampleAccuracy(values[0], values[1], n_r, values[2] if n_f else None, values[3] if n_f else None, n_f,
                          retain_drop_se=values[4])


def judge(codes_before: Tensor, codes_after: Tensor, labels: Tensor, is_forget: Tensor, *, criterion,
          sample: SampleAccuracy | None = None, max_retain_drop: float = MAX_RETAIN_DROP,
          max_forget_accuracy: float = MAX_FORGET_ACCURACY, retain_drop_z: float = RETAIN_DROP_Z) -> Verdict:
    """The :class:`Verdict` of a step from the codes' logits before and after it (and a retain
    sample's accuracies, where one was given); ``criterion``: a
    :class:`mnemo_fast.calibration.Criterion` (depth, max_forget_prob, min_retain_margin)."""
    forget_fails, retain_fails, details = code_sides(
        codes_before, codes_after, labels, is_forget, depth=criterion.depth,
        max_forget_prob=criterion.max_forget_prob, min_retain_margin=criterion.min_retain_margin)
    # with a retain sample the retain side is judged on it, not on the codes (as lambda1="auto" does)
    on_sample = sample is not None and bool(sample.retain_rows)
    judged = forget_fails if on_sample else forget_fails + retain_fails
    reasons = [f"codes: {reason}" for reason in judged]
    evidence = "codes"
    sample_forget_fails = sample_retain_fails = False
    if sample is not None:
        evidence = f"codes and a retain sample of {sample.retain_rows + sample.forget_rows}"
        bound = sample.retain_drop_bound(retain_drop_z)
        sample_retain_fails = on_sample and bound > max_retain_drop
        sample_forget_fails = bool(sample.forget_rows) and sample.forget_after > max_forget_accuracy
        if sample_retain_fails:
            said = (f"more than {max_retain_drop:.0%} lost" if sample.retain_drop > max_retain_drop else
                    f"{sample.retain_drop:.1%} lost; on {sample.retain_rows} rows a loss above {max_retain_drop:.0%} "
                    f"is not ruled out: bound {bound:.1%} at {retain_drop_z:g} standard errors")
            reasons.append(f"retain sample: accuracy on the remaining classes {sample.retain_before:.1%} -> "
                           f"{sample.retain_after:.1%} ({said})")
        if sample_forget_fails:
            reasons.append(f"retain sample: {sample.forget_after:.1%} of its {sample.forget_rows} forget-class "
                           f"rows still right (at most {max_forget_accuracy:.0%} allowed)")
    return Verdict(bool(reasons), tuple(reasons), evidence, not forget_fails, not retain_fails, sample, details,
                   forget_ok=not forget_fails and not sample_forget_fails,
                   retain_ok=not sample_retain_fails if on_sample else not retain_fails)
