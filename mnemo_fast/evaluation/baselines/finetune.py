"""Fine-tune on the retained data (catastrophic forgetting of the forget classes)."""

from __future__ import annotations

import copy
from typing import Iterable

import torch

from ._common import split, train


def finetune(
    model: torch.nn.Module,
    train_data,
    forget_classes: Iterable[int] | int,
    *,
    epochs: int = 5,
    lr: float = 0.02,
    optimizer: str = "sgd",
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> torch.nn.Module:
    """A copy of ``model`` fine-tuned on the retained part of ``train_data`` only.

    Data needed: the retained training data (forget classes are dropped from ``train_data``).
    Defaults follow the fine-tuning baseline of the SSD paper's code (Foster et al., 2024):
    5 epochs, SGD with momentum 0.9, lr 0.02 (we add a cosine decay).
    """
    _, retain = split(train_data, forget_classes)
    tuned = copy.deepcopy(model)
    return train(tuned, retain, epochs, lr=lr, optimizer=optimizer, batch_size=batch_size,
                 seed=seed, progress=progress, desc="finetune")
