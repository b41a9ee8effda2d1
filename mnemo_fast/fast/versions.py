"""Version counters of caught tensors: did anything write into them in place since?

The fast path catches layer inputs, layer outputs and output gradients during a pass and
reads them later. PyTorch bumps a tensor's version counter (shared by its views and
``detach()``-ed aliases) on every in-place write, so comparing the counter read when a tensor
was caught with the counter now tells whether the caught values are still the ones the
layer saw. docs/FAST_PATH.md, "What runs after a capture".
"""

from __future__ import annotations

from collections import defaultdict

import torch

Tensor = torch.Tensor


class Versions:
    """Version counters of caught tensors, read when they were caught and compared later:
    a changed counter means the tensor was written in place since (``key`` says whose).

    ``watch`` holds the tensors until :meth:`changed` is last asked (the pass drops the
    watcher with the chunk)."""

    def __init__(self):
        self._entries: list[tuple[object, str, Tensor, int]] = []

    def watch(self, key, what: str, tensors) -> None:
        for t in tensors:
            if isinstance(t, Tensor) and not t.is_inference():  # those keep no counter
                self._entries.append((key, what, t, t._version))

    def changed(self, whats: tuple[str, ...] | None = None) -> dict[object, set[str]]:
        """{key: {what}} of the tensors written in place since they were watched."""
        out: dict[object, set[str]] = defaultdict(set)
        for key, what, t, version in self._entries:
            if (whats is None or what in whats) and t._version != version:
                out[key].add(what)
        return dict(out)

    def forget(self, whats: tuple[str, ...]) -> None:
        """Stop watching (and holding) the tensors of ``whats``."""
        self._entries = [e for e in self._entries if e[1] not in whats]
