"""The distributed stack: forgetting on many processes, FSDP2 shards, the ``torchrun`` job.

- :mod:`.engine`: :class:`DistributedEngine` (the codes split across ranks, sums all-reduced,
  FSDP2 shards handled behind the engine) and :func:`forget_distributed`;
- :mod:`.launch`: ``torchrun ... -m mnemo_fast.distributed.launch`` for a saved checkpoint;
- the sharding helpers (DTensor detection, local shards, reduce-scatter into a parameter's
  layout) live on the ground floor, :mod:`mnemo_fast.sharding`, since the reference, the fast
  engine and the validation need them too; ``gathered``, ``is_sharded``, ``any_sharded`` and
  ``local`` are re-exported here.

The names below load on first use: importing the package itself loads nothing.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DistributedEngine": ".engine", "RankDisagreement": ".engine", "forget_distributed": ".engine",
    "share": ".engine", "unwrap": ".engine", "all_reduce_flat_": ".engine",
    "gathered": "..sharding", "is_sharded": "..sharding", "any_sharded": "..sharding", "local": "..sharding",
    "shard": ".launch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
