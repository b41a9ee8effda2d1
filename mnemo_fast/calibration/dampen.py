"""``mode="dampen"`` with ``lambda1="auto"``: the dampening threshold chosen from the codes (and a
retain sample where one is given). docs/METHOD.md, "Dampening".

The dampening step scales every parameter element whose Fisher ratio ``eta = f_F / f_R`` exceeds
a threshold ``a`` by ``min(lam / eta, 1)`` (Selective Synaptic Dampening, Foster et al., AAAI
2024, with the codes' Fisher in place of the training data's). A smaller threshold dampens more
elements, so the search scans :data:`THRESHOLDS` from the largest down and stops at the first
one whose result meets the forget side of the criterion, then goes :data:`MARGIN_NOTCHES` further
(a threshold 10^0.25 smaller): the least dampening that forgets, with a margin.

- The forget side is judged by :func:`mnemo_fast.verdict.judge`, the verdict's own function, on
  the criterion :func:`criterion_for` gives: :data:`DEFAULT_CRITERION` (or the caller's
  ``calibration=`` options) on the codes; with a retain sample holding rows of the forget class
  (a validation split), those rows must end at most 1% right and the codes need only end
  misclassified (real rows judge the depth better than the codes do: benchmarks/ZOO.md,
  "Dampening").
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
#: the forget side on the codes alone (tuned on the zoo's tune half: benchmarks/ZOO.md, "Dampening")
DEFAULT_CRITERION = Criterion(depth=0.25, max_forget_prob=1e-2, min_retain_margin=0.7)
#: the codes' forget side when a sample's forget-class rows judge the forgetting: misclassified
MISCLASSIFIED = Criterion(depth=0.0, max_forget_prob=1.0, min_retain_margin=0.7)
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
    :data:`DEFAULT_CRITERION`; with a sample's forget-class rows, only misclassified codes are
    asked for (the caller's ``min_retain_margin`` kept)."""
    base = options if options is not None else DEFAULT_CRITERION
    if sample_has_forget_rows and options is None:
        return replace(MISCLASSIFIED, min_retain_margin=base.min_retain_margin)
    return base


def forget_met(verdict: verdicts.Verdict) -> bool:
    """The forget side of a :class:`mnemo_fast.verdict.Verdict`: the codes', and a sample's
    forget-class rows at most 1% right where it has some."""
    sample = verdict.sample
    rows_ok = (sample is None or not sample.forget_rows
               or sample.forget_after <= verdicts.MAX_FORGET_ACCURACY)
    return verdict.codes_forget_ok and rows_ok


def calibrate_dampening(session: CandidateSession, lam: float, criterion: Criterion,
                        classes, thresholds=THRESHOLDS) -> Calibration:
    """Scan ``thresholds`` (largest first) on ``session`` and leave the chosen dampening applied.

    Returns a :class:`Calibration` with ``lambda1`` the threshold and ``lambda2`` = ``lam``,
    ``search="dampen"``; ``diagnostics["trials"]`` holds (threshold, forget met, retain met) of
    every trial."""
    start = time.perf_counter()
    before = session.before_logits()
    trials, chosen, verdict, notches = [], None, None, 0
    for threshold in thresholds:
        session.dampen(threshold, lam)
        verdict = judge(session, before, criterion, classes)
        met = forget_met(verdict)
        trials.append({"threshold": threshold, "forget_met": met, "retain_met": not _retain_failed(verdict)})
        if chosen is not None:
            notches += 1
        elif met:
            chosen = threshold
        if chosen is not None and notches == MARGIN_NOTCHES:
            break
    reached = chosen is not None
    chosen = trials[-1]["threshold"]  # the last trial stays applied: the margin's, or the most dampening
    feasible = reached and forget_met(verdict) and not verdict.flagged
    calibration = Calibration(lambda1=chosen, lambda2=lam, sign=None, search="dampen", feasible=feasible,
                              forget_reached=reached, seconds=time.perf_counter() - start)
    calibration.diagnostics.update(trials=trials, criterion=criterion, verdict=verdict)
    if not reached:
        warnings.warn(
            f"mode='dampen', lambda1='auto': no threshold down to {thresholds[-1]:g} met the forget side "
            f"({'; '.join(verdict.reasons)}); the most dampening step was applied", CalibrationWarning,
            stacklevel=user_stacklevel())
    return calibration


def judge(session: CandidateSession, before, criterion: Criterion, classes) -> verdicts.Verdict:
    """The verdict of the parameters as they are now (the codes, and the session's retain sample)."""
    sample = None
    if session.retain_inputs is not None:
        sample = verdicts.sample_accuracy(session.retain_before, session.retain_logits(), session.retain_labels,
                                          classes)
    return verdicts.judge(before, session.logits(), session.labels, session.is_forget, criterion=criterion,
                          sample=sample)


def _retain_failed(verdict: verdicts.Verdict) -> bool:
    """Whether the verdict's reasons include the retain side (codes or sample)."""
    if verdict.sample is not None and verdict.sample.retain_rows:
        return any(r.startswith("retain sample: accuracy") for r in verdict.reasons)
    return not verdict.codes_retain_ok
