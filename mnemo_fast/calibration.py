"""Choose lambda1 (and optionally lambda2) from the mnemonic codes alone (docs/METHOD.md, "Choosing lambda1 from the codes").

Misclassifying the forget codes is not enough (on Fashion-MNIST lambda1 = 1e-3 flips every
forget code, yet some classes keep ~20% test accuracy). The criterion therefore asks for a
*depth* of forgetting and bounds the damage, both read off the codes:

- forget side: every forget-class code is misclassified with a margin (true-class logit minus
  the best other logit) of at most ``-depth * m0``, where ``m0`` is that code's margin before
  forgetting (the code must end as confidently wrong as it was right, scaled by ``depth``), and
  its true-class probability is at most ``max_forget_prob``;
- retain side: every remaining-class code stays correct, and the median remaining-code margin
  keeps at least ``min_retain_margin`` of its value before forgetting.

lambda1 is the smallest scale meeting the forget side, found on a log scale: one trial per
decade from ``lambda1_range[0]`` up, then ``steps`` bisections in log space inside the first
decade that meets it. Each trial applies the shift with both signs to the live parameters
of a :class:`mnemo_fast.session.CandidateSession` (the one :func:`mnemo_fast.forget` then
uses: the Fisher pair is computed once), scores them on the codes (at most ``chunk_size`` per
forward) with the rule of :func:`mnemo_fast.forget` (keep +1 only if A_R + E_F is strictly
better), and undoes it: no copy of the model is made. If the retain side fails at that
lambda1, ``feasible`` is False (the codes say the classes cannot be forgotten cleanly at this
lambda2); if no trial meets the forget side, lambda1 is the top of the range, ``feasible`` is
False and a :class:`CalibrationWarning` says so. With several lambda2 candidates, each gets its
lambda1 and the feasible one whose remaining codes keep the largest median margin wins (ties:
the smaller lambda2).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from . import engines, validation
from .codes import MnemonicCodes
from .reference.fisher import logits_of
from .session import CandidateSession, better_sign

Tensor = torch.Tensor


class CalibrationWarning(UserWarning):
    """No trial reached the forgetting criterion: lambda1 is the top of the searched range."""


@dataclass
class Trial:
    """What the codes say at one (lambda1, lambda2): for the sign :func:`forget` would keep."""

    lambda1: float
    lambda2: float
    sign: int
    forget_max_margin: float      # largest (least negative) forget-code margin
    forget_max_prob: float        # largest true-class probability of a forget code
    forget_depth: float           # min over forget codes of -margin_after / margin_before
    retain_all_correct: bool
    retain_margin_ratio: float    # median remaining-code margin after / before
    forget_ok: bool = False
    retain_ok: bool = False


@dataclass
class Calibration:
    """The chosen ``lambda1``/``lambda2`` and how they were found.

    ``feasible``: the chosen trial meets both sides of the criterion; ``forget_reached``: some
    trial met the forget side (False: lambda1 is the top of the range, with a
    :class:`CalibrationWarning`); ``chosen``: that trial (None when not reached); ``trials``:
    every trial in order; ``per_lambda2``: (lambda2, lambda1, trial) per lambda2 candidate;
    ``seconds``: the time taken. ``diagnostics`` holds the same as a dict (and the criterion
    and the forget codes' margins before).
    """

    lambda1: float
    lambda2: float
    feasible: bool = False
    forget_reached: bool = False
    chosen: Trial | None = None
    trials: list[Trial] = field(default_factory=list)
    per_lambda2: list[tuple[float, float, Trial | None]] = field(default_factory=list)
    seconds: float = 0.0
    diagnostics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Criterion:
    """The forget and retain sides of the criterion (see the module docstring)."""

    depth: float = 1.0
    max_forget_prob: float = 1e-3
    min_retain_margin: float = 0.5


def _margins(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, labels[:, None], float("-inf"))
    prob = torch.softmax(logits.float(), -1).gather(1, labels[:, None]).squeeze(1)
    return true - other.max(1).values, prob


class _Prober:
    """Trials on a :class:`CandidateSession`: shift with both signs, score the margins, undo."""

    def __init__(self, session: CandidateSession):
        self.session = session
        self.labels, self.is_forget = session.labels, session.is_forget
        self.margin0, self.prob0 = _margins(session.before_logits(), self.labels)

    @torch.no_grad()
    def probe(self, lambda1: float, lambda2: float) -> Trial:
        results = []
        for sign in (1, -1):  # each written from the originals: no undo in between
            self.session.set_shift(lambda1, lambda2, sign)
            margin, prob = _margins(self.session.logits(), self.labels)
            correct = margin > 0
            # ties count as wrong, as argmax would pick the first index; close enough here
            a_r = correct[~self.is_forget].float().mean().item() if (~self.is_forget).any() else 1.0
            e_f = 1.0 - correct[self.is_forget].float().mean().item()
            results.append((a_r + e_f, sign, margin, prob))
        best = results[0] if better_sign(results[0][0], results[1][0]) == 1 else results[1]
        _, sign, margin, prob = best
        f, r = self.is_forget, ~self.is_forget
        m0f = self.margin0[f].clamp_min(1e-6)
        depth = (-margin[f] / m0f).min().item()
        if r.any():
            m0r = self.margin0[r].clamp_min(1e-6)
            ratio = (margin[r] / m0r).median().item()
            retain_correct = bool((margin[r] > 0).all())
        else:
            ratio, retain_correct = 1.0, True
        return Trial(lambda1, lambda2, sign, margin[f].max().item(), prob[f].max().item(),
                     depth, retain_correct, ratio)


def _judge(trial: Trial, depth: float, max_forget_prob: float, min_retain_margin: float) -> Trial:
    trial.forget_ok = trial.forget_depth >= depth and trial.forget_max_prob <= max_forget_prob
    trial.retain_ok = trial.retain_all_correct and trial.retain_margin_ratio >= min_retain_margin
    return trial


def _search_lambda1(prober, lambda2, lo, hi, steps, judge, trials) -> tuple[float, Trial | None]:
    def run(l1: float) -> Trial:
        t = judge(prober.probe(l1, lambda2))
        trials.append(t)
        return t

    decades = max(1, int(round(math.log10(hi / lo))))
    previous = math.log10(lo)
    for k in range(decades + 1):
        x = math.log10(lo) + k
        t = run(10**x)
        if t.forget_ok:
            if k == 0:
                return 10**x, t
            a, b, best = previous, x, t          # a fails, b meets the forget side
            for _ in range(steps):
                mid = 0.5 * (a + b)
                tm = run(10**mid)
                if tm.forget_ok:
                    b, best = mid, tm
                else:
                    a = mid
            return 10**b, best
        previous = x
    return hi, None


def lambda2_candidates(lambda2: float | Sequence[float]) -> list[float]:
    """The lambda2 values to search: one number or a non-empty sequence, all positive."""
    return validation.lambda2_list(lambda2)


def calibrate_session(
    session: CandidateSession,
    lambda2s: Sequence[float],
    *,
    depth: float = 1.0,
    max_forget_prob: float = 1e-3,
    min_retain_margin: float = 0.5,
    lambda1_range: tuple[float, float] = (1e-7, 10.0),
    steps: int = 6,
) -> Calibration:
    """The search of :func:`calibrate` on an open session (its Fisher pair, its live
    parameters, left as they were). Cost: 2 forwards of the codes per trial, each after one
    elementwise pass that writes the candidate from the original values."""
    start = time.perf_counter()
    criterion = Criterion(depth, max_forget_prob, min_retain_margin)
    lo, hi = lambda1_range
    if not 0 < lo < hi:
        raise ValueError(f"lambda1_range must satisfy 0 < lo < hi, got {lambda1_range}")

    def judge(t: Trial) -> Trial:
        return _judge(t, criterion.depth, criterion.max_forget_prob, criterion.min_retain_margin)

    prober = _Prober(session)
    trials: list[Trial] = []
    choices = []
    try:
        for l2 in lambda2s:
            l1, t = _search_lambda1(prober, l2, lo, hi, steps, judge, trials)
            choices.append((l1, l2, t))
    finally:
        session.restore()

    def rank(choice):
        l1, l2, t = choice
        if t is None:
            return (0, 0, -math.inf, -l2)
        return (1, int(t.retain_ok), t.retain_margin_ratio, -l2)

    l1, l2, chosen = max(choices, key=rank)
    feasible = bool(chosen is not None and chosen.retain_ok)
    if chosen is None:
        warnings.warn(
            f"lambda1 calibration: no trial in {lambda1_range} reached the forgetting criterion "
            f"(depth {criterion.depth}, max forget probability {criterion.max_forget_prob}); using the "
            f"top of the range, lambda1 = {hi:g}",
            CalibrationWarning,
            stacklevel=3,
        )
    seconds = time.perf_counter() - start
    per_lambda2 = [(c[1], c[0], c[2]) for c in choices]
    diagnostics = {
        "feasible": feasible,
        "forget_reached": chosen is not None,
        "chosen": chosen,
        "per_lambda2": per_lambda2,
        "trials": trials,
        "criterion": {"depth": criterion.depth, "max_forget_prob": criterion.max_forget_prob,
                      "min_retain_margin": criterion.min_retain_margin},
        "forget_margin_before": prober.margin0[prober.is_forget].tolist(),
        "seconds": seconds,
    }
    return Calibration(lambda1=l1, lambda2=l2, feasible=feasible, forget_reached=chosen is not None,
                       chosen=chosen, trials=trials, per_lambda2=per_lambda2, seconds=seconds,
                       diagnostics=diagnostics)


def calibrate(
    model: torch.nn.Module,
    codes: MnemonicCodes,
    forget_classes: Iterable[int] | int,
    *,
    lambda2: float | Sequence[float] = 10.0,
    depth: float = 1.0,
    max_forget_prob: float = 1e-3,
    min_retain_margin: float = 0.5,
    lambda1_range: tuple[float, float] = (1e-7, 10.0),
    steps: int = 6,
    eps: float = 1e-16,
    chunk_size: int | None = None,
    output_fn: Callable = logits_of,
    params=None,
    engine=None,
) -> Calibration:
    """lambda1 (and lambda2 if a sequence is given) for :func:`mnemo_fast.forget`, codes only.

    See the module docstring for the criterion. Cost: one Fisher pair from the codes, then
    2 forward passes of the codes per trial, at most ``chunk_size`` codes each (about
    ``log10(range) + steps`` trials per lambda2). The model's parameters are left exactly as
    they were. ``forget(lambda1="auto")`` runs the same search on its own session, so it
    computes the Fisher pair once.
    """
    start = time.perf_counter()
    options = dict(depth=depth, max_forget_prob=max_forget_prob, min_retain_margin=min_retain_margin,
                   lambda1_range=lambda1_range, steps=steps)
    options = validation.calibration_options(options, options)  # README, "What it refuses, and how"
    depth, max_forget_prob, min_retain_margin, lambda1_range, steps = options.values()
    eps, chunk_size = validation.number("eps", eps), validation.chunk_size(chunk_size)
    validation.usable_codes(codes)
    classes = validation.forget_classes(codes, forget_classes)
    engine = engines.resolve(engine)
    validation.trainable_model(model)
    lambda2s = lambda2_candidates(lambda2)
    validation.representable({"lambda2": lambda2s}, model.parameters())
    lo, hi = lambda1_range
    with engines.forwards(engine, model):
        session = CandidateSession(model, codes, classes, engine=engine, eps=eps, chunk_size=chunk_size,
                                   output_fn=output_fn, params=params)
        result = calibrate_session(session, lambda2s, depth=depth, max_forget_prob=max_forget_prob,
                                   min_retain_margin=min_retain_margin, lambda1_range=lambda1_range, steps=steps)
    result.seconds = result.diagnostics["seconds"] = time.perf_counter() - start
    return result
