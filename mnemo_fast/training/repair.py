"""EXTENSION, beyond the paper: a short repair after forgetting, on the retained classes' codes
alone (docs/METHOD.md, "Repair on the retained codes").

The one-shot shift can cost the retained classes some accuracy. :func:`repair` fine-tunes the
forgotten model for a few steps on the codes of the classes it keeps (no real data, no forget
codes), and stops (undoing the last step) as soon as a forget code would be classified right
again or get more probable than ``max_forget_prob`` (or than the most probable one before). Off unless called; :func:`mnemo_fast.forget` never runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .. import validation
from ..codes import MnemonicCodes
from ..modeling import eval_mode, logits_of
from ..session import code_inputs, code_logits
from .train import make_optimizer

LOSSES = ("ce", "distill")


@dataclass
class RepairResult:
    """What :func:`repair` did: ``steps`` taken (kept), ``stopped`` ("steps", or "forget"
    when a step undone brought a forget code back), the loss per step, and the forget
    codes' largest true-class probability after."""

    model: torch.nn.Module
    steps: int
    stopped: str
    losses: list[float] = field(default_factory=list)
    forget_max_prob: float = 0.0


def repair(
    model: torch.nn.Module,
    codes: MnemonicCodes,
    forget_classes: Iterable[int] | int,
    *,
    steps: int = 50,
    lr: float = 1e-4,
    loss: str = "ce",
    original: torch.nn.Module | None = None,
    max_forget_prob: float = 1e-3,
    optimizer: str = "adam",
    output_fn: Callable = logits_of,
) -> RepairResult:
    """EXTENSION (not in the paper): fine-tune ``model`` in place for ``steps`` full-batch steps
    on the retained classes' codes [N_R, *shape] alone, in eval mode (BatchNorm statistics and
    dropout untouched).

    ``loss="ce"``: cross-entropy to the codes' labels. ``loss="distill"``: KL divergence to
    ``original``'s softmax on the same codes (the model before forgetting, whose logits on
    the retained codes the repair restores; required for this loss). After each step the
    forget codes are checked: if one is classified right or its true-class probability
    exceeds ``max_forget_prob`` (or, if one was above it already, the largest before the
    repair), the step is undone and the repair stops. Returns
    :class:`RepairResult` (``model`` is the same object).
    """
    steps = validation.integer("steps", steps, minimum=0)
    lr = validation.number("lr", lr)
    max_forget_prob = validation.number("max_forget_prob", max_forget_prob, maximum=1.0)
    if loss not in LOSSES:
        raise validation.UnlearningError(f"loss must be one of {LOSSES}, got {loss!r}")
    if loss == "distill" and original is None:
        raise validation.UnlearningError("loss='distill' needs original= (the model before forgetting)")
    validation.usable_codes(codes)
    forget = validation.forget_classes(codes, forget_classes)
    keep = [c for c in range(codes.num_classes) if c not in forget]  # never empty: forget_classes checks
    validation.trainable_model(model)
    x_r, y_r = code_inputs(model, codes, keep)
    x_f, y_f = code_inputs(model, codes, forget)
    target = None
    if loss == "distill":
        target = torch.log_softmax(code_logits(original, x_r, output_fn=output_fn), -1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(optimizer, params, lr=lr)

    def forget_prob(limit: float) -> tuple[bool, float]:
        logits = code_logits(model, x_f, output_fn=output_fn)
        prob = torch.softmax(logits, -1).gather(1, y_f[:, None]).max().item()
        return bool((logits.argmax(-1) == y_f).any()) or prob > limit, prob

    losses, stopped, taken = [], "steps", 0
    _, prob = forget_prob(1.0)
    limit = max(max_forget_prob, prob)  # a forget code may not get closer to its class than before
    with eval_mode(model):
        for _ in range(steps):
            saved = [p.detach().clone() for p in params]
            out = output_fn(model(x_r)).float()
            value = (F.cross_entropy(out, y_r) if target is None else
                     F.kl_div(torch.log_softmax(out, -1), target, log_target=True, reduction="batchmean"))
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            back, p_now = forget_prob(limit)
            if back:
                with torch.no_grad():
                    for p, s in zip(params, saved):
                        p.copy_(s)
                stopped = "forget"
                break
            losses.append(value.item())
            taken, prob = taken + 1, p_now
    opt.zero_grad(set_to_none=True)
    return RepairResult(model=model, steps=taken, stopped=stopped, losses=losses, forget_max_prob=prob)
