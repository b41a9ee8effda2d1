"""NegGrad+ (Kurmanji et al., NeurIPS 2023, "Towards Unbounded Machine Unlearning"):
gradient descent on the retained data and ascent on the forget data, in one loss."""

from __future__ import annotations

import copy
import itertools
from typing import Iterable

import torch
import torch.nn.functional as F

from ...training.train import fit, to_model
from ._common import split


def neggrad_plus(
    model: torch.nn.Module,
    train_data,
    forget_classes: Iterable[int] | int,
    *,
    alpha: float = 0.99,
    epochs: int = 5,
    lr: float = 0.01,
    batch_size: int = 64,
    seed: int = 0,
) -> torch.nn.Module:
    """A copy of ``model`` trained on ``alpha * CE(retain) - (1 - alpha) * CE(forget)``.

    Data needed: forget and retained training data (both from ``train_data``). One epoch is a
    pass over the retained data, each retained batch paired with a forget batch (cycled).
    Defaults in the spirit of the SCRUB code's NegGrad+: SGD momentum 0.9, alpha 0.99
    (weight of the retain loss), a few epochs.
    """
    forget, retain = split(train_data, forget_classes)
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    r_loader = torch.utils.data.DataLoader(retain, batch_size=batch_size, shuffle=True, generator=g)
    f_loader = torch.utils.data.DataLoader(forget, batch_size=batch_size, shuffle=True, generator=g)
    opt = torch.optim.SGD(out.parameters(), lr=lr, momentum=0.9)

    def batches():
        for _ in range(epochs):
            yield from zip(r_loader, itertools.cycle(f_loader))

    def loss_fn(net, batch):
        (xr, yr), (xf, yf) = (to_model(net, *pair) for pair in batch)
        return alpha * F.cross_entropy(net(xr), yr) - (1 - alpha) * F.cross_entropy(net(xf), yf)

    return fit(out, opt, batches(), loss_fn)
