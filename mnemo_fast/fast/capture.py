"""Catch each hooked layer's input and output gradient during one batched backward.

Forward hooks save the layer input; a tensor hook on the layer output receives the
gradient of that output (even when an in-place activation follows: the hook belongs to the
pre-in-place version). Parameters are frozen during the pass, so autograd computes no
weight gradients at all: the rules do that work once, squared. A layer output that carries
no graph (the first layer, when neither the input nor the parameters require grad) becomes
a leaf the backward is asked for, and a copy of it flows on, so in-place ops stay legal.

What runs after a layer can invalidate what was caught of it (:class:`Versions`): an
in-place op on a saved input (``y = lin(h); h.relu_()``) changes the saved values, and one on
an output that is an autograd view (a Linear on [N, T, d]) rewrites the view's history, so
its hook never fires. Version counters tell: the pass reads them after the forward, and a
layer whose input or view output changed is caught again with its own copy of that tensor
(``protect``; the chunk is run again, and the plan remembers it). docs/FAST_PATH.md,
"What runs after a capture".
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterator

import torch
from torch import nn

from .versions import Versions

Tensor = torch.Tensor


def _detached(value, copy: bool = False):
    if not isinstance(value, Tensor):
        return value
    return value.detach().clone() if copy else value.detach()


class Capture:
    """Records ``calls[module] = [[args, kwargs, grad_output], ...]`` for the modules given.

    ``layouts[module] = (dims, move)``: the dimensions of the first input that may index
    samples (from the plan); exactly one must have the batch size, else the call is flagged.
    With ``move`` (position-wise layers) that dimension is moved first in the saved input and
    in the output gradient, so rules always see [N, ...]. A tuple output
    (nn.MultiheadAttention) is followed through its first element.

    ``protect[module]``: what of the module's calls is caught on a copy, {"input", "output"}
    (learned from :attr:`versions`, see the module docstring). An output gradient is
    watched too: autograd writing into it after the hook would be caught after the backward.
    """

    def __init__(self, layouts: dict[nn.Module, tuple[set[int], bool]], keep: tuple = (),
                 protect: dict[nn.Module, set[str]] | None = None):
        self.layouts = layouts
        self.keep = {id(p) for p in keep}  # parameters other paths need gradients through
        self.protect = protect or {}
        self.calls: dict[nn.Module, list[list]] = defaultdict(list)
        self.leaves: list[Tensor] = []
        self.batch_mismatch = False
        self.versions = Versions()
        self._batch = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output):
        first = output[0] if isinstance(output, tuple) and output else output
        if not isinstance(first, Tensor) or not first.is_floating_point() or not args:
            return None
        candidates, move = self.layouts[module]
        dims = [d for d in sorted(candidates) if args[0].dim() > d and args[0].shape[d] == self._batch]
        if len(dims) != 1 and not (dims and self._batch == 1):
            self.batch_mismatch = True
            return None
        dim = dims[0] if move else 0
        protect = self.protect.get(module, ())
        copy = "input" in protect
        args = (args[0].movedim(dim, 0), *args[1:])
        record = [tuple(_detached(a, copy) for a in args), {k: _detached(v, copy) for k, v in kwargs.items()}, None]
        if not copy:  # the saved tensors alias the caller's: a later in-place op would show
            self.versions.watch(module, "input", (*record[0], *record[1].values()))
        self.calls[module].append(record)
        replacement = None
        protected = "output" in protect
        if first.requires_grad and (protected or first._is_view()):
            # a view: an in-place op on it would orphan the hook; protected: nothing may write
            # the original any more (if something does, the copy did not take)
            self.versions.watch(module, "output", (first,))
        if not first.requires_grad or protected:
            # the hook on ``first`` sees the gradient of what flows on: a copy, which later
            # in-place ops may write (a leaf when nothing upstream needs a gradient)
            if not first.requires_grad:
                first = first.detach().requires_grad_()
                self.leaves.append(first)
            replacement = first.clone()
            if isinstance(output, tuple):
                replacement = (replacement, *output[1:])

        versions = self.versions  # not ``self``: a leaf's hook would then hold the capture

        def keep(grad: Tensor) -> None:
            record[2] = grad.movedim(dim, 0)
            versions.watch(module, "gradient", (grad,))

        first.register_hook(keep)
        return replacement

    def _freeze(self, module: nn.Module, args: tuple) -> None:
        """Under FSDP2 a module runs on gathered copies of its parameters, which the caller's
        ``frozen`` did not reach: freeze those as the module is called (restored on exit)."""
        for p in module.parameters():
            if p.requires_grad and id(p) not in self.keep:
                p.requires_grad_(False)
                self._thawed.append(p)

    @contextlib.contextmanager
    def recording(self, batch_size: int) -> Iterator["Capture"]:
        self._batch = batch_size
        self._thawed: list[nn.Parameter] = []
        # prepend: before any hook of the caller's, which may replace the output (the rules
        # need the gradient of the layer's own output, not of what a hook made of it)
        handles = [m.register_forward_hook(self._hook, with_kwargs=True, prepend=True) for m in self.layouts]
        handles += [m.register_forward_pre_hook(self._freeze) for m in self.layouts]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for p in self._thawed:
                p.requires_grad_(True)


@contextlib.contextmanager
def frozen(params: list[nn.Parameter]) -> Iterator[None]:
    """Temporarily stop ``params`` from requiring grad (restored afterwards)."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
