"""Shared helpers of the baselines: class splits, a plain training loop, parameter resets."""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset
from tqdm.auto import tqdm


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


def train(
    model: torch.nn.Module,
    dataset: Dataset,
    epochs: int,
    *,
    lr: float = 1e-3,
    optimizer: str = "adam",
    batch_size: int = 64,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    cosine: bool = True,
    seed: int = 0,
    progress: bool = False,
    desc: str = "train",
) -> torch.nn.Module:
    """Plain cross-entropy training in place (seeded shuffle); returns ``model`` in eval mode."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(loader))) if cosine else None
    device, dtype = device_dtype(model)
    model.train()
    for _ in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
        for x, y in loader:
            x, y = x.to(device, dtype), y.to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    model.eval()
    return model
