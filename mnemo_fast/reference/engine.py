"""The reference engine: torch.func per-sample gradients and the paper's formula, tensor by tensor.

See :class:`mnemo_fast.engines.Engine` for the interface every engine implements.
"""

from __future__ import annotations

import torch

from . import fisher as ref_fisher, perturb
from ..fisher_sums import FisherSums
from ..sharding import any_sharded

Tensor = torch.Tensor


class ReferenceEngine(FisherSums):
    """Pure PyTorch: torch.func per-sample gradients and the paper's formula, tensor by tensor."""

    name = "reference"
    #: torch.func's per-sample gradients cannot run on sharded (DTensor) parameters
    takes_shards = False

    def backend_for(self, device: torch.device) -> str:
        return "reference"

    def _fisher_sums(self, model, inputs, targets, chunk_size, output_fn) -> dict[str, Tensor]:
        if any_sharded(model.parameters()):
            raise NotImplementedError(
                "the reference engine's per-sample gradients (torch.func) cannot run on sharded "
                "(DTensor / FSDP2) parameters; use mnemo_fast.distributed.DistributedEngine, which "
                "takes them through the layer rules"
            )
        return ref_fisher.sum_squared_grads(
            model, inputs, targets, chunk_size=chunk_size, output_fn=output_fn
        )

    # The perturbation is the paper's formula on lists of tensors (reference/perturb.py), which
    # the op table also takes as the fused ops' pure-PyTorch twins: one copy of the formula.
    @staticmethod
    def max_ratio(forget, remain) -> Tensor:
        return perturb.max_ratios(forget, remain)

    @staticmethod
    @torch.no_grad()
    def shift_(params, forget, remain, max_ratio, lambda1, lambda2, sign) -> None:
        perturb.shift_(params, forget, remain, max_ratio, lambda1, lambda2, sign)

    @staticmethod
    @torch.no_grad()
    def gaussian_(params, forget, remain, max_ratio, lambda1, lambda2, tau, generator) -> None:
        perturb.gaussian_(params, forget, remain, max_ratio, lambda1, lambda2, tau, generator)

    @staticmethod
    @torch.no_grad()
    def dampen_(params, forget, remain, threshold, lam) -> None:
        perturb.dampen_(params, forget, remain, threshold, lam)


REFERENCE = ReferenceEngine()
