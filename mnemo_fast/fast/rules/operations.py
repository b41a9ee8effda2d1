"""Parameters taken at the level of operations, not modules.

Models people bring use parameters outside the modules the layer rules know: GPT-2's
``Conv1D`` (``addmm(bias, x, weight)`` with a raw ``[in, out]`` weight), the RMSNorm scales of
Llama-style models (``weight * hidden``), layer scales, hand-written norms, relative-position
bias tables indexed by a buffer, and linear layers whose samples are folded into a leading
dimension with windows or heads (Swin: ``[N * windows, T, d]``).

A ``TorchFunctionMode`` (:class:`Recorder`) watches every torch operation of a forward pass and
follows two kinds of tensors: those computed from **one parameter alone** (the parameter, and
anything computed from it and constants: ``p[:, None]``, ``p.t()``, ``1 + p``,
``table[index_buffer].permute(...)``), each with the function that recomputes it from the
parameter; and those that **hold samples** (computed from the model's input). An operation
that takes both is a *use* of the parameter. The planner runs the forward on one sample and
on two (:func:`plan_operations`); for every use it proves, from the two probes, which dimension
of the output and of each sample-holding operand holds the samples (its size goes from ``k``
to ``2k``, every other size unchanged; ``k > 1``: samples folded with ``k`` rows each), and
that the first sample's rows come first and equal the one-sample probe's (so rows are grouped
by sample and no sample is mixed with another). A size that happens to equal the batch size
never decides anything. What cannot be proven goes to the generic path, with the reason.

In the batched pass each use's output gradient is caught by a tensor hook and turned into
per-sample gradients of the parameter (docs/FAST_PATH.md, "Parameters used by operations"):

- ``linear`` / ``addmm`` / ``matmul`` with the parameter as the weight: the linear kernel on
  the (unfolded) input and output gradient, without per-sample gradient tensors, when the
  parameter is used once and directly;
- ``embedding`` with sample-holding ids: unique (sample, id) rows, as the Embedding rule;
- ``layer_norm``: sum over positions of ``g * x_hat`` per sample;
- any other operation (``mul``, ``add``/``sub`` with ``alpha``, ``div``, ``cat``, ...): the
  vector-Jacobian product of that one operation, vectorised over samples with ``torch.func``.

A parameter reached through a chain (``p[:, None]``) gets its per-sample gradient mapped back
through the chain's own vector-Jacobian product, vectorised over samples. Several uses of one
parameter are summed per sample before squaring.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from ...dtypes import accumulation_dtype
from ..versions import Versions
from .embedding import embedding_sums

Tensor = torch.Tensor

#: Operations whose result keeps no tensor link we follow (shape queries and the like).
_IGNORED = {"__get__", "size", "dim", "numel", "__len__", "__contains__", "is_floating_point",
            "data_ptr", "stride", "element_size", "is_contiguous", "__format__", "__repr__",
            "__bool__", "item", "tolist", "__hash__"}
#: Linear-family operations whose weight operand the linear kernel takes.
_LINEAR = {"linear", "addmm", "matmul", "mm", "__matmul__"}
#: Most elements of per-sample gradient tensors one use may materialise (else generic).
MAX_PER_SAMPLE_ELEMENTS = 1 << 26


def _name(func) -> str:
    return getattr(func, "__name__", type(func).__name__)


def _in_place(name: str) -> bool:
    """``add_``, ``__iadd__``, ``__setitem__``: writes into its first argument."""
    return (name.endswith("_") and not name.startswith("__")) or name == "__setitem__" or (
        name.startswith("__i") and name not in ("__index__", "__invert__", "__int__", "__iter__"))


@dataclass
class Origin:
    """A tensor computed from parameter ``name`` alone: ``fn(p)`` recomputes it."""

    name: str
    fn: Callable[[Tensor], Tensor]
    direct: bool  # the parameter itself


@dataclass
class Use:
    """One operation that takes a tensor computed from a parameter and tensors holding samples.

    ``param_leaves``: positions (in the flattened arguments) of the parameter operands, with
    their origins; ``batch_leaves``: positions of the sample-holding operands."""

    func: Callable
    args: tuple
    kwargs: dict
    spec: object  # pytree spec of (args, kwargs)
    leaves: list
    param_leaves: dict[int, Origin]
    batch_leaves: list[int]
    output: Tensor | None

    @property
    def op(self) -> str:
        return _name(self.func)

    @property
    def names(self) -> set[str]:
        return {origin.name for origin in self.param_leaves.values()}


@dataclass
class Layout:
    """Where one tensor holds its samples: dimension ``dim``, ``rows`` entries per sample."""

    dim: int
    rows: int


@dataclass
class UsePlan:
    """A proven use: the output's and each sample-holding operand's layout."""

    op: str
    name: str
    output: Layout
    operands: dict[int, Layout]
    param_leaf: int
    direct: bool
    index: int = -1  # ordinal of the use among the forward's uses of planned parameters


@dataclass
class OperationsPlan:
    """Parameters taken at the operation level, their uses in forward order, and the
    reasons the others are not."""

    names: list[str] = field(default_factory=list)
    uses: list[UsePlan] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    #: use index -> what of it the batched pass catches on a copy ({"input", "output"}):
    #: learned when a later in-place op wrote it (:class:`OperationsCapture`)
    protect: dict[int, set[str]] = field(default_factory=dict)


class _IdMap:
    """Tensor -> value by identity, without keeping tensors alive (tensors compare
    elementwise, so weakref containers cannot hold them)."""

    def __init__(self):
        self._items: dict[int, tuple[weakref.ref, object]] = {}

    def __setitem__(self, t: Tensor, value) -> None:
        self._items[id(t)] = (weakref.ref(t), value)

    def get(self, t: Tensor):
        item = self._items.get(id(t))
        return item[1] if item is not None and item[0]() is t else None

    def __contains__(self, t: Tensor) -> bool:
        item = self._items.get(id(t))
        return item is not None and item[0]() is t


class Recorder(TorchFunctionMode):
    """Follows tensors computed from ``params`` alone and tensors holding samples (seeded
    with ``inputs``); records every operation that takes both (:class:`Use`).
    ``on_use(use)`` is called as each use is recorded (to hook its output); a tensor it
    returns flows on in place of the use's output (a copy the hook's tensor is safe from)."""

    def __init__(self, params: dict[str, Tensor], inputs: list[Tensor], on_use=None, model=None):
        super().__init__()
        self.origins = _IdMap()  # tensor -> Origin
        self.batched = _IdMap()  # tensor -> True
        for name, p in params.items():
            self.origins[p] = Origin(name, lambda q: q, True)
        for x in inputs:
            self.batched[x] = True
        self.uses: list[Use] = []
        self.mixed: dict[str, str] = {}  # parameter -> why it cannot be followed
        self.on_use = on_use
        #: name -> the tensor the forward used for it: the parameter itself, or under FSDP2
        #: the gathered (unsharded) tensor its owner holds while it runs
        self.live: dict[str, Tensor] = dict(params)
        self._owners = _owners(model, params) if model is not None else {}
        self._handles: list = []

    def __enter__(self):
        # FSDP2 swaps each sharded parameter for its gathered tensor in the owner's (or an
        # ancestor unit's) pre-forward hook, registered before this one: follow that tensor.
        self._handles = [module.register_forward_pre_hook(self._seed) for module in self._owners]
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return super().__exit__(*exc)

    def _seed(self, module, args) -> None:
        for local, name in self._owners[module]:
            now = module._parameters.get(local)
            if now is not None and now is not self.live[name]:
                self.live[name] = now
                self.origins[now] = Origin(name, lambda q: q, True)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name(func)
        if name in _IGNORED:
            return out
        leaves, spec = tree_flatten((args, kwargs))
        found = {i: self.origins.get(t) for i, t in enumerate(leaves) if isinstance(t, Tensor)}
        params = {i: origin for i, origin in found.items() if origin is not None}
        batch = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t in self.batched]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        if batch:
            for t in outputs:
                self.batched[t] = True
            if params and _in_place(name):
                for origin in params.values():
                    self.mixed.setdefault(origin.name, f"used by the in-place operation {name}")
            elif params:
                use = Use(func, args, kwargs, spec, leaves, params, batch,
                          outputs[0] if len(outputs) == 1 else None)
                self.uses.append(use)
                if self.on_use is not None:
                    replacement = self.on_use(use)
                    if replacement is not None:  # a copy flows on, wherever the output sits in ``out``
                        self.batched[replacement] = True
                        flat, out_spec = tree_flatten(out)
                        out = tree_unflatten([replacement if t is use.output else t for t in flat], out_spec)
        elif params:
            names = {origin.name for origin in params.values()}
            if len(names) > 1:
                for n in names:
                    self.mixed.setdefault(n, f"combined with another parameter ({name}) before meeting the samples")
                return out
            self._follow(func, leaves, spec, params, out, outputs)
        return out

    def _follow(self, func, leaves, spec, params: dict[int, Origin], out, outputs) -> None:
        """Record how each output of a parameter-only operation is recomputed from the parameter."""
        name = next(iter(params.values())).name
        fns = {i: origin.fn for i, origin in params.items()}

        def whole(p: Tensor):
            new = [fns[i](p) if i in fns else leaf for i, leaf in enumerate(leaves)]
            a, k = tree_unflatten(new, spec)
            return func(*a, **k)

        for position, t in enumerate(tree_flatten(out)[0]):
            if isinstance(t, Tensor) and t.is_floating_point():
                self.origins[t] = Origin(name, (lambda p, position=position: tree_flatten(whole(p))[0][position]), False)


def _owners(model: torch.nn.Module, params: dict[str, Tensor]) -> dict[torch.nn.Module, list[tuple[str, str]]]:
    """module -> [(local name, full name)] of the parameters of ``params`` it registers."""
    owners: dict[torch.nn.Module, list[tuple[str, str]]] = {}
    for name in params:
        prefix, _, local = name.rpartition(".")
        owners.setdefault(model.get_submodule(prefix), []).append((local, name))
    return owners


def _layout(small: Tensor, large: Tensor) -> Layout | None:
    """The one dimension whose size goes from k (one sample) to 2k (two samples)."""
    if small.dim() != large.dim():
        return None
    grown = [d for d in range(small.dim()) if small.shape[d] != large.shape[d]]
    if len(grown) != 1:
        return None
    d = grown[0]
    k = small.shape[d]
    if k < 1 or large.shape[d] != 2 * k:
        return None
    return Layout(d, k)


def _same_rows(small: Tensor, large: Tensor, layout: Layout) -> bool:
    """The first sample's rows of the two-sample probe equal the one-sample probe's."""
    first = large.narrow(layout.dim, 0, layout.rows)
    if not small.is_floating_point():
        return torch.equal(first, small)
    scale = float(small.abs().max()) if small.numel() else 0.0
    return torch.allclose(first.double(), small.double(), rtol=1e-4, atol=1e-6 * max(scale, 1e-30))


def plan_operations(model: torch.nn.Module, params: dict[str, Tensor], x1: Tensor, x2: Tensor,
                    output_fn) -> OperationsPlan:
    """Which of ``params`` the operation level takes, from a forward on ``x1`` [1, ...] and on
    ``x2`` [2, ...] (whose first sample is ``x1``'s; the model in eval mode)."""
    plan = OperationsPlan()
    probes = []
    for x in (x1, x2):
        recorder = Recorder(params, [x], model=model)
        with torch.no_grad(), recorder:
            output_fn(model(x))
        probes.append(recorder)
    one, two = probes
    for name, why in {**one.mixed, **two.mixed}.items():
        plan.reasons.setdefault(name, why)
    if [(u.op, sorted(u.names)) for u in one.uses] != [(u.op, sorted(u.names)) for u in two.uses]:
        for name in params:
            plan.reasons.setdefault(name, "the operations differ between a forward of one sample and of two")
        return plan
    used = set()
    proven: list[list[UsePlan]] = []
    for small, large in zip(one.uses, two.uses):
        proven.append([])
        for name in sorted(small.names):
            used.add(name)
            if name in plan.reasons:
                continue
            use_plan, reason = _prove(small, large, name)
            if reason:
                plan.reasons[name] = reason
            else:
                proven[-1].append(use_plan)
    for name in params:
        if name not in used:
            plan.reasons.setdefault(name, "no operation combines it with the samples")
    plan.names = [name for name in params if name not in plan.reasons]
    taken = set(plan.names)
    index = 0
    for small, use_plans in zip(one.uses, proven):
        if not small.names & taken:
            continue  # not recorded in the batched pass, which follows planned parameters only
        for use_plan in use_plans:
            if use_plan.name in taken:
                use_plan.index = index
                plan.uses.append(use_plan)
        index += 1
    return plan


def _prove(small: Use, large: Use, name: str) -> tuple[UsePlan | None, str | None]:
    """(the use's plan for parameter ``name``, None) when every layout is proven; else
    (None, the reason)."""
    leaves = [i for i, origin in small.param_leaves.items() if origin.name == name]
    if len(leaves) != 1:
        return None, f"{small.op} takes it {len(leaves)} times"
    if small.output is None or large.output is None:
        return None, f"{small.op} does not return one tensor"
    if small.leaves[leaves[0]].shape != large.leaves[leaves[0]].shape:
        return None, f"what {small.op} takes of it changes shape with the batch (expanded to the samples)"
    output = _layout(small.output, large.output)
    if output is None:
        return None, f"no dimension of {small.op}'s output is proven to hold the samples"
    if not _same_rows(small.output, large.output, output):
        return None, f"{small.op}'s output rows are not grouped by sample (or samples are mixed)"
    operands = {}
    for i in small.batch_leaves:
        layout = _layout(small.leaves[i], large.leaves[i])
        if layout is None or not _same_rows(small.leaves[i], large.leaves[i], layout):
            return None, f"no dimension of {small.op}'s input is proven to hold the samples"
        operands[i] = layout
    origin = small.param_leaves[leaves[0]]
    return UsePlan(small.op, name, output, operands, leaves[0], origin.direct), None


# ---- per-sample gradients in the batched pass ----------------------------------------------
def _samples_first(t: Tensor, layout: Layout, n: int) -> Tensor:
    """[N, ...]: the sample dimension first, each sample's ``rows`` kept as a dimension."""
    return t.unflatten(layout.dim, (n, layout.rows)).movedim(layout.dim, 0)


def _per_sample_vjp(use: Use, plan: UsePlan, grad: Tensor, n: int) -> Tensor:
    """[N, *operand.shape] gradients of the parameter operand, one per sample: the operation's
    vector-Jacobian product vectorised over samples (each sample's slice keeps the dimension)."""
    operand = use.leaves[plan.param_leaf]
    batch_positions = list(plan.operands)

    def one(g_n, *xs):
        def f(q):
            new = list(use.leaves)
            new[plan.param_leaf] = q
            for position, x in zip(batch_positions, xs):
                new[position] = x
            a, k = tree_unflatten(new, use.spec)
            return use.func(*a, **k)

        _, vjp = torch.func.vjp(f, operand)
        return vjp(g_n)[0]

    xs = [_samples_first(use.leaves[i], plan.operands[i], n) for i in batch_positions]
    g = _samples_first(grad, plan.output, n)
    return torch.func.vmap(one)(g, *xs)


#: add/sub-like operations: (sign of the first operand, sign of the second); ``alpha``
#: scales the second (``torch.add(x, p, alpha=a)`` is ``x + a * p``).
_SUMS = {"add": (1, 1), "__add__": (1, 1), "__radd__": (1, 1), "sub": (1, -1), "__sub__": (1, -1)}
_PRODUCTS = {"mul", "__mul__", "__rmul__"}


def _per_sample_elementwise(use: Use, plan: UsePlan, grad: Tensor, n: int) -> Tensor | None:
    """[N, *operand.shape] per-sample gradients of the parameter operand of a sum, a product or
    a linear-family bias, read off the output gradient without rerunning the operation (the
    vectorised vjp would recompute its forward, a whole matrix product for ``addmm``'s bias);
    None for any other operation. A broadcast operand's gradient is the output gradient summed
    to its shape, sample by sample."""
    position, keyword = _role(use, plan)
    operand = use.leaves[plan.param_leaf]
    if plan.op == "addmm" and (position == 0 or keyword == "input"):
        scale, other = float(use.kwargs.get("beta", 1.0)), None
    elif plan.op == "linear" and (position == 2 or keyword == "bias"):
        scale, other = 1.0, None
    elif plan.op in _SUMS and position in (0, 1) and not keyword and len(use.args) == 2:
        scale = _SUMS[plan.op][position] * (float(use.kwargs.get("alpha", 1.0)) if position == 1 else 1.0)
        if set(use.kwargs) - {"alpha"}:
            return None
        other = None
    elif plan.op in _PRODUCTS and position in (0, 1) and not keyword and len(use.args) == 2 and not use.kwargs:
        scale, other = 1.0, use.args[1 - position]
        if isinstance(other, Tensor) and other.is_complex():
            return None
    else:
        return None
    g = _samples_first(grad, plan.output, n)
    if isinstance(other, Tensor):
        i = _leaf(use, other)
        if i in plan.operands:  # sample-holding: each sample's own rows
            other = _samples_first(other, plan.operands[i], n).detach()
        else:  # a constant: broadcast against each sample's output slice, as in the forward
            other = other.detach()
            if other.dim() >= g.dim():
                return None
    summed = _sum_to_operand(g * other if other is not None else g, operand.shape, n)
    return summed * scale if summed is not None and scale != 1.0 else summed


def _sum_to_operand(t: Tensor, shape: torch.Size, n: int) -> Tensor | None:
    """``t`` [N, *out] summed, sample by sample, over the dimensions an operand of ``shape``
    was broadcast along (broadcasting aligns shapes on the right): [N, *shape]; None when the
    operand has more dimensions than a sample's slice of the output."""
    padded = (1,) * (t.dim() - 1 - len(shape)) + tuple(shape)
    if len(padded) != t.dim() - 1:
        return None
    return t.sum_to_size((n,) + padded).reshape(n, *shape)


def _leaf(use: Use, value) -> int | None:
    """Position of ``value`` (by identity) among the use's flattened arguments."""
    return next((i for i, leaf in enumerate(use.leaves) if leaf is value), None)


def _arg(use: Use, position: int, keyword: str):
    return use.args[position] if len(use.args) > position else use.kwargs.get(keyword)


def _batched_arg(use: Use, plan: UsePlan, position: int, keyword: str, n: int) -> Tensor | None:
    """Argument ``position`` with its samples first, if it is a sample-holding operand."""
    value = _arg(use, position, keyword)
    i = _leaf(use, value) if isinstance(value, Tensor) else None
    return _samples_first(value, plan.operands[i], n) if i in plan.operands else None


def _role(use: Use, plan: UsePlan) -> tuple[int | None, str | None]:
    """(position, keyword) of the parameter operand in the call's arguments."""
    operand = use.leaves[plan.param_leaf]
    for j, a in enumerate(use.args):
        if a is operand:
            return j, None
    return None, next((k for k, v in use.kwargs.items() if v is operand), None)


def _linear_parts(use: Use, plan: UsePlan, grad: Tensor, n: int):
    """(x [N, R, in], g [N, R, out], weight_is_in_out) for a linear-family use whose parameter
    is the weight, or None."""
    position, keyword = _role(use, plan)
    if plan.op == "linear" and (position == 1 or keyword == "weight"):
        x, transposed = _batched_arg(use, plan, 0, "input", n), False
    elif plan.op == "addmm" and (position == 2 or keyword == "mat2"):
        x, transposed = _batched_arg(use, plan, 1, "mat1", n), True
    elif plan.op in ("matmul", "mm", "__matmul__") and position == 1 and use.leaves[plan.param_leaf].dim() == 2:
        x, transposed = _batched_arg(use, plan, 0, "input", n), True
    else:
        return None
    if x is None:
        return None
    g = _samples_first(grad, plan.output, n)
    return x.reshape(n, -1, x.shape[-1]), g.reshape(n, -1, g.shape[-1]), transposed


def _scale(use: Use, plan: UsePlan, linear: bool) -> float:
    """addmm's alpha scales the weight's gradient in the kernel path (the generic vjp path
    applies it itself)."""
    return float(use.kwargs.get("alpha", 1.0)) if linear and plan.op == "addmm" else 1.0


class OperationsCapture:
    """Hooks every planned use during one batched forward; :attr:`sums` (direct single uses
    through a kernel) and :attr:`samples` (per-sample gradients of the others) after the backward."""

    def __init__(self, plan: OperationsPlan, params: dict[str, Tensor], inputs: Tensor, kernels, model=None):
        self.plan = plan
        self.params = {name: params[name] for name in plan.names}
        self.kernels = kernels
        self.n = inputs.shape[0]
        self.recorder = Recorder(self.params, [inputs], on_use=self._on_use, model=model)
        self.single = {name for name in plan.names if sum(u.name == name for u in plan.uses) == 1}
        self.sums: dict[str, Tensor] = {}
        self.samples: dict[str, Tensor] = {}
        self.failed: str | None = None
        #: the uses' sample-holding operands and outputs, by use index (see
        #: :class:`..versions.Versions`); ``plan.protect[index]`` is caught on copies
        self.versions = Versions()
        #: the hooked uses' outputs: the backward asks for their gradients, not the
        #: parameters' (a parameter's own gradient, e.g. a weight-gradient GEMM, is never needed)
        self.outputs: list[Tensor] = []
        self._next = 0

    def _on_use(self, use: Use) -> None:
        index = self._next
        self._next += 1
        plans = [u for u in self.plan.uses if u.index == index]
        if not plans or any(u.op != use.op or u.name not in use.names for u in plans):
            self.failed = f"the forward's operations differ from the plan's (use {index}: {use.op})"
            return
        protect = self.plan.protect.get(index, ())
        batched = set(use.batch_leaves)
        if "input" in protect:  # the hook reads the operands after the forward: its own copies
            use.leaves = [leaf.detach().clone() if i in batched else leaf for i, leaf in enumerate(use.leaves)]
            use.args, use.kwargs = tree_unflatten(use.leaves, use.spec)
        else:
            self.versions.watch(index, "input", [use.leaves[i] for i in batched])
        if use.output is None or not use.output.requires_grad:
            return None  # no gradient reaches it: zero contribution
        use.output.register_hook(lambda grad, use=use, plans=plans: self._gradient(use, plans, grad))
        self.outputs.append(use.output)
        # an in-place op on it would orphan the hook (a view's history is rewritten) or stop
        # the backward short of it (the backward asks for the gradient of its newest version);
        # protected, a copy flows on and nothing may write the original (else the copy failed)
        self.versions.watch(index, "output", [use.output])
        return use.output.clone() if "output" in protect else None

    def _gradient(self, use: Use, plans: list[UsePlan], grad: Tensor) -> None:
        try:
            for plan in plans:
                self._accumulate(use, plan, grad)
        except Exception as error:  # noqa: BLE001 - any failure falls back to the generic path
            self.failed = f"{use.op}: {type(error).__name__}: {error}"

    def _accumulate(self, use: Use, plan: UsePlan, grad: Tensor) -> None:
        n, name = self.n, plan.name
        p = self.params[name]
        dtype = accumulation_dtype(p.dtype)
        grad = grad.detach()
        if plan.direct and name in self.single:
            linear = _linear_parts(use, plan, grad, n) if plan.op in _LINEAR else None
            if linear is not None:
                x, g, transposed = linear
                sums = self.kernels.linear_fisher(g.contiguous(), x.detach().to(g.dtype).contiguous())
                self.sums[name] = (sums.t() if transposed else sums).to(dtype) * _scale(use, plan, True) ** 2
                return
            position, keyword = _role(use, plan)
            ids = _batched_arg(use, plan, 0, "input", n) if plan.op == "embedding" else None
            plain = _arg(use, 3, "max_norm") is None and not _arg(use, 5, "scale_grad_by_freq")
            if ids is not None and (position == 1 or keyword == "weight") and plain:
                g = _samples_first(grad, plan.output, n).reshape(n, -1, grad.shape[-1])
                self.sums[name] = embedding_sums(ids.reshape(n, -1), g.to(dtype), p.shape[0], _arg(use, 2, "padding_idx"))
                return
        per_sample = self._per_sample(use, plan, grad).to(dtype)
        if name in self.samples:
            self.samples[name] = self.samples[name] + per_sample
        else:
            self.samples[name] = per_sample

    def _per_sample(self, use: Use, plan: UsePlan, grad: Tensor) -> Tensor:
        """[N, *p.shape] per-sample gradients of the parameter from this use."""
        n, p = self.n, self.params[plan.name]
        operand = use.leaves[plan.param_leaf]
        if n * operand.numel() > MAX_PER_SAMPLE_ELEMENTS or n * p.numel() > MAX_PER_SAMPLE_ELEMENTS:
            raise MemoryError(f"per-sample gradients of {plan.name} would hold {n * p.numel()} elements")
        linear = _linear_parts(use, plan, grad, n) if plan.op in _LINEAR else None
        position, keyword = _role(use, plan)
        x = _batched_arg(use, plan, 0, "input", n) if plan.op == "layer_norm" else None
        if linear is not None:
            x, g, transposed = linear
            w = torch.einsum("nro,nri->noi", g, x.detach().to(g.dtype)) * _scale(use, plan, True)
            on_operand = w.transpose(1, 2) if transposed else w
        elif x is not None and (position in (2, 3) or keyword in ("weight", "bias")):
            g = _samples_first(grad, plan.output, n)
            if position == 2 or keyword == "weight":
                g = g * F.layer_norm(x.detach(), operand.shape, None, None, _arg(use, 4, "eps") or 1e-5)
            on_operand = _sum_to_operand(g, operand.shape, n)
        else:
            on_operand = _per_sample_elementwise(use, plan, grad, n)
            if on_operand is None:
                on_operand = _per_sample_vjp(use, plan, grad, n)
        if plan.direct:
            return on_operand.reshape(n, *p.shape)
        live = self.recorder.live[plan.name].detach()  # the gathered tensor under FSDP2
        _, vjp = torch.func.vjp(use.param_leaves[plan.param_leaf].fn, live)  # back through the chain
        return torch.func.vmap(lambda g_n: vjp(g_n)[0])(on_operand)

