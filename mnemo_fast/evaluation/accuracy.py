"""Accuracy per class, on the forget classes and on the retained ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from ..modeling import eval_mode, logits_of



@dataclass(frozen=True)
class Evaluation:
    """per_class: class -> accuracy (classes absent from the data are left out)."""

    per_class: dict[int, float]
    forget_accuracy: float
    retain_accuracy: float
    accuracy: float
    num_samples: int

    @property
    def forget_error(self) -> float:
        """E_F of the paper: error on the forgotten classes."""
        return 1.0 - self.forget_accuracy


def _as_loader(data, batch_size: int = 512):
    if isinstance(data, torch.utils.data.DataLoader):
        return data
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def predictions(model: torch.nn.Module, data, output_fn: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels [N], true labels [N]) over a DataLoader or a map-style dataset.

    ``output_fn`` picks the logits from the model's output (default: the method's
    ``logits_of``: a tensor, ``.logits`` or ``["logits"]``).
    """
    output_fn = logits_of if output_fn is None else output_fn
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    preds, labels = [], []
    with eval_mode(model):
        for x, y in _as_loader(data):
            x = x.to(device, dtype) if x.is_floating_point() else x.to(device)
            preds.append(output_fn(model(x)).argmax(-1).cpu())
            labels.append(torch.as_tensor(y).cpu())
    return torch.cat(preds), torch.cat(labels)


def evaluate(
    model: torch.nn.Module,
    loader,
    forget_classes: Iterable[int] | int = (),
    *,
    output_fn: Callable | None = None,
) -> Evaluation:
    """Accuracy per class, on ``forget_classes`` (forget accuracy) and on the rest (retain).

    ``loader``: a DataLoader or a map-style dataset of (x, y). A side with no samples gets NaN.
    """
    if isinstance(forget_classes, int):
        forget_classes = [forget_classes]
    forget = torch.tensor(sorted(set(int(c) for c in forget_classes)), dtype=torch.long)
    pred, true = predictions(model, loader, output_fn)
    correct = (pred == true).float()
    per_class = {int(c): correct[true == c].mean().item() for c in torch.unique(true)}
    is_forget = torch.isin(true, forget)
    nan = float("nan")
    return Evaluation(
        per_class=per_class,
        forget_accuracy=correct[is_forget].mean().item() if is_forget.any() else nan,
        retain_accuracy=correct[~is_forget].mean().item() if (~is_forget).any() else nan,
        accuracy=correct.mean().item(),
        num_samples=int(true.numel()),
    )
