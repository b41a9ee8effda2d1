"""Device bookkeeping of the fast path: which GPU a tensor means, and tensors grouped per device.

Small pure functions (no CUDA needed to test them): the CUDA ops take tensors of one device
per call, so a model spread over several GPUs (``device_map="auto"``, pipeline splits) is
perturbed with one fused call per device.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def cuda_index(device: torch.device, current: Callable[[], int] | None = None) -> int:
    """The GPU index ``device`` means: its own index (0 included), else the current device
    (``current()``, default ``torch.cuda.current_device``).

    (``device.index or current()`` would send ``cuda:0`` to another current device.)
    """
    if device.index is not None:
        return device.index
    return (current or torch.cuda.current_device)()


def default_generator(device: torch.device) -> torch.Generator:
    """The default random generator of ``device``: the CPU one, or the GPU's own."""
    if device.type == "cuda":
        return torch.cuda.default_generators[cuda_index(device)]
    return torch.default_generator


def generator_fits(generator: torch.device, device: torch.device) -> bool:
    """Whether the CUDA ops accept a generator on ``generator`` for tensors on ``device``.

    Same device type, and the same index unless the generator names none
    (``torch.Generator("cuda")``); the C++ twin is ``generator_fits`` in ``csrc/checks.h``.
    """
    return generator.type == device.type and (generator.index is None or generator.index == device.index)


def group_by_device(tensors: Sequence[torch.Tensor]) -> list[tuple[torch.device, list[int]]]:
    """Positions of ``tensors`` per device, devices in order of first appearance.

    [T_0, ..., T_{L-1}] -> [(device, [l, ...]), ...]; the positions of one device keep their order.
    """
    groups: dict[torch.device, list[int]] = {}
    for position, tensor in enumerate(tensors):
        groups.setdefault(tensor.device, []).append(position)
    return list(groups.items())
