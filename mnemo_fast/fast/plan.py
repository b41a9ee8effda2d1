"""Which parameters the layer rules can take, and which go to the generic per-sample path.

A parameter is taken by a rule when exactly one module with a rule that can take it is
called, and a batch-1 forward shows the parameter used once per call of that module (counted
as edges into its gradient accumulator in the autograd graph), with an input dimension of
size 1 that can index samples. A raw parameter whose one use is an expand/add/subtract
node is taken by the broadcast rule if a second probe, of batch 2, proves which dimension of
that node's output indexes samples (:func:`.rules.broadcast.plan_use`). Anything else (a raw
parameter of a custom module, a weight tied between two layers or also used functionally, a
convolution whose batch dimension is not first, a broadcast whose sample dimension is not
proven) goes to the generic path, with its reason in :attr:`Plan.reasons`.
"""

from __future__ import annotations

import warnings
import weakref
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..stack import user_stacklevel
from .rules import rule_for
from .rules.broadcast import BROADCAST_NODES, BroadcastUse, parent_nodes, plan_use
from .rules.operations import OperationsPlan, plan_operations


@dataclass
class Plan:
    """rule_modules: module -> (rule, {local name: full name}); generic: full names;
    batch_dims: module -> the input dimensions that may index samples (seen of size 1)."""

    rule_modules: dict[nn.Module, tuple[object, dict[str, str]]] = field(default_factory=dict)
    generic: list[str] = field(default_factory=list)
    batch_dims: dict[nn.Module, set[int]] = field(default_factory=dict)
    #: raw parameters broadcast over the batch (see :mod:`.rules.broadcast`), full names
    broadcast: list[str] = field(default_factory=list)
    #: full name -> where its broadcast node holds the samples, for each name of ``broadcast``
    broadcast_uses: dict[str, BroadcastUse] = field(default_factory=dict)
    #: full name -> why it goes to the generic path, for each name of ``generic``
    reasons: dict[str, str] = field(default_factory=dict)

    #: parameters a rule could take, computed on the generic path with the generic ones
    #: (one per-sample pass costs less than a batched pass plus that pass), full names;
    #: they are in ``generic`` too
    joined: list[str] = field(default_factory=list)

    #: parameters taken at the operation level (:mod:`.rules.operations`), None if none
    operations: OperationsPlan | None = None

    #: rule module -> what of its calls the batched pass catches on a copy, {"input",
    #: "output"}: learned when a later in-place op wrote it (:mod:`.capture`)
    protect: dict[nn.Module, set[str]] = field(default_factory=dict)

    #: rule module -> the Linear Fisher sums its rule computes, per call of the batch-1 probe:
    #: [[(local name, T, d_in, d_out, dtype)]] (:meth:`.rules.base.Rule.linear_sums`); what
    #: ``explain`` turns into each layer's Linear path (:func:`.dispatch.decide_linear`)
    linear: dict[nn.Module, list[list[tuple]]] = field(default_factory=dict)

    def linear_sizes(self, module: nn.Module) -> dict[str, tuple]:
        """local name -> ((T, d_in, d_out, dtype), ...) of ``module``'s Linear sums, its calls
        joined along positions (T added up), as the rule joins them."""
        calls = self.linear.get(module) or []
        if not calls or any(len(c) != len(calls[0]) for c in calls):
            return {}
        out: dict[str, list[tuple]] = {}
        for parts in zip(*calls):
            local, _, d_in, d_out, dtype = parts[0]
            out.setdefault(local, []).append((sum(p[1] for p in parts), d_in, d_out, dtype))
        return {local: tuple(sizes) for local, sizes in out.items()}

    def routes(self) -> dict[str, "Route"]:
        """name -> :class:`Route` for every parameter of the plan."""
        out = {}
        for module, (rule, local_names) in self.rule_modules.items():
            sizes = self.linear_sizes(module)
            for local, full in local_names.items():
                copied = " and ".join(sorted(self.protect.get(module, ())))
                note = f" ({copied} copied: written in place later in the forward)" if copied else ""
                out[full] = Route(full, "rule", f"{type(rule).__name__} on {type(module).__name__}.{local}{note}",
                                  sizes.get(local, ()))
        for name in self.broadcast:
            out[name] = Route(name, "broadcast", "broadcast over the samples (expand / add / subtract)")
        if self.operations is not None:
            for name in self.operations.names:
                ops = [u.op for u in self.operations.uses if u.name == name]
                out[name] = Route(name, "operation", ", ".join(ops) or "unused (zero)")
        for name in self.generic:
            path = "joined" if name in self.joined else "generic"
            out[name] = Route(name, path, self.reasons.get(name, "no rule takes it"))
        return out

    def send_generic(self, name: str, reason: str) -> None:
        self.generic.append(name)
        self.reasons[name] = reason


@dataclass(frozen=True)
class Route:
    """How one parameter's Fisher is computed. ``path``: "rule", "broadcast", "operation",
    "generic" (no rule takes it), "joined" (a rule could, but it shares the generic
    parameters' per-sample pass, which costs less than two passes), or "reference" on the
    reference engine; ``detail``: the rule, the operations, or why; ``linear``: the sizes
    ((T, d_in, d_out, dtype), ...) of the Linear Fisher sums its rule computes, T per sample
    (empty if none), from which ``explain`` names the Linear path."""

    name: str
    path: str
    detail: str
    linear: tuple = ()


class GenericPathWarning(UserWarning):
    """Parameters of a model went to the generic per-sample path (exact, slower)."""


_warned: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def warn_generic(model: nn.Module, plan: Plan) -> None:
    """One :class:`GenericPathWarning` per model, naming the generic parameters and why."""
    if not plan.generic or model in _warned:
        return
    _warned.add(model)
    shown = "; ".join(f"{name} ({plan.reasons.get(name, 'no rule')})" for name in plan.generic[:5])
    more = f"; and {len(plan.generic) - 5} more" if len(plan.generic) > 5 else ""
    warnings.warn(
        f"mnemo_fast: {len(plan.generic)} parameter(s) of {type(model).__name__} go to the generic "
        f"per-sample path (exact, slower): {shown}{more}. mnemo_fast.explain(model, inputs, targets) "
        f"lists every parameter's path",
        GenericPathWarning,
        stacklevel=user_stacklevel(),
    )


def all_generic(params, reason: str) -> Plan:
    """A plan that sends every parameter of ``params`` to the generic path for ``reason``."""
    return Plan(generic=list(params), reasons={name: reason for name in params})


def _mixes_samples(model: nn.Module) -> bool:
    """BatchNorm without running statistics normalises over the batch even in eval mode."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None for m in model.modules()
    )


def make_plan(model: nn.Module, params: dict[str, nn.Parameter], x1: torch.Tensor, y1: torch.Tensor, output_fn,
              x2: torch.Tensor | None = None) -> Plan:
    """Plan from one sample ``x1`` [1, ...], ``y1`` [1] (given twice more, as a batch of 2,
    only when a raw parameter may be broadcast over the batch); the model is in eval mode.
    ``x2`` [2, ...]: two different samples, the first ``x1``'s, for the operation-level probe
    (None: ``x1`` twice, which proves the layouts but not the order of folded rows; right
    only when every batch of the call has one sample)."""
    if _mixes_samples(model):
        return all_generic(params, "BatchNorm without running statistics mixes the samples")
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

    # module -> [(first, last)] autograd sequence numbers of the nodes each call created: a
    # parameter's use counts as its module's only if the node that uses it lies in one
    windows: dict[nn.Module, list[list[int]]] = defaultdict(list)

    def resolve(module, args):
        for local, p in rule_params[module].items():
            now = rules[module].parameters(module).get(local)
            if now is not None:
                live[id(p)] = id(now)
        windows[module].append([_next_node_number(), -1])

    linear: dict[nn.Module, list[list[tuple]]] = defaultdict(list)

    def count(module, args, kwargs, output):
        calls[module] += 1
        windows[module][-1][1] = _next_node_number()
        seen = rules[module].batch_candidates(module, args[0]) if args and torch.is_tensor(args[0]) else set()
        batch_dims[module] = batch_dims.get(module, seen) & seen
        try:  # what explain reports of the Linear path; never a reason to fail the plan
            linear[module].append(rules[module].linear_sums(module, rules[module].inputs(args, kwargs)))
        except Exception:  # noqa: BLE001
            linear[module].append([])

    handles = [m.register_forward_hook(count, with_kwargs=True) for m in rules]
    handles += [m.register_forward_pre_hook(resolve) for m in rules]
    try:
        with torch.enable_grad():
            loss = F.cross_entropy(output_fn(model(x1)), y1, reduction="sum")
    finally:
        for handle in handles:
            handle.remove()
    x2 = torch.cat([x1, x1]) if x2 is None else x2
    _keep_growing_dims(model, rules, batch_dims, x2, output_fn)
    used = {id(p): live.get(id(p), id(p)) for p in params.values()}
    parents = parent_nodes(loss, set(used.values())) if loss.grad_fn is not None else {}
    parents = {key: parents[used_id] for key, used_id in used.items() if used_id in parents}
    uses = Counter({key: len(nodes) for key, nodes in parents.items()})

    def within(key: int, module: nn.Module) -> bool:
        """Every use of the parameter is a node one of ``module``'s calls created (not one of a
        use elsewhere, while the module's own call is detached from the loss)."""
        spans = [span for span in windows.get(module, []) if span[1] >= 0]
        return all(any(a <= node._sequence_nr() < b for a, b in spans) for node in parents.get(key, []))

    plan = Plan(batch_dims=batch_dims, linear=dict(linear))
    candidates = []  # raw parameters with one use, through a broadcast node
    for name, p in params.items():
        called = [(m, local) for m, local in claims[id(p)] if calls[m] > 0]
        if len(called) == 1:
            module, local = called[0]
            rule = rules[module]
            fits = rule.max_calls is None or calls[module] <= rule.max_calls
            own = within(id(p), module)
            if fits and batch_dims[module] and uses[id(p)] == calls[module] and own:
                plan.rule_modules.setdefault(module, (rule, {}))[1][local] = name
                continue
            plan.send_generic(name, _why_not_taken(type(module).__name__, rule, calls[module],
                                                   batch_dims[module], uses[id(p)], own))
        elif len(called) > 1:
            plan.send_generic(name, f"tied: the weight of {len(called)} called modules with a rule")
        elif claims[id(p)]:
            plan.send_generic(name, f"its module is not called; used {uses[id(p)]} times elsewhere")
        elif uses[id(p)] != 1:
            plan.send_generic(name, f"raw parameter used {uses[id(p)]} times in the forward")
        elif parents[id(p)][0].name() not in BROADCAST_NODES:
            plan.send_generic(name, f"raw parameter used by {parents[id(p)][0].name()}, which no rule takes")
        else:
            candidates.append(name)
    if candidates:
        _plan_broadcast(plan, model, {name: params[name] for name in candidates}, parents, x1, y1, output_fn)
    left = {name: params[name] for name in params if name in plan.reasons}
    if left:
        _plan_operations(plan, model, left, x1, x2, output_fn)
    plan.generic = [name for name in params if name in plan.reasons]  # the parameters' order
    return plan


def _plan_operations(plan: Plan, model, left: dict[str, nn.Parameter], x1, x2, output_fn) -> None:
    """The operation level takes what it can prove of the parameters no layer rule took."""
    try:
        operations = plan_operations(model, left, x1, x2, output_fn)
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        for name in left:
            plan.reasons[name] += f"; the operation-level probe failed ({type(error).__name__}: {error})"
        return
    for name in operations.names:
        del plan.reasons[name]
    for name, why in operations.reasons.items():
        plan.reasons[name] += f"; at the operation level: {why}"
    if operations.names:
        plan.operations = operations


def _keep_growing_dims(model, rules, batch_dims: dict, x2, output_fn) -> None:
    """Keep, of each rule module's candidate dimensions (size 1 at batch 1), those that have
    size 2 in every call of a forward at batch 2: an input shared by the whole batch (BERT's
    position ids ``[1, T]``) has size 1 at any batch size, so it holds no samples."""
    grown: dict = {}

    def record(module, args, output):
        if module in batch_dims and args and torch.is_tensor(args[0]):
            shape = args[0].shape
            dims = {d for d in batch_dims[module] if len(shape) > d and shape[d] == 2}
            grown[module] = grown.get(module, dims) & dims

    handles = [m.register_forward_hook(record) for m in rules]
    try:
        with torch.no_grad():
            output_fn(model(x2))
    except (RuntimeError, ValueError, TypeError, IndexError):
        grown = {}  # a model that refuses a batch of 2: no dimension is shown to grow
    finally:
        for handle in handles:
            handle.remove()
    for module in batch_dims:
        batch_dims[module] = grown.get(module, set())


def _why_not_taken(kind: str, rule, calls: int, dims: set[int], uses: int, own: bool = True) -> str:
    if rule.max_calls is not None and calls > rule.max_calls:
        return f"its {kind} is called {calls} times; the rule takes at most {rule.max_calls}"
    if not dims:
        return f"no input dimension of its {kind} is shown to index samples (size 1 at batch 1, 2 at batch 2)"
    if not own:
        return f"used outside its {kind} (whose own call does not reach the loss, e.g. detached)"
    return f"used {uses} times but its {kind} is called {calls} times (also used outside it)"


def _next_node_number() -> int:
    """The sequence number the next autograd node will get (numbers grow in creation order,
    per thread): a throwaway node's number."""
    with torch.enable_grad():
        return (_COUNTER * 1.0).grad_fn._sequence_nr() + 1


_COUNTER = torch.zeros((), requires_grad=True)


def _plan_broadcast(plan: Plan, model, candidates: dict[str, nn.Parameter], parents, x1, y1, output_fn) -> None:
    """Broadcast rule or generic path for each candidate: a second probe, the sample given
    twice (batch 2), shows which dimension of each broadcast node's output grows with the
    batch (:func:`.rules.broadcast.plan_use`). A size that equals N never decides it."""
    try:
        with torch.enable_grad():
            loss2 = F.cross_entropy(output_fn(model(torch.cat([x1, x1]))), torch.cat([y1, y1]), reduction="sum")
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        for name in candidates:
            plan.send_generic(name, f"a probe of batch 2 failed ({type(error).__name__})")
        return
    wanted = {id(p) for p in candidates.values()}
    parents2 = parent_nodes(loss2, wanted) if loss2.grad_fn is not None else {}
    for name, p in candidates.items():
        nodes2 = parents2.get(id(p), [])
        use = plan_use(parents[id(p)][0], nodes2[0] if len(nodes2) == 1 else None, p)
        if isinstance(use, str):
            plan.send_generic(name, use)
        else:
            plan.broadcast.append(name)
            plan.broadcast_uses[name] = use
