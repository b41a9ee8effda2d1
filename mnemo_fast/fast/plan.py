"""Which parameters the layer rules can take, and which go to the generic per-sample path.

A parameter is taken by a rule when exactly one module with a rule that can take it is
called, and a batch-1 forward shows the parameter used once per call of that module (counted
as edges into its gradient accumulator in the autograd graph), with an input dimension of
size 1 that can index samples. Anything else (a raw parameter of a custom
module, nn.MultiheadAttention's projections, a weight tied between two layers or also used
functionally, a convolution whose batch dimension is not first) goes to the generic path.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .rules import rule_for
from .rules.broadcast import BROADCAST_NODES, parent_nodes


@dataclass
class Plan:
    """rule_modules: module -> (rule, {local name: full name}); generic: full names;
    batch_dims: module -> the input dimensions that may index samples (seen of size 1)."""

    rule_modules: dict[nn.Module, tuple[object, dict[str, str]]] = field(default_factory=dict)
    generic: list[str] = field(default_factory=list)
    batch_dims: dict[nn.Module, set[int]] = field(default_factory=dict)
    #: raw parameters broadcast over the batch (see :mod:`.broadcast`), full names
    broadcast: list[str] = field(default_factory=list)




def _mixes_samples(model: nn.Module) -> bool:
    """BatchNorm without running statistics normalises over the batch even in eval mode."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None for m in model.modules()
    )


def make_plan(model: nn.Module, params: dict[str, nn.Parameter], x1: torch.Tensor, y1: torch.Tensor, output_fn) -> Plan:
    """Plan from one sample ``x1`` [1, ...], ``y1`` [1]; the model is in eval mode."""
    if _mixes_samples(model):
        return Plan(generic=list(params))
    rules = {m: rule_for(m) for m in model.modules()}
    rules = {m: r for m, r in rules.items() if r is not None}
    claims = defaultdict(list)  # id(parameter) -> [(module, local name)] of rules that can take it
    rule_params = {module: rule.parameters(module) for module, rule in rules.items()}
    for module, local_params in rule_params.items():
        for local, p in local_params.items():
            claims[id(p)].append((module, local))
    calls: Counter = Counter()
    batch_dims: dict[nn.Module, set[int]] = {}
    # id(registered parameter) -> id(the tensor the module holds under that name while it
    # runs): the same, except under FSDP2, whose pre-forward hook swaps each sharded DTensor
    # parameter for its gathered (unsharded) tensor and its post-forward hook swaps it back.
    live: dict[int, int] = {}

    def resolve(module, args):
        for local, p in rule_params[module].items():
            now = rules[module].parameters(module).get(local)
            if now is not None:
                live[id(p)] = id(now)

    def count(module, args, output):
        calls[module] += 1
        seen = rules[module].batch_candidates(module, args[0]) if args and torch.is_tensor(args[0]) else set()
        batch_dims[module] = batch_dims.get(module, seen) & seen

    handles = [m.register_forward_hook(count) for m in rules]
    handles += [m.register_forward_pre_hook(resolve) for m in rules]
    try:
        with torch.enable_grad():
            loss = F.cross_entropy(output_fn(model(x1)), y1, reduction="sum")
    finally:
        for handle in handles:
            handle.remove()
    used = {id(p): live.get(id(p), id(p)) for p in params.values()}
    parents = parent_nodes(loss, set(used.values())) if loss.grad_fn is not None else {}
    parents = {key: parents[used_id] for key, used_id in used.items() if used_id in parents}
    uses = Counter({key: len(nodes) for key, nodes in parents.items()})

    plan = Plan(batch_dims=batch_dims)
    for name, p in params.items():
        called = [(m, local) for m, local in claims[id(p)] if calls[m] > 0]
        if len(called) == 1:
            module, local = called[0]
            rule = rules[module]
            within = rule.max_calls is None or calls[module] <= rule.max_calls
            if within and batch_dims[module] and uses[id(p)] == calls[module]:
                plan.rule_modules.setdefault(module, (rule, {}))[1][local] = name
                continue
        if not claims[id(p)] and uses[id(p)] == 1 and parents[id(p)][0].name() in BROADCAST_NODES:
            plan.broadcast.append(name)
            continue
        plan.generic.append(name)
    return plan
