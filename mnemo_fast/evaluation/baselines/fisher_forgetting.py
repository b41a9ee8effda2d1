"""Fisher forgetting (Golatkar, Achille, Soatto, CVPR 2020, "Eternal Sunshine of the Spotless
Net"), class-forgetting variant of the authors' code (also used by the SSD paper's code)."""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn.functional as F

from ...method import fisher_diagonal
from ...modeling import eval_mode, trainable_parameters
from ._common import as_classes, device_dtype, split, tensors

ESTIMATORS = ("sampled", "original", "empirical")


def retain_fisher(
    model: torch.nn.Module,
    retain_data,
    *,
    estimator: str = "sampled",
    draws: int = 1,
    seed: int = 0,
    chunk_size: int | None = 1024,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the model's predictive distribution on ``retain_data`` (mean over samples).

    - "original": the authors' estimator, exact: for each sample (batch 1) and each class y,
      p(y|x) * (d CE(x, y) / dw)^2, summed over y (one backward per sample and class: slow);
    - "sampled" (default): the same expectation by Monte Carlo, y ~ p(y|x) (``draws`` per
      sample), on this package's exact per-sample Fisher engine (fused, batched);
    - "empirical": true labels instead of model samples (the empirical Fisher).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    x, y = tensors(retain_data)
    device, dtype = device_dtype(model)
    x, y = x.to(device, dtype), y.to(device)
    if estimator == "empirical":
        return fisher_diagonal(model, x, y, reduction="mean", chunk_size=chunk_size)
    if estimator == "sampled":
        with torch.no_grad(), eval_mode(model):
            probs = torch.cat([F.softmax(model(x[i:i + 1024]).float(), -1) for i in range(0, len(x), 1024)])
        g = torch.Generator(device="cpu").manual_seed(seed)
        total = None
        for _ in range(draws):
            targets = torch.multinomial(probs.cpu(), 1, generator=g).squeeze(1).to(device)
            f = fisher_diagonal(model, x, targets, reduction="mean", chunk_size=chunk_size)
            total = f if total is None else {n: total[n] + f[n] for n in f}
        return {n: v / draws for n, v in total.items()}
    params = trainable_parameters(model)
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    with eval_mode(model):
        for xi in x:
            out = model(xi[None])
            prob = F.softmax(out, -1).detach()
            for c in range(out.shape[1]):
                loss = F.cross_entropy(out, torch.tensor([c], device=device))
                grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
                for (n, _), gr in zip(params.items(), grads):
                    if gr is not None:
                        acc[n] += prob[0, c] * gr.square()
    return {n: v / len(x) for n, v in acc.items()}


@torch.no_grad()
def fisher_forgetting(
    model: torch.nn.Module,
    train_data,
    forget_classes: Iterable[int] | int,
    *,
    alpha: float = 1e-6,
    estimator: str = "sampled",
    draws: int = 1,
    seed: int = 0,
    fisher: dict[str, torch.Tensor] | None = None,
) -> torch.nn.Module:
    """A copy of ``model`` with w <- mu + sqrt(var) * N(0, 1), var from the inverse retain Fisher.

    Data needed: the retained training data (from ``train_data``). Per parameter (the authors'
    ``get_mean_var``): var = alpha / (F + 1e-8), clamped at 1e3 (1e2 for the classifier,
    recognised as a tensor whose first dimension is the number of classes) before the alpha;
    weights (ndim > 1) share the mean variance over their input dimension; the classifier rows
    of the forget classes get mean 0 and variance 1e-4; the classifier and 1-D tensors (biases,
    BatchNorm) get 10x the variance. alpha = 1e-6 as in the SSD paper's code of this baseline.
    ``estimator``: see :func:`retain_fisher` ("original" is the authors' exact, slow loop).
    """
    classes = as_classes(forget_classes)
    _, retain = split(train_data, classes)
    if fisher is None:
        with torch.enable_grad():
            fisher = retain_fisher(model, retain, estimator=estimator, draws=draws, seed=seed)
    out = copy.deepcopy(model)
    device, dtype = device_dtype(out)
    x0 = tensors(retain)[0][:1].to(device, dtype)
    with eval_mode(out):
        num_classes = out(x0).shape[-1]
    g = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in trainable_parameters(out).items():
        var = (1.0 / (fisher[name] + 1e-8)).clamp(max=1e3)
        is_head = p.shape[0] == num_classes
        if is_head:
            var = var.clamp(max=1e2)
        var = alpha * var
        if p.dim() > 1:
            var = var.mean(dim=1, keepdim=True).expand_as(p).clone()
        mu = p.detach().clone()
        if is_head:
            mu[classes] = 0
            var[classes] = 1e-4
            var = var * 10
        elif p.dim() == 1:
            var = var * 10
        noise = torch.randn(p.shape, generator=g).to(device, p.dtype)
        p.copy_(mu + var.sqrt() * noise)
    return out
