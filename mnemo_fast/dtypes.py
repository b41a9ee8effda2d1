"""The one accumulation-dtype rule of the package, importable without the compiled extension.

Sums of squares (the Fisher), the ratio eta and the shift are computed in float32 whatever
the parameter's dtype (float16/bfloat16 squares of small gradients underflow), except that
float64 stays float64: the reference in float64 is the ground truth the fast path is tested
against. The C++/CUDA kernels follow the same rule (``csrc/``). docs/METHOD.md, "Precision".
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype is accumulated and computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
