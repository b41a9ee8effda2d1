"""Engines: the two hot steps of the method behind one interface.

``method.py`` is written once against an engine. The reference engine is plain PyTorch
(``mnemo_fast.reference``); the fast engine (``mnemo_fast.fast.engine``) captures layer
inputs/output gradients and calls the fused kernels. Both take and return the same things:

- ``sum_squared_grads(model, inputs, targets, chunk_size, output_fn)`` -> {name: S}, with
  S = sum_n (dL_n/dw)^2 for every trainable parameter (model already in eval mode);
- ``max_ratio(forget, remain)`` -> [L] largest finite eta per tensor;
- ``shift_(params, forget, remain, max_ratio, lambda1, lambda2, sign)``: w += sign*alpha*eta;
- ``gaussian_(params, forget, remain, max_ratio, lambda1, lambda2, tau, generator)``;
- optionally ``correct(model, inputs, labels, chunk_size, output_fn)`` -> [N] bool, how the
  codes are scored (default: :func:`mnemo_fast.method.correct_predictions`; the distributed
  engine splits them across ranks).
"""

from __future__ import annotations

import torch

from .reference.engine import REFERENCE, ReferenceEngine  # noqa: F401 (re-exported)



def default_engine():
    """The engine ``mnemo_fast`` uses when none is given: the fast one when the compiled
    extension loaded (``MNEMO_FAST_DISABLE_EXT=1`` switches it off), else the reference."""
    from .fast import _ext

    if _ext.available():
        from .fast.engine import EXTENSION

        return EXTENSION
    return REFERENCE


def resolve(engine):
    return default_engine() if engine is None else engine


def backend(device: str | torch.device = "cpu") -> str:
    """Which path ``mnemo_fast`` takes for tensors on ``device``: "cpu-ext", "cuda-ext" or
    "reference"."""
    return default_engine().backend_for(torch.device(device))
