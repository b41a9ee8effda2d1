"""The paper's perturbation, written literally (docs/METHOD.md, "The shift (the
paper's perturbation)" and "The Gaussian variant").

For one parameter tensor with Fisher diagonals ``f_F`` (forget classes) and ``f_R``
(remaining classes), all of the parameter's shape:

    eta   = exp(log f_F - log f_R)      NaN -> 0, +inf -> largest finite eta of the tensor
    alpha = min(lambda1, lambda2 / max(eta))
    shift = alpha * eta                 (the model moves by sign * shift)

The dampening variant (``mode="dampen"``, after Selective Synaptic Dampening) scales instead of
shifting: ``w *= min(lam / eta, 1)`` where ``eta > threshold`` (:func:`dampening`, :func:`dampen_`).

Arithmetic is done in float32 (float64 when the Fisher is float64), whatever the
parameter's dtype (:func:`mnemo_fast.dtypes.accumulation_dtype`), and the result is cast
back on write.

:func:`max_ratios`, :func:`shift_`, :func:`gaussian_` and :func:`dampen_` apply the formula to lists of tensors
in place: they are the reference engine's perturbation and the pure-PyTorch twins of the fused
ops in the op table (:data:`mnemo_fast.fast.ops.TWINS`), one copy of the formula for both.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..dtypes import accumulation_dtype

Tensor = torch.Tensor


def raw_ratio(forget: Tensor, remain: Tensor) -> Tensor:
    """``exp(log f_F - log f_R)`` with NaN set to 0; +inf is left in place."""
    dtype = accumulation_dtype(forget.dtype)
    eta = torch.exp(torch.log(forget.to(dtype)) - torch.log(remain.to(dtype)))
    return torch.nan_to_num(eta, nan=0.0, posinf=float("inf"), neginf=0.0)


def max_finite_ratio(forget: Tensor, remain: Tensor) -> Tensor:
    """Largest finite eta of one tensor (0-dim). 0 when the tensor has no finite eta."""
    eta = raw_ratio(forget, remain)
    finite = eta[torch.isfinite(eta)]
    if finite.numel() == 0:
        return torch.zeros((), dtype=eta.dtype, device=eta.device)
    return finite.max()


def ratio(forget: Tensor, remain: Tensor, max_ratio: Tensor | None = None) -> Tensor:
    """eta with the authors' handling: NaN -> 0 and +inf -> the tensor's largest finite eta."""
    eta = raw_ratio(forget, remain)
    if max_ratio is None:
        max_ratio = max_finite_ratio(forget, remain)
    return torch.where(torch.isinf(eta), max_ratio.to(eta.dtype), eta)


def alpha(max_ratio: Tensor, lambda1: float, lambda2: float) -> Tensor:
    """Per-tensor gain ``min(lambda1, lambda2 / max eta)`` (lambda1 when max eta is 0)."""
    return torch.clamp(lambda2 / max_ratio, max=lambda1)


def shift(forget: Tensor, remain: Tensor, lambda1: float, lambda2: float) -> Tensor:
    """``alpha * eta`` for one tensor, in the accumulation dtype of the Fisher."""
    max_ratio = max_finite_ratio(forget, remain)
    return alpha(max_ratio, lambda1, lambda2) * ratio(forget, remain, max_ratio)


def perturbation(
    forget_fisher: Mapping[str, Tensor],
    remain_fisher: Mapping[str, Tensor],
    lambda1: float,
    lambda2: float,
) -> dict[str, Tensor]:
    """Per-parameter shifts ``alpha_l * eta`` (the paper's formula); name -> tensor.

    Each weight and each bias is its own tensor ``l`` with its own ``alpha_l``.
    """
    if forget_fisher.keys() != remain_fisher.keys():
        raise ValueError("forget_fisher and remain_fisher must have the same parameter names")
    return {
        name: shift(forget_fisher[name], remain_fisher[name], lambda1, lambda2)
        for name in forget_fisher
    }


def gaussian_noise(
    forget: Tensor,
    remain: Tensor,
    lambda1: float,
    lambda2: float,
    tau: float,
    generator: torch.Generator | None,
    like: Tensor,
) -> Tensor:
    """Masked Gaussian update ``[eta > tau] * alpha * eta * z`` with ``z ~ N(0, 1)``.

    ``z`` is drawn with ``torch.randn(like.shape, dtype=like.dtype)`` from ``generator``,
    so the fused kernel can reproduce it draw for draw on the CPU.
    """
    max_ratio = max_finite_ratio(forget, remain)
    eta = ratio(forget, remain, max_ratio)
    z = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    update = alpha(max_ratio, lambda1, lambda2) * eta * z.to(eta.dtype)
    return torch.where(eta > tau, update, torch.zeros_like(update))


# ---- lists of tensors, in place: the reference engine, and the fused ops' twins ------------
# (their signatures repeat the fused ops' in mnemo_fast/fast/ops.py on purpose: a twin takes
# exactly what its compiled op takes, so the op table can swap one for the other)

def max_ratios(forget: Sequence[Tensor], remain: Sequence[Tensor]) -> Tensor:
    """[L]: per tensor, the largest finite eta (:func:`max_finite_ratio`); twin of the fused
    ``perturb_max_ratio`` (:mod:`mnemo_fast.fast.ops`)."""
    if len(forget) == 0:
        return torch.zeros(0)
    return torch.stack([max_finite_ratio(f, r) for f, r in zip(forget, remain)])


def shift_(
    params: Sequence[Tensor],
    forget: Sequence[Tensor],
    remain: Sequence[Tensor],
    max_ratio: Tensor,
    lambda1: float,
    lambda2: float,
    sign: float,
) -> None:
    """In place, tensor by tensor: ``p += sign * alpha_l * eta_l``; twin of the fused
    ``perturb_shift_``."""
    for p, f, r, m in zip(params, forget, remain, max_ratio):
        m = m.to(accumulation_dtype(f.dtype))
        step = alpha(m, lambda1, lambda2) * ratio(f, r, m)
        p.add_((sign * step).to(p.dtype))


def gaussian_(
    params: Sequence[Tensor],
    forget: Sequence[Tensor],
    remain: Sequence[Tensor],
    max_ratio: Tensor,
    lambda1: float,
    lambda2: float,
    tau: float,
    generator: torch.Generator | None = None,
) -> None:
    """In place: ``p += [eta > tau] * alpha_l * eta * z``, z drawn like ``torch.randn(p.shape)``
    tensor by tensor in list order from ``generator``; twin of the fused ``perturb_gaussian_``."""
    for p, f, r, m in zip(params, forget, remain, max_ratio):
        m = m.to(accumulation_dtype(f.dtype))
        eta = ratio(f, r, m)
        z = torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)
        update = alpha(m, lambda1, lambda2) * eta * z.to(eta.dtype)
        p.add_(torch.where(eta > tau, update, torch.zeros_like(update)).to(p.dtype))


def dampening(forget: Tensor, remain: Tensor, threshold: float, lam: float) -> Tensor:
    """The dampening factor of one tensor (docs/METHOD.md, "Dampening"): ``min(lam / eta, 1)``
    where ``eta > threshold``, else 1, with eta = exp(log f_F - log f_R), NaN -> 0 (never
    dampened) and +inf kept (factor 0). In the accumulation dtype of the Fisher."""
    eta = raw_ratio(forget, remain)
    factor = torch.clamp(lam / eta, max=1.0)  # eta = 0 gives inf, clamped to 1; eta = inf gives 0
    return torch.where(eta > threshold, factor, torch.ones_like(factor))


def dampen_(
    params: Sequence[Tensor],
    forget: Sequence[Tensor],
    remain: Sequence[Tensor],
    threshold: float,
    lam: float,
) -> None:
    """In place, tensor by tensor: ``p *= [eta > threshold] min(lam / eta, 1)`` (1 elsewhere), the
    product taken in the accumulation dtype and rounded once to the parameter's dtype; twin of
    the fused ``perturb_dampen_``."""
    for p, f, r in zip(params, forget, remain):
        factor = dampening(f, r, threshold, lam)
        p.copy_((p.to(factor.dtype) * factor).to(p.dtype))
