"""The reference engine: torch.func per-sample gradients and the paper's formula, tensor by tensor.

See :class:`mnemo_fast.engines.Engine` for the interface every engine implements.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import fisher as ref_fisher
from ..fast.ops import TWINS  # the op table: a leaf module that never loads the extension
from ..distributed.sharding import any_sharded

Tensor = torch.Tensor


class ReferenceEngine:
    """Pure PyTorch: torch.func per-sample gradients and the paper's formula, tensor by tensor."""

    name = "reference"
    #: torch.func's per-sample gradients cannot run on sharded (DTensor) parameters
    takes_shards = False

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
        if any_sharded(model.parameters()):
            raise NotImplementedError(
                "the reference engine's per-sample gradients (torch.func) cannot run on sharded "
                "(DTensor / FSDP2) parameters; use mnemo_fast.distributed.DistributedEngine, which "
                "takes them through the layer rules"
            )
        return ref_fisher.sum_squared_grads(
            model, inputs, targets, chunk_size=chunk_size, output_fn=output_fn
        )

    # The perturbation is the fused ops' pure-PyTorch twins, so there is one copy of the formula.
    @staticmethod
    def max_ratio(forget, remain) -> Tensor:
        return TWINS.perturb_max_ratio(forget, remain)

    @staticmethod
    @torch.no_grad()
    def shift_(params, forget, remain, max_ratio, lambda1, lambda2, sign) -> None:
        TWINS.perturb_shift_(params, forget, remain, max_ratio, lambda1, lambda2, sign)

    @staticmethod
    @torch.no_grad()
    def gaussian_(params, forget, remain, max_ratio, lambda1, lambda2, tau, generator) -> None:
        TWINS.perturb_gaussian_(params, forget, remain, max_ratio, lambda1, lambda2, tau, generator)


REFERENCE = ReferenceEngine()
