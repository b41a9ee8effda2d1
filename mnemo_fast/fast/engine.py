"""The fast engine: hooks + per-layer rules for the Fisher, fused ops for the perturbation.

Same interface (:class:`mnemo_fast.engines.Engine`) as the reference engine. Parameters no rule
can take are computed by the reference's generic per-sample path, only those; on a device the
compiled kernels were not built for, the Fisher runs on the hooks engine with ATen ops
(``fallback``) and the perturbation on the reference's formula.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..dtypes import accumulation_dtype
from ..fisher_sums import FisherSums
from ..modeling import logits_of, trainable_parameters, zero_accumulator
from ..reference import fisher as ref_fisher
from ..reference.engine import REFERENCE
from . import _ext, devices, dispatch
from .capture import Capture, frozen
from .ops import COMPILED, TWINS
from .plan import Plan, Route, all_generic, make_plan, warn_generic
from .rules.base import Rule
from .rules.broadcast import BroadcastCapture, per_sample
from .rules.operations import OperationsCapture
from ..sharding import is_sharded

Tensor = torch.Tensor


def _refuse_sharded_generic(plan: Plan, params, why: str = "not taken by any layer rule") -> None:
    sharded = [name for name in plan.generic if is_sharded(params[name])]
    if sharded:
        raise NotImplementedError(
            f"sharded (DTensor) parameters {sharded[:5]}: {why}, and the generic per-sample "
            f"path cannot run on shards. Supported under FSDP2: Linear, Conv1d/2d, Embedding, "
            f"the norm layers and nn.MultiheadAttention, each called once per forward, and "
            f"parameters taken at the operation level (mnemo_fast.explain shows each path)"
        )


def _plan(model, params, inputs: Tensor, targets: Tensor, output_fn) -> Plan:
    """The plan of a call on ``inputs`` [N, ...]: probes of its first sample and first two,
    or the last plan made when nothing it depends on has changed (:class:`PlanCache`)."""
    key = PLANS.signature(model, params, inputs, targets, output_fn)
    plan = PLANS.get(model, key)
    if plan is None:
        plan = make_plan(model, params, inputs[:1], targets[:1], output_fn, inputs[:2] if inputs.shape[0] >= 2 else None)
        PLANS.put(model, key, plan)
    return plan


_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)


def _hook_ids(hooks) -> tuple:
    """Handle ids of ``hooks`` (a module's hook dict), leaving out this package's passive
    observers (a hook marked ``mnemo_fast_passive``: it records, it changes nothing)."""
    return tuple(k for k, hook in hooks.items() if not getattr(hook, "mnemo_fast_passive", False))


def _plain_attributes(module: torch.nn.Module) -> tuple:
    """(name, value) of the module's plain attributes (numbers, strings, dtypes, devices and
    tuples of them: its configuration, such as stride or padding_mode), and the identity of
    an instance-level ``forward``."""
    out = []
    for name, value in vars(module).items():
        if isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)):
            out.append((name, value))
        elif name == "forward":
            out.append((name, id(value)))
    return tuple(out)


class PlanCache:
    """The last plan the fast engine made, kept while nothing it depends on changes, so that
    calling ``forget`` (or the Fisher) again on the same model does not plan it again.

    One entry: the model (held weakly: the entry goes with the model) and the signature of
    what a plan reads (:meth:`signature`): every module (identity, class, training flag,
    plain attributes, instance-level ``forward``, hook ids), torch's global module hooks,
    every parameter and buffer (name, identity, shape, dtype, device, requires_grad), the
    shapes of one input and one target, their dtypes and devices, whether the call has >= 2
    samples (the probe of two), and
    ``output_fn``. Any difference plans afresh. A model with sharded (FSDP2) parameters, whose
    forwards swap tensors, and a plan that holds the model itself (the root is a layer with a
    rule) are not kept; a pass that contradicts its plan drops it (:meth:`discard`). Not
    seen: a change a forward reads from outside these (a global flag, a tensor's values
    steering control flow); :meth:`clear` forgets the plan.
    """

    def __init__(self):
        self._entry: tuple[weakref.ref, tuple, Plan] | None = None

    @staticmethod
    def signature(model, params, inputs: Tensor, targets: Tensor, output_fn) -> tuple | None:
        """What the plan of ``model`` for these inputs depends on; None: not cacheable."""
        if any(is_sharded(p) for p in params.values()):
            return None
        modules = tuple(
            (name, id(m), type(m), m.training, _plain_attributes(m), tuple(_hook_ids(getattr(m, h, {})) for h in _HOOKS))
            for name, m in model.named_modules(remove_duplicate=False)
        )
        tensors = tuple(
            (name, id(t), t.shape, t.dtype, t.device, t.requires_grad)
            for named in (model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
            for name, t in named
        )
        glob = torch.nn.modules.module
        hooks = tuple(_hook_ids(getattr(glob, h, {})) for h in (
            "_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks", "_global_backward_hooks"))
        data = tuple((t.shape[1:], t.dtype, t.device) for t in (inputs, targets))  # any N >= 2 alike
        return (modules, tensors, hooks, tuple(params), data, inputs.shape[0] >= 2, output_fn)

    def get(self, model, key) -> Plan | None:
        entry = self._entry
        if key is None or entry is None or entry[0]() is not model or entry[1] != key:
            return None
        return entry[2]

    def put(self, model, key, plan: Plan) -> None:
        if key is None or model in plan.rule_modules or model in plan.batch_dims:
            self._entry = None  # the plan would keep its own model alive
            return
        self._entry = (weakref.ref(model, self._dropped), key, plan)

    def _dropped(self, ref) -> None:
        if self._entry is not None and self._entry[0] is ref:
            self._entry = None

    def discard(self, model) -> None:
        """Forget the plan of ``model`` (its pass contradicted it)."""
        if self._entry is not None and self._entry[0]() is model:
            self._entry = None

    def clear(self) -> None:
        self._entry = None


#: The fast engines' plan cache (shared: both engines plan the same way).
PLANS = PlanCache()


def one_pass_if_cheaper(plan: Plan, params, num_samples: int, chunk_size: int | None = None) -> Plan:
    """The plan itself, or, when some parameters go to the generic path and a per-sample pass
    over every parameter takes no more chunks of samples than one over those alone, a plan
    that sends every parameter there: the generic path runs a whole per-sample forward and
    backward over the model whatever it is asked for, so the batched rule pass would only add
    to it (with it, ``mnemo_fast`` would cost more than ``mnemo_fast.reference``). The
    parameters the rules would have taken keep their exact sums (the reference's), and the
    memory stays within the reference's per-chunk bound. docs/FAST_PATH.md, "The generic path costs a whole per-sample pass"."""
    if not plan.generic or len(plan.generic) == len(params) or any(is_sharded(p) for p in params.values()):
        return plan
    if chunk_size is None:
        chunks = lambda names: -(-num_samples // ref_fisher.auto_chunk({n: params[n] for n in names}, num_samples))  # noqa: E731
        if chunks(params) > chunks(plan.generic):
            return plan  # the generic parameters alone fit larger chunks: two passes cost less
    why = (f"computed in the per-sample pass of the {len(plan.generic)} generic parameter(s): "
           f"one pass costs less than a batched pass plus that one")
    joined = [name for name in params if name not in plan.reasons]
    return Plan(generic=list(params), joined=joined, reasons={**plan.reasons, **{name: why for name in joined}})


def _one_passable(plan: Plan, params) -> bool:
    """Whether one pass can serve several blocks of rows: every parameter goes to a
    position-wise layer rule (Linear, Embedding, LayerNorm/RMSNorm) that reads its module's
    first input and output gradient alone, [N, ...] both (cut by rows); none to the broadcast,
    operation-level or generic paths (their sums are not kept per row); no parameter sharded.
    Convolutions and batch norms are left to one pass per block: a batched convolution picks
    its algorithm by batch size, and the rounding it moved (CNN, float32) exceeded what the
    distributed tests allow between FSDP ranks and one process."""
    return (not plan.generic and not plan.broadcast and not plan.operations and bool(plan.rule_modules)
            and all(type(rule).inputs is Rule.inputs and rule.position_wise for rule, _ in plan.rule_modules.values())
            and not any(is_sharded(p) for p in params.values()))


def _protect_written(model, plan: Plan, capture: Capture, used: OperationsCapture | None) -> bool | str:
    """After a chunk's forward: whether it wrote in place into a tensor caught of a layer (a
    saved input, or an output that is a view, whose hook that write orphans) or of an
    operation-level use (an operand or its output). Those are added to the plan's protection
    (caught on copies from now on) and the chunk must run again; the other watched outputs are
    let go. A str: a protected tensor was written all the same (its copy did not take), so the
    captures cannot be trusted."""
    found = False
    for watcher, protect in _watchers(plan, capture, used):
        for key, whats in watcher.changed(("input", "output")).items():
            if whats <= protect.get(key, set()):
                return f"the {_caught(model, key, whats, watcher is capture.versions)} was written although caught on a copy"
            protect.setdefault(key, set()).update(whats)
            found = True
        watcher.forget(("output",))
    return found


def _written_after_backward(model, plan: Plan, capture: Capture, used: OperationsCapture | None) -> str | None:
    """Why the captures cannot be trusted after the backward (a saved input or an output
    gradient written in place during it), naming the module; None when they can."""
    for watcher, _ in _watchers(plan, capture, used):
        for key, whats in watcher.changed().items():
            return f"the {_caught(model, key, whats, watcher is capture.versions)} changed during the backward"
    return None


def _watchers(plan: Plan, capture: Capture, used: OperationsCapture | None):
    """(version watcher, the plan's protection it feeds) of the layer rules and, if any, of the
    operation level."""
    yield capture.versions, plan.protect
    if used is not None:
        yield used.versions, plan.operations.protect


def _caught(model, key, whats: set[str], of_module: bool) -> str:
    """'input and output caught of blocks.0.lin': what was caught of whom (a module by its
    name in ``model``, an operation-level use by its index)."""
    if of_module:
        who = next((name for name, m in model.named_modules() if m is key), "") or type(key).__name__
    else:
        who = f"operation-level use {key}"
    return f"{' and '.join(sorted(whats))} caught of {who}"


def _blocks(inputs: Tensor, targets: Tensor, sizes: Sequence[int]):
    """(inputs, targets) of each block of consecutive rows (views)."""
    start = 0
    for size in sizes:
        yield inputs[start : start + size], targets[start : start + size]
        start += size


class FastEngine(FisherSums):
    """``kernels``: one path of the op table, :data:`.ops.COMPILED` or :data:`.ops.TWINS`."""

    #: the layer rules take sharded (FSDP2) layers' gathered inputs and output gradients
    takes_shards = True
    #: ``sum_squared_grads_groups`` takes ``one_pass`` (one forward+backward for all blocks)
    one_pass_groups = True

    def __init__(self, kernels, name: str, fused_perturbation: bool, compiled: bool = False, fallback=None):
        self.kernels = kernels
        self.name = name
        self.fused_perturbation = fused_perturbation
        self.compiled = compiled  # compiled kernels: the CPU always, CUDA when built; ATen: any device
        self.fallback = fallback  # the engine that runs where this one's kernels do not

    def path_for(self, device: torch.device, generator: torch.Generator | None = None) -> dispatch.Decision:
        """The path of this engine's work on ``device``, as :func:`.dispatch.decide` (the one
        place that decides it) gives it; every method below asks it."""
        return dispatch.decide(self, device, generator=generator)

    def backend_for(self, device: torch.device) -> str:
        """What runs for tensors on ``device``: "cpu-ext", "cuda-ext" or "hooks-aten"."""
        return self.path_for(device).fisher

    def runs_on(self, device: torch.device) -> bool:
        """Whether this engine's kernels run on ``device`` (an ability :func:`.dispatch.decide`
        reads; where they do not, it sends the call to ``fallback``)."""
        if not self.compiled:
            return True
        return device.type == "cpu" or (device.type == "cuda" and _ext.has_cuda_kernels(device))

    # ---- Fisher ---------------------------------------------------------------------

    def _fisher_sums(self, model, inputs, targets, chunk_size, output_fn) -> dict[str, Tensor]:
        runner = self.path_for(inputs.device).engine
        if runner is not self:  # the decision sent this device elsewhere
            return runner.sum_squared_grads(model, inputs, targets, chunk_size, output_fn)
        return self.sum_squared_grads_groups(model, inputs, targets, [inputs.shape[0]], chunk_size, output_fn)[0]

    def sum_squared_grads_groups(
        self,
        model: torch.nn.Module,
        inputs: Tensor,
        targets: Tensor,
        sizes: Sequence[int],
        chunk_size: int | None = None,
        output_fn: Callable[[object], Tensor] = logits_of,
        one_pass: bool = False,
    ) -> list[dict[str, Tensor]]:
        """:meth:`sum_squared_grads` of each block of consecutive rows of ``inputs`` [N, ...]
        (``sizes``: the blocks' row counts, summing to N), on one plan: the Fisher pair of the
        forget and retained codes plans the model once, not twice. Each block runs its own
        forward+backward, so each sum is bit for bit what :meth:`sum_squared_grads` gives for
        that block. The plan is kept for the next call while the model and the inputs' shapes
        stay the same (:class:`PlanCache`).

        ``one_pass=True`` (what ``forget``'s session asks for): when all rows fit one chunk
        (``chunk_size`` None or >= N), one forward+backward for all the blocks together, each
        block's sums taken from its own rows of the captured layer inputs and output gradients.
        A batched forward of all rows may round differently from one per block (float32: ~1e-7
        relative), so the sums then equal the blocks' own up to rounding, not bit for bit.
        Where the rows of a capture cannot simply be cut (a broadcast or an operation-level
        parameter, a rule with inputs of its own such as attention, the generic path, sharded
        parameters), with a convolution or batch norm (:func:`_one_passable`), or in smaller
        chunks (one pass would save at most one chunk's pass), the blocks run their own passes
        as without it. docs/FAST_PATH.md, "One batched pass, parameters frozen"."""
        sizes = [int(n) for n in sizes]
        if sum(sizes) != inputs.shape[0]:
            raise ValueError(f"group sizes {sizes} do not add up to the {inputs.shape[0]} inputs")
        params = trainable_parameters(model)
        if not params:
            return [{} for _ in sizes]
        runner = self.path_for(inputs.device).engine
        if runner is not self:  # the decision sent this device elsewhere
            if hasattr(runner, "sum_squared_grads_groups"):
                return runner.sum_squared_grads_groups(model, inputs, targets, sizes, chunk_size, output_fn, one_pass)
            return [runner.sum_squared_grads(model, x, y, chunk_size, output_fn)
                    for x, y in _blocks(inputs, targets, sizes)]
        plan = _plan(model, params, inputs, targets, output_fn)
        # with chunks smaller than all the rows, one pass would save at most one chunk's pass:
        # the blocks keep their own chunks (and their sums bit for bit)
        if one_pass and len(sizes) > 1 and (chunk_size is None or chunk_size >= inputs.shape[0]) \
                and _one_passable(plan, params):
            taken = self._rule_pass(model, plan, params, inputs, targets, chunk_size, output_fn, sizes)
            if not isinstance(taken, str):  # else the pass contradicted the plan: the blocks' own passes decide
                return [{name: sums[name] for name in params} for sums in taken]
        _refuse_sharded_generic(plan, params)
        warn_generic(model, plan)
        plan = one_pass_if_cheaper(plan, params, max(sizes), chunk_size)
        return [self._sums(model, params, plan, x, y, chunk_size, output_fn)
                for x, y in _blocks(inputs, targets, sizes)]

    def routes(self, model, inputs: Tensor, targets: Tensor, output_fn=logits_of) -> dict[str, Route]:
        """name -> :class:`.plan.Route` for every trainable parameter (the plan a Fisher call on
        these inputs would make; model in eval mode). Backs :func:`mnemo_fast.explain`."""
        runner = self.path_for(inputs.device).engine
        if runner is not self:  # the decision sent this device elsewhere
            return runner.routes(model, inputs, targets, output_fn)
        params = trainable_parameters(model)
        if not params:
            return {}
        return one_pass_if_cheaper(_plan(model, params, inputs, targets, output_fn), params, inputs.shape[0]).routes()

    def _sums(self, model, params, plan: Plan, inputs, targets, chunk_size, output_fn) -> dict[str, Tensor]:
        """{name: sum} over ``inputs`` on ``plan``: the rule pass, then the generic path for
        the parameters no rule takes."""
        sums: dict[str, Tensor] = {}
        if plan.rule_modules or plan.broadcast or plan.operations:
            taken = self._rule_pass(model, plan, params, inputs, targets, chunk_size, output_fn, [inputs.shape[0]])
            if isinstance(taken, str):  # the pass contradicted the plan: no rule is safe
                PLANS.discard(model)
                plan = all_generic(params, f"the batched pass failed: {taken}")
                _refuse_sharded_generic(plan, params, f"the batched pass failed ({taken})")
                warn_generic(model, plan)
            else:
                sums.update(taken[0])
        if plan.generic:
            sums.update(ref_fisher.sum_squared_grads(
                model, inputs, targets, plan.generic, chunk_size=chunk_size, output_fn=output_fn
            ))
        return {name: sums[name] for name in params}

    def _rule_pass(self, model, plan: Plan, params, inputs, targets, chunk_size, output_fn, sizes: Sequence[int]):
        """[{name: sum}] of each block of ``sizes`` consecutive rows, over the rule-taken
        parameters, or a str saying how the pass contradicted the plan. Several blocks: the
        rule modules' captures are cut by rows (only plans of :func:`_one_passable`)."""
        names = {full for _, local_names in plan.rule_modules.values() for full in local_names.values()}
        names |= set(plan.broadcast)
        broadcast = {name: params[name] for name in plan.broadcast}
        operations = plan.operations
        op_params = {name: params[name] for name in operations.names} if operations else {}
        names |= set(op_params)
        # per block: the first contribution becomes the accumulator (no zero fill)
        blocks: list[dict[str, Tensor]] = [{} for _ in sizes]
        first = blocks[0]  # where a single-block pass, and the non-rule paths, accumulate

        def add(sums: dict[str, Tensor], name: str, value: Tensor) -> None:
            dtype = accumulation_dtype(params[name].dtype)
            if name in sums:
                sums[name] += value.to(dtype)
            else:  # rule outputs are fresh tensors: safe to own and add into
                sums[name] = value.to(dtype, memory_format=torch.contiguous_format).view(params[name].shape)
        bounds = [0, *itertools.accumulate(sizes)]
        step = chunk_size or max(inputs.shape[0], 1)  # an empty block: no pass, zero sums
        for start in range(0, inputs.shape[0], step):
            x, y = inputs[start : start + step], targets[start : start + step]
            # the blocks' rows within this chunk: (block, first row, end row), chunk-relative
            cuts = [(k, max(a, start) - start, min(b, start + x.shape[0]) - start)
                    for k, (a, b) in enumerate(zip(bounds, bounds[1:])) if min(b, start + x.shape[0]) > max(a, start)]
            rest = [p for name, p in params.items() if name not in broadcast and name not in op_params]
            while True:  # once more for each newly found in-place write into a capture
                capture = Capture({m: (plan.batch_dims[m], rule.position_wise) for m, (rule, _) in plan.rule_modules.items()},
                                  keep=tuple(op_params.values()) + tuple(broadcast.values()), protect=plan.protect)
                caught = BroadcastCapture(broadcast)
                used = OperationsCapture(operations, params, x, self.kernels, model) if operations else None
                with frozen(rest), capture.recording(x.shape[0]), torch.enable_grad():
                    with used.recorder if used else contextlib.nullcontext():
                        loss = F.cross_entropy(output_fn(model(x)), y, reduction="sum")
                    written = _protect_written(model, plan, capture, used)
                    if isinstance(written, str):
                        return written
                    if written:
                        continue  # the forward wrote into a capture: catch those on copies
                    # The operation level's hooks fire on its uses' outputs: asking for those
                    # gradients (not the parameters') spares the parameters' own gradients.
                    wanted = capture.leaves + list(broadcast.values()) + (used.outputs if used else [])
                    wanted = wanted or ([x] if x.requires_grad else [])
                    if loss.requires_grad and wanted:
                        caught.attach(loss)
                        torch.autograd.grad(loss, wanted, allow_unused=True)
                break
            written = _written_after_backward(model, plan, capture, used)
            if capture.batch_mismatch or caught.failed or (used and used.failed) or written:
                return ("a layer's input did not hold the batch where the plan found it" if capture.batch_mismatch
                        else "a broadcast parameter's gradient did not have the planned shape" if caught.failed
                        else f"an operation-level use failed: {used.failed}" if used and used.failed
                        else written)
            if used:
                for name, value in used.sums.items():
                    add(first, name, value)
                for name, samples in used.samples.items():
                    add(first, name, samples.square().sum(0))
            for name, (grad, scale) in caught.grads.items():
                samples = per_sample(grad, plan.broadcast_uses[name], params[name].shape, scale, x.shape[0])
                if samples is None:
                    return f"the gradient of {name}'s broadcast node did not have the planned shape"
                add(first, name, samples.to(accumulation_dtype(params[name].dtype)).square().sum(0))
            for module, records in capture.calls.items():
                rule, local_names = plan.rule_modules[module]
                calls = [(rule.inputs(args, kwargs), grad) for args, kwargs, grad in records if grad is not None]
                if not calls:
                    continue
                for block, a, b in (cuts if len(sizes) > 1 else [(0, 0, x.shape[0])]):
                    rows = calls if len(sizes) == 1 else [(inp[a:b], grad[a:b]) for inp, grad in calls]
                    for local, value in rule.accumulate(module, rows, self.kernels).items():
                        if local in local_names:
                            add(blocks[block], local_names[local], value)
            # Drop this chunk's captured inputs and output gradients before the next forward:
            # one chunk's activations live at a time, whatever N is.
            capture = caught = used = loss = wanted = records = calls = value = None
        for sums in blocks:
            for name in names - sums.keys():  # a parameter no code reached: zero Fisher
                sums[name] = zero_accumulator(params[name])
        return blocks

    # ---- perturbation -------------------------------------------------------------------
    def _fused(self, tensors: Sequence[Tensor], generator: torch.Generator | None = None) -> list[tuple[list[int], object]]:
        """(positions, ops) per fused call: the positions of ``tensors`` of one device (the
        ops take one device per call) and the ops the decision gives that device, the fused
        kernels or the reference's formula (:data:`_REFERENCE_OPS`; a ``generator`` serving
        another device draws as torch.randn does). When the fused kernels cannot take every
        tensor (one not contiguous, or on a device decided "reference"), one call of the
        reference's formula over them all. The per-tensor test is here; the per-device one
        is :meth:`path_for`'s."""
        everything = [(list(range(len(tensors))), _REFERENCE_OPS)]
        if not tensors or not all(t.is_contiguous() for t in tensors):
            return everything
        groups = devices.group_by_device(tensors)
        if any(self.path_for(device).perturbation != "fused" for device, _ in groups):
            return everything
        if generator is None:
            return [(positions, self.kernels) for _, positions in groups]
        return [(positions, self.kernels if self.path_for(device, generator).perturbation == "fused" else _REFERENCE_OPS)
                for device, positions in groups]

    def max_ratio(self, forget: Sequence[Tensor], remain: Sequence[Tensor]) -> Tensor:
        calls = self._fused(forget)
        if len(calls) == 1:
            return calls[0][1].perturb_max_ratio(list(forget), list(remain))
        parts = [ops.perturb_max_ratio(*_take(g, forget, remain)) for g, ops in calls]
        out = torch.empty(len(forget), dtype=parts[0].dtype, device=forget[0].device)
        for (positions, _), part in zip(calls, parts):  # [L] on forget[0]'s device, like one call
            out[torch.tensor(positions, device=out.device)] = part.to(out.device, out.dtype)
        return out

    def shift_(self, params, forget, remain, max_ratio, lambda1, lambda2, sign) -> None:
        calls = self._fused(params)
        for positions, ops in calls:
            p, f, r = _take(positions, params, forget, remain)
            ops.perturb_shift_(p, f, r, _ratio_for(max_ratio, positions, p[0].device if p else None,
                                                   len(calls)), lambda1, lambda2, sign)

    def gaussian_(self, params, forget, remain, max_ratio, lambda1, lambda2, tau, generator) -> None:
        calls = self._fused(params, generator)
        for positions, ops in calls:
            p, f, r = _take(positions, params, forget, remain)
            ratio = _ratio_for(max_ratio, positions, p[0].device if p else None, len(calls))
            ops.perturb_gaussian_(p, f, r, ratio, lambda1, lambda2, tau, generator)

    def dampen_(self, params, forget, remain, threshold, lam) -> None:
        for positions, ops in self._fused(params):
            ops.perturb_dampen_(*_take(positions, params, forget, remain), threshold, lam)


class _ReferenceOps:
    """The reference's perturbation under the fused ops' names (looked up at each call)."""

    @staticmethod
    def perturb_max_ratio(forget, remain):
        return REFERENCE.max_ratio(forget, remain)

    @staticmethod
    def perturb_shift_(params, forget, remain, max_ratio, lambda1, lambda2, sign):
        return REFERENCE.shift_(params, forget, remain, max_ratio, lambda1, lambda2, sign)

    @staticmethod
    def perturb_gaussian_(params, forget, remain, max_ratio, lambda1, lambda2, tau, generator):
        return REFERENCE.gaussian_(params, forget, remain, max_ratio, lambda1, lambda2, tau, generator)

    @staticmethod
    def perturb_dampen_(params, forget, remain, threshold, lam):
        return REFERENCE.dampen_(params, forget, remain, threshold, lam)


#: Where the decision says "reference": the paper's formula, tensor by tensor.
_REFERENCE_OPS = _ReferenceOps()


def _take(positions: list[int], *lists: Sequence[Tensor]) -> list[list[Tensor]]:
    """The entries ``positions`` of each list (one device's share of a multi-device call)."""
    return [[items[i] for i in positions] for items in lists]


def _ratio_for(max_ratio: Tensor, positions: list[int], device: torch.device, groups: int) -> Tensor:
    """max_ratio [L] cut to ``positions`` [G] on ``device`` (unchanged for a single device)."""
    if groups == 1:
        return max_ratio
    return max_ratio[torch.tensor(positions, device=max_ratio.device)].to(device)


def _aten_engine() -> FastEngine:
    return FastEngine(TWINS, "hooks-aten", fused_perturbation=False)


def _extension_engine() -> FastEngine:
    return FastEngine(COMPILED, "ext", fused_perturbation=True, compiled=True, fallback=HOOKS_ATEN)


#: Hooks + layer rules on the ops' pure-PyTorch twins (no compiled code): the best pure-PyTorch version.
HOOKS_ATEN = _aten_engine()
#: Hooks + layer rules on the compiled kernels, fused perturbation.
EXTENSION = _extension_engine()
