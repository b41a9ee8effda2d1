"""Parameters sharded across ranks (FSDP2 ``fully_shard``, DTensor): detection and views.

A sharded parameter is a ``torch.distributed.tensor.DTensor``: each rank holds a shard
(``to_local()``) of a tensor whose ``shape`` is the global one. The method meets such
parameters in the Fisher pass and the scoring of the codes (FSDP's own forwards, which
gather each layer's weights while it runs, in lockstep on every rank), the perturbation
(elementwise: each rank edits its own shard) and the per-tensor maximum of the ratio (an
all-reduce MAX); :mod:`mnemo_fast.distributed` puts these together.

A ground-floor module (docs/LAYOUT.md): the reference, the fast engine, the validation and the
distributed engine all ask these questions, so it imports nothing from the package.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Mapping

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


def fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2 units (``fully_shard``-ed modules) of ``model``, root first; [] when none."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP2 unit of ``model`` back in its sharded state (parameter names then
    resolve to the sharded DTensors, and the next forward gathers the shards afresh)."""
    for module in fsdp_units(model):
        module.reshard()


@contextlib.contextmanager
def resharded_forwards(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, every FSDP2 unit of ``model`` reshards after each forward.

    FSDP2 keeps the root unit gathered after a forward (training needs it again at once in
    the backward); while it is, the module holds plain full-size tensors under the
    parameters' names and the next forward reads those. The method edits the shards between
    forwards, so it must never see a stale gathered copy. FSDP2's own setting does this:
    ``set_reshard_after_forward(True)`` on every unit, the root included (a backward after such
    a forward gathers the unit again in FSDP's pre-backward hook, and the post-backward
    reshards it). The units' previous settings are restored on exit. A no-op without FSDP2.
    """
    units = fsdp_units(model)
    if not units:
        yield
        return
    saved = [_reshard_setting(unit) for unit in units]
    for unit in units:
        unit.reshard()
        unit.set_reshard_after_forward(True, recurse=False)
    try:
        yield
    finally:
        for unit, setting in zip(units, saved):
            unit.reshard()
            _restore_reshard_setting(unit, setting)


def _reshard_setting(unit) -> tuple:
    """(auto flag, post-forward mesh info per parameter group): FSDP2 has no public getter."""
    state = unit._get_fsdp_state()
    return state._auto_reshard_after_forward, [g.post_forward_mesh_info for g in state._fsdp_param_groups]


def _restore_reshard_setting(unit, setting: tuple) -> None:
    state = unit._get_fsdp_state()
    state._auto_reshard_after_forward, infos = setting
    for group, info in zip(state._fsdp_param_groups, infos):
        group.post_forward_mesh_info = info


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
