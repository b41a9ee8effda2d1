"""Forgetting on many processes: the Fisher's sum over codes split across ranks.

The Fisher is a sum of per-sample squares, sum_n g_n^2, so each rank computes the sum over
its contiguous share of the codes and one ``all_reduce(SUM)`` per dtype combines them. The
rest of the method (ratio, shift, scoring on the codes) runs on every rank as it does on
one: for a model replicated on every rank all ranks end with the same parameters.

For a saved checkpoint, ``torchrun --standalone --nproc_per_node=2 -m mnemo_fast.distributed.launch ...``
is the ready-made job (:mod:`mnemo_fast.distributed.launch`). In your own script, launched with torchrun
(one process per device)::

    import torch, torch.distributed as dist
    import mnemo_fast as mf
    from mnemo_fast.distributed import forget_distributed

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    model = load_my_model().to(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    codes = mf.MnemonicCodes.load("codes.safetensors")
    result = forget_distributed(model, codes, [0], lambda1=1e-4, lambda2=1)
    if rank == 0:
        torch.save(result.model.state_dict(), "forgotten.pt")
    dist.destroy_process_group()

Tested: gloo on the CPU, plain modules and ``DistributedDataParallel`` (its ``.module`` is
used, so no DDP hook or buffer broadcast runs during the Fisher), and FSDP2 models
(``fully_shard``, DTensor parameters). Not tested: NCCL on GPUs (same code path, nothing
gloo-specific here).

Sharded (FSDP2) models: every forward is a collective (FSDP gathers each unit's shards), so
the ranks run their shares of the codes in lockstep, a rank with no codes left running one
code and discarding it. The layer rules see each gathered layer's input and output gradient
and give global-shape sums for the step; each is reduce-scattered into the rank's shard (a
DTensor laid out like the parameter); nn.MultiheadAttention's rule, which recomputes the
projections after the backward, gathers its weights again there. The perturbation is elementwise on the local shards; the
per-tensor maximum is an all-reduce MAX. Parameters no rule takes raise NotImplementedError
(the generic torch.func path cannot run on shards), and the model is edited in place only.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from .. import engines
from ..fisher_sums import FisherSums
from ..method import forget
from ..modeling import logits_of, trainable_parameters, zero_accumulator
from ..session import correct_predictions
from ..sharding import any_sharded, is_sharded, local, reduce_to_layout, reject_flat_parameters, resharded_forwards
from ..validation import UnlearningError, all_finite

Tensor = torch.Tensor


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper, else ``model``."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def share(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's contiguous slice [start, end) of ``num_samples`` (sizes differ by at most 1)."""
    base, extra = divmod(num_samples, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_reduce_flat_(tensors: Sequence[Tensor], op=dist.ReduceOp.SUM, group=None) -> None:
    """All-reduce ``tensors`` in place with one collective per (dtype, device) bucket."""
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = defaultdict(list)
    for t in tensors:
        buckets[(t.dtype, t.device)].append(t)
    for bucket in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=op, group=group)
        for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
            t.copy_(part.view_as(t))


class DistributedEngine(FisherSums):
    """Wrap an engine (default: :func:`mnemo_fast.engines.default_engine`) for many ranks.

    - ``sum_squared_grads``: rank r takes ``inputs[start:end]`` (:func:`share`), a rank
      with no samples contributes zeros; sums are combined by ``all_reduce(SUM)``, one
      flattened buffer per dtype. Every rank gets the full sum.
    - ``correct`` (scoring on the codes): split the same way, one ``all_reduce(SUM)`` of
      the per-code hits; every rank scores the candidates on the same counts.
    - ``max_ratio``: computed locally, then ``all_reduce(MAX)`` (so a rank holding a
      shard of a tensor still gets the tensor's maximum).
    - ``shift_`` / ``gaussian_`` / ``dampen_``: delegated; each rank perturbs the parameters it holds.
      For ``gaussian_`` on replicated parameters all ranks must pass generators in the same
      state (same seed), or the replicas diverge.

    Every rank must call the engine the same number of times with the same model structure
    (the collectives are matched by order). Sharded (FSDP2) models: the method enters
    :meth:`forwards` once around each call, inside which every FSDP2 unit reshards after each
    forward (FSDP2's own ``reshard_after_forward``), so parameter names always resolve to the
    shards the perturbation edits and each forward gathers them afresh.
    """

    takes_shards = True

    def __init__(self, inner_engine=None, group=None):
        self.inner = engines.resolve(inner_engine)
        self.group = group
        self.name = f"distributed({self.inner.name})"

    def backend_for(self, device: torch.device) -> str:
        return engines.decide(self, device).fisher  # the inner engine's path (``inner``)

    def forwards(self, model: torch.nn.Module):
        """Around a whole call on ``model``: sharded units reshard after every forward."""
        return resharded_forwards(unwrap(model))

    local = staticmethod(local)

    def all_ranks(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on every rank (one all_reduce MIN): a check that fails on one
        rank's shard fails on all, so no rank is left waiting in the next collective."""
        value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group)
        return bool(value.item())

    def _lockstep(self, num_samples: int, chunk_size: int | None) -> list[tuple[int, int]]:
        """This rank's slices, one per step; every rank gets the same number of steps (a
        sharded model's forward is a collective: FSDP gathers each layer's shards), and a
        slice may be empty (the rank then runs one code and discards the result)."""
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        start, end = share(num_samples, rank, world)
        most = -(-num_samples // world)
        step = min(chunk_size or most, most)
        return [(min(start + k, end), min(start + k + step, end)) for k in range(0, most, step)]

    def _fisher_sums(self, model, inputs, targets, chunk_size, output_fn) -> dict[str, Tensor]:
        model = unwrap(model)
        reject_flat_parameters(model)
        params = trainable_parameters(model)
        if any_sharded(params.values()):
            return self._sharded_sums(model, params, inputs, targets, chunk_size, output_fn)
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        start, end = share(inputs.shape[0], rank, world)
        if end > start:
            sums = self.inner.sum_squared_grads(model, inputs[start:end], targets[start:end], chunk_size, output_fn)
        else:
            sums = {name: zero_accumulator(p) for name, p in params.items()}
        ordered = [sums[name] for name in params]  # the same order on every rank
        all_reduce_flat_(ordered, dist.ReduceOp.SUM, self.group)
        return sums

    def _sharded_sums(self, model, params, inputs, targets, chunk_size, output_fn) -> dict[str, Tensor]:
        """Sums over all ranks' codes, laid out like the parameters (a DTensor shard for a
        sharded one). The forwards run in lockstep; after each step every tensor's global-shape
        partial sum is reduce-scattered into this rank's shard (all-reduced if replicated), so
        a rank holds one step's full-size sums (transient) and shard-size accumulators."""
        inner = engines.decide(self.inner, inputs.device, sharded=True).engine
        sums: dict[str, Tensor] = {}
        for start, end in self._lockstep(inputs.shape[0], chunk_size):
            empty = end == start
            if empty:
                start, end = 0, 1
            part = inner.sum_squared_grads(model, inputs[start:end], targets[start:end], None, output_fn)
            for name, p in params.items():  # the same order on every rank
                value = part.pop(name)
                if empty:
                    value.zero_()  # the stand-in code counts for nothing, but the collective runs
                value = reduce_to_layout(value, p, self.group)
                if name in sums:
                    sums[name] += value
                else:
                    sums[name] = value
        return sums

    def correct(
        self,
        model: torch.nn.Module,
        inputs: Tensor,
        labels: Tensor,
        chunk_size: int | None = None,
        output_fn: Callable[[object], Tensor] = logits_of,
    ) -> Tensor:
        """[N] bool, scored like the Fisher: rank r classifies its share of the codes and one
        ``all_reduce(SUM)`` assembles the whole vector, so every rank scores the candidates
        on identical counts (and chooses the same one) at 1/world of the cost. A sharded
        model's forwards run in lockstep (see :meth:`_lockstep`)."""
        model = unwrap(model)
        hits = torch.zeros(inputs.shape[0], dtype=torch.int32, device=inputs.device)
        if any_sharded(model.parameters()):
            for start, end in self._lockstep(inputs.shape[0], chunk_size):
                if end == start:
                    correct_predictions(model, inputs[:1], labels[:1], None, output_fn)
                else:
                    hits[start:end] = correct_predictions(model, inputs[start:end], labels[start:end], None, output_fn).int()
        else:
            rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
            start, end = share(inputs.shape[0], rank, world)
            if end > start:
                hits[start:end] = correct_predictions(model, inputs[start:end], labels[start:end], chunk_size, output_fn).int()
        dist.all_reduce(hits, op=dist.ReduceOp.SUM, group=self.group)
        return hits.bool()

    def max_ratio(self, forget: Sequence[Tensor], remain: Sequence[Tensor]) -> Tensor:
        local_max = self.inner.max_ratio(_locals(forget), _locals(remain)).clone()
        if local_max.numel():
            dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=self.group)
        return local_max

    def shift_(self, params, forget, remain, max_ratio, lambda1, lambda2, sign) -> None:
        self.inner.shift_(_locals(params), _locals(forget), _locals(remain), max_ratio, lambda1, lambda2, sign)

    def dampen_(self, params, forget, remain, threshold, lam) -> None:
        self.inner.dampen_(_locals(params), _locals(forget), _locals(remain), threshold, lam)

    def gaussian_(self, params, forget, remain, max_ratio, lambda1, lambda2, tau, generator) -> None:
        """Replicated tensors draw from ``generator`` (the same on every rank, so replicas stay
        equal); sharded ones from a per-rank generator seeded from it, so shards get
        independent noise (distributed like a one-process draw, not bitwise equal to it)."""
        sharded = [k for k, t in enumerate(forget) if is_sharded(t)]
        if not sharded:
            return self.inner.gaussian_(params, forget, remain, max_ratio, lambda1, lambda2, tau, generator)
        replicated = [k for k, t in enumerate(forget) if not is_sharded(t)]
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        per_rank = torch.Generator(device=generator.device).manual_seed(seed + dist.get_rank(self.group))
        for idx, gen in ((replicated, generator), (sharded, per_rank)):
            if idx:
                pick = lambda ts: [local(ts[k]) for k in idx]  # noqa: E731
                self.inner.gaussian_(pick(params), pick(forget), pick(remain), max_ratio[idx], lambda1, lambda2, tau, gen)


def _locals(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [local(t) for t in tensors]


class RankDisagreement(RuntimeError):
    """Ranks of a replicated model chose different candidates or ended with different weights."""


def _agree(values: Tensor, group) -> bool:
    low, high = values.clone(), values.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    return bool(torch.equal(low, high))


@torch.no_grad()
def _check_finite_everywhere(model: torch.nn.Module, group, device: torch.device) -> None:
    """Every rank raises if any rank holds a NaN or inf in a trainable parameter (its shard or
    replica): a check on one rank only would leave the others waiting in a collective."""
    finite = all_finite([local(p) for p in model.parameters() if p.requires_grad])
    flag = torch.tensor([1 if finite else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    if not flag.item():
        raise UnlearningError(
            f"rank {dist.get_rank(group)}: a trainable parameter contains NaN or inf on "
            f"{'this rank' if not finite else 'another rank'}: refusing to forget"
        )


def _best_candidate(result) -> int:
    if result.mode == "shift":
        return 0 if result.sign == 1 else 1
    scores = result.candidate_scores
    return max(range(len(scores)), key=lambda k: (scores[k], -k))


def forget_distributed(
    model: torch.nn.Module,
    codes,
    classes: Iterable[int] | int,
    *,
    inner_engine=None,
    group=None,
    verify_parameters: bool = True,
    **kwargs,
):
    """``mnemo_fast.forget`` with the Fisher split across the ranks of ``group``.

    Call on every rank with the same replicated ``model`` (plain or DDP-wrapped; the
    wrapped module is used and, with ``inplace=True``, edited), the same codes and the same
    keyword arguments (for ``mode="gaussian"`` a generator seeded the same on every rank).
    The candidate is chosen on every rank from its own code scores; this checks that all
    ranks chose the same candidate with the same scores (and, with ``verify_parameters``,
    ended with the same per-tensor parameter sums) and raises :class:`RankDisagreement`
    otherwise. Returns the :class:`mnemo_fast.ForgetResult` (``model`` is the unwrapped module
    or its copy).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("forget_distributed needs torch.distributed initialised (init_process_group)")
    module = unwrap(model)
    reject_flat_parameters(module)
    device = local(next(module.parameters())).device
    _check_finite_everywhere(module, group, device)
    result = forget(module, codes, classes, engine=DistributedEngine(inner_engine, group), **kwargs)
    choice = torch.tensor([_best_candidate(result), *result.candidate_scores], dtype=torch.float64, device=device)
    if not _agree(choice, group):
        raise RankDisagreement(
            f"rank {dist.get_rank(group)}: ranks chose different forgetting candidates "
            f"(this rank: candidate {int(choice[0])}, scores {result.candidate_scores}); are the "
            f"model, codes and generator seed the same on every rank?"
        )
    replicated = [p for p in result.model.parameters() if not is_sharded(p)]  # shards differ by design
    if verify_parameters and replicated:
        with torch.no_grad():
            sums = torch.stack([p.detach().double().sum() for p in replicated])
        if not _agree(sums, group):
            raise RankDisagreement(
                f"rank {dist.get_rank(group)}: the forgotten parameters differ between ranks; "
                f"are the model replicas identical?"
            )
    return result
