"""LayerNorm, GroupNorm, RMSNorm, BatchNorm (running statistics): per-sample gradients are
only [N, C], gamma = sum over positions of xhat * g and beta = sum of g; several calls add
their per-sample gradients before squaring. docs/FAST_PATH.md, "Norm layers"."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import Calls, Rule, Tensor, acc, has_bias, has_weight

#: normalise(module, x, g) -> (xhat, g), both [N, P, C] with the affine dimensions flattened last
Normalise = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]


class NormRule(Rule):
    def __init__(self, normalise: Normalise, position_wise: bool = False):
        self.normalise = normalise
        self.position_wise = position_wise

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return module.running_mean is not None and module.running_var is not None
        return True

    def batch_candidates(self, module: nn.Module, x: Tensor) -> set[int]:
        if not self.position_wise:
            return super().batch_candidates(module, x)
        return {d for d in range(x.dim() - len(module.normalized_shape)) if x.shape[d] == 1}

    def accumulate(self, module, calls: Calls, kernels) -> dict[str, Tensor]:
        gamma = beta = 0
        for inp, grad in calls:
            xhat, g = self.normalise(module, acc(inp), acc(grad))
            gamma = gamma + (xhat * g).sum(1)
            beta = beta + g.sum(1)
        out = {}
        if has_weight(module):
            out["weight"] = gamma.square().sum(0).view(module.weight.shape)
        if has_bias(module):
            out["bias"] = beta.square().sum(0).view(module.bias.shape)
        return out


def _channels_last(t: Tensor) -> Tensor:
    """[N, C, *spatial] -> [N, P, C]."""
    return t.flatten(2).transpose(1, 2)


def _trailing(module, x: Tensor, xhat: Tensor, g: Tensor):
    """Normalised over the trailing ``normalized_shape``: [N, *, *shape] -> [N, P, C]."""
    size = x[0].shape[-len(module.normalized_shape):].numel()
    n = x.shape[0]
    return xhat.reshape(n, -1, size), g.reshape(n, -1, size)


def layer_norm(module: nn.LayerNorm, x: Tensor, g: Tensor):
    """xhat by the fused op (one pass; mean and variance by hand cost several)."""
    return _trailing(module, x, F.layer_norm(x, module.normalized_shape, None, None, module.eps), g)


def rms_norm(module, x: Tensor, g: Tensor):
    return _trailing(module, x, F.rms_norm(x, module.normalized_shape, None, module.eps), g)


def group_norm(module: nn.GroupNorm, x: Tensor, g: Tensor):
    n, c = x.shape[:2]
    xhat = F.group_norm(x, module.num_groups, None, None, module.eps).reshape(n, c, -1)
    return _channels_last(xhat), _channels_last(g.reshape(n, c, -1))


def batch_norm(module, x: Tensor, g: Tensor):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = module.running_mean.to(x.dtype).view(shape)
    var = module.running_var.to(x.dtype).view(shape)
    xhat = (x - mean) * torch.rsqrt(var + module.eps)
    n, c = x.shape[:2]
    return _channels_last(xhat.reshape(n, c, -1)), _channels_last(g.reshape(n, c, -1))
