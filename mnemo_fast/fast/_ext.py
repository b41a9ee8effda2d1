"""The one guarded place that loads the compiled library ``mnemo_fast._C``.

Nothing else imports ``_C``: when it is missing or broken the package still imports and
the pure-PyTorch path (``mnemo_fast.reference``) stays usable. Set
``MNEMO_FAST_DISABLE_EXT=1`` to ignore the extension even when it is built.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

_DISABLE_VAR = "MNEMO_FAST_DISABLE_EXT"
_state: dict[str, object] = {}
_on_load: list = []  # callbacks to run once the extension has loaded


def _load() -> None:
    if "available" in _state:
        return
    if os.environ.get(_DISABLE_VAR, "0") not in ("", "0"):
        _state.update(available=False, error=f"disabled by {_DISABLE_VAR}")
        return
    try:
        importlib.import_module("mnemo_fast._C")
    except Exception as exc:  # ImportError, OSError (undefined symbol), anything the loader raises
        _state.update(available=False, error=f"{type(exc).__name__}: {exc}")
        warnings.warn(
            "mnemo_fast: the compiled kernels (mnemo_fast._C) could not be loaded; using the "
            "pure-PyTorch path. Details: mnemo_fast.fast._ext.load_error(). Build them with "
            "`pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    _state.update(available=True, error=None)
    while _on_load:
        _on_load.pop(0)()


def when_loaded(callback) -> None:
    """Run ``callback()`` once the extension has loaded: now if it has, else right after it
    does. Lets :mod:`mnemo_fast.fast.ops` register its fake kernels without loading ``_C``."""
    if _state.get("available"):
        callback()
    else:
        _on_load.append(callback)


def available() -> bool:
    """True when the compiled operators ``torch.ops.mnemo_fast.*`` are registered."""
    _load()
    return bool(_state["available"])


def load_error() -> str | None:
    """Why the extension is unavailable (None when it loaded)."""
    _load()
    return _state["error"]  # type: ignore[return-value]


def has_cuda_kernels() -> bool:
    """True when the CUDA kernels are registered (the extension was built with CUDA)."""
    return available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "mnemo_fast::sum_sq_grad_linear", "CUDA"
    )
