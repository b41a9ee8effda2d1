"""nn.Linear: W [out, in] gets sum_n (g_n^T x_n)^2 over positions T, by the path the dispatch
rule picks (``kernels.linear_fisher``: squares-gemm, chunked-bmm or the fused kernel); the bias
gets sum_n (sum_t g_n[t])^2. Several calls are joined along positions first.
docs/FAST_PATH.md, "Linear, T = 1", "Linear, T > 1" and "Which Linear path: the dispatch rule"."""

from __future__ import annotations

from torch import nn

from .base import Calls, Rule, Tensor, cat_positions, has_bias, has_weight, square_sum


class LinearRule(Rule):
    position_wise = True

    def linear_sums(self, module: nn.Linear, inputs) -> list[tuple]:
        positions = inputs.numel() // max(module.in_features, 1)  # a batch-1 call: T of its sample
        return [("weight", positions, module.in_features, module.out_features, inputs.dtype)]

    def accumulate(self, module: nn.Linear, calls: Calls, kernels) -> dict[str, Tensor]:
        n = calls[0][0].shape[0]
        x = cat_positions([inp.reshape(n, -1, inp.shape[-1]) for inp, _ in calls])
        g = cat_positions([grad.reshape(n, -1, grad.shape[-1]) for _, grad in calls])
        out = {}
        if has_weight(module):
            out["weight"] = kernels.linear_fisher(g.contiguous(), x.contiguous())
        if has_bias(module):
            out["bias"] = square_sum(g[:, 0] if g.shape[1] == 1 else g.sum(1))
        return out
