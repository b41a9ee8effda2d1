"""The reference engine: torch.func per-sample gradients and the paper's formula, tensor by tensor.

See :mod:`mnemo_fast.engines` for the interface every engine implements.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import fisher as ref_fisher
from . import perturb as ref_perturb

Tensor = torch.Tensor


class ReferenceEngine:
    """Pure PyTorch: torch.func per-sample gradients and the paper's formula, tensor by tensor."""

    name = "reference"

    def backend_for(self, device: torch.device) -> str:
        return "reference"

    def sum_squared_grads(
        self,
        model: torch.nn.Module,
        inputs: Tensor,
        targets: Tensor,
        chunk_size: int | None = None,
        output_fn: Callable[[object], Tensor] = ref_fisher.logits_of,
    ) -> dict[str, Tensor]:
        return ref_fisher.sum_squared_grads(
            model, inputs, targets, chunk_size=chunk_size, output_fn=output_fn
        )

    def max_ratio(self, forget: Sequence[Tensor], remain: Sequence[Tensor]) -> Tensor:
        if not forget:
            return torch.zeros(0)
        return torch.stack([ref_perturb.max_finite_ratio(f, r) for f, r in zip(forget, remain)])

    @torch.no_grad()
    def shift_(
        self,
        params: Sequence[Tensor],
        forget: Sequence[Tensor],
        remain: Sequence[Tensor],
        max_ratio: Tensor,
        lambda1: float,
        lambda2: float,
        sign: float,
    ) -> None:
        for p, f, r, m in zip(params, forget, remain, max_ratio):
            step = ref_perturb.alpha(m, lambda1, lambda2) * ref_perturb.ratio(f, r, m)
            p.add_((sign * step).to(p.dtype))

    @torch.no_grad()
    def gaussian_(
        self,
        params: Sequence[Tensor],
        forget: Sequence[Tensor],
        remain: Sequence[Tensor],
        max_ratio: Tensor,
        lambda1: float,
        lambda2: float,
        tau: float,
        generator: torch.Generator | None,
    ) -> None:
        for p, f, r in zip(params, forget, remain):
            noise = ref_perturb.gaussian_noise(f, r, lambda1, lambda2, tau, generator, like=p)
            p.add_(noise.to(p.dtype))


REFERENCE = ReferenceEngine()
