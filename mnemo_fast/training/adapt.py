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
import warnings
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..codes import MnemonicCodes, MnemonicMix
from ..modeling import logits_of
from ..stack import user_stacklevel
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


def _save(path: Path, step: int, model, opt, config: dict, run: dict) -> None:
    """Write the checkpoint: weights, optimizer, RNG, settings, and ``run`` (steps planned, codes hash)."""
    tmp = path.with_suffix(".tmp")
    torch.save(
        {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
         "rng": _rng_state(), "config": config, **run},
        tmp,
    )
    os.replace(tmp, path)  # a crash while writing never leaves a half checkpoint


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _load(path: Path, model, opt, config: dict, run: dict) -> int:
    """Restore a checkpoint into ``model`` and ``opt``; return its step.

    Refuses (ValueError, saying which and how to fix it) a checkpoint that cannot be read,
    was written with other settings or other codes, or already did more than ``run["steps"]``
    steps. A checkpoint written before steps and codes were recorded resumes with a warning.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        step = int(state["step"])
    except Exception as error:  # truncated, corrupt or foreign file
        raise ValueError(
            f"{path}: cannot read the checkpoint ({_first_line(error)}); "
            f"delete it, use another checkpoint_dir, or pass resume=False to start over"
        ) from error
    if state.get("config") != config:
        raise ValueError(
            f"{path} was written by a run with different settings: {state.get('config')} != {config}; "
            f"use another checkpoint_dir or resume=False"
        )
    if "codes_sha256" not in state:
        warnings.warn(f"{path} records neither its steps nor its codes (an older checkpoint): "
                      f"resuming from step {step} without checking them", stacklevel=user_stacklevel())
    elif state["codes_sha256"] != run["codes_sha256"]:
        raise ValueError(
            f"{path} was written with other codes (sha256 {state['codes_sha256'][:12]}..., these are "
            f"{run['codes_sha256'][:12]}...): pass the codes it was trained with (MnemonicCodes.load of "
            f"the saved file), or use another checkpoint_dir or resume=False to start over with these"
        )
    if step > run["steps"]:
        raise ValueError(
            f"{path} already did {step} steps (of {state.get('steps', '?')} planned), more than "
            f"steps={run['steps']}: pass steps >= {step} to continue it, or use another "
            f"checkpoint_dir or resume=False for a shorter run"
        )
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    return step


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
    output_fn: Callable = logits_of,
) -> torch.nn.Module:
    """Fine-tune ``model`` in place for ``steps`` steps on ``dataset`` mixed with ``codes``.

    dataset: map-style, items (x [*codes.shape], y int). Each step draws ``batch_size``
    samples (seeded permutation per epoch), replaces each by its class's code with
    probability ``t_mix`` (:class:`MnemonicMix`), and takes one cross-entropy step with SGD
    (momentum 0.9, the paper's ImageNet setting) or Adam (``optimizer="adam"``), constant lr.

    With ``checkpoint_dir``, ``<dir>/adapt.pt`` holds weights, optimizer state, step and RNG
    state, the steps planned and the codes' sha256 (:meth:`MnemonicCodes.fingerprint`), written
    every ``checkpoint_every`` steps and at the end; with ``resume`` a run finding it continues
    from its step and ends with the same weights as an uninterrupted run. Resuming is refused
    (ValueError) when the settings differ, the codes differ, or the checkpoint already did
    more than ``steps`` steps (a longer ``steps`` extends a finished run). ``output_fn`` picks
    the logits from the model's output, as in ``forget`` (a Hugging Face model's ``.logits``
    by default). Returns ``model`` (in eval mode).
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
        run = {"steps": int(steps), "codes_sha256": codes.fingerprint()}
        path = Path(checkpoint_dir) / CHECKPOINT_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume and path.exists():
            start = _load(path, model, opt, config, run)
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
            _save(path, done, model, opt, config, run)

    fit(model, opt, batches(), lambda net, batch: cross_entropy(net, batch, output_fn), on_step=after_step)
    bar.close()
    return model
