"""Engines: the two hot steps of the method behind one interface, and the one place that picks one.

The method (``method.py``, ``session.py``, ``calibration.py``) is written once against an
:class:`Engine`. The reference engine is plain PyTorch (:mod:`mnemo_fast.reference.engine`);
the fast engines (:mod:`mnemo_fast.fast.engine`) capture layer inputs/output gradients and call
the fused kernels (``EXTENSION``) or their ATen twins (``HOOKS_ATEN``); the distributed engine
(:mod:`mnemo_fast.distributed.engine`) splits the codes across ranks and owns sharded models.

This module imports no engine at load time, so importing it (or any low-level module that
needs :func:`select`) never pulls in the public namespace or the compiled extension.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Protocol, Sequence, runtime_checkable

import torch

from .devices import NO_GPU, missing_gpu
from .fisher_sums import FisherSums
from .fast import dispatch
from .fast.dispatch import Decision

Tensor = torch.Tensor


@runtime_checkable
class Engine(Protocol):
    """What every engine implements (the reference, the fast ones and the distributed one).

    - ``sum_squared_grads``: {name: S} with S = sum_n (dL_n/dw)^2 for every trainable parameter
      (the model already in eval mode), a fresh tensor per parameter (callers own it);
    - ``max_ratio``: [L] the largest finite eta = f_F / f_R of each tensor;
    - ``shift_``: w += sign * alpha_l * eta, alpha_l = min(lambda1, lambda2 / max_ratio_l);
    - ``gaussian_``: w += [eta > tau] * alpha_l * eta * z, z ~ N(0, 1) from ``generator``;
    - ``dampen_``: w *= [eta > threshold] min(lam / eta, 1) (1 elsewhere), mode="dampen".

    Optional, looked up with ``getattr`` (defaults in brackets):

    - ``correct(model, inputs, labels, chunk_size, output_fn)`` -> [N] bool, how the codes are
      scored [:func:`mnemo_fast.session.correct_predictions`; the distributed engine splits them];
    - ``forwards(model)`` -> a context manager entered once around a whole call (a sharded
      model reshards after each forward inside it) [none];
    - ``local(t)`` -> the part of ``t`` this process holds and edits [``t`` itself];
    - ``all_ranks(flag, device)`` -> whether a check's ``flag`` holds on every process, so a
      check fails on all of them or none [``flag``];
    - ``takes_shards``: whether ``sum_squared_grads`` runs on sharded (DTensor) parameters [False];
    - ``sum_squared_grads_groups(model, inputs, targets, sizes, chunk_size, output_fn)`` -> one
      ``sum_squared_grads`` per block of ``sizes`` consecutive rows, on one plan [one call per block].

    What :func:`decide` reads to choose the path (defaults in brackets): ``runs_on(device)``,
    whether the engine's kernels run on ``device`` [True]; ``fallback``, the engine that runs
    where they do not [none]; ``fused_perturbation`` [False]; ``compiled``, the path is named
    after the device ("cpu-ext", "cuda-ext") [False]; ``inner``, the engine each rank runs, for
    one that splits the work across ranks [none].
    """

    name: str

    def backend_for(self, device: torch.device) -> str: ...

    #: the Fisher sums, one signature for every engine (:class:`mnemo_fast.fisher_sums.FisherSums`)
    sum_squared_grads = FisherSums.sum_squared_grads

    def max_ratio(self, forget: Sequence[Tensor], remain: Sequence[Tensor]) -> Tensor: ...

    def shift_(self, params, forget, remain, max_ratio, lambda1, lambda2, sign) -> None: ...

    def gaussian_(self, params, forget, remain, max_ratio, lambda1, lambda2, tau, generator) -> None: ...

    def dampen_(self, params, forget, remain, threshold, lam) -> None: ...


def default_engine() -> Engine:
    """The engine ``mnemo_fast`` uses when none is given: the fast one when the compiled
    extension loaded (``MNEMO_FAST_DISABLE_EXT=1`` switches it off), else the reference."""
    from .fast import _ext

    if _ext.available():
        from .fast.engine import EXTENSION

        return EXTENSION
    from .reference.engine import REFERENCE

    return REFERENCE


def decide(
    engine: Engine | None = None,
    device: torch.device | None = None,
    *,
    sharded: bool = False,
    generator: torch.Generator | None = None,
) -> Decision:
    """The one place that decides the path of a call: which engine runs, what computes the
    Fisher and whether the perturbation is fused, from the device, whether the model is
    sharded and the extension's abilities (:func:`mnemo_fast.fast.dispatch.decide`, which the
    engines' own methods ask too; here ``engine`` None is :func:`default_engine`, and sharded
    parameters an engine cannot take go to the hooks engine on ATen ops)."""
    why: tuple[str, ...] = ()
    if engine is None:
        from .fast import _ext

        engine = default_engine()
        if not _ext.available():
            why = (f"the compiled extension is unavailable ({_ext.load_error()})",)
    shards = None
    if sharded:  # loaded only then: a reference call never loads the fast engine
        from .fast.engine import HOOKS_ATEN as shards
    return dispatch.decide(engine, device, sharded=sharded, generator=generator, shards=shards, why=why)


def select(engine: Engine | None = None, *, device: torch.device | None = None, sharded: bool = False) -> Engine:
    """The engine :func:`decide` names for ``device`` and ``sharded`` (``engine`` None: the default)."""
    return decide(engine, device, sharded=sharded).engine


def resolve(engine: Engine | None) -> Engine:
    """``engine``, or the default one when None (see :func:`select`)."""
    return select(engine)


def forwards(engine: Engine, model: torch.nn.Module) -> ContextManager[None]:
    """The engine's context for a whole call on ``model`` (see :class:`Engine`), else none."""
    enter = getattr(engine, "forwards", None)
    return enter(model) if enter is not None else contextlib.nullcontext()


def local_of(engine: Engine) -> Callable[[Tensor], Tensor]:
    """The engine's view of what this process holds of a tensor (itself by default)."""
    return getattr(engine, "local", None) or (lambda t: t)


def backend(device: str | torch.device = "cpu") -> str:
    """Which path ``mnemo_fast`` takes for tensors on ``device``: "cpu-ext", "cuda-ext",
    "hooks-aten" (a device the build has no kernels for) or "reference"; ``"no-gpu"`` for a
    CUDA device this machine does not have (no path runs there: no tensor can be put on it)."""
    device = torch.device(device)
    if missing_gpu(device):
        return NO_GPU
    return decide(device=device).fisher


def __getattr__(name: str):
    # REFERENCE / ReferenceEngine stay importable from here, loaded on first use.
    if name in ("REFERENCE", "ReferenceEngine"):
        from .reference import engine as reference_engine

        return getattr(reference_engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
