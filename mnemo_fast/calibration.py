"""Choose lambda1 (and optionally lambda2) from the mnemonic codes alone (ALGORITHM.md, 7).

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
(the fused engine's ``max_ratio``/``shift_``), scores them on the codes with the rule of
:func:`mnemo_fast.forget` (keep +1 only if A_R + E_F is strictly better), and undoes it: no copy
of the model is made. If the retain side fails at that lambda1, ``feasible`` is False in the
diagnostics (the codes say the classes cannot be forgotten cleanly at this lambda2). With
several lambda2 candidates, each gets its lambda1 and the feasible one whose remaining codes keep
the largest median margin wins (ties: the smaller lambda2).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from . import engines, validation
from .codes import MnemonicCodes
from .method import class_fishers, code_inputs
from .reference.fisher import eval_mode, logits_of, trainable_parameters
from .sharding import local, reshard

Tensor = torch.Tensor


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
    """The chosen ``lambda1``/``lambda2`` and what led there (``diagnostics``)."""

    lambda1: float
    lambda2: float
    diagnostics: dict = field(default_factory=dict)


def _margins(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, labels[:, None], float("-inf"))
    prob = torch.softmax(logits.float(), -1).gather(1, labels[:, None]).squeeze(1)
    return true - other.max(1).values, prob


class _Prober:
    """Perturb-score-undo on the live parameters of ``model`` (never a copy of the model)."""

    def __init__(self, model, codes, classes, eps, chunk_size, output_fn, engine):
        self.model, self.output_fn, self.engine = model, output_fn, engine
        reshard(model)  # FSDP2: parameters by name are the shards, not a gathered copy
        params = trainable_parameters(model)
        self.names = list(params)
        self.live = [local(p.detach()) for p in params.values()]  # a sharded one: this rank's shard
        self.originals = [p.clone() for p in self.live]
        fisher_f, fisher_r = class_fishers(model, codes, classes, eps=eps, chunk_size=chunk_size,
                                           output_fn=output_fn, engine=engine)
        self.forget = [fisher_f[n].contiguous() for n in self.names]
        self.remain = [fisher_r[n].contiguous() for n in self.names]
        self.max_ratio = engine.max_ratio(self.forget, self.remain)
        self.inputs, self.labels = code_inputs(model, codes, range(codes.num_classes))
        self.is_forget = torch.isin(self.labels, torch.tensor(classes, device=self.labels.device))
        self.margin0, self.prob0 = self.margins()

    @torch.no_grad()
    def margins(self) -> tuple[Tensor, Tensor]:
        with eval_mode(self.model):
            logits = self.output_fn(self.model(self.inputs)).float()
        reshard(self.model)  # the next probe edits the shards: the next forward must gather them
        return _margins(logits, self.labels)

    @torch.no_grad()
    def restore(self) -> None:
        for p, o in zip(self.live, self.originals):
            p.copy_(o)

    @torch.no_grad()
    def probe(self, lambda1: float, lambda2: float) -> Trial:
        results = []
        for sign in (1, -1):
            self.engine.shift_(self.live, self.forget, self.remain, self.max_ratio,
                               lambda1, lambda2, float(sign))
            try:
                margin, prob = self.margins()
            finally:
                self.restore()
            correct = margin > 0
            # ties count as wrong, as argmax would pick the first index; close enough here
            a_r = correct[~self.is_forget].float().mean().item() if (~self.is_forget).any() else 1.0
            e_f = 1.0 - correct[self.is_forget].float().mean().item()
            results.append((a_r + e_f, sign, margin, prob))
        best = results[0] if results[0][0] > results[1][0] else results[1]
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
    engine=None,
) -> Calibration:
    """lambda1 (and lambda2 if a sequence is given) for :func:`mnemo_fast.forget`, codes only.

    See the module docstring for the criterion. Cost: one Fisher pair from the codes, then
    2 forward passes of the C codes per trial (about ``log10(range) + steps`` trials per
    lambda2). The model's parameters are left exactly as they were. ``diagnostics`` holds
    every trial, whether the choice is ``feasible`` (retain side met) and the seconds taken.
    """
    start = time.perf_counter()
    classes = validation.forget_classes(codes, forget_classes)
    validation.trainable_model(model)
    engine = engines.resolve(engine)
    lambda2s = [float(lambda2)] if isinstance(lambda2, (int, float)) else [float(v) for v in lambda2]
    if not lambda2s or any(v <= 0 for v in lambda2s):
        raise ValueError(f"lambda2 must be positive, got {lambda2}")
    lo, hi = lambda1_range
    if not 0 < lo < hi:
        raise ValueError(f"lambda1_range must satisfy 0 < lo < hi, got {lambda1_range}")

    def judge(t: Trial) -> Trial:
        return _judge(t, depth, max_forget_prob, min_retain_margin)

    prober = _Prober(model, codes, classes, eps, chunk_size, output_fn, engine)
    trials: list[Trial] = []
    choices = []
    try:
        for l2 in lambda2s:
            l1, t = _search_lambda1(prober, l2, lo, hi, steps, judge, trials)
            choices.append((l1, l2, t))
    finally:
        prober.restore()

    def rank(choice):
        l1, l2, t = choice
        if t is None:
            return (0, 0, -math.inf, -l2)
        return (1, int(t.retain_ok), t.retain_margin_ratio, -l2)

    l1, l2, chosen = max(choices, key=rank)
    diagnostics = {
        "feasible": bool(chosen is not None and chosen.retain_ok),
        "forget_reached": chosen is not None,
        "chosen": chosen,
        "per_lambda2": [(c[1], c[0], c[2]) for c in choices],
        "trials": trials,
        "criterion": {"depth": depth, "max_forget_prob": max_forget_prob,
                      "min_retain_margin": min_retain_margin},
        "forget_margin_before": prober.margin0[prober.is_forget].tolist(),
        "seconds": time.perf_counter() - start,
    }
    return Calibration(lambda1=l1, lambda2=l2, diagnostics=diagnostics)
