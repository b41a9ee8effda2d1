"""Forget classes of a saved model on many processes: the ``torchrun`` entry point.

    torchrun --standalone --nproc_per_node=2 -m mnemo_fast.distributed.launch \\
        runs/demo/model.safetensors runs/demo/codes.safetensors --forget 3 \\
        --output forgotten.safetensors [--fsdp] [--chunk-size 16] [--engine auto|reference]

Every rank loads the checkpoint (``mnemo-fast demo`` or :func:`mnemo_fast.evaluation.models.save_checkpoint`)
and the codes, onto its GPU (``LOCAL_RANK``) where CUDA is available, else the CPU (NCCL or
gloo accordingly). With ``--fsdp`` the model is sharded with FSDP2 first (each Linear and
Conv2d its own unit, the rest in the root unit). :func:`mnemo_fast.distributed.forget_distributed`
then splits the codes across the ranks, each rank running ``--engine`` (``reference``: pure
PyTorch; its layer-rule twin for sharded layers); rank 0 writes the forgotten model (gathered from the
shards under ``--fsdp``) and prints what happened.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..evaluation import models
from ..cli import add_forget_options, describe_result, forget_lambdas, refuse_flagged
from ..codes import MnemonicCodes
from ..reference.engine import REFERENCE
from .engine import forget_distributed
from ..sharding import gathered


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchrun ... -m mnemo_fast.distributed.launch", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("codes", type=Path)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (fully_shard) first")
    parser.add_argument("--chunk-size", type=int, default=None, help="codes per forward pass on a rank")
    add_forget_options(parser)
    return parser


def _device() -> torch.device:
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def shard(model: torch.nn.Module, device: torch.device,
          units: tuple[type, ...] = (torch.nn.Linear, torch.nn.Conv2d)) -> torch.nn.Module:
    """FSDP2 over all ranks: every module of a ``units`` type its own unit, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for module in list(model.modules()):
        if isinstance(module, units):
            fully_shard(module, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def inner_engine(name: str):
    """The engine each rank runs for ``--engine``: None (the default one) or the reference."""
    return REFERENCE if name == "reference" else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    device = _device()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        rank = dist.get_rank()
        model, meta = models.load_checkpoint(args.checkpoint)
        model.to(device)
        codes = MnemonicCodes.load(args.codes)
        if args.fsdp:
            model = shard(model, device)
        lambda1, lambda2 = forget_lambdas(args, meta["model"])
        result = forget_distributed(model, codes, args.forget, inplace=True, chunk_size=args.chunk_size,
                                    mode=args.mode, lambda1=lambda1, lambda2=lambda2,
                                    inner_engine=inner_engine(args.engine))
        state = {name: t.cpu() for name, t in gathered(model.state_dict()).items()}  # collective
        refused = refuse_flagged(result, args) if rank == 0 else None  # every rank judged the same codes
        if rank == 0 and refused is None:
            plain = models.build(meta["model"], tuple(codes.shape), codes.num_classes)
            plain.load_state_dict(state)
            models.save_checkpoint(plain, args.output, name=meta["model"], input_shape=tuple(codes.shape),
                                   num_classes=codes.num_classes, forgotten=" ".join(map(str, args.forget)))
            print(f"{dist.get_world_size()} ranks{' (FSDP2)' if args.fsdp else ''}: {describe_result(result)}")
            print(f"saved {args.output}")
        elif rank == 0:
            print(f"{dist.get_world_size()} ranks{' (FSDP2)' if args.fsdp else ''}: {describe_result(result)}")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return refused or 0 if rank == 0 else 0


if __name__ == "__main__":
    code = main()
    # Leave without the interpreter's teardown: gloo's background threads, destroyed with the
    # C++ statics after the process group is gone, sometimes abort the process ("terminate
    # called without an active exception") after all the work is done and saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
