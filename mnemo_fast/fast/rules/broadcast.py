"""Raw parameters that are broadcast over the batch: a class token expanded to every sample,
a learned position embedding added to every sample (``x + self.pos``, ``cls.expand(N, ...)``).

Such a parameter has one use: an expand, add or subtract node whose output holds the batch
in dimension 0. A hook on that autograd node catches the gradient of its output [N, ...];
the per-sample gradient is that gradient summed over the dimensions the parameter was
broadcast along (within each sample), so no per-sample forward pass is needed.
docs/FAST_PATH.md, "Raw parameters broadcast over the batch".
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

#: Autograd nodes through which a broadcast parameter's per-sample gradient is the node's
#: output gradient, reduced to the parameter's shape (the sign of a subtraction squares away).
BROADCAST_NODES = ("ExpandBackward0", "AddBackward0", "SubBackward0")


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


def per_sample(grad_output: Tensor, shape: torch.Size, batch: int) -> Tensor | None:
    """[N, *shape] per-sample gradients from the node's output gradient, or None when the
    output's dimension 0 is not the batch the parameter was broadcast over."""
    padded = (1,) * (grad_output.dim() - len(shape)) + tuple(shape)
    if grad_output.dim() < len(shape) or grad_output.shape[0] != batch or padded[0] != 1:
        return None
    dims = [d for d in range(1, grad_output.dim()) if padded[d] == 1 and grad_output.shape[d] != 1]
    reduced = grad_output.sum(dims, keepdim=True) if dims else grad_output
    if tuple(reduced.shape[1:]) != padded[1:]:
        return None
    return reduced.reshape(batch, *shape)


class BroadcastCapture:
    """Hooks the parent node of each broadcast parameter after a forward pass."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = params
        self.grads: dict[str, Tensor] = {}
        self.failed = False

    def attach(self, loss: Tensor) -> None:
        parents = parent_nodes(loss, {id(p) for p in self.params.values()})
        for name, p in self.params.items():
            nodes = parents.get(id(p), [])
            if len(nodes) != 1 or nodes[0].name() not in BROADCAST_NODES:
                self.failed = True
                return
            nodes[0].register_hook(self._keeper(name))

    def _keeper(self, name: str):
        def keep(grad_inputs, grad_outputs):
            self.grads[name] = grad_outputs[0]

        return keep
