"""Shared helpers of the baselines: class splits, parameter resets, and the plain training
(:func:`mnemo_fast.training.train.train`, re-exported: the package has one training loop)."""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from ...training.train import train  # noqa: F401 (re-exported for the baselines)


def as_classes(forget_classes: Iterable[int] | int) -> list[int]:
    if isinstance(forget_classes, int):
        return [forget_classes]
    return sorted({int(c) for c in forget_classes})


def labels_of(dataset: Dataset) -> torch.Tensor:
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1]
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(dataset.indices)]
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))])


def split(dataset: Dataset, forget_classes: Iterable[int] | int) -> tuple[Subset, Subset]:
    """(forget part, retain part) of ``dataset`` by label."""
    classes = torch.tensor(as_classes(forget_classes))
    is_forget = torch.isin(labels_of(dataset), classes)
    return (Subset(dataset, torch.nonzero(is_forget).squeeze(1).tolist()),
            Subset(dataset, torch.nonzero(~is_forget).squeeze(1).tolist()))


def tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All of a (small) dataset as (inputs, labels) tensors."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0], dataset.tensors[1]
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset):
        idx = torch.as_tensor(dataset.indices, dtype=torch.long)
        return dataset.dataset.tensors[0][idx], dataset.dataset.tensors[1][idx]
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys)


def device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def reinitialize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with every module's ``reset_parameters`` called under ``seed``."""
    fresh = copy.deepcopy(model)
    torch.manual_seed(seed)
    for module in fresh.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        if hasattr(module, "reset_running_stats"):
            module.reset_running_stats()
    return fresh
