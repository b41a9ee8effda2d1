"""Bounds on the float32 rounding that another order of summation can produce, for tests that
compare a split computation (ranks, chunks) with one process: derived from the sizes, not set
from one run's measurement (a bound set that way fails by chance on another machine)."""

from __future__ import annotations

import torch

U32 = 2.0 ** -24  # float32 unit roundoff


def float32_fisher_bound(terms: int, model: torch.nn.Module) -> float:
    """Relative rounding of a float32 Fisher sum that another order and other batches can give:
    a sum of ``terms`` nonnegative squares moves by at most (terms - 1) u of itself when
    reordered, and each square of a per-sample gradient by 2 gamma_K per layer it passes
    (a dot product of length K rounds within K u; K the largest ``in_features``), first order."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inner = max(m.in_features for m in layers)
    return (terms - 1 + 2 * 2 * inner * len(layers)) * U32


def float32_model_bound(fisher_bound: float, shift: torch.Tensor, weight: torch.Tensor) -> float:
    """Relative to the tensor's largest weight: the shift moves with eta = f_F / f_R and its
    maximum (each relative error at most 2 fisher_bound, so the shift's at most 4 of it, kept
    loose by 2), plus the rounding of the update itself."""
    scale = float(weight.abs().max().clamp_min(1e-30))
    return 8 * fisher_bound * float(shift.abs().max()) / scale + 4 * U32
