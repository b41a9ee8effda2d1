"""A small, honest training loop with mnemonic codes mixed into the data."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .codes import MnemonicCodes, MnemonicMix

OPTIMIZERS = ("adam", "sgd")


@dataclass
class TrainHistory:
    """Mean training loss and accuracy per epoch (on the mixed data)."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)


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
) -> TrainHistory:
    """Train ``model`` in place on ``dataset`` with each sample replaced by its class's code
    with probability ``t_mix`` (:class:`MnemonicMix`), cross-entropy, a cosine learning-rate
    schedule over all steps, and a seeded shuffle. Returns the per-epoch history.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    mixed = MnemonicMix(dataset, codes, t_mix, seed=seed)
    loader = torch.utils.data.DataLoader(
        mixed, batch_size=batch_size, shuffle=True, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    device = next(model.parameters()).device
    history = TrainHistory()
    model.train()
    bar = tqdm(range(epochs), desc="train", disable=not progress, leave=False)
    for epoch in bar:
        mixed.set_epoch(epoch)
        total_loss, correct, seen = 0.0, 0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            total_loss += loss.item() * len(y)
            correct += (logits.argmax(-1) == y).sum().item()
            seen += len(y)
        history.loss.append(total_loss / seen)
        history.accuracy.append(correct / seen)
        bar.set_postfix(loss=f"{history.loss[-1]:.3f}", acc=f"{history.accuracy[-1]:.3f}")
    model.eval()
    return history
