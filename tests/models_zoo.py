"""Small models covering the layer types the Fisher engines must handle (built in code)."""

from __future__ import annotations

import torch
from torch import nn

from mnemo_fast import models


class EmbeddingBag(nn.Module):
    """Token ids [N, T] -> Embedding -> mean over T -> Linear. Repeated ids within a sample."""

    def __init__(self, vocab: int = 12, dim: int = 6, num_classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


class NormNet(nn.Module):
    """Linear on [N, T, d] -> LayerNorm -> GELU -> GroupNorm over channels -> pooled head."""

    def __init__(self, dim: int = 8, num_classes: int = 3):
        super().__init__()
        self.proj = nn.Linear(5, dim)
        self.norm = nn.LayerNorm(dim)
        self.group = nn.GroupNorm(2, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):  # x [N, T, 5]
        h = nn.functional.gelu(self.norm(self.proj(x)))
        h = self.group(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h.mean(1))


def mlp(num_classes: int = 4):
    return models.MLP((1, 4, 4), num_classes, hidden=7), (1, 4, 4)


def cnn(num_classes: int = 4):
    return models.SmallCNN((1, 8, 8), num_classes, width=3), (1, 8, 8)


def embedding_bag(num_classes: int = 4):
    return EmbeddingBag(num_classes=num_classes), "ids"


def norm_net(num_classes: int = 3):
    return NormNet(num_classes=num_classes), (6, 5)


def make_inputs(shape, n: int, generator: torch.Generator, vocab: int = 12):
    if shape == "ids":
        return torch.randint(0, vocab, (n, 5), generator=generator)
    return torch.randn((n, *shape), generator=generator)
