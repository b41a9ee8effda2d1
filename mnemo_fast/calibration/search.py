"""Choose the step of the shift from the mnemonic codes alone (docs/METHOD.md, "Choosing the step from the codes").

Misclassifying the forget codes is not enough (on Fashion-MNIST lambda1 = 1e-3 flips every
forget code, yet some classes keep ~20% test accuracy). The criterion therefore asks for a
*depth* of forgetting and bounds the damage, both read off the codes:

- forget side: every forget-class code is misclassified with a margin (true-class logit minus
  the best other logit) of at most ``-depth * m0``, where ``m0`` is that code's margin before
  forgetting (the code must end as confidently wrong as it was right, scaled by ``depth``), and
  its true-class probability is at most ``max_forget_prob``;
- retain side: every remaining-class code stays correct, and the median remaining-code margin
  keeps at least ``min_retain_margin`` of its value before forgetting.

What is searched (``search``):

- ``"scale"`` (default): the effective step. Per tensor the shift is ``alpha_l * eta`` with
  ``alpha_l = min(lambda1, lambda2 / max eta_l)``; where dead units leave f_R at the epsilon
  floor (ReLU conv nets) ``lambda2`` binds for any useful ``lambda1``, so a search over
  ``lambda1`` alone cannot make the step smaller. Here ``lambda1`` and ``lambda2`` move
  together: a trial at ``lambda1`` uses ``lambda2 = lambda1 * L2 / 1e-3`` (``L2`` the given
  lambda2; with the default 10 this is the paper's MNIST pair (1e-3, 10) scaled as a whole),
  so every tensor's step scales with the trial whichever of the two binds. The sign is
  chosen on margins (``sign_rule="margin"``): the sign whose codes meet the forget side; if
  both do, the one whose retained codes keep the larger median margin (not merely their
  argmax, which can stay right while the model is wrecked); if neither, the one that forgets
  deeper. ``forget`` then applies the calibration's sign. Where the smallest step meeting the
  forget side breaks the retain side (on conv nets the codes can need a step 10x larger than
  the real class does), the choice falls back to the *balanced* step and sign: the trial of
  either sign maximising ``min(forget depth, median retained margin ratio)`` among those that
  misclassify every forget code, over the scan (taken one decade further) and ``steps``
  halvings of a local search around the best (``feasible`` is then False and
  ``diagnostics["balanced"]`` True). A balanced step under which the median retained code is
  misclassified (min(depth, ratio) <= 0: most retained codes wrong) is not applied: the
  *best-effort* step below is, as when no trial meets the forget side.
- ``"lambda1"``: the first calibration: ``lambda1`` searched with ``lambda2`` fixed, the sign by
  the code accuracy A_R + E_F (the rule of :func:`mnemo_fast.forget`), which ``forget`` re-picks.

Either way the value is the smallest ``lambda1`` meeting the forget side, found on a log scale:
one trial per decade from ``lambda1_range[0]`` up, then ``steps`` bisections in log space
inside the first decade that meets it. Each trial applies the shift with both signs to the
live parameters of a :class:`mnemo_fast.session.CandidateSession` (the one
:func:`mnemo_fast.forget` then uses: the Fisher pair is computed once), scores them on the
codes (at most ``chunk_size`` per forward) and undoes it: no copy of the model is made. If the
retain side fails at that lambda1, ``feasible`` is False (the codes say the classes cannot be
forgotten cleanly there). If no trial meets the forget side, ``feasible`` and ``forget_reached``
are False and a :class:`CalibrationWarning` says so; ``search="lambda1"`` then takes the top of
the range (its fixed lambda2 bounds the step), ``search="scale"`` the *best-effort* step
(``diagnostics["best_effort"]``): the balanced trial among those that misclassify every forget
code with the retained margins still positive on the median, else the trial that forgets
deepest while keeping the retain side, else the smallest step. Never the top of the range:
there the paired lambda2 lets the step grow without bound, and on conv nets and a small
transformer that step sent every input to one class. With several lambda2
candidates, each gets its search and the feasible one whose remaining codes keep the largest
median margin wins (ties: the smaller lambda2).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Iterable, Mapping, Sequence

import torch

from .. import engines, validation
from ..codes import MnemonicCodes
from ..modeling import logits_of
from ..session import CandidateSession, CodeAccuracy, better_sign
from ..stack import user_stacklevel
from ..verdict import MAX_FORGET_ACCURACY, MAX_RETAIN_DROP, drop_bound, margins as _margins, paired_drop

Tensor = torch.Tensor


class CalibrationWarning(validation.ForgetWarning):
    """No trial reached the forgetting criterion (``search="scale"``: the best-effort step was
    used, which may leave the class in place; ``search="lambda1"``: the top of the range), or
    ``forget`` applied a step that met the forget side but not the retain side."""


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
    score: float = 0.0            # A_R + E_F on the codes (argmax), the sign rule of forget()
    retain_sample_drop: float | None = None  # forget(retain=...): accuracy lost on the sample's retained rows
    retain_sample_bound: float | None = None  # ... verdict.drop_bound of that drop
    forget_sample_accuracy: float | None = None  # ... accuracy on its forget-class rows (None: it has none)


@dataclass
class Calibration:
    """The chosen ``lambda1``/``lambda2`` and how they were found.

    ``feasible``: the chosen trial meets both sides of the criterion; ``forget_reached``: some
    trial met the forget side (False: with a :class:`CalibrationWarning`, ``search="scale"``
    chose the best-effort step of :func:`_best_effort`, ``search="lambda1"`` the top of the
    range); ``chosen``: the chosen trial (None only for ``search="lambda1"`` when not reached); ``trials``:
    every trial in order; ``per_lambda2``: (lambda2, lambda1, trial) per lambda2 candidate;
    ``seconds``: the time taken; ``sign``: the sign :func:`mnemo_fast.forget` applies with
    this calibration (``search="scale"``), None where it re-picks it by code accuracy
    (``search="lambda1"``); ``search``: what was searched. ``diagnostics`` holds the same as a
    dict (and the criterion and the forget codes' margins before).
    """

    lambda1: float
    lambda2: float
    sign: int | None = None
    search: str = "scale"
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


@dataclass(frozen=True)
class SearchOptions(Criterion):
    """The search's options and their defaults, written once: the keywords of :func:`calibrate`
    and :func:`calibrate_session`, and the search options of ``forget(calibration={...})``
    (docs/REFUSALS.md for the values each accepts). The criterion's three come first, from
    :class:`Criterion`; the search's own follow."""

    lambda1_range: tuple[float, float] = (1e-7, 10.0)
    steps: int = 6
    search: str = "scale"

    @classmethod
    def of(cls, keywords: Mapping[str, object], caller: str, *, base: SearchOptions | None = None,
           checked: bool = False) -> SearchOptions:
        """``base`` (the defaults if None) with a function's keyword arguments: an unknown one is
        refused as Python refuses it; ``checked``: every value, in the fields' order, checked and
        converted first (:func:`mnemo_fast.validation.calibration_options`)."""
        unknown = [name for name in keywords if name not in SEARCH_OPTIONS]
        if unknown:
            raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
        base = base or cls()
        if checked:
            values = {name: keywords.get(name, getattr(base, name)) for name in SEARCH_OPTIONS}
            return cls(**validation.calibration_options(values, SEARCH_OPTIONS))
        return replace(base, **keywords)

    @classmethod
    def from_calibration(cls, options: Mapping[str, object]) -> SearchOptions:
        """``forget``'s ``calibration=`` search options, each name and value checked in the
        caller's order (:func:`mnemo_fast.validation.calibration_options`)."""
        return cls(**validation.calibration_options(options, SEARCH_OPTIONS))

    @property
    def criterion(self) -> Criterion:
        return Criterion(**{f.name: getattr(self, f.name) for f in fields(Criterion)})


#: The names of the search options (:class:`SearchOptions`' fields, in order).
SEARCH_OPTIONS = tuple(f.name for f in fields(SearchOptions))


SEARCHES = ("scale", "lambda1")
#: search="scale": a trial at lambda1 uses lambda2 = lambda1 * L2 / PAIRED_LAMBDA1 (the paper's
#: MNIST pair (1e-3, 10) scaled as a whole when L2 = 10).
PAIRED_LAMBDA1 = 1e-3
#: The lambda2 the search starts from when none is given (``calibrate`` and
#: ``forget(lambda1="auto")``): the paper's MNIST lambda2, which search="scale" moves with lambda1.
DEFAULT_LAMBDA2 = 10.0


class _Prober:
    """Trials on a :class:`CandidateSession`: shift with both signs, score the margins, undo.
    ``sign_rule``: "accuracy" (A_R + E_F on the codes, +1 only if strictly better: the rule
    of :func:`mnemo_fast.forget`) or "margin" (see the module docstring)."""

    def __init__(self, session: CandidateSession, judge, sign_rule: str = "accuracy"):
        self.session, self.judge, self.sign_rule = session, judge, sign_rule
        self.both: list[Trial] = []   # every trial of either sign, in order
        self.labels, self.is_forget = session.labels, session.is_forget
        self.margin0, self.prob0 = _margins(session.before_logits(), self.labels)
        # the codes of each side as row indices, and their margins before (floored), once
        self._f = self.is_forget.nonzero().view(-1)
        self._r = (~self.is_forget).nonzero().view(-1)
        self._floor_f = self.margin0.index_select(0, self._f).clamp_min(1e-6)
        self._floor_r = self.margin0.index_select(0, self._r).clamp_min(1e-6)
        # forget(retain=(x, y)): the sample's rows of the remaining classes and of the forget
        # classes, and their hits before
        self._sample = getattr(session, "retain_inputs", None) is not None
        if self._sample:
            forget_classes = self.labels[self.is_forget].unique()
            self._sample_forget_rows = torch.isin(session.retain_labels, forget_classes)
            self._sample_rows = ~self._sample_forget_rows
            self._has_forget_rows = bool(self._sample_forget_rows.any())
            self._sample_hits_before = self._sample_hits(session.retain_before)[self._sample_rows]

    def _sample_hits(self, logits: Tensor) -> Tensor:
        """[M] bool: the retain sample's rows classified right under ``logits`` [M, C]."""
        return logits.argmax(-1) == self.session.retain_labels

    def _sample_figures(self) -> tuple[float, float, float | None]:
        """(drop, its bound, forget-row accuracy or None) of the sample under the live parameters,
        in one host transfer (:func:`mnemo_fast.verdict.paired_drop`)."""
        hits = self._sample_hits(self.session.retain_logits())
        drop, se = paired_drop(self._sample_hits_before, hits[self._sample_rows])
        forget = hits[self._sample_forget_rows].float().mean() if self._has_forget_rows else drop.new_zeros(())
        drop, se, forget = torch.stack([drop, se, forget]).tolist()
        return drop, drop_bound(drop, se), forget if self._has_forget_rows else None

    def _one(self, lambda1: float, lambda2: float, sign: int) -> Trial:
        """The trial of one sign, judged (written from the originals: no undo needed). Its
        statistics are read in one host transfer."""
        trial = getattr(self.session, "trial_logits", None)  # a CandidateSession's: set_shift + logits, cheaper
        if trial is None or self._sample:  # the sample's forward needs every parameter written
            self.session.set_shift(lambda1, lambda2, sign)
        logits = self.session.logits() if trial is None or self._sample else trial(lambda1, lambda2, sign)
        figures = self._sample_figures() if self._sample else None
        trial = self.statistics(logits, lambda1, lambda2, sign)
        if figures is not None:
            trial.retain_sample_drop, trial.retain_sample_bound, trial.forget_sample_accuracy = figures
        self.both.append(trial)
        return self.judge(trial)

    def statistics(self, logits: Tensor, lambda1: float, lambda2: float, sign: int) -> Trial:
        """The unjudged :class:`Trial` of the codes' ``logits`` [N, C] (float32), read in one
        host transfer; not recorded in :attr:`both`."""
        margin, prob = _margins(logits, self.labels)
        m_f, m_r = margin.index_select(0, self._f), margin.index_select(0, self._r)
        # ties count as wrong, as argmax would pick the first index; close enough here
        stats = [(m_f > 0).float().mean(), (-m_f / self._floor_f).min(), m_f.max(), prob.index_select(0, self._f).max()]
        if m_r.numel():
            right = m_r > 0
            stats += [right.float().mean(), (m_r / self._floor_r).median(), right.all().to(stats[0].dtype)]
        stats = torch.stack([t.to(stats[0].dtype) for t in stats]).tolist()
        forget_correct, depth, forget_max_margin, forget_max_prob = stats[:4]
        a_r, ratio, retain_correct = (stats[4], stats[5], bool(stats[6])) if m_r.numel() else (1.0, 1.0, True)
        return Trial(lambda1, lambda2, sign, forget_max_margin, forget_max_prob,
                     depth, retain_correct, ratio, score=a_r + (1.0 - forget_correct))

    @torch.no_grad()
    def probe(self, lambda1: float, lambda2: float) -> Trial:
        plus, minus = self._one(lambda1, lambda2, 1), self._one(lambda1, lambda2, -1)
        if self.sign_rule == "accuracy":
            return plus if better_sign(plus.score, minus.score) == 1 else minus

        def key(t: Trial):
            if t.forget_ok:
                return (1, int(t.retain_ok), t.retain_margin_ratio)
            return (0, 0, _balance(t))
        return plus if key(plus) > key(minus) else minus  # ties: -1, as in forget()


def _judge(trial: Trial, depth: float, max_forget_prob: float, min_retain_margin: float) -> Trial:
    """The two sides of the criterion. With a retain sample (``forget(retain=...)``) the retain side
    is judged on it in place of the retained codes (its drop's bound at most ``MAX_RETAIN_DROP``),
    and where it has rows of a forget class, the forget side also asks them to be at most
    ``MAX_FORGET_ACCURACY`` right: the verdict's rules (mnemo_fast/verdict.py)."""
    trial.forget_ok = trial.forget_depth >= depth and trial.forget_max_prob <= max_forget_prob
    if trial.forget_sample_accuracy is not None:
        trial.forget_ok = trial.forget_ok and trial.forget_sample_accuracy <= MAX_FORGET_ACCURACY
    if trial.retain_sample_bound is not None:
        trial.retain_ok = trial.retain_sample_bound <= MAX_RETAIN_DROP
    else:
        trial.retain_ok = trial.retain_all_correct and trial.retain_margin_ratio >= min_retain_margin
    return trial


def _balance(t: Trial) -> float:
    """How far a trial is along both sides at once: min(forget depth, retained margin ratio)."""
    return min(t.forget_depth, t.retain_margin_ratio)


def _balanced(prober, pair, first: int, steps: int, trials: list[Trial], lo: float, hi: float) -> Trial | None:
    """Where the forget side is met only at steps that break the retain side: the (step, sign)
    that maximises min(depth, retained margin ratio) among the trials of either sign that
    misclassify every forget code. The scan goes one decade past the first one meeting the
    forget side, then ``steps`` halvings of a local search around the best (one sign)."""
    for x in (0.5, 1.0):  # one decade past the first decade that met the forget side
        l1 = min(hi, 10 ** (math.log10(prober.first_met) + x))
        trials.append(prober.probe(l1, pair(l1)))
    candidates = [t for t in prober.both[first:] if t.forget_max_margin < 0]
    if not candidates:
        return None
    best = max(candidates, key=lambda t: (_balance(t), -t.lambda1))
    return _local_search(prober, pair, best, steps, trials, lo, hi, 0.25,
                         lambda t, best: t.forget_max_margin < 0 and _balance(t) > _balance(best))


def _local_search(prober, pair, best: Trial, steps: int, trials: list[Trial], lo: float, hi: float,
                  width: float, better: Callable[[Trial, Trial], bool]) -> Trial:
    """``steps`` halvings (from ``width`` decades) of a search around ``best`` for its sign:
    a trial at ``best.lambda1 * 10^(+-width)`` (clamped to [lo, hi]) replaces ``best`` when
    ``better(trial, best)``. Every trial goes to ``trials``."""
    for _ in range(steps):
        for x in (-width, width):
            l1 = min(hi, max(lo, 10 ** (math.log10(best.lambda1) + x)))
            t = prober._one(l1, pair(l1), best.sign)
            trials.append(t)
            if better(t, best):
                best = t
        width /= 2
    return best


def _effort(t: Trial) -> tuple:
    """The order of :func:`_best_effort`: a balanced trial (every forget code wrong, retained
    margins positive on the median) by min(depth, margin ratio), then a trial keeping the
    retain side by its depth, then anything else by the smaller step; ties: the smaller step."""
    if t.forget_max_margin < 0 and _balance(t) > 0:
        return (2, _balance(t), -t.lambda1)
    if t.retain_ok:
        return (1, t.forget_depth, -t.lambda1)
    return (0, -t.lambda1, 0.0)


def _best_effort(prober, pair, first: int, steps: int, trials: list[Trial], lo: float, hi: float) -> Trial | None:
    """Where no trial meets the forget side (``search="scale"``): the step to apply instead of
    the top of the range, whose paired lambda2 lets the step grow without bound (on conv nets
    and a small transformer it sent every input to one class). The best trial of either sign
    since ``first`` by :func:`_effort`: the balanced one among those misclassifying every
    forget code with the retained margins still positive on the median, else the one forgetting
    deepest while keeping the retain side, else the smallest step; then ``steps`` halvings of a
    local search around it (its sign) by the same order. None if nothing was tried."""
    tried = prober.both[first:]
    if not tried:
        return None
    return _local_search(prober, pair, max(tried, key=_effort), steps, trials, lo, hi, 0.5,
                         lambda t, best: _effort(t) > _effort(best))


def _search_lambda1(prober, pair, lo, hi, steps, trials, balance: bool = False) -> tuple[float, Trial | None, str]:
    """(lambda1, its trial, how it was chosen): the smallest lambda1 in [lo, hi] meeting the
    forget side (``"smallest"``); ``pair(lambda1)`` is its lambda2. With ``balance``
    (``search="scale"``): where that trial breaks the retain side, the balanced trial of
    :func:`_balanced` (``"balanced"``) when it keeps the median retained margin positive, else
    the best-effort trial of :func:`_best_effort` (``"best effort"``: the forget codes go
    wrong only where most retained codes do too); where no trial meets the forget side, the
    best-effort trial too (``"best effort, unreached"``). Without ``balance``, where no trial
    meets it: the top of the range and no trial (``"top"``)."""
    first = len(prober.both)

    def run(l1: float) -> Trial:
        t = prober.probe(l1, pair(l1))
        trials.append(t)
        return t

    l1, chosen = _smallest(run, lo, hi, steps, prober)
    if not balance or (chosen is not None and chosen.retain_ok):
        return l1, chosen, "smallest" if chosen is not None else "top"
    if chosen is not None:
        fallback = _balanced(prober, pair, first, steps, trials, lo, hi)
        if fallback is not None and _balance(fallback) > 0:
            return fallback.lambda1, fallback, "balanced"
    fallback = _best_effort(prober, pair, first, steps, trials, lo, hi)
    return fallback.lambda1, fallback, "best effort" if chosen is not None else "best effort, unreached"


def _smallest(run, lo, hi, steps, prober=None) -> tuple[float, Trial | None]:
    """One trial per decade from ``lo``, then ``steps`` log-bisections in the first decade
    meeting the forget side: (lambda1, its trial), or (hi, None)."""
    decades = max(1, int(round(math.log10(hi / lo))))
    previous = math.log10(lo)
    for k in range(decades + 1):
        x = math.log10(lo) + k
        t = run(10**x)
        if t.forget_ok:
            if prober is not None:
                prober.first_met = 10**x
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
    options: SearchOptions | None = None,
    **search_options,
) -> Calibration:
    """The search of :func:`calibrate` on an open session (its Fisher pair, its live
    parameters, left as they were), with ``options`` and the keywords of :class:`SearchOptions`
    over them (not checked here: :func:`calibrate` and ``forget`` check them). Cost: 2 forwards
    of the codes per trial, each after one elementwise pass that writes the candidate from the
    original values."""
    start = time.perf_counter()
    options = SearchOptions.of(search_options, "calibrate_session", base=options)
    criterion, lambda1_range, steps, search = options.criterion, options.lambda1_range, options.steps, options.search
    lo, hi = lambda1_range
    if not 0 < lo < hi:
        raise ValueError(f"lambda1_range must satisfy 0 < lo < hi, got {lambda1_range}")
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")

    def judge(t: Trial) -> Trial:
        return _judge(t, criterion.depth, criterion.max_forget_prob, criterion.min_retain_margin)

    prober = _Prober(session, judge, "margin" if search == "scale" else "accuracy")
    trials: list[Trial] = []
    choices = []
    try:
        for l2 in lambda2s:
            pair = (lambda l1, l2=l2: l1 * l2 / PAIRED_LAMBDA1) if search == "scale" else (lambda l1, l2=l2: l2)
            l1, t, how = _search_lambda1(prober, pair, lo, hi, steps, trials, balance=search == "scale")
            choices.append((l1, t.lambda2 if t is not None else pair(l1), t, l2, how))
    finally:
        session.restore()

    def rank(choice):
        l1, _, t, l2, how = choice  # ties: the smaller given lambda2
        if t is None:
            return (0, (), -l2)
        if how.startswith("best effort"):  # by the order of _best_effort, after any applied forget step
            return (1, _effort(t), -l2)
        return (2, (int(t.retain_ok), t.retain_margin_ratio), -l2)

    l1, l2, chosen, _, how = max(choices, key=rank)
    reached = any(c[4] in ("smallest", "balanced", "best effort") for c in choices)
    feasible = bool(how in ("smallest", "balanced") and chosen.retain_ok and chosen.forget_ok)
    if how.startswith("best effort") or how == "top":
        if chosen is None:  # search="lambda1": lambda2 is fixed, so it bounds the top of the range
            fallback = f"using the top of the range, lambda1 = {hi:g}"
        else:
            kind = {2: "the balanced step (every forget code wrong, the retained margins positive)",
                    1: "the deepest step that keeps the retained codes",
                    0: "the smallest step tried (every step tried breaks the retained codes)"}[_effort(chosen)[0]]
            fallback = (f"using {kind} instead (lambda1 = {l1:g}, lambda2 = {l2:g}; forget codes' depth "
                        f"{chosen.forget_depth:.2f}): the class may not be forgotten")
        what = (f"no trial in {lambda1_range} reached the forgetting criterion (depth {criterion.depth}, "
                f"max forget probability {criterion.max_forget_prob})" if not reached else
                "the forget codes were misclassified only at steps under which most retained codes are "
                "misclassified too, which are not applied")
        warnings.warn(f"lambda1 calibration: {what}; {fallback}", CalibrationWarning, stacklevel=user_stacklevel())
    seconds = time.perf_counter() - start
    per_lambda2 = [(c[1], c[0], c[2]) for c in choices]
    sign = chosen.sign if chosen is not None and search == "scale" else None
    diagnostics = {
        "search": search,
        "sign": sign,
        "feasible": feasible,
        "forget_reached": reached,
        "balanced": how == "balanced" and not chosen.forget_ok,
        "best_effort": how.startswith("best effort"),
        "chosen": chosen,
        "per_lambda2": per_lambda2,
        "trials": trials,
        "criterion": {"depth": criterion.depth, "max_forget_prob": criterion.max_forget_prob,
                      "min_retain_margin": criterion.min_retain_margin},
        "forget_margin_before": prober.margin0[prober.is_forget].tolist(),
        "seconds": seconds,
    }
    return Calibration(lambda1=l1, lambda2=l2, sign=sign, search=search, feasible=feasible,
                       forget_reached=reached, chosen=chosen, trials=trials, per_lambda2=per_lambda2, seconds=seconds,
                       diagnostics=diagnostics)


def calibrate(
    model: torch.nn.Module,
    codes: MnemonicCodes,
    forget_classes: Iterable[int] | int,
    *,
    lambda2: float | Sequence[float] = DEFAULT_LAMBDA2,
    eps: float = 1e-16,
    chunk_size: int | None = None,
    output_fn: Callable = logits_of,
    params=None,
    engine=None,
    **search_options,
) -> Calibration:
    """lambda1 and lambda2 (and the sign, with ``search="scale"``) for :func:`mnemo_fast.forget`,
    from the codes only.

    ``search_options``: the fields of :class:`SearchOptions` (depth, max_forget_prob,
    min_retain_margin, lambda1_range, steps, search). See the module docstring for the
    criterion and the two searches (``search="lambda1"``: the first calibration, lambda2
    fixed). Cost: one Fisher pair from the codes, then
    2 forward passes of the codes per trial, at most ``chunk_size`` codes each (about
    ``log10(range) + steps`` trials per lambda2). The model's parameters are left exactly as
    they were. ``forget(lambda1="auto")`` runs the same search on its own session, so it
    computes the Fisher pair once.
    """
    start = time.perf_counter()
    options = SearchOptions.of(search_options, "calibrate", checked=True)  # docs/REFUSALS.md
    eps, chunk_size = validation.number("eps", eps), validation.chunk_size(chunk_size)
    validation.usable_codes(codes)
    classes = validation.forget_classes(codes, forget_classes)
    engine = engines.resolve(engine)
    validation.trainable_model(model)
    lambda2s = lambda2_candidates(lambda2)
    validation.representable({"lambda2": lambda2s}, model.parameters())
    with engines.forwards(engine, model):
        session = CandidateSession(model, codes, classes, engine=engine, eps=eps, chunk_size=chunk_size,
                                   output_fn=output_fn, params=params)
        result = calibrate_session(session, lambda2s, options)
    result.seconds = result.diagnostics["seconds"] = time.perf_counter() - start
    return result


def warn_if_unmet(calibration: Calibration | None, before: CodeAccuracy, after: CodeAccuracy) -> bool:
    """``forget(lambda1="auto")``'s :class:`CalibrationWarning` for a step that met the forget side
    but not the retain side (``before``/``after``: the code accuracies around the applied step).
    A best-effort step is left alone: :func:`calibrate_session` warned already. Whether it warned."""
    if (calibration is None or calibration.feasible or not calibration.forget_reached
            or calibration.diagnostics.get("best_effort")):
        return False
    if calibration.search == "dampen":  # mnemo_fast/calibration/dampen.py: the verdict says what failed
        reasons = "; ".join(calibration.diagnostics["verdict"].reasons)
        warnings.warn(f"mode='dampen', lambda1='auto': the forget side was met at threshold {calibration.lambda1:g} "
                      f"(lam {calibration.lambda2:g}), but not the retain side: {reasons}", CalibrationWarning,
                      stacklevel=user_stacklevel())
        return True
    if before.forget < 1.0 or before.retain < 1.0:  # it does not know its codes: say so
        why = (f"the model classifies only {before.forget:.0%} of the forget codes and {before.retain:.0%} of "
               f"the others before forgetting: it may not have been trained with these codes "
               f"(train_with_codes, adapt_with_codes)")
    else:  # a model that knows its codes, where the codes admit no step meeting both sides
        why = (f"the step applied balances the two sides (codes after: {after.forget:.0%} of the forget codes, "
               f"{after.retain:.0%} of the others correct); check the class on a few real samples "
               f"(mnemo_fast.diagnose)")
    warnings.warn(
        f"lambda1='auto': the codes' criterion was not met (the forget side was reached at "
        f"lambda1={calibration.lambda1:g}, lambda2={calibration.lambda2:g}, but only with the remaining codes "
        f"misclassified or their margins below the criterion's); {why}",
        CalibrationWarning,
        stacklevel=user_stacklevel(),
    )
    return True
