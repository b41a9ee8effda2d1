"""Retrain from scratch without the forget classes: the gold standard of class unlearning."""

from __future__ import annotations

from typing import Iterable

import torch

from ...codes import MnemonicCodes
from ...training.train import train_with_codes
from ._common import reinitialize, split, train


def retrain(
    model: torch.nn.Module,
    train_data,
    forget_classes: Iterable[int] | int,
    *,
    epochs: int,
    codes: MnemonicCodes | None = None,
    t_mix: float = 0.1,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> torch.nn.Module:
    """A fresh copy of ``model``'s architecture trained on the retained part of ``train_data``.

    Data needed: the full training set (the forget classes are dropped here). With ``codes``
    the recipe is :func:`mnemo_fast.train_with_codes` (codes of the remaining classes mixed in
    with ``t_mix``: the same recipe as the original model, minus the forget classes); without,
    plain cross-entropy with Adam and a cosine schedule. ``model`` itself is not modified.
    """
    _, retain = split(train_data, forget_classes)
    fresh = reinitialize(model, seed)
    if codes is not None:
        train_with_codes(fresh, retain, codes, t_mix, epochs, batch_size=batch_size, lr=lr,
                         seed=seed, progress=progress)
        return fresh.eval()
    return train(fresh, retain, epochs, lr=lr, batch_size=batch_size, seed=seed,
                 progress=progress, desc="retrain")
