"""Readable pure-PyTorch twins of the compiled operators (``mnemo_fast.fast.ops``).

Same signatures as the fused ops; these materialise per-sample gradients and run the
paper's formula op by op, so they are the ground truth the kernels are tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mnemo_fast.reference import perturb

Tensor = torch.Tensor


def _accumulate_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def sum_sq_grad_linear(grad_output: Tensor, input: Tensor) -> Tensor:
    """``sum_n (g_n^T x_n)**2`` for g [N, T, out], x [N, T, in] -> [out, in] (fp32/fp64)."""
    dtype = _accumulate_dtype(input)
    per_sample = torch.einsum("nto,nti->noi", grad_output.to(dtype), input.to(dtype))
    return per_sample.square().sum(0)


def sum_sq_grad_conv2d(
    grad_output: Tensor,
    input: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """``sum_n G_n**2`` with G_n the weight gradient of sample n: [out, in/groups, kh, kw]."""
    dtype = _accumulate_dtype(input)
    n, c = input.shape[:2]
    out = grad_output.shape[1]
    cols = F.unfold(input.to(dtype), kernel_size, dilation, padding, stride)  # [N, C*kh*kw, L]
    cols = cols.view(n, groups, c // groups * kernel_size[0] * kernel_size[1], -1)
    g = grad_output.to(dtype).reshape(n, groups, out // groups, -1)
    per_sample = torch.einsum("ngol,ngkl->ngok", g, cols)
    return per_sample.square().sum(0).reshape(out, c // groups, *kernel_size)


def perturb_max_ratio(forget: Sequence[Tensor], remain: Sequence[Tensor]) -> Tensor:
    """Largest finite eta of each tensor, [L] (float64 when the Fishers are, else float32)."""
    if len(forget) == 0:
        return torch.zeros(0)
    return torch.stack([perturb.max_finite_ratio(f, r) for f, r in zip(forget, remain)])


def perturb_shift_(
    params: Sequence[Tensor],
    forget: Sequence[Tensor],
    remain: Sequence[Tensor],
    max_ratio: Tensor,
    lambda1: float,
    lambda2: float,
    sign: float,
) -> None:
    """``p += sign * alpha_l * eta_l`` for each tensor, in place (the paper's formula)."""
    for p, f, r, m in zip(params, forget, remain, max_ratio):
        m = m.to(perturb.compute_dtype(f))
        shift = perturb.alpha(m, lambda1, lambda2) * perturb.ratio(f, r, m)
        p.add_((sign * shift).to(p.dtype))


def perturb_gaussian_(
    params: Sequence[Tensor],
    forget: Sequence[Tensor],
    remain: Sequence[Tensor],
    max_ratio: Tensor,
    lambda1: float,
    lambda2: float,
    tau: float,
    generator: torch.Generator | None,
) -> None:
    """``p += [eta > tau] * alpha_l * eta * z`` with ``z = torch.randn(p.shape)``, in place."""
    for p, f, r, m in zip(params, forget, remain, max_ratio):
        m = m.to(perturb.compute_dtype(f))
        eta = perturb.ratio(f, r, m)
        z = torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)
        update = perturb.alpha(m, lambda1, lambda2) * eta * z.to(eta.dtype)
        p.add_(torch.where(eta > tau, update, torch.zeros_like(update)).to(p.dtype))
