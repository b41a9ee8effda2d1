"""The best pure-PyTorch versions of the fused kernels: same signatures as :mod:`.ops`.

Bounded memory (samples in blocks), ATen ops only. They are what the fast path runs when
the extension is absent or disabled inside the hooks engine, and the bar the compiled
kernels are benchmarked against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# Per-sample gradients of one block held at once: about this many bytes.
_BLOCK_BYTES = 64 * 2**20


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _block(n: int, per_sample_elements: int) -> int:
    return max(1, min(n, _BLOCK_BYTES // max(4 * per_sample_elements, 1)))


def sum_sq_grad_linear(grad_output: Tensor, input: Tensor) -> Tensor:
    """grad_output [N, T, out], input [N, T, in] -> sum_n (g_n^T x_n)^2 [out, in]."""
    dtype = _acc_dtype(input)
    g, x = grad_output.to(dtype), input.to(dtype)
    if g.shape[1] == 1:  # (g^2)^T (x^2): one GEMM, nothing per-sample is formed
        return g[:, 0].square().t() @ x[:, 0].square()
    n, _, out_features = g.shape
    acc = torch.zeros(out_features, x.shape[2], dtype=dtype, device=x.device)
    step = _block(n, out_features * x.shape[2])
    for start in range(0, n, step):
        per_sample = torch.bmm(g[start : start + step].transpose(1, 2), x[start : start + step])
        acc += per_sample.square_().sum(0)
    return acc


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def sum_sq_grad_conv2d(
    grad_output: Tensor,
    input: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> Tensor:
    """grad_output [N, out, Ho, Wo], input [N, in, H, W] -> [out, in/groups, kh, kw]."""
    kh, kw = _pair(kernel_size)
    dtype = _acc_dtype(input)
    n, out_channels = grad_output.shape[:2]
    in_per_group, out_per_group = input.shape[1] // groups, out_channels // groups
    acc = torch.zeros(groups, out_per_group, in_per_group * kh * kw, dtype=dtype, device=input.device)
    step = _block(n, out_channels * in_per_group * kh * kw)
    for start in range(0, n, step):
        x = input[start : start + step].to(dtype)
        cols = F.unfold(x, (kh, kw), dilation=_pair(dilation), padding=_pair(padding), stride=_pair(stride))
        cols = cols.view(x.shape[0], groups, in_per_group * kh * kw, -1)
        g = grad_output[start : start + step].to(dtype).reshape(x.shape[0], groups, out_per_group, -1)
        acc += torch.einsum("ngol,ngkl->ngok", g, cols).square_().sum(0)
    return acc.view(out_channels, in_per_group, kh, kw)
