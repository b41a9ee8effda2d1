"""The package's one training loop, and training with mnemonic codes mixed into the data.

:func:`fit` is the loop (loss, backward, optimizer step, schedule step); every trainer of the
package calls it: :func:`train_with_codes` here, :func:`mnemo_fast.adapt_with_codes`, and the
baselines' plain training and NegGrad+ (:mod:`mnemo_fast.evaluation.baselines`). Each caller
brings its batches (an iterable, so epochs, checkpoints and resumption stay the caller's) and
its loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..codes import MnemonicCodes, MnemonicMix
from ..modeling import logits_of

OPTIMIZERS = ("adam", "sgd")


@dataclass
class TrainHistory:
    """Mean training loss and accuracy per epoch (on the mixed data)."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)


def make_optimizer(name: str, params, *, lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """Adam (``"adam"``) or SGD with momentum (``"sgd"``) over ``params``."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def to_model(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) on the model's device; floating inputs in the model's dtype (token ids stay ints)."""
    p = next(model.parameters())
    x = x.to(p.device, p.dtype) if x.is_floating_point() else x.to(p.device)
    return x, torch.as_tensor(y).to(p.device)


def fit(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable,
    loss_fn: Callable[[torch.nn.Module, object], torch.Tensor],
    *,
    schedule=None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.nn.Module:
    """The one training loop: for each ``batch``, ``loss = loss_fn(model, batch)`` (a scalar),
    backward, ``optimizer.step()``, ``schedule.step()`` (if any), then ``on_step(i, loss)``
    (i counts from 0 within this call). Train mode during the loop, eval mode after; returns
    ``model``. ``batches`` may be a generator: code after its last ``yield`` of an epoch runs
    once that epoch's last step is done (per-epoch bookkeeping).
    """
    model.train()
    for i, batch in enumerate(batches):
        loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        if on_step is not None:
            on_step(i, loss)
    model.eval()
    return model


def cross_entropy(model: torch.nn.Module, batch, output_fn: Callable = logits_of) -> torch.Tensor:
    """Mean cross-entropy of one (x [B, ...], y [B]) batch; ``output_fn`` picks the [B, C]
    logits from what the model returns (default: the tensor itself, ``.logits`` or
    ``["logits"]``, as ``forget`` reads them)."""
    x, y = to_model(model, *batch)
    return F.cross_entropy(output_fn(model(x)), y)


def train_with_codes(
    model: torch.nn.Module,
    dataset,
    codes: MnemonicCodes,
    t_mix: float,
    epochs: int,
    *,
    batch_size: int = 64,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = True,
    code_shift: int = 0,
    output_fn: Callable = logits_of,
) -> TrainHistory:
    """Train ``model`` in place on ``dataset`` with each sample replaced by its class's code
    with probability ``t_mix`` (:class:`MnemonicMix`), cross-entropy, a cosine learning-rate
    schedule over all steps, and a seeded shuffle (docs/METHOD.md, "Training with codes").
    ``code_shift`` > 0 rolls each replacing code by up to that many elements per spatial dim
    (``MnemonicMix(shift=...)``; 0, the paper's training, by default). ``output_fn`` picks the
    logits from the model's output, as in ``forget`` (a Hugging Face model's ``.logits`` by
    default, no wrapper needed). Returns the per-epoch history.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    mixed = MnemonicMix(dataset, codes, t_mix, seed=seed, shift=code_shift)
    loader = torch.utils.data.DataLoader(
        mixed, batch_size=batch_size, shuffle=True, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(optimizer, params, lr=lr, weight_decay=weight_decay, momentum=momentum)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    history = TrainHistory()
    totals = [0.0, 0, 0]  # loss sum, correct, seen in the current epoch

    def loss_fn(net, batch):
        x, y = to_model(net, *batch)
        logits = output_fn(net(x))
        loss = F.cross_entropy(logits, y)
        totals[0] += loss.item() * len(y)
        totals[1] += (logits.argmax(-1) == y).sum().item()
        totals[2] += len(y)
        return loss

    def epochs_of_batches():
        bar = tqdm(range(epochs), desc="train", disable=not progress, leave=False)
        for epoch in bar:
            mixed.set_epoch(epoch)
            totals[:] = [0.0, 0, 0]
            yield from loader
            history.loss.append(totals[0] / totals[2])
            history.accuracy.append(totals[1] / totals[2])
            bar.set_postfix(loss=f"{history.loss[-1]:.3f}", acc=f"{history.accuracy[-1]:.3f}")

    fit(model, opt, epochs_of_batches(), loss_fn, schedule=schedule)
    return history


def train(
    model: torch.nn.Module,
    dataset,
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
    output_fn: Callable = logits_of,
) -> torch.nn.Module:
    """Plain cross-entropy training in place (seeded shuffle, optional cosine schedule over
    all steps; ``output_fn`` as in :func:`cross_entropy`); returns ``model`` in eval mode."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(optimizer, params, lr=lr, weight_decay=weight_decay, momentum=momentum)
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(loader)))
                if cosine else None)

    def epochs_of_batches():
        for _ in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
            yield from loader

    return fit(model, opt, epochs_of_batches(), lambda net, batch: cross_entropy(net, batch, output_fn),
               schedule=schedule)
