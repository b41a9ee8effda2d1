"""Checks on what a caller hands to the method, each failing with a message that names the problem.

Every check runs before the model is touched, so a failure leaves the caller's model as it was.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from .codes import MnemonicCodes
from .dtypes import accumulation_dtype
from .reference.fisher import eval_mode
from .distributed.sharding import any_sharded, local


class UnlearningError(ValueError):
    """Bad input to an unlearning call (a ValueError, so ``except ValueError`` catches it)."""


def forget_classes(codes: MnemonicCodes, classes: Iterable[int] | int) -> list[int]:
    """Sorted unique forget classes; raises on empty, unknown, or all classes."""
    if isinstance(classes, int) or (torch.is_tensor(classes) and classes.dim() == 0):
        classes = [int(classes)]
    try:
        chosen = sorted(set(codes.check_classes(classes)))
    except ValueError as error:
        raise UnlearningError(f"forget_classes: {error}") from None
    if not chosen:
        raise UnlearningError("forget_classes is empty: name at least one class to forget")
    if len(chosen) == codes.num_classes:
        raise UnlearningError(
            f"forget_classes names all {codes.num_classes} classes: at least one must remain"
        )
    return chosen


def copyable(model: torch.nn.Module, inplace: bool) -> None:
    """A model with sharded (FSDP2/DTensor) parameters is edited in place only: checked first,
    before a calibration or a check's forward has run on it."""
    if not inplace and any_sharded(model.parameters()):
        raise UnlearningError(
            "a model with sharded (FSDP2/DTensor) parameters cannot be copied here: pass "
            "inplace=True (each rank edits its own shard, all or nothing)"
        )


def trainable_model(model: torch.nn.Module) -> None:
    """The model has trainable parameters and all of them are finite."""
    # a sharded parameter is checked on this rank's shard (forget_distributed agrees across ranks)
    params = [(n, local(p)) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise UnlearningError("the model has no trainable parameters (requires_grad=True) to perturb")
    for name, p in params:
        if not p.is_floating_point():
            raise UnlearningError(f"parameter {name!r} is not floating point ({p.dtype})")
    if all_finite([p for _, p in params]):
        return
    for name, p in params:
        if not torch.isfinite(p).all():
            raise UnlearningError(f"parameter {name!r} contains NaN or inf: refusing to forget")


@torch.no_grad()
def all_finite(tensors: list[torch.Tensor]) -> bool:
    """No NaN or inf in any of ``tensors``. NaN or inf anywhere makes its tensor's sum
    non-finite, so the sums decide with one host sync per device; a sum can also overflow,
    and only then is each tensor checked exactly."""
    return _all_sums_finite(tensors) or all(bool(torch.isfinite(t).all()) for t in tensors)


@torch.no_grad()
def _all_sums_finite(tensors: list[torch.Tensor]) -> bool:
    """One read pass per tensor and one host sync per device (not one per tensor)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t.detach().sum(dtype=accumulation_dtype(t.dtype)).double())
    return all(bool(torch.isfinite(torch.stack(sums)).all()) for sums in by_device.values())


def code_batch_fits(
    model: torch.nn.Module,
    codes: MnemonicCodes,
    inputs: torch.Tensor,
    output_fn: Callable[[object], torch.Tensor],
) -> None:
    """One forward pass on one code: the shapes agree and there is one logit per class."""
    try:
        with torch.no_grad(), eval_mode(model):  # train-mode BatchNorm would update its statistics
            logits = output_fn(model(inputs[:1]))
    except (RuntimeError, ValueError) as error:
        raise UnlearningError(
            f"code shape {codes.shape} does not fit the model's input: the forward pass on a "
            f"code failed with: {error}"
        ) from None
    if logits.dim() != 2 or logits.shape[-1] != codes.num_classes:
        raise UnlearningError(
            f"the model returns logits of shape {tuple(logits.shape)} for one code, but the "
            f"codes cover {codes.num_classes} classes (expected [1, {codes.num_classes}])"
        )
