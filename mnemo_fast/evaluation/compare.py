"""How far one set of Fisher sums is from another (tests and benchmarks of the fast path)."""

from __future__ import annotations

from typing import Mapping

import torch


def max_relative_error(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> float:
    """Largest per-tensor ``max |got - want| / max |want|`` over ``want``'s names, with
    ``max |want|`` floored at 1e-6 of the largest entry of all of ``want``. A tensor whose
    true Fisher is zero (attention key biases: the softmax ignores them) holds rounding noise
    in both, and then compares as zero instead of as an infinite relative error."""
    scale = max(float(v.abs().max()) for v in want.values())
    return max(float((got[k] - want[k]).abs().max()) / max(float(want[k].abs().max()), 1e-6 * scale) for k in want)
