"""The pure-PyTorch ground truth: the same API as :mod:`mnemo_fast`, on the reference engine.

``import mnemo_fast.reference as mf`` and ``import mnemo_fast as mf`` are interchangeable;
nothing this namespace exposes loads the compiled extension (the method's functions, including
``code_accuracy``, are bound to the reference engine). The names load on first use: the
package's modules (``engine``, ``fisher``, ``perturb``) stand on a floor below the method (the
fast engine and the engine choice import them), and importing one of them must not pull in
this namespace, which stands above the method (docs/LAYOUT.md, "Import rules").
"""

from __future__ import annotations

import importlib

import torch

from ..devices import NO_GPU, missing_gpu
from ..public import NAMES as _NAMES

__all__ = list(_NAMES)  # mnemo_fast/public.py: the one list of both namespaces

_PLAIN = {
    "MnemonicCodes": "..codes", "MnemonicMix": "..codes", "Evaluation": "..evaluation",
    "evaluate": "..evaluation", "CodeAccuracy": "..session", "ForgetResult": "..method",
    "perturb_": "..method", "adapt_with_codes": "..training.adapt", "train_with_codes": "..training.train",
    "TrainHistory": "..training.train", "UnlearningError": "..validation", "ForgetWarning": "..validation",
    "Explanation": "..explain",
    "Diagnosis": "..diagnose", "ClassDiagnosis": "..diagnose", "Verdict": "..verdict",
}


def backend(device: str = "cpu") -> str:
    """Which path runs here: "reference", or "no-gpu" for a CUDA device this machine does not
    have (as :func:`mnemo_fast.backend` answers)."""
    return NO_GPU if missing_gpu(torch.device(device)) else "reference"


def __getattr__(name: str):
    if name in _PLAIN:
        value = getattr(importlib.import_module(_PLAIN[name], __name__), name)
    elif name in __all__:
        from ..api import bind
        from .engine import REFERENCE

        bound = bind(REFERENCE)
        globals().update(bound)
        value = bound[name]
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
