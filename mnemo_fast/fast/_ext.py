"""The one guarded place that loads the compiled library ``mnemo_fast._C``.

Nothing else imports ``_C``: when it is missing or broken the package still imports and
the pure-PyTorch path (``mnemo_fast.reference``) stays usable. Set
``MNEMO_FAST_DISABLE_EXT=1`` to ignore the extension even when it is built.

On a GPU the CUDA kernels run only when the build has them (:func:`has_cuda_kernels`) and
holds a kernel image for that GPU's architecture (probed once per device at first use); where
either is missing the fast engine hands CUDA tensors to its pure-PyTorch fallback, and
:func:`note_missing_cuda` (called at ``import mnemo_fast``) says so once per process.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from ..stack import user_stacklevel
from .devices import cuda_index

_DISABLE_VAR = "MNEMO_FAST_DISABLE_EXT"
_REBUILD = (
    "rebuild with `FORCE_CUDA=1 pip install --no-build-isolation -e .` (README, Install); "
    "`mnemo_fast.backend(\"cuda\")` says which path runs"
)
_state: dict[str, object] = {}
_on_load: list = []  # callbacks to run once the extension has loaded
_images: dict[int, bool] = {}  # GPU index -> the build has a kernel image for it
_noted: set[str] = set()  # once-per-process messages already given


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
            stacklevel=user_stacklevel(),  # the user's line, however deep in the package the first use is
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


def has_cuda_kernels(device: torch.device | None = None) -> bool:
    """True when the CUDA kernels are registered (the extension was built with CUDA) and,
    given a CUDA ``device``, hold a kernel image for that GPU (:func:`kernel_image`)."""
    registered = _cuda_registered()
    if not registered or device is None or device.type != "cuda":
        return registered
    return kernel_image(cuda_index(device))


def _cuda_registered() -> bool:
    return available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "mnemo_fast::sum_sq_grad_linear", "CUDA"
    )


def _probe(index: int) -> bool:
    """Asks the library whether it has a kernel image for GPU ``index`` (True for a build
    without the probe: it then cannot tell)."""
    module = importlib.import_module("mnemo_fast._C")
    probe = getattr(module, "cuda_kernel_image", None)
    return True if probe is None else bool(probe(index))


def kernel_image(index: int) -> bool:
    """Whether the CUDA kernels can launch on GPU ``index`` (SASS for its architecture or PTX
    the driver compiles). Probed once per GPU; a miss warns once and the caller falls back."""
    if index not in _images:
        _images[index] = ok = _probe(index)
        if not ok:
            major, minor = torch.cuda.get_device_capability(index)
            _note(
                f"image{index}",
                f"mnemo_fast: the CUDA kernels have no image for GPU {index} (sm_{major}{minor}); "
                f"its tensors run on the pure-PyTorch path. Add {major}.{minor} to "
                f"TORCH_CUDA_ARCH_LIST and {_REBUILD}.",
            )
    return _images[index]


def _note(key: str, message: str) -> None:
    if key not in _noted:
        _noted.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=user_stacklevel())


def missing_cuda_message() -> str | None:
    """One line for a GPU machine whose extension has no CUDA kernels (None otherwise)."""
    if not torch.cuda.is_available() or not available() or has_cuda_kernels():
        return None
    return (
        "mnemo_fast: a GPU is visible but mnemo_fast._C was built without CUDA kernels, so "
        f"CUDA tensors run on the pure-PyTorch path; {_REBUILD}."
    )


def note_missing_cuda() -> None:
    """Warns once per process when :func:`missing_cuda_message` has something to say. Loads
    the extension only on a machine with a GPU (a CPU machine's import stays lazy)."""
    if "cuda" in _noted or not torch.cuda.is_available():
        return
    message = missing_cuda_message()
    if message is not None:
        _note("cuda", message)
