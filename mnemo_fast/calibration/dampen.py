"""``mode="dampen"`` with ``lambda1="auto"``: the dampening threshold chosen from the codes (and a
retain sample where one is given). docs/METHOD.md, "Dampening".

The dampening step scales every parameter element whose Fisher ratio ``eta = f_F / f_R`` exceeds
a threshold ``a`` by ``min(lam / eta, 1)`` (Selective Synaptic Dampening, Foster et al., AAAI
2024, with the codes' Fisher in place of the training data's). A smaller threshold dampens more
elements, so the search scans :data:`THRESHOLDS` from the largest down and stops at the first
one whose result meets the forget side of the criterion, then goes :data:`MARGIN_NOTCHES` further
(a threshold 10^0.25 smaller): the least dampening that forgets, with a margin.

- The forget side is judged by :meth:`mnemo_fast.session.CandidateSession.verdict`, the verdict's own function, on
  the criterion :func:`criterion_for` gives: :data:`DEFAULT_CRITERION` (or the caller's
  ``calibration=`` options) on the codes; with a retain sample holding rows of the forget class
  (a validation split), those rows must end at most 1% right and the codes need only end
  misclassified (real rows judge the depth better than the codes do: benchmarks/ZOO.md,
  "Dampening").
- **The confirmation** (with such a sample only). Twenty-odd forget-class rows cannot show a
  class kept at one or two percent, so a clean verdict also needs the codes' own forget side of
  :data:`DEFAULT_CRITERION` (:func:`verdict_criterion_for`): a sample adds evidence and never
  relaxes it. Where the margin's threshold does not meet it, the scan goes on down while the
  sample's retained rows hold and applies the first threshold that meets it; where none does,
  the margin's threshold is applied and the verdict flags it.
- The retain side is not searched: below the chosen threshold it only gets worse. Whether the
  chosen result keeps it is ``feasible`` (and the verdict's).
- No threshold meets the forget side: the smallest one (:data:`THRESHOLDS`' last, the most
  dampening) is chosen, ``forget_reached`` is False and a :class:`CalibrationWarning` says so.

Each trial is one write of the parameters from their original values (no undo) and one forward
of the codes (and of the sample): at most ``len(THRESHOLDS)`` = 33 of each.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import replace

import torch

from .. import verdict as verdicts
from ..session import CandidateSession
from ..stack import user_stacklevel
from .search import Calibration, CalibrationWarning, Criterion

#: thresholds tried, from 1e8 down to 1, four a decade (eta <= 1: the forget classes need the
#: element no more than the others, never dampened)
THRESHOLDS = tuple(10.0 ** (k / 4) for k in range(32, -1, -1))
#: SSD's lambda: a selected element is scaled by min(lam / eta, 1)
DEFAULT_LAM = 1.0
#: the criterion on the codes alone (tuned on the zoo's tune half: benchmarks/ZOO.md, "Dampening").
#: The retain side is only judged, never searched: 0.9 is the loosest margin that left the tune
#: half with one silent failure (0.7: eight), at the price of more false alarms
DEFAULT_CRITERION = Criterion(depth=0.25, max_forget_prob=1e-2, min_retain_margin=0.9)
#: the codes' forget side when a sample's forget-class rows judge the forgetting: misclassified
#: (the retain side as in DEFAULT_CRITERION)
MISCLASSIFIED = replace(DEFAULT_CRITERION, depth=0.0, max_forget_prob=1.0)
#: thresholds past the first that meets the forget side: the margin the choice keeps (one notch,
#: a factor 10^0.25; on the tune half it turned most "class kept" silent failures into forgotten
#: or flagged cases)
MARGIN_NOTCHES = 1


#: modules whose parameters the dampening leaves alone by default (with a class name holding
#: "Norm" or "Embedding": transformers' own RMSNorm, ViTEmbeddings, ...)
LEFT_OUT_TYPES = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase, torch.nn.Embedding)


def default_params(model: torch.nn.Module):
    """mode="dampen"'s ``params=`` when the caller gives none: a name predicate leaving out the
    parameters of normalisation and embedding modules, and everything inside them (a module that
    is one of :data:`LEFT_OUT_TYPES` or whose class name holds "Norm" or "Embedding"). On the
    zoo's tune half this forgot more cases under every rule compared than dampening every
    parameter (benchmarks/ZOO.md, "Dampening"); ``params="*"`` dampens every parameter."""
    left_out = set()
    for prefix, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, LEFT_OUT_TYPES) or "Norm" in kind or "Embedding" in kind:
            left_out.update(f"{prefix}.{name}" if prefix else name for name, _ in module.named_parameters())
    return lambda name: name not in left_out


def criterion_for(options: Criterion | None, sample_has_forget_rows: bool) -> Criterion:
    """The criterion of a dampening search: the caller's (``calibration=`` options) or
    :data:`DEFAULT_CRITERION`, or :data:`MISCLASSIFIED` where a sample's forget-class rows judge
    the forgetting."""
    if options is not None:
        return options
    return MISCLASSIFIED if sample_has_forget_rows else DEFAULT_CRITERION


def verdict_criterion_for(options: Criterion | None) -> Criterion:
    """The criterion of a dampening's verdict: the caller's, else :data:`DEFAULT_CRITERION`
    whatever the sample (the search may stop on a sample's forget rows, the verdict needs the
    codes' forget side as well)."""
    return options if options is not None else DEFAULT_CRITERION


def forget_met(verdict: verdicts.Verdict) -> bool:
    """The forget side of a :class:`mnemo_fast.verdict.Verdict`: the codes', and a sample's
    forget-class rows at most 1% right where it has some (``verdict.forget_ok``)."""
    return verdict.forget_ok


def calibrate_dampening(session: CandidateSession, lam: float, criterion: Criterion,
                        classes, thresholds=THRESHOLDS, confirm: Criterion | None = None) -> Calibration:
    """Scan ``thresholds`` (largest first) on ``session`` and leave the chosen dampening applied.

    ``criterion`` stops the scan; ``confirm`` (default: ``criterion``) judges the verdict, and
    where it differs and the margin's threshold fails it, the scan goes on while the retain side
    holds (the module docstring's confirmation). Returns a :class:`Calibration` with ``lambda1``
    the threshold and ``lambda2`` = ``lam``, ``search="dampen"``; ``diagnostics["trials"]``
    holds (threshold, forget met, retain met) of every trial, by ``criterion`` and, once
    confirming, by ``confirm`` (``"confirming": True``)."""
    start = time.perf_counter()
    confirm = criterion if confirm is None else confirm
    criteria = (criterion,) if confirm == criterion else (criterion, confirm)  # each trial judged by both
    trials, first_met, judged, notches, index = [], None, (), 0, 0
    for index, threshold in enumerate(thresholds):
        session.dampen(threshold, lam)
        judged = session.verdicts(criteria, classes)  # one forward for both criteria
        trials.append({"threshold": threshold, "forget_met": judged[0].forget_ok, "retain_met": judged[0].retain_ok})
        if first_met is not None:
            notches += 1
        elif judged[0].forget_ok:
            first_met = threshold
        if first_met is not None and notches == MARGIN_NOTCHES:
            break
    reached = first_met is not None
    applied = trials[-1]["threshold"]  # the last trial stays applied: the margin's, or the most dampening
    verdict = judged[-1]  # by confirm
    if len(criteria) > 1 and reached and verdict.flagged and verdict.retain_ok:
        verdict, applied = _confirm(session, lam, confirm, classes, thresholds[index + 1:], trials, verdict, applied)
    calibration = Calibration(lambda1=applied, lambda2=lam, sign=None, search="dampen",
                              feasible=reached and not verdict.flagged,  # not flagged: both sides met
                              forget_reached=reached, seconds=time.perf_counter() - start)
    calibration.diagnostics.update(trials=trials, criterion=criterion, verdict_criterion=confirm, verdict=verdict)
    if not reached:
        warnings.warn(
            f"mode='dampen', lambda1='auto': no threshold down to {thresholds[-1]:g} met the forget side "
            f"({'; '.join(verdict.reasons)}); the most dampening step was applied", CalibrationWarning,
            stacklevel=user_stacklevel())
    return calibration


def _confirm(session: CandidateSession, lam: float, confirm: Criterion, classes, below, trials: list,
             verdict: verdicts.Verdict, applied: float) -> tuple[verdicts.Verdict, float]:
    """The confirmation: try the thresholds ``below`` the margin's (largest first) until one
    meets ``confirm`` (returned applied, with its verdict) or loses the retain side; then, or
    when none is left, the margin's threshold ``applied`` is written again and returned with its
    flagged ``verdict``."""
    for threshold in below:
        session.dampen(threshold, lam)
        trial = session.verdict(confirm, classes)
        trials.append({"threshold": threshold, "forget_met": trial.forget_ok, "retain_met": trial.retain_ok,
                       "confirming": True})
        if not trial.flagged:
            return trial, threshold
        if not trial.retain_ok:
            break
    if trials[-1]["threshold"] != applied:
        session.dampen(applied, lam)  # written from the original values: exactly the margin's step
    return verdict, applied
