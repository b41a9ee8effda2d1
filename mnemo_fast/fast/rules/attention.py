"""nn.MultiheadAttention by local recomputation.

The module projects q/k/v and runs attention inside one functional call, so hooks cannot see
the projections' inputs and output gradients. The rule recomputes the block from its saved
inputs, with the projection outputs as leaves, and backpropagates the caught output gradient
through it: that costs one attention forward/backward, and gives per-sample gradients of the
q/k/v projections ([N, L, 3E]) and the output projection's input, which then go through the
Linear kernel like any other layer. Supported: shared q/k/v embedding size (``in_proj_weight``),
no ``bias_k``/``bias_v``, no ``add_zero_attn``; anything else takes the generic path.
docs/FAST_PATH.md, "Attention: recompute from the saved inputs".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...sharding import is_sharded
from .base import Rule, Tensor, acc

_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


def _call_arguments(args: tuple, kwargs: dict) -> dict:
    bound = dict(zip(_ARGS, args))
    bound.update(kwargs)
    return bound


def _additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """MultiheadAttention masks (bool True = masked out, or additive) -> an additive mask."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def _whole(p: Tensor) -> Tensor:
    """The detached full weight. The projections are recomputed after the backward, when FSDP2
    has put a sharded weight's shards back: gather it (a collective; every rank recomputes the
    same layers in the same order, the forwards being in lockstep)."""
    return p.full_tensor().detach() if is_sharded(p) else p.detach()


class MultiheadAttentionRule(Rule):
    max_calls = 1  # each call recomputes its own attention

    def supports(self, module: nn.Module) -> bool:
        return (
            isinstance(module, nn.MultiheadAttention)
            and module._qkv_same_embed_dim
            and module.bias_k is None
            and not module.add_zero_attn
        )

    def batch_dim(self, module: nn.MultiheadAttention) -> int:
        return 0 if module.batch_first else 1

    def inputs(self, args: tuple, kwargs: dict):
        return _call_arguments(args, kwargs)

    def parameters(self, module: nn.MultiheadAttention) -> dict[str, nn.Parameter]:
        found = dict(module.named_parameters(recurse=False))
        found.update({f"out_proj.{k}": p for k, p in module.out_proj.named_parameters(recurse=False)})
        return found

    def linear_sums(self, module: nn.MultiheadAttention, inputs: dict) -> list[tuple]:
        """q, k, v projections (their own positions: L, S, S) and the output projection (L)."""
        e = module.embed_dim
        q = inputs["query"]
        k = inputs.get("key", q)
        v = inputs.get("value", k)
        length = lambda t: t.numel() // e  # noqa: E731 - a batch-1 call: positions of its sample
        return [*(("in_proj_weight", length(t), e, e, q.dtype) for t in (q, k, v)),
                ("out_proj.weight", length(q), e, e, q.dtype)]

    def _recompute(self, module: nn.MultiheadAttention, call: dict, grad_out: Tensor):
        """(q/k/v inputs [N, L|S, E] x3, their projections' grads, out_proj input [N, L, E], grad [N, L, E])."""
        first = (lambda t: t) if module.batch_first else (lambda t: t.transpose(0, 1))
        q_in, k_in, v_in = (first(call[k]) for k in ("query", "key", "value"))
        g_out = first(grad_out)
        n, length, embed = q_in.shape
        heads, dim = module.num_heads, module.head_dim
        weight = _whole(module.in_proj_weight)
        bias = _whole(module.in_proj_bias) if module.in_proj_bias is not None else None
        chunks = [None, None, None] if bias is None else bias.chunk(3)
        projected = [
            F.linear(x, w, b).detach().requires_grad_()
            for x, w, b in zip((q_in, k_in, v_in), weight.chunk(3), chunks)
        ]
        with torch.enable_grad():
            q, k, v = (p.view(n, -1, heads, dim).transpose(1, 2) for p in projected)
            mask = _additive_mask(call.get("attn_mask"), q.dtype)
            padding = _additive_mask(call.get("key_padding_mask"), q.dtype)
            if mask is not None and mask.dim() == 3:  # [N * heads, L, S]
                mask = mask.view(n, heads, *mask.shape[1:])
            if padding is not None:
                padding = padding.view(n, 1, 1, -1)
                mask = padding if mask is None else mask + padding
            causal = bool(call.get("is_causal")) and mask is None
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            merged = attended.transpose(1, 2).reshape(n, length, embed)
            out = F.linear(merged, _whole(module.out_proj.weight))
            grads = torch.autograd.grad(out, projected, grad_outputs=g_out)
        return (q_in, k_in, v_in), grads, merged.detach(), g_out

    def accumulate(self, module, calls, kernels) -> dict[str, Tensor]:
        (call, grad_out), = calls
        inputs, grads, merged, g_out = self._recompute(module, call, grad_out)
        result = {}
        if module.in_proj_weight.requires_grad:
            blocks = [kernels.linear_fisher(g.contiguous(), x.contiguous()) for x, g in zip(inputs, grads)]
            result["in_proj_weight"] = torch.cat(blocks, 0)
        if module.in_proj_bias is not None and module.in_proj_bias.requires_grad:
            result["in_proj_bias"] = torch.cat([acc(g.sum(1)) for g in grads], 1).square().sum(0)
        if module.out_proj.weight.requires_grad:
            result["out_proj.weight"] = kernels.linear_fisher(g_out.contiguous(), merged.contiguous())
        if module.out_proj.bias is not None and module.out_proj.bias.requires_grad:
            result["out_proj.bias"] = acc(g_out.sum(1)).square().sum(0)
        return result
