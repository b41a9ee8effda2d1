"""The method itself as a baseline-shaped function: from the codes, or from k real samples
per class (the paper's "with data" ablation, for models trained without codes)."""

from __future__ import annotations

from typing import Iterable

import torch

from ...codes import MnemonicCodes
from ...method import ForgetResult, forget
from ._common import labels_of, tensors

AUTO = "auto"


def mnemonic_result(
    model: torch.nn.Module,
    codes: MnemonicCodes,
    forget_classes: Iterable[int] | int,
    *,
    lambda1: float | str = 1e-3,
    lambda2: float = 10.0,
    **calibration_options,
) -> ForgetResult:
    """:func:`mnemo_fast.forget`; ``lambda1="auto"`` calibrates on the same candidate session
    (codes only, one Fisher pair), with ``calibration_options`` (depth, max_forget_prob,
    min_retain_margin, lambda1_range, steps) for the criterion. ``seconds`` includes the
    calibration time."""
    if lambda1 == AUTO:
        return forget(model, codes, forget_classes, lambda1=AUTO, lambda2=float(lambda2),
                      calibration=calibration_options)
    return forget(model, codes, forget_classes, lambda1=float(lambda1), lambda2=float(lambda2))


def mnemonic(model, codes, forget_classes, *, lambda1: float | str = 1e-3, lambda2: float = 10.0):
    """The paper's method. Data needed: the codes only (model trained with them).
    Defaults: the paper's MNIST MLP lambdas (1e-3, 10); ``lambda1="auto"`` calibrates."""
    return mnemonic_result(model, codes, forget_classes, lambda1=lambda1, lambda2=lambda2).model


def sample_codes(train_data, num_classes: int, k: int = 1, seed: int = 0) -> MnemonicCodes:
    """k real training samples per class (seeded) as a ``MnemonicCodes`` [C, k, *shape]."""
    x, _ = tensors(train_data)
    labels = labels_of(train_data)
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).squeeze(1)
        if len(idx) < k:
            raise ValueError(f"class {c} has {len(idx)} samples, fewer than k={k}")
        picks.append(x[idx[torch.randperm(len(idx), generator=g)[:k]]])
    return MnemonicCodes(torch.stack(picks).float())


def mnemonic_with_data_result(model, train_data, forget_classes, *, k: int = 1, seed: int = 0,
                              num_classes: int | None = None, lambda1: float | str = AUTO,
                              lambda2: float = 10.0, **calibration_options) -> ForgetResult:
    """:func:`mnemonic_result` with k real samples per class in place of the codes."""
    if num_classes is None:
        num_classes = int(labels_of(train_data).max()) + 1
    samples = sample_codes(train_data, num_classes, k, seed)
    return mnemonic_result(model, samples, forget_classes, lambda1=lambda1, lambda2=lambda2,
                           **calibration_options)


def mnemonic_with_data(model, train_data, forget_classes, *, k: int = 1, seed: int = 0,
                       lambda1: float | str = AUTO, lambda2: float = 10.0):
    """The paper's "with data" ablation: the method with k real samples per class as codes.
    Data needed: k training samples of every class (forget and remaining); no codes, so it
    works on models trained without codes. ``lambda1="auto"`` calibrates on those samples."""
    return mnemonic_with_data_result(model, train_data, forget_classes, k=k, seed=seed,
                                     lambda1=lambda1, lambda2=lambda2).model
