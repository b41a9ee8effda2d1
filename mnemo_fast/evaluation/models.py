"""The paper's MLP and a small CNN, plus checkpoints that record how to rebuild them."""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import torch
from torch import nn
from safetensors.torch import load_file, safe_open, save_file

MODELS = ("mlp", "cnn", "resnet18")


class MLP(nn.Sequential):
    """The paper's MNIST model: flatten -> Linear(hidden=1000) -> sigmoid -> Linear(classes)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: int = 1000):
        super().__init__(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), hidden),
            nn.Sigmoid(),
            nn.Linear(hidden, num_classes),
        )


class SmallCNN(nn.Sequential):
    """Two conv-BatchNorm-ReLU blocks, adaptive pooling to 4x4, two linear layers.

    Works for any image size >= 4 (8x8 digits, 28x28 Fashion-MNIST); input [N, C, H, W].
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 16):
        channels = input_shape[0]
        super().__init__(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )


def build(name: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """A model by name ("mlp", "cnn", "resnet18": CIFAR-style, reduced width) for inputs of ``input_shape`` (e.g. (1, 28, 28))."""
    if name == "mlp":
        return MLP(input_shape, num_classes)
    if name == "cnn":
        return SmallCNN(input_shape, num_classes)
    if name == "resnet18":
        from .resnet import resnet18

        return resnet18(input_shape, num_classes)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, name: str, input_shape: Sequence[int], num_classes: int, **extra: str) -> None:
    """Weights (safetensors) with what :func:`load_checkpoint` needs to rebuild the model."""
    meta = {"model": name, "input_shape": json.dumps(list(input_shape)), "num_classes": str(num_classes)}
    meta.update({k: str(v) for k, v in extra.items()})
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=meta)


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict[str, str]]:
    """(model, metadata) from a file written by :func:`save_checkpoint`."""
    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata() or {})
    if "model" not in meta:
        raise ValueError(f"{path} is not a mnemo_fast checkpoint (no 'model' metadata)")
    model = build(meta["model"], json.loads(meta["input_shape"]), int(meta["num_classes"]))
    model.load_state_dict(load_file(str(path)))
    return model, meta
