"""A synthetic token classification task and a small text transformer, for token codes.

No text data set can be downloaded here, so the text experiments use a **synthetic** task,
said so wherever it is reported: each class owns ``markers`` token ids; a sequence of class c
is random filler tokens with ``hits`` of c's markers at random positions. The label is a
pattern of tokens, as in topic or keyword classification, and a model must find the markers
wherever they are (attention or pooling), not read one position.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

#: id 0 is kept for padding, as in most tokenizers; no code or sequence uses it
PAD = 0


def synthetic_tokens(num_classes: int = 6, train: int = 3000, test: int = 1000, *, length: int = 16,
                     vocab_size: int = 128, markers: int = 4, hits: int = 3,
                     seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) ``TensorDataset`` of int64 token ids [n, length] and int64 labels [n].

    Class c's markers are ids ``1 + c * markers ... 1 + (c + 1) * markers - 1``; filler ids are
    drawn from the rest of [1, vocab_size). Balanced classes; one seeded generator.
    """
    first_filler = 1 + num_classes * markers
    if first_filler >= vocab_size:
        raise ValueError(f"vocab_size {vocab_size} leaves no filler tokens after {num_classes} x {markers} markers")
    if not 1 <= hits <= length:
        raise ValueError(f"hits must be in [1, length], got {hits}")
    generator = torch.Generator().manual_seed(seed)

    def draw(n: int) -> TensorDataset:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=generator)]
        x = torch.randint(first_filler, vocab_size, (n, length), generator=generator)
        positions = torch.rand(n, length, generator=generator).argsort(dim=1)[:, :hits]
        marker = 1 + labels[:, None] * markers + torch.randint(0, markers, (n, hits), generator=generator)
        x.scatter_(1, positions, marker)
        return TensorDataset(x, labels)

    return draw(train), draw(test)


class TextTransformer(nn.Module):
    """Token ids [N, T] -> logits [N, classes]: embedding + learned positions, ``layers``
    pre-norm encoder layers (nn.TransformerEncoderLayer, batch first), mean pooling, a
    LayerNorm and a linear head."""

    def __init__(self, vocab_size: int, length: int, num_classes: int, width: int = 32,
                 layers: int = 1, heads: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.zeros(length, width))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed(tokens) + self.position)
        return self.head(self.norm(hidden.mean(dim=1)))
