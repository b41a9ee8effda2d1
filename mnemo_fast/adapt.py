"""Teach a pre-trained model its mnemonic codes: a short, resumable fine-tuning.

The paper adapts pre-trained models (e.g. ImageNet ResNet-18: 2,000 steps, SGD, lr 1e-3,
weight decay 5e-4, batch 64) by fine-tuning with each sample replaced by its class's code
with probability ``t_mix`` (docs/METHOD.md, "Training with codes"). Long jobs get interrupted, so the
loop is step-based and checkpoints everything that decides the next step: weights,
optimizer state, step and RNG state. The batch of step s is a pure function of
(seed, s), so a resumed run gives the same final weights as an uninterrupted one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .codes import MnemonicCodes, MnemonicMix
from .train import cross_entropy, fit, make_optimizer

OPTIMIZERS = ("sgd", "adam")
CHECKPOINT_NAME = "adapt.pt"


def _batch_indices(step: int, num_samples: int, batch_size: int, seed: int) -> tuple[int, torch.Tensor]:
    """(epoch, indices) of step ``step``: a fresh seeded permutation per epoch, cut in batches."""
    per_epoch = -(-num_samples // batch_size)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return epoch, order[position * batch_size : (position + 1) * batch_size]


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(path: Path, step: int, model, opt, config: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
         "rng": _rng_state(), "config": config},
        tmp,
    )
    os.replace(tmp, path)  # a crash while writing never leaves a half checkpoint


def _load(path: Path, model, opt, config: dict) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["config"] != config:
        raise ValueError(
            f"{path} was written by a run with different settings: {state['config']} != {config}; "
            f"use another checkpoint_dir or resume=False"
        )
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    return int(state["step"])


def adapt_with_codes(
    model: torch.nn.Module,
    dataset,
    codes: MnemonicCodes,
    steps: int,
    *,
    t_mix: float = 0.1,
    lr: float = 1e-3,
    weight_decay: float = 5e-4,
    batch_size: int = 64,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    resume: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> torch.nn.Module:
    """Fine-tune ``model`` in place for ``steps`` steps on ``dataset`` mixed with ``codes``.

    dataset: map-style, items (x [*codes.shape], y int). Each step draws ``batch_size``
    samples (seeded permutation per epoch), replaces each by its class's code with
    probability ``t_mix`` (:class:`MnemonicMix`), and takes one cross-entropy step with SGD
    (momentum 0.9, the paper's ImageNet setting) or Adam (``optimizer="adam"``), constant lr.

    With ``checkpoint_dir``, ``<dir>/adapt.pt`` holds weights, optimizer state, step and RNG
    state, written every ``checkpoint_every`` steps and at the end; with ``resume`` a run
    finding it continues from its step (settings must match) and ends with the same weights
    as an uninterrupted run. Returns ``model`` (in eval mode).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if steps < 0 or batch_size < 1 or checkpoint_every < 1:
        raise ValueError(
            f"need steps >= 0, batch_size >= 1, checkpoint_every >= 1; got {steps}, {batch_size}, {checkpoint_every}"
        )
    mixed = MnemonicMix(dataset, codes, t_mix, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(optimizer, params, lr=lr, weight_decay=weight_decay, momentum=momentum)
    config = {"t_mix": float(t_mix), "lr": float(lr), "weight_decay": float(weight_decay),
              "batch_size": int(batch_size), "optimizer": optimizer, "momentum": float(momentum),
              "seed": int(seed), "num_samples": len(dataset)}
    path = None
    start = 0
    if checkpoint_dir is not None:
        path = Path(checkpoint_dir) / CHECKPOINT_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume and path.exists():
            start = _load(path, model, opt, config)
    if start == 0:
        torch.manual_seed(seed)  # dropout etc.: the same from step 0 as after a resume

    bar = tqdm(total=steps, initial=min(start, steps), desc="adapt", disable=not progress, leave=False)

    def batches():
        for step in range(start, steps):
            epoch, indices = _batch_indices(step, len(mixed), batch_size, seed)
            mixed.set_epoch(epoch)
            items = [mixed[int(i)] for i in indices]
            yield (torch.stack([torch.as_tensor(item[0]) for item in items]),
                   torch.as_tensor([int(item[1]) for item in items]))

    def after_step(i: int, loss: torch.Tensor) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = start + i + 1
        if path is not None and (done % checkpoint_every == 0 or done == steps):
            _save(path, done, model, opt, config)

    fit(model, opt, batches(), cross_entropy, on_step=after_step)
    bar.close()
    return model
