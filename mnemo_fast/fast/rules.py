"""One rule per layer type: sum_n (per-sample gradient)^2 from a layer's input and output gradient.

A rule sees every call of its module in one batched pass: ``calls`` is a list of
(input [N, ...], grad_output [N, ...]) with the per-sample loss summed, so grad_output holds
per-sample gradients. Several calls of one module are summed per sample *before* squaring
(Linear/Conv: concatenated along positions; norms: per-sample gradients added).
``kernels`` is :mod:`mnemo_fast.fast.ops` (compiled) or :mod:`mnemo_fast.fast.aten`.
Returns {local parameter name: sum of squares}; PERFORMANCE.md has the math.
"""

from __future__ import annotations

import functools

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
Calls = list[tuple[Tensor, Tensor]]


def _acc(t: Tensor) -> Tensor:
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _square_sum(per_sample: Tensor) -> Tensor:
    """[N, *shape] per-sample gradients -> sum_n g_n^2 [*shape]."""
    return _acc(per_sample).square().sum(0)


def _bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None and module.bias.requires_grad


def _weight(module: nn.Module) -> bool:
    return getattr(module, "weight", None) is not None and module.weight.requires_grad


class Rule:
    """Defaults every rule shares; a rule overrides what its layer needs."""

    #: Most calls of one module per forward the rule can combine (None: any number).
    max_calls: int | None = None
    #: The layer acts on each position alone (Linear, Embedding, LayerNorm): samples may sit
    #: on any dimension of the input but the feature dimensions (e.g. [T, N, d] inputs).
    position_wise: bool = False
    #: Trailing feature dimensions of the input (never the batch dimension).
    feature_dims: int = 1

    def supports(self, module: nn.Module) -> bool:
        return True

    def batch_dim(self, module: nn.Module) -> int:
        """Dimension of the module's first input that indexes samples."""
        return 0

    def batch_candidates(self, module: nn.Module, x: Tensor) -> set[int]:
        """Dimensions of a batch-1 input ``x`` that may index samples (size 1, not features)."""
        if not self.position_wise:
            dim = self.batch_dim(module)
            return {dim} if x.dim() > dim and x.shape[dim] == 1 else set()
        return {d for d in range(x.dim() - self.feature_dims) if x.shape[d] == 1}

    def inputs(self, args: tuple, kwargs: dict):
        """What :meth:`accumulate` receives of one call's arguments."""
        return args[0]

    def parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """local name -> parameter the rule computes (the module's own, by default)."""
        return dict(module.named_parameters(recurse=False))


def _cat_positions(parts: list[Tensor]) -> Tensor:
    """The calls of one module joined along positions (dim 1); a single call is not copied."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


class LinearRule(Rule):
    """W [out, in]: sum_n (g_n^T x_n)^2 over positions T; bias: sum_n (sum_t g_n[t])^2."""

    position_wise = True

    def accumulate(self, module: nn.Linear, calls: Calls, kernels) -> dict[str, Tensor]:
        n = calls[0][0].shape[0]
        x = _cat_positions([inp.reshape(n, -1, inp.shape[-1]) for inp, _ in calls])
        g = _cat_positions([grad.reshape(n, -1, grad.shape[-1]) for _, grad in calls])
        out = {}
        if _weight(module):
            out["weight"] = kernels.sum_sq_grad_linear(g.contiguous(), x.contiguous())
        if _bias(module):
            out["bias"] = _square_sum(g[:, 0] if g.shape[1] == 1 else g.sum(1))
        return out


class ConvRule(Rule):
    """Conv1d/Conv2d through the conv2d kernel (Conv1d as height 1); zero or other padding
    modes (the input is padded here first); bias: sum_n (sum over positions of g_n)^2."""

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, (nn.Conv1d, nn.Conv2d)) and not isinstance(module.padding, str) \
            and not isinstance(module, nn.modules.conv._ConvTransposeNd)

    def _as_2d(self, module, x: Tensor, g: Tensor):
        two_d = isinstance(module, nn.Conv2d)
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = (0, 0)
        else:
            padding = module.padding if two_d else (0, module.padding[0])
        if two_d:
            return x, g, module.kernel_size, module.stride, padding, module.dilation
        lift = lambda p: (1, p[0])
        return (x.unsqueeze(2), g.unsqueeze(2), lift(module.kernel_size), lift(module.stride),
                padding, lift(module.dilation))

    max_calls = 1  # calls of different spatial sizes cannot share one kernel call

    def accumulate(self, module, calls: Calls, kernels) -> dict[str, Tensor]:
        (inp, grad), = calls
        out = {}
        if _weight(module):
            x, g, k, s, p, d = self._as_2d(module, inp, grad)
            d2 = kernels.sum_sq_grad_conv2d(g.contiguous(), x.contiguous(), k, s, p, d, module.groups)
            out["weight"] = d2.view(module.weight.shape)
        if _bias(module):
            out["bias"] = _square_sum(grad.flatten(2).sum(2))
        return out


class EmbeddingRule(Rule):
    """Rows of a sample that share a token id are summed before squaring:
    D[v] = sum_n (sum_{t: id[n,t]=v} g_n[t])^2, via unique (n, id) pairs and index_add."""

    position_wise = True
    feature_dims = 0

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq

    def accumulate(self, module: nn.Embedding, calls: Calls, kernels) -> dict[str, Tensor]:
        if not _weight(module):
            return {}
        n, vocab = calls[0][0].shape[0], module.num_embeddings
        ids = _cat_positions([inp.reshape(n, -1) for inp, _ in calls])
        g = _acc(_cat_positions([grad.reshape(n, -1, grad.shape[-1]) for _, grad in calls]))
        if module.padding_idx is not None:  # the padding row gets no gradient
            g = g.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)
        sample = torch.arange(n, device=ids.device).unsqueeze(1).expand_as(ids)
        keys, slot = torch.unique(sample * vocab + ids, return_inverse=True)
        rows = torch.zeros(keys.numel(), g.shape[-1], dtype=g.dtype, device=g.device)
        rows.index_add_(0, slot.reshape(-1), g.reshape(-1, g.shape[-1]))
        out = torch.zeros(vocab, g.shape[-1], dtype=g.dtype, device=g.device)
        out.index_add_(0, keys % vocab, rows.square_())
        return {"weight": out}


class NormRule(Rule):
    """LayerNorm, GroupNorm, RMSNorm, BatchNorm (running statistics): per-sample gradients
    are only [N, C]: gamma = sum over positions of xhat * g, beta = sum of g."""

    def __init__(self, normalise: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor, Tensor]], position_wise: bool = False):
        # normalise(module, x, g) -> (xhat, g) with the affine dims last, flattened to [N, P, C]
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
            xhat, g = self.normalise(module, _acc(inp), _acc(grad))
            gamma = gamma + (xhat * g).sum(1)
            beta = beta + g.sum(1)
        out = {}
        if _weight(module):
            out["weight"] = gamma.square().sum(0).view(module.weight.shape)
        if _bias(module):
            out["bias"] = beta.square().sum(0).view(module.bias.shape)
        return out


def _channels_last(t: Tensor) -> Tensor:
    """[N, C, *spatial] -> [N, P, C]."""
    return t.flatten(2).transpose(1, 2)


def _layer_norm(module: nn.LayerNorm, x: Tensor, g: Tensor):
    dims = tuple(range(-len(module.normalized_shape), 0))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, keepdim=True, unbiased=False)
    xhat = (x - mean) * torch.rsqrt(var + module.eps)
    size = xhat[0].shape[-len(dims):].numel()
    n = x.shape[0]
    return xhat.reshape(n, -1, size), g.reshape(n, -1, size)


def _rms_norm(module, x: Tensor, g: Tensor):
    dims = tuple(range(-len(module.normalized_shape), 0))
    eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
    xhat = x * torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)
    size = x[0].shape[-len(dims):].numel()
    n = x.shape[0]
    return xhat.reshape(n, -1, size), g.reshape(n, -1, size)


def _group_norm(module: nn.GroupNorm, x: Tensor, g: Tensor):
    n, c = x.shape[:2]
    grouped = x.reshape(n, module.num_groups, -1)
    mean = grouped.mean(-1, keepdim=True)
    var = grouped.var(-1, keepdim=True, unbiased=False)
    xhat = ((grouped - mean) * torch.rsqrt(var + module.eps)).reshape(n, c, -1)
    return _channels_last(xhat), _channels_last(g.reshape(n, c, -1))


def _batch_norm(module, x: Tensor, g: Tensor):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = module.running_mean.to(x.dtype).view(shape)
    var = module.running_var.to(x.dtype).view(shape)
    xhat = (x - mean) * torch.rsqrt(var + module.eps)
    return _channels_last(xhat.reshape(x.shape[0], x.shape[1], -1)), _channels_last(g.reshape(x.shape[0], x.shape[1], -1))


RULES: dict[type, object] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Embedding: EmbeddingRule(),
    nn.LayerNorm: NormRule(_layer_norm, position_wise=True),
    nn.GroupNorm: NormRule(_group_norm),
    nn.BatchNorm1d: NormRule(_batch_norm),
    nn.BatchNorm2d: NormRule(_batch_norm),
    nn.BatchNorm3d: NormRule(_batch_norm),
}
if hasattr(nn, "RMSNorm"):
    RULES[nn.RMSNorm] = NormRule(_rms_norm, position_wise=True)


def _register_attention() -> None:
    from .attention import MultiheadAttentionRule  # it builds on this module's Rule

    RULES[nn.MultiheadAttention] = MultiheadAttentionRule()


_register_attention()


def rule_for(module: nn.Module):
    """The rule of ``module``'s type, if it supports this configuration; else None. A subclass
    (NonDynamicallyQuantizableLinear, FSDP2's FSDPLinear/FSDPConv2d) takes its base's rule
    only if it keeps the base's ``forward``: one that overrides it may compute anything."""
    rule = _rule_of_type(type(module))
    return rule if rule is not None and rule.supports(module) else None


@functools.lru_cache(maxsize=None)
def _rule_of_type(cls: type):
    """The rule of the nearest base in RULES, unless ``cls`` overrides one of its methods beyond
    _HARMLESS_OVERRIDES (looked up once per class: the planner asks for every module, every call)."""
    mro = cls.__mro__
    for depth, base in enumerate(mro):
        if base in RULES:
            overridden = {
                name for sub in mro[:depth] if sub not in base.__mro__
                for name, value in vars(sub).items() if callable(value) and hasattr(base, name)
            }
            return None if overridden - _HARMLESS_OVERRIDES else RULES[base]
    return None


# Methods a subclass may override and still compute its base's forward: construction, and
# FSDP2's ``_apply`` (device moves of the sharded parameters).
_HARMLESS_OVERRIDES = {"__init__", "__new__", "_apply", "extra_repr", "reset_parameters"}
