"""Catch each hooked layer's input and output gradient during one batched backward.

Forward hooks save the layer input; a tensor hook on the layer output receives the
gradient of that output (even when an in-place activation follows: the hook belongs to the
pre-in-place version). Parameters are frozen during the pass, so autograd computes no
weight gradients at all: the rules do that work once, squared. A layer output that carries
no graph (the first layer, when neither the input nor the parameters require grad) becomes
a leaf the backward is asked for, and a copy of it flows on, so in-place ops stay legal.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterator

import torch
from torch import nn

Tensor = torch.Tensor


class Capture:
    """Records ``calls[module] = [[input, grad_output], ...]`` for the modules given."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        self.calls: dict[nn.Module, list[list[Tensor | None]]] = defaultdict(list)
        self.leaves: list[Tensor] = []
        self.batch_mismatch = False
        self._batch = None

    def _hook(self, module: nn.Module, args: tuple, output: Tensor):
        if not isinstance(output, Tensor) or not output.is_floating_point() or not args:
            return None
        x = args[0]
        if x.shape[0] != self._batch:
            self.batch_mismatch = True
        record: list[Tensor | None] = [x.detach(), None]
        self.calls[module].append(record)
        replacement = None
        if not output.requires_grad:
            output = output.detach().requires_grad_()
            self.leaves.append(output)
            replacement = output.clone()

        def keep(grad: Tensor) -> None:
            record[1] = grad

        output.register_hook(keep)
        return replacement

    @contextlib.contextmanager
    def recording(self, batch_size: int) -> Iterator["Capture"]:
        self._batch = batch_size
        handles = [m.register_forward_hook(self._hook) for m in self.modules]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


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
