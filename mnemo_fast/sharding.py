"""Parameters sharded across ranks (FSDP2 ``fully_shard``, DTensor): detection and views.

A sharded parameter is a ``torch.distributed.tensor.DTensor``: each rank holds a shard
(``to_local()``) of a tensor whose ``shape`` is the global one. The method meets such
parameters in the Fisher pass and the scoring of the codes (FSDP's own forwards, which
gather each layer's weights while it runs, in lockstep on every rank), the perturbation
(elementwise: each rank edits its own shard) and the per-tensor maximum of the ratio (an
all-reduce MAX); :mod:`mnemo_fast.distributed` puts these together.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

Tensor = torch.Tensor

try:  # torch.distributed may be compiled out
    from torch.distributed.tensor import DTensor, Partial
except ImportError:  # pragma: no cover - builds without distributed support
    DTensor = None
    Partial = None


def is_sharded(t: object) -> bool:
    """True for a DTensor (an FSDP2 or tensor-parallel parameter, or a Fisher tensor like one)."""
    return DTensor is not None and isinstance(t, DTensor)


def any_sharded(tensors: Iterable[object]) -> bool:
    return any(is_sharded(t) for t in tensors)


def local(t: Tensor) -> Tensor:
    """The rank's own shard of ``t`` (sharing its storage), or ``t`` itself when not sharded."""
    return t.to_local() if is_sharded(t) else t


def gathered(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached whole tensors: shards all-gathered (a collective: call on every rank), others as
    they are."""
    return {name: (t.full_tensor() if is_sharded(t) else t).detach() for name, t in tensors.items()}


def reduce_to_layout(partial: Tensor, param: Tensor, group=None) -> Tensor:
    """Sum ``partial`` (a global-shape tensor, this rank's share of a sum) over the ranks and
    lay it out like ``param``: for a sharded parameter a DTensor with its mesh and placements
    (one reduce-scatter over the mesh, uneven shards included), else a plain tensor
    all-reduced over ``group``. The mesh must span the ranks that split the sum."""
    if not is_sharded(param):
        torch.distributed.all_reduce(partial, group=group)
        return partial
    mesh = param.device_mesh
    pending = DTensor.from_local(partial, mesh, [Partial()] * mesh.ndim, run_check=False)
    return pending.redistribute(mesh, param.placements)


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP2 unit of ``model`` back in its sharded state.

    FSDP2 keeps the root unit gathered after a forward that no backward follows, and while
    it is, the module holds plain full-size tensors under the parameters' names and the next
    forward reads those. The method edits the shards between forwards, so it reshards after
    each pass: the next forward gathers the edited shards, and parameter names resolve to
    the sharded DTensors.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def reject_flat_parameters(model: torch.nn.Module) -> None:
    """FSDP1 (``FullyShardedDataParallel``) flattens parameters into one FlatParameter per
    unit: per-parameter Fisher tensors cannot be formed from it. Say so instead of failing
    somewhere deep in a forward."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise NotImplementedError(
            "FullyShardedDataParallel (FSDP1, flat parameters) is not supported; shard the model "
            "with torch.distributed.fsdp.fully_shard (FSDP2, DTensor parameters) instead"
        )
