"""Selective Synaptic Dampening (Foster, Schoepf, Brintrup, AAAI 2024) and its loss-free
variant LFSSD (Foster, Schoepf, Brintrup, 2024, "Loss-Free Machine Unlearning")."""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from ...method import fisher_diagonal
from ...modeling import eval_mode, tensors_kept, trainable_parameters
from ._common import device_dtype, split, tensors

ESTIMATORS = ("per_sample", "original_batch")


def _xy(model, data):
    x, y = tensors(data)
    device, dtype = device_dtype(model)
    return x.to(device, dtype), y.to(device)


def _batch_importance(model, x, y, batch_size, loss_fn, square: bool):
    """The original estimator: per batch, |grad|^2 (SSD) or |grad| (LFSSD) of the batch-mean
    loss, averaged over batches (depends on batch composition and order)."""
    params = trainable_parameters(model)
    imp = {n: torch.zeros_like(p) for n, p in params.items()}
    batches = 0
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            loss = loss_fn(model(x[i:i + batch_size]), y[i:i + batch_size])
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for n, g in zip(params, grads):
                if g is not None:
                    imp[n] += g.square() if square else g.abs()
            batches += 1
    return {n: v / batches for n, v in imp.items()}


def ssd_importance(model, data, *, estimator: str = "per_sample", batch_size: int = 64,
                   chunk_size: int | None = 1024) -> dict[str, torch.Tensor]:
    """SSD importance of ``data``: the diagonal Fisher (mean of squared per-sample CE gradients)
    on this package's exact per-sample engine ("per_sample"), or the original code's square of
    batch-mean gradients averaged over batches of ``batch_size`` ("original_batch")."""
    x, y = _xy(model, data)
    if estimator == "per_sample":
        return fisher_diagonal(model, x, y, reduction="mean", chunk_size=chunk_size)
    if estimator == "original_batch":
        return _batch_importance(model, x, y, batch_size, F.cross_entropy, square=True)
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


def lfssd_importance(model, data, *, estimator: str = "per_sample", batch_size: int = 64,
                     chunk_size: int = 64) -> dict[str, torch.Tensor]:
    """LFSSD importance: |d ||f(x)||_2^2 / dw| (no labels). "per_sample": mean over samples of
    the absolute per-sample gradient (torch.func, exact, order-free); "original_batch": the
    original code's absolute gradient of the batch-mean squared norm, averaged over batches."""
    x, y = _xy(model, data)
    if estimator == "original_batch":
        return _batch_importance(
            model, x, y, batch_size, lambda out, _: out.pow(2).sum(1).mean(), square=False)
    if estimator != "per_sample":
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    params = {n: p.detach() for n, p in trainable_parameters(model).items()}
    frozen = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def sq_norm(weights, xi):
        out = functional_call(model, ({**frozen, **weights}, buffers), (xi[None],))
        return out.pow(2).sum()

    per_sample = vmap(grad(sq_norm), in_dims=(None, 0))
    imp = {n: torch.zeros_like(p) for n, p in params.items()}
    with eval_mode(model), tensors_kept(model):
        for i in range(0, len(x), chunk_size):
            for n, g in per_sample(params, x[i:i + chunk_size]).items():
                imp[n] += g.abs().sum(0)
    return {n: v / len(x) for n, v in imp.items()}


def _alpha(alpha, estimator, share, forget, full) -> float:
    if alpha is not None:
        return float(alpha)
    return 10.0 if estimator == "original_batch" else share * len(full) / max(1, len(forget))


@torch.no_grad()
def dampen_(model, forget_imp, full_imp, *, alpha: float, lam: float, exponent: float = 1.0,
            lower_bound: float = 1.0) -> torch.nn.Module:
    """SSD's update in place: where forget_imp > alpha * full_imp, w *= min(lam * full / forget, 1)."""
    for name, p in trainable_parameters(model).items():
        fi, oi = forget_imp[name], full_imp[name]
        where = fi > oi * alpha
        weight = ((oi * lam) / fi).pow(exponent)
        update = weight[where]
        update[update > lower_bound] = 1.0
        p[where] = p[where] * update
    return model


def ssd(
    model: torch.nn.Module,
    train_data,
    forget_classes: Iterable[int] | int,
    *,
    alpha: float | None = None,
    lam: float = 1.0,
    estimator: str = "per_sample",
    batch_size: int = 64,
    share: float = 0.5,
) -> torch.nn.Module:
    """SSD: a copy of ``model`` with forget-specialised parameters dampened.

    Data needed: the forget training data and the full training data (both from
    ``train_data``). Importances are diagonal Fishers (see :func:`ssd_importance`; the
    original code's batch estimator is ``estimator="original_batch"``). Defaults are the
    paper's for ResNet-18: selection weighting alpha = 10, dampening constant lambda = 1.
    """
    forget, _ = split(train_data, forget_classes)
    out = copy.deepcopy(model)
    with torch.enable_grad():
        full_imp = ssd_importance(out, train_data, estimator=estimator, batch_size=batch_size)
        forget_imp = ssd_importance(out, forget, estimator=estimator, batch_size=batch_size)
    return dampen_(out, forget_imp, full_imp, alpha=_alpha(alpha, estimator, share, forget, train_data),
                   lam=lam).eval()


def lfssd(
    model: torch.nn.Module,
    train_data,
    forget_classes: Iterable[int] | int,
    *,
    alpha: float | None = None,
    lam: float = 1.0,
    estimator: str = "per_sample",
    batch_size: int = 64,
    share: float = 0.5,
) -> torch.nn.Module:
    """LFSSD: SSD with label-free importances |grad ||f(x)||^2| (see :func:`lfssd_importance`).

    Data needed: forget and full training inputs (labels only to select the forget classes).
    Defaults: alpha = 10, lambda = 1 (the LFSSD paper keeps SSD's ResNet-18 settings) for the
    original estimator; ``alpha=None`` with "per_sample" means ``share * N / N_F`` (see :func:`ssd`).
    """
    forget, _ = split(train_data, forget_classes)
    out = copy.deepcopy(model)
    with torch.enable_grad():
        full_imp = lfssd_importance(out, train_data, estimator=estimator, batch_size=batch_size)
        forget_imp = lfssd_importance(out, forget, estimator=estimator, batch_size=batch_size)
    return dampen_(out, forget_imp, full_imp, alpha=_alpha(alpha, estimator, share, forget, train_data),
                   lam=lam).eval()
