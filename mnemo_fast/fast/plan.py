"""Which parameters the layer rules can take, and which go to the generic per-sample path.

A parameter is taken by a rule when it belongs to exactly one module with a rule, and a
batch-1 forward shows it used once per call of that module (counted as edges into its
gradient accumulator in the autograd graph). Anything else (a raw parameter of a custom
module, nn.MultiheadAttention's projections, a weight tied between two layers or also used
functionally, a layer whose batch dimension is not first) goes to the generic path.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .rules import rule_for


@dataclass
class Plan:
    """rule_modules: module -> (rule, {local name: full name}); generic: full names."""

    rule_modules: dict[nn.Module, tuple[object, dict[str, str]]] = field(default_factory=dict)
    generic: list[str] = field(default_factory=list)


def _uses_per_parameter(loss: torch.Tensor) -> Counter:
    """id(parameter) -> number of graph edges into its AccumulateGrad node."""
    uses: Counter = Counter()
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None:
                uses[id(variable)] += 1
            else:
                stack.append(child)
    return uses


def _mixes_samples(model: nn.Module) -> bool:
    """BatchNorm without running statistics normalises over the batch even in eval mode."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None for m in model.modules()
    )


def make_plan(model: nn.Module, params: dict[str, nn.Parameter], x1: torch.Tensor, y1: torch.Tensor, output_fn) -> Plan:
    """Plan from one sample ``x1`` [1, ...], ``y1`` [1]; the model is in eval mode."""
    if _mixes_samples(model):
        return Plan(generic=list(params))
    owners = defaultdict(list)
    for module in model.modules():
        for local, p in module.named_parameters(recurse=False):
            owners[id(p)].append((module, local))
    candidates = {m for own in owners.values() for m, _ in own if rule_for(m) is not None}
    calls: Counter = Counter()
    batch_first = defaultdict(lambda: True)

    def count(module, args, output):
        calls[module] += 1
        batch_first[module] &= bool(args) and args[0].shape[0] == 1

    handles = [m.register_forward_hook(count) for m in candidates]
    try:
        with torch.enable_grad():
            loss = F.cross_entropy(output_fn(model(x1)), y1, reduction="sum")
    finally:
        for handle in handles:
            handle.remove()
    uses = _uses_per_parameter(loss) if loss.grad_fn is not None else Counter()

    plan = Plan()
    for name, p in params.items():
        own = owners[id(p)]
        module, local = own[0]
        rule = rule_for(module)
        fits = rule is not None and calls[module] <= getattr(rule, "max_calls", calls[module])
        if len(own) == 1 and module in candidates and fits and batch_first[module] and uses[id(p)] == calls[module]:
            plan.rule_modules.setdefault(module, (rule, {}))[1][local] = name
        else:
            plan.generic.append(name)
    return plan
