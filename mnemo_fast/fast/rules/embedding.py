"""nn.Embedding: rows of a sample that share a token id are summed before squaring,
D[v] = sum_n (sum_{t: id[n,t]=v} g_n[t])^2, via unique (sample, id) pairs and index_add.
docs/FAST_PATH.md, "Embedding"."""

from __future__ import annotations

import torch
from torch import nn

from .base import Calls, Rule, Tensor, acc, cat_positions, has_weight


class EmbeddingRule(Rule):
    position_wise = True
    feature_dims = 0

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq

    def accumulate(self, module: nn.Embedding, calls: Calls, kernels) -> dict[str, Tensor]:
        if not has_weight(module):
            return {}
        n = calls[0][0].shape[0]
        ids = cat_positions([inp.reshape(n, -1) for inp, _ in calls])
        g = acc(cat_positions([grad.reshape(n, -1, grad.shape[-1]) for _, grad in calls]))
        return {"weight": embedding_sums(ids, g, module.num_embeddings, module.padding_idx)}


def embedding_sums(ids: Tensor, g: Tensor, vocab: int, padding_idx: int | None = None) -> Tensor:
    """D [vocab, d] from ids [N, T] and g [N, T, d] (the Embedding rule's, and the operation
    level's for ``F.embedding``): the padding row gets no gradient; rows of one sample that
    share an id are summed before squaring, via unique (sample, id) pairs and index_add."""
    n = ids.shape[0]
    if padding_idx is not None:
        g = g.masked_fill((ids == padding_idx).unsqueeze(-1), 0)
    sample = torch.arange(n, device=ids.device).unsqueeze(1).expand_as(ids)
    keys, slot = torch.unique(sample * vocab + ids, return_inverse=True)
    rows = torch.zeros(keys.numel(), g.shape[-1], dtype=g.dtype, device=g.device)
    rows.index_add_(0, slot.reshape(-1), g.reshape(-1, g.shape[-1]))
    out = torch.zeros(vocab, g.shape[-1], dtype=g.dtype, device=g.device)
    out.index_add_(0, keys % vocab, rows.square_())
    return out
