"""What every layer rule shares: the :class:`Rule` defaults and small helpers.

A rule sees every call of its module in one batched pass: ``calls`` is a list of
(input [N, ...], grad_output [N, ...]) with the per-sample loss summed, so grad_output holds
per-sample gradients. Several calls of one module are summed per sample *before* squaring.
``kernels`` is one path of the op table (:data:`mnemo_fast.fast.ops.COMPILED` or
:data:`mnemo_fast.fast.ops.TWINS`); a Linear Fisher sum goes through its ``linear_fisher``,
which takes the path :func:`mnemo_fast.fast.dispatch.decide_linear` picks. ``accumulate``
returns {local parameter name: sum of squares}; docs/FAST_PATH.md, "One batched pass, parameters frozen", has the common setup.
"""

from __future__ import annotations

import torch
from torch import nn

from ...dtypes import accumulation_dtype

Tensor = torch.Tensor
Calls = list[tuple[Tensor, Tensor]]


def acc(t: Tensor) -> Tensor:
    """``t`` in its accumulation dtype (see :func:`mnemo_fast.dtypes.accumulation_dtype`)."""
    return t.to(accumulation_dtype(t.dtype))


def square_sum(per_sample: Tensor) -> Tensor:
    """[N, *shape] per-sample gradients -> sum_n g_n^2 [*shape]."""
    return acc(per_sample).square().sum(0)


def cat_positions(parts: list[Tensor]) -> Tensor:
    """The calls of one module joined along positions (dim 1); a single call is not copied."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None and module.bias.requires_grad


def has_weight(module: nn.Module) -> bool:
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

    def accumulate(self, module: nn.Module, calls: Calls, kernels) -> dict[str, Tensor]:
        """{local name: sum_n (per-sample gradient)^2} from all calls of ``module``."""
        raise NotImplementedError

    def linear_sums(self, module: nn.Module, inputs) -> list[tuple]:
        """The Linear Fisher sums (``kernels.linear_fisher``) :meth:`accumulate` computes from
        one call of a batch-1 probe (``inputs``: what :meth:`inputs` gives of that call):
        [(local name, T positions, d_in, d_out, dtype)]. What ``explain`` names the Linear path
        from (:func:`mnemo_fast.fast.dispatch.decide_linear`); none by default."""
        return []
