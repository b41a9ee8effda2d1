"""The paper's MLP and a small CNN, plus checkpoints that record how to rebuild them."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from safetensors.torch import safe_open, save_file

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


class CheckpointError(ValueError):
    """A model checkpoint that cannot be used: unreadable, incomplete, or contradicting itself.

    The message names the file and what is wrong with it.
    """


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict[str, str]]:
    """(model, metadata) from a file written by :func:`save_checkpoint`.

    A missing file raises ``FileNotFoundError``; every other bad file raises
    :class:`CheckpointError` with the path and what is wrong: a directory; an empty, truncated,
    corrupt or non-safetensors file; missing or invalid metadata (``model`` one of
    :data:`MODELS`, ``input_shape`` a JSON list of positive integers, ``num_classes`` a positive
    integer); weights that contradict the metadata (missing, unexpected, of another shape or not
    floating point where the model's are). The model is first built on the meta device and
    compared with the file's tensor shapes, so metadata naming a huge model allocates nothing.
    """
    where = Path(path)
    if not where.exists():
        raise FileNotFoundError(f"{path}: no such model checkpoint")
    if where.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a model checkpoint")
    try:
        with safe_open(str(where), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            name, input_shape, num_classes = _checkpoint_metadata(path, meta)
            expected = _skeleton_state(path, name, input_shape, num_classes)
            stored = {key: handle.get_slice(key) for key in handle.keys()}
            _check_weights(path, expected, {k: (tuple(v.get_shape()), v.get_dtype()) for k, v in stored.items()})
            state = {key: handle.get_tensor(key) for key in expected}
    except CheckpointError:
        raise
    except Exception as error:  # safetensors' parse errors, OS errors: one error with the path
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(error)})") from error
    model = build(name, input_shape, num_classes)
    model.load_state_dict(state)
    return model, meta


def _checkpoint_metadata(path, meta: dict[str, str]) -> tuple[str, tuple[int, ...], int]:
    """(model name, input shape, number of classes) from a checkpoint's metadata, checked."""
    if "model" not in meta:
        raise CheckpointError(f"{path}: not a mnemo_fast checkpoint (no 'model' metadata)")
    missing = [key for key in ("input_shape", "num_classes") if key not in meta]
    if missing:
        raise CheckpointError(f"{path}: the metadata lacks {', '.join(missing)}")
    name = meta["model"]
    if name not in MODELS:
        raise CheckpointError(f"{path}: metadata model={name!r} is not one of {MODELS}")
    try:
        shape = json.loads(meta["input_shape"])
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: metadata input_shape={meta['input_shape']!r} is not valid JSON") from None
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)):
        raise CheckpointError(
            f"{path}: metadata input_shape={meta['input_shape']!r} must be a non-empty JSON list of positive integers"
        )
    if name in ("cnn", "resnet18") and len(shape) != 3:
        raise CheckpointError(f"{path}: metadata input_shape={shape} must be [channels, height, width] for {name}")
    text = meta["num_classes"].strip()
    if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        raise CheckpointError(f"{path}: metadata num_classes={meta['num_classes']!r} is not a positive integer")
    return name, tuple(shape), int(text)


def _skeleton_state(path, name: str, input_shape: tuple[int, ...], num_classes: int) -> dict[str, torch.Tensor]:
    """The state dict (meta tensors: shapes only) of the model the metadata describes."""
    try:
        with torch.device("meta"):
            return build(name, input_shape, num_classes).state_dict()
    except Exception as error:  # e.g. sizes too large for a tensor
        raise CheckpointError(
            f"{path}: the metadata (model={name}, input_shape={list(input_shape)}, num_classes={num_classes}) "
            f"describes no buildable model ({_first_line(error)})"
        ) from error


def _check_weights(path, expected: dict[str, torch.Tensor], stored: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Raise CheckpointError naming the first weights that contradict the model the metadata describes."""
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    wrong = [f"{k} {stored[k][0]} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in stored and stored[k][0] != tuple(v.shape)]
    kinds = [f"{k} ({stored[k][1]})" for k, v in expected.items()
             if k in stored and v.is_floating_point() and stored[k][1] not in _FLOAT_DTYPES]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
                         ("not floating point", kinds)):
        if items:
            shown = ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(
            f"{path}: the weights do not match the model its metadata describes ({'; '.join(problems)})"
        )


#: safetensors dtype names of floating-point tensors.
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _first_line(error: BaseException) -> str:
    """The first line of an error's message (torch appends C++ stack traces to some)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
