"""Model helpers every floor of the package needs: the logits of an output, eval mode, the
trainable parameters, a zero Fisher sum for a parameter.

A ground-floor module (docs/LAYOUT.md): it imports nothing from the package but the other
ground-floor modules (:mod:`.dtypes`, :mod:`.sharding`), so the core, the engines
(reference, fast, distributed) and the evaluation tools can all import it.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from .dtypes import accumulation_dtype
from .sharding import local

Tensor = torch.Tensor

#: Picks the logits out of what a model returns (default :func:`logits_of`).
OutputFn = Callable[[object], Tensor]


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """name -> parameter for every parameter that requires grad (tied ones listed once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode (BatchNorm on running stats), restoring each module's mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def tensors_kept(model: torch.nn.Module) -> Iterator[None]:
    """Every module's registered parameters and buffers are the same objects on the way out.

    ``torch.func.functional_call`` swaps tensors into a model and back; on a module registered
    twice (``nn.Sequential(lin, act, lin)``, a block reused in a ModuleList) torch 2.13 puts
    back the swapped-in tensor for one of the names, so the caller's module is left holding a
    functorch wrapper instead of its Parameter (and ``copy.deepcopy`` of it fails). Wrapped
    around such calls, this restores what each module held."""
    held = [(m, kind, name, t) for m in model.modules() for kind in ("_parameters", "_buffers")
            for name, t in getattr(m, kind).items()]
    try:
        yield
    finally:
        for m, kind, name, t in held:
            if getattr(m, kind).get(name) is not t:
                getattr(m, kind)[name] = t


def zero_accumulator(p: Tensor) -> Tensor:
    """A contiguous zero sum for parameter ``p``: its (global) shape, its accumulation dtype,
    its device. Always a plain tensor, also for a sharded (DTensor) parameter, whose sums the
    distributed engine assembles into shards."""
    return torch.zeros(p.shape, dtype=accumulation_dtype(p.dtype), device=local(p).device)


def logits_of(output: object) -> Tensor:
    """The default ``output_fn``: a tensor as is, else its ``.logits`` or ``["logits"]``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    raise TypeError(
        f"model returned {type(output).__name__}; pass output_fn= to pick the logits from it"
    )
