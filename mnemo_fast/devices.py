"""The ground floor: which devices this machine has (imports nothing of the package).

Both namespaces' ``backend()`` answer :data:`NO_GPU` for a CUDA device this machine lacks:
no path runs there, since no tensor can be put on it.
"""

from __future__ import annotations

import torch

#: What ``backend()`` answers for a GPU this machine does not have.
NO_GPU = "no-gpu"


def missing_gpu(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA device this machine lacks (no GPU visible, or fewer than its index)."""
    if device.type != "cuda":
        return False
    if not torch.cuda.is_available():
        return True
    return device.index is not None and device.index >= torch.cuda.device_count()
