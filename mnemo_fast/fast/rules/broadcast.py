"""Raw parameters that are broadcast over the batch: a class token expanded to every sample,
a learned position embedding added to every sample (``x + self.pos``, ``cls.expand(N, ...)``,
``torch.add(x, p, alpha=a)``).

Such a parameter has one use: an expand, add or subtract node whose output holds the samples
in one dimension. A hook on that autograd node catches the gradient of its output; the
per-sample gradient is that gradient, times ``alpha`` when the parameter is the ``other``
operand of an add/sub, summed over the dimensions the parameter was broadcast along (within
each sample), so no per-sample forward pass is needed.

The sample dimension is never guessed from sizes: the planner compares the node's output
shape on two probes, of batch 1 and batch 2 (:func:`plan_use`); exactly one dimension must go
from 1 to 2, all others unchanged, else the parameter goes to the generic path with a reason.
docs/FAST_PATH.md, "Raw parameters broadcast over the batch".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor

#: Autograd nodes through which a broadcast parameter's per-sample gradient is the node's
#: output gradient, scaled and reduced to the parameter's shape (a sign squares away).
BROADCAST_NODES = ("ExpandBackward0", "AddBackward0", "SubBackward0")


@dataclass(frozen=True)
class BroadcastUse:
    """How one broadcast parameter's per-sample gradient is read off its node's output
    gradient: ``dim`` indexes the samples, ``shape`` is the output shape at batch 1."""

    dim: int
    shape: tuple[int, ...]


def parent_nodes(loss: Tensor, wanted: set[int]) -> dict[int, list]:
    """id(parameter) -> the autograd nodes with an edge into its gradient accumulator."""
    parents: dict[int, list] = {}
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
            if variable is None:
                stack.append(child)
            elif id(variable) in wanted:
                parents.setdefault(id(variable), []).append(node)
    return parents


def scale_of(node, param: Tensor) -> float | None:
    """|d output / d param| of a broadcast node: ``alpha`` when ``param`` is the second
    operand of an add/sub (``torch.add(x, p, alpha=3)``), else 1; None if unreadable."""
    if node.name() == "ExpandBackward0":
        return 1.0
    edges = [i for i, (child, _) in enumerate(node.next_functions)
             if getattr(child, "variable", None) is param]
    if edges != [0] and edges != [1]:
        return None
    if edges == [0]:
        return 1.0
    alpha = getattr(node, "_saved_alpha", None)
    if isinstance(alpha, (bool, int, float)):
        return abs(float(alpha))
    return None


def output_shape(node) -> tuple[int, ...] | None:
    """Shape of a node's forward output (the gradient it receives), None if torch hides it."""
    try:
        return tuple(int(s) for s in node._input_metadata[0].shape)
    except (AttributeError, IndexError, TypeError, RuntimeError):
        return None


def plan_use(node1, node2, param: Tensor) -> BroadcastUse | str:
    """The :class:`BroadcastUse` of ``param`` whose one use is ``node1`` in a batch-1 probe
    and ``node2`` in a batch-2 probe of the same sample twice; else why it cannot be one."""
    if node1.name() not in BROADCAST_NODES:
        return f"raw parameter used by {node1.name()}, which no rule takes"
    if scale_of(node1, param) is None:
        return f"the alpha of its {node1.name()} node cannot be read"
    if node2 is None or node2.name() != node1.name():
        return f"its use differs between probes of batch 1 and 2 ({node1.name()})"
    one, two = output_shape(node1), output_shape(node2)
    if one is None or two is None:
        return f"the output shape of its {node1.name()} node cannot be read"
    grown = [d for d in range(len(one)) if len(one) == len(two) and one[d] != two[d]]
    if len(one) != len(two) or len(grown) != 1 or (one[grown[0]], two[grown[0]]) != (1, 2):
        return (f"no dimension of its {node1.name()} output provably indexes samples "
                f"(shape {list(one)} at batch 1, {list(two)} at batch 2)")
    dim, shape = grown[0], param.shape
    if len(shape) > len(one) or _padded(shape, len(one))[dim] != 1:
        return f"it varies along the sample dimension {dim} of its {node1.name()} output"
    return BroadcastUse(dim, one)


def _padded(shape, dims: int) -> tuple[int, ...]:
    """``shape`` with leading 1s to ``dims`` dimensions (broadcasting's alignment)."""
    return (1,) * (dims - len(shape)) + tuple(shape)


def per_sample(grad_output: Tensor, use: BroadcastUse, shape: torch.Size, scale: float, batch: int) -> Tensor | None:
    """[N, *shape] per-sample gradients from the node's output gradient [..., N, ...]
    (N at ``use.dim``), or None when that gradient does not have the planned shape."""
    expected = list(use.shape)
    expected[use.dim] = batch
    if list(grad_output.shape) != expected:
        return None
    padded = _padded(shape, len(expected))
    dims = [d for d in range(len(expected)) if d != use.dim and padded[d] == 1 and expected[d] != 1]
    reduced = grad_output.sum(dims, keepdim=True) if dims else grad_output
    reduced = reduced.movedim(use.dim, 0).reshape(batch, *shape)
    return reduced * scale if scale != 1.0 else reduced


class BroadcastCapture:
    """Hooks the parent node of each broadcast parameter after a forward pass;
    ``grads[name] = (output gradient, scale)``."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = params
        self.grads: dict[str, tuple[Tensor, float]] = {}
        self.failed = False

    def attach(self, loss: Tensor) -> None:
        parents = parent_nodes(loss, {id(p) for p in self.params.values()})
        for name, p in self.params.items():
            nodes = parents.get(id(p), [])
            scale = scale_of(nodes[0], p) if len(nodes) == 1 and nodes[0].name() in BROADCAST_NODES else None
            if scale is None:
                self.failed = True
                return
            nodes[0].register_hook(self._keeper(name, scale))

    def _keeper(self, name: str, scale: float):
        def keep(grad_inputs, grad_outputs):
            self.grads[name] = (grad_outputs[0], scale)

        return keep
