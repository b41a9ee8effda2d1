"""Sums of squared per-sample gradients, the ground truth of the Fisher diagonal.

For samples (x_n, y_n) and the per-sample cross-entropy L_n = CE(model(x_n), y_n):

    S[w] = sum_n (dL_n / dw)^2        one tensor like each parameter

computed with ``torch.func`` (vmap over ``grad``) in chunks of samples, or, for models vmap
cannot trace, one backward per sample (the authors' batch-1 loop). BatchNorm and dropout
must not mix or drop samples, so the model runs in eval mode (restored afterwards).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from ..modeling import OutputFn, logits_of, tensors_kept, trainable_parameters, zero_accumulator

Tensor = torch.Tensor

# Per-sample gradients of a chunk are held at once: keep them near this many bytes.
_VMAP_BYTES = 256 * 2**20


def _zeros_like_accumulators(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: zero_accumulator(p) for name, p in params.items()}


def auto_chunk(params: dict[str, Tensor], num_samples: int) -> int:
    """Samples per vmap chunk: per-sample gradients of ``params`` near :data:`_VMAP_BYTES`."""
    bytes_per_sample = sum(p.numel() * 4 for p in params.values())
    return max(1, min(num_samples, _VMAP_BYTES // max(bytes_per_sample, 1)))


def _vmap_sum_sq(
    model: torch.nn.Module,
    params: dict[str, Tensor],
    inputs: Tensor,
    targets: Tensor,
    chunk_size: int,
    output_fn: OutputFn,
) -> dict[str, Tensor]:
    frozen = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    trainable = {name: p.detach() for name, p in params.items()}

    def sample_loss(weights: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, ({**frozen, **weights}, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(output_fn(out), y.unsqueeze(0), reduction="sum")

    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    sums = _zeros_like_accumulators(params)
    with tensors_kept(model):  # functional_call may leave a reused module holding its wrappers
        for start in range(0, inputs.shape[0], chunk_size):
            grads = per_sample_grads(
                trainable, inputs[start : start + chunk_size], targets[start : start + chunk_size]
            )
            for name, g in grads.items():
                sums[name] += g.to(sums[name].dtype).square().sum(0)
    return sums


def _loop_sum_sq(
    model: torch.nn.Module,
    params: dict[str, Tensor],
    inputs: Tensor,
    targets: Tensor,
    output_fn: OutputFn,
) -> dict[str, Tensor]:
    names = list(params)
    sums = _zeros_like_accumulators(params)
    for x, y in zip(inputs, targets):
        loss = F.cross_entropy(output_fn(model(x.unsqueeze(0))), y.unsqueeze(0), reduction="sum")
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        for name, g in zip(names, grads):
            if g is not None:
                sums[name] += g.to(sums[name].dtype).square()
    return sums


def sum_squared_grads(
    model: torch.nn.Module,
    inputs: Tensor,
    targets: Tensor,
    names: Sequence[str] | None = None,
    *,
    chunk_size: int | None = None,
    method: str = "auto",
    output_fn: OutputFn = logits_of,
) -> dict[str, Tensor]:
    """``{name: sum_n (dL_n/dw)^2}`` for the trainable parameters ``names`` (default all).

    inputs [N, *input_shape], targets [N] (class indices). ``method``: "vmap", "loop" or
    "auto" (vmap, falling back to the batch-1 loop when vmap cannot trace the model).
    Float16/bfloat16 parameters get float32 sums. The model must already be in the mode
    the caller wants (see :func:`mnemo_fast.modeling.eval_mode`).
    """
    params = trainable_parameters(model)
    if names is not None:
        params = {name: params[name] for name in names}
    if not params:
        return {}
    if method == "loop":
        return _loop_sum_sq(model, params, inputs, targets, output_fn)
    chunk = chunk_size or auto_chunk(params, inputs.shape[0])
    try:
        return _vmap_sum_sq(model, params, inputs, targets, chunk, output_fn)
    except (RuntimeError, NotImplementedError, TypeError):
        if method == "vmap":
            raise
        return _loop_sum_sq(model, params, inputs, targets, output_fn)
