"""The one-shot forgetting method, written once against an engine (ALGORITHM.md, 3-5).

Data flows one way: codes -> (engine) Fisher pair -> (engine) candidate perturbations, each
scored on the codes and undone -> the best candidate applied -> result. ``mnemo_fast`` and
``mnemo_fast.reference`` expose these functions bound to the fast and the reference engine.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from . import validation
from .codes import MnemonicCodes
from . import engines
from .reference.fisher import eval_mode, logits_of, trainable_parameters
from .reference.perturb import compute_dtype
from .sharding import any_sharded, local, reshard

Tensor = torch.Tensor
OutputFn = Callable[[object], Tensor]
MODES = ("shift", "gaussian")


@dataclass(frozen=True)
class CodeAccuracy:
    """Accuracy on the codes: ``forget`` on the forget classes' codes, ``retain`` on the rest."""

    forget: float
    retain: float

    @property
    def score(self) -> float:
        """The candidate score of the specification: A_R + E_F = retain + (1 - forget)."""
        return self.retain + (1.0 - self.forget)


@dataclass
class ForgetResult:
    """What :func:`forget` returns. ``model`` is a new model unless ``inplace=True``."""

    model: torch.nn.Module
    sign: int | None
    code_accuracy_before: CodeAccuracy
    code_accuracy_after: CodeAccuracy
    seconds: float
    mode: str = "shift"
    lambda1: float = 0.0
    lambda2: float = 0.0
    candidate_scores: list[float] = field(default_factory=list)
    backend: str = "reference"
    calibration: object | None = None  # mnemo_fast.calibration.Calibration with lambda1="auto"


ParamSelector = Callable[[str], bool] | str | Iterable[str] | None


def parameter_filter(selector: ParamSelector) -> Callable[[str], bool]:
    """A name predicate from ``params=``: None (all), a callable, or glob pattern(s) such
    as ``"encoder.layers.11.*"`` or ``["head.*", "norm.*"]``."""
    if selector is None:
        return lambda name: True
    if callable(selector):
        return selector
    patterns = [selector] if isinstance(selector, str) else list(selector)
    return lambda name: any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


@contextlib.contextmanager
def only_parameters(model: torch.nn.Module, selector: ParamSelector) -> Iterator[None]:
    """Within the block, trainable parameters that ``selector`` rejects do not require grad
    (so every engine skips them); the flags are restored afterwards."""
    keep = parameter_filter(selector)
    dropped = [p for name, p in model.named_parameters() if p.requires_grad and not keep(name)]
    try:
        for p in dropped:
            p.requires_grad_(False)
        yield
    finally:
        for p in dropped:
            p.requires_grad_(True)


def model_dtype_device(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    """dtype and device of the model's first floating parameter (float32/CPU if none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.float32, torch.device("cpu")


def code_inputs(model: torch.nn.Module, codes: MnemonicCodes, classes: Iterable[int]) -> tuple[Tensor, Tensor]:
    """The codes of ``classes`` as (inputs, labels) on the model's device and dtype."""
    dtype, device = model_dtype_device(model)
    inputs, labels = codes.batch(classes)
    return inputs.to(device=device, dtype=dtype), labels.to(device)


def fisher_diagonal(
    model: torch.nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    reduction: str = "mean",
    chunk_size: int | None = None,
    output_fn: OutputFn = logits_of,
    params: ParamSelector = None,
    engine=None,
) -> dict[str, Tensor]:
    """Empirical Fisher diagonal: mean (or sum) over samples of squared per-sample gradients.

    inputs [N, *input_shape], targets [N] class indices; returns {name: tensor like the
    parameter} for every trainable parameter (float32 for float16/bfloat16 parameters).
    The loss is each sample's own cross-entropy, so this is sum_n (dL_n/dw)^2 / N, not the
    square of a batch gradient. BatchNorm/dropout must not mix samples: the model is put in
    eval mode for the computation and every module's mode is restored afterwards.
    ``params`` restricts the result to the selected parameters (see :func:`parameter_filter`).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if inputs.shape[0] == 0 or targets.shape != (inputs.shape[0],):
        raise ValueError(
            f"need N >= 1 inputs and targets of shape [N]; got inputs {tuple(inputs.shape)} "
            f"and targets {tuple(targets.shape)}"
        )
    engine = engines.resolve(engine)
    with eval_mode(model), only_parameters(model, params):
        sums = engine.sum_squared_grads(model, inputs, targets, chunk_size, output_fn)
    if reduction == "mean":
        sums = {name: s.div_(inputs.shape[0]) for name, s in sums.items()}  # engines return fresh tensors
    return sums


def class_fishers(
    model: torch.nn.Module,
    codes: MnemonicCodes,
    forget_classes: Iterable[int] | int,
    *,
    eps: float = 1e-16,
    chunk_size: int | None = None,
    output_fn: OutputFn = logits_of,
    params: ParamSelector = None,
    engine=None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(f_F, f_R) from the codes alone, with the authors' epsilon floor.

    For a class set C with K codes per class: f = (eps + sum_{codes} g^2 / K) / |C|, so an
    element no code touches ends at eps/|C| (ALGORITHM.md, section 3).
    """
    engine = engines.resolve(engine)
    forget = validation.forget_classes(codes, forget_classes)
    remain = [c for c in range(codes.num_classes) if c not in forget]

    def fisher_of(classes: list[int]) -> dict[str, Tensor]:
        inputs, labels = code_inputs(model, codes, classes)
        sums = engine.sum_squared_grads(model, inputs, labels, chunk_size, output_fn)
        # In place, in the formula's order ((s / K) + eps) / |C|: no second parameter-sized copy.
        return {name: s.div_(codes.per_class).add_(eps).div_(len(classes)) for name, s in sums.items()}

    with eval_mode(model), only_parameters(model, params):
        return fisher_of(forget), fisher_of(remain)


def _aligned(forget_fisher: Mapping[str, Tensor], remain_fisher: Mapping[str, Tensor]) -> list[str]:
    if forget_fisher.keys() != remain_fisher.keys():
        raise ValueError("forget_fisher and remain_fisher must have the same parameter names")
    for name in forget_fisher:
        if forget_fisher[name].shape != remain_fisher[name].shape:
            raise ValueError(f"Fisher shapes differ for {name!r}")
    return list(forget_fisher)


def perturbation(
    forget_fisher: Mapping[str, Tensor],
    remain_fisher: Mapping[str, Tensor],
    lambda1: float,
    lambda2: float,
    *,
    engine=None,
) -> dict[str, Tensor]:
    """Per-parameter shifts ``alpha_l * eta`` of the paper (name -> tensor).

    eta = exp(log f_F - log f_R) with NaN -> 0 and +inf -> the tensor's largest finite eta;
    alpha_l = min(lambda1, lambda2 / max eta). Apply with :func:`perturb_`.
    """
    engine = engines.resolve(engine)
    names = _aligned(forget_fisher, remain_fisher)
    forget = [forget_fisher[n].contiguous() for n in names]
    remain = [remain_fisher[n].contiguous() for n in names]
    shifts = [torch.zeros_like(f, dtype=compute_dtype(f)) for f in forget]
    engine.shift_(shifts, forget, remain, engine.max_ratio(forget, remain), lambda1, lambda2, 1.0)
    return dict(zip(names, shifts))


@torch.no_grad()
def perturb_(model: torch.nn.Module, shifts: Mapping[str, Tensor], sign: int) -> torch.nn.Module:
    """``w <- w + sign * shift`` for each named parameter in ``shifts``; returns ``model``."""
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    params = dict(model.named_parameters())
    unknown = [name for name in shifts if name not in params]
    if unknown:
        raise ValueError(f"shifts name parameters the model does not have: {unknown}")
    for name, step in shifts.items():
        if step.shape != params[name].shape:
            raise ValueError(f"shift for {name!r} has shape {tuple(step.shape)}, parameter {tuple(params[name].shape)}")
    for name, step in shifts.items():
        params[name].add_((sign * step).to(params[name].dtype))
    return model


@torch.no_grad()
def correct_predictions(
    model: torch.nn.Module,
    inputs: Tensor,
    labels: Tensor,
    chunk_size: int | None = None,
    output_fn: OutputFn = logits_of,
) -> Tensor:
    """[N] bool: the model (in eval mode) puts input n in class labels[n]; at most
    ``chunk_size`` inputs per forward pass."""
    step = chunk_size or max(inputs.shape[0], 1)
    with eval_mode(model):
        return torch.cat([
            output_fn(model(inputs[start : start + step])).argmax(-1) == labels[start : start + step]
            for start in range(0, inputs.shape[0], step)
        ])


@torch.no_grad()
def code_accuracy(
    model: torch.nn.Module,
    codes: MnemonicCodes,
    forget_classes: Iterable[int] | int,
    *,
    output_fn: OutputFn = logits_of,
    chunk_size: int | None = None,
    engine=None,
) -> CodeAccuracy:
    """Fraction of the forget classes' codes and of the remaining codes classified correctly.

    ``chunk_size`` bounds the codes per forward pass. An engine with a ``correct`` method
    (:class:`mnemo_fast.distributed.DistributedEngine`) may split the codes across processes;
    others score them here with :func:`correct_predictions`.
    """
    forget = validation.forget_classes(codes, forget_classes)
    inputs, labels = code_inputs(model, codes, range(codes.num_classes))
    score = getattr(engines.resolve(engine), "correct", correct_predictions)
    correct = score(model, inputs, labels, chunk_size, output_fn)
    is_forget = torch.isin(labels, torch.tensor(forget, device=labels.device))
    return CodeAccuracy(
        forget=correct[is_forget].float().mean().item(),
        retain=correct[~is_forget].float().mean().item(),
    )


def _default_generator(device: torch.device) -> torch.Generator:
    from .fast.devices import default_generator  # cuda:0 is index 0, not "the current device"

    return default_generator(device)


def forget(
    model: torch.nn.Module,
    codes: MnemonicCodes,
    forget_classes: Iterable[int] | int,
    *,
    lambda1: float | str,
    lambda2: float | Sequence[float],
    mode: str = "shift",
    tau: float = 1.0,
    draws: int = 2,
    inplace: bool = False,
    generator: torch.Generator | None = None,
    eps: float = 1e-16,
    chunk_size: int | None = None,
    output_fn: OutputFn = logits_of,
    params: ParamSelector = None,
    engine=None,
) -> ForgetResult:
    """Make ``model`` forget ``forget_classes`` in one shot, from the codes alone.

    mode="shift" (the paper): w += s * alpha_l * eta with one sign s for the model, the sign
    with the better code score A_R + E_F (+1 only if strictly better). mode="gaussian": w +=
    [eta > tau] * alpha_l * eta * z, z ~ N(0, 1) from ``generator`` (torch's default one if
    None), best of ``draws`` draws by the same score. Candidates are applied, scored and
    undone on one copy of the parameters; no model is copied per candidate.

    ``lambda1="auto"`` chooses lambda1 from the codes alone (:func:`mnemo_fast.calibration.calibrate`;
    ``lambda2`` may then be a list to search too); the choice is in ``result.calibration``.
    ``params`` perturbs only the selected parameters (e.g. ``"blocks.11.*"``: the last
    block), computing the Fisher for those alone; ``chunk_size`` bounds how many codes go
    through the model at once; ``output_fn`` picks the logits from a model that returns an
    object or a dict (default: the tensor itself, ``.logits`` or ``["logits"]``).

    A new model is returned unless ``inplace=True``; in-place edits happen completely or not
    at all (any failure restores the parameters). Bad input raises ``UnlearningError``.
    """
    start = time.perf_counter()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    auto = isinstance(lambda1, str)
    if auto and lambda1 != "auto":
        raise ValueError(f"lambda1 must be a positive number or 'auto', got {lambda1!r}")
    if not auto and not (lambda1 > 0 and isinstance(lambda2, (int, float)) and lambda2 > 0):
        raise ValueError(f"lambda1 and lambda2 must be positive numbers, got {lambda1} and {lambda2}")
    if mode == "gaussian" and draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    classes = validation.forget_classes(codes, forget_classes)
    validation.trainable_model(model)
    inputs, _ = code_inputs(model, codes, classes)
    validation.code_batch_fits(model, codes, inputs, output_fn)

    engine = engines.resolve(engine)
    calibration = None
    if auto:
        from .calibration import calibrate

        with only_parameters(model, params):
            calibration = calibrate(model, codes, classes, lambda2=lambda2, eps=eps,
                                    chunk_size=chunk_size, output_fn=output_fn, engine=engine)
        lambda1, lambda2 = calibration.lambda1, calibration.lambda2
    if not inplace and any_sharded(model.parameters()):
        raise validation.UnlearningError(
            "a model with sharded (FSDP2/DTensor) parameters cannot be copied here: pass "
            "inplace=True (each rank edits its own shard, all or nothing)"
        )
    target = model if inplace else copy.deepcopy(model)
    reshard(target)  # FSDP2: the checks' forward may have left the root unit gathered
    keep = parameter_filter(params)
    chosen = {name: p for name, p in trainable_parameters(target).items() if keep(name)}
    if not chosen:
        raise validation.UnlearningError(f"params={params!r} selects none of the trainable parameters")
    names = list(chosen)
    live = [local(p.detach()) for p in chosen.values()]  # a sharded parameter: this rank's shard
    originals = [p.clone() for p in live]
    try:
        result = _forget_in_place(
            target, live, names, codes, classes, lambda1, lambda2, mode, tau, draws,
            generator, eps, chunk_size, output_fn, keep, engine, originals,
        )
    except BaseException:
        _restore(live, originals)
        raise
    result.seconds = time.perf_counter() - start
    result.calibration = calibration
    return result


@torch.no_grad()
def _restore(live: list[Tensor], originals: list[Tensor]) -> None:
    for p, original in zip(live, originals):
        p.copy_(original)


def _forget_in_place(
    model, live, names, codes, classes, lambda1, lambda2, mode, tau, draws,
    generator, eps, chunk_size, output_fn, keep, engine, originals,
) -> ForgetResult:
    before = code_accuracy(model, codes, classes, output_fn=output_fn, chunk_size=chunk_size, engine=engine)
    fisher_f, fisher_r = class_fishers(
        model, codes, classes, eps=eps, chunk_size=chunk_size, output_fn=output_fn,
        params=keep, engine=engine,
    )
    forget_list = [fisher_f[n].contiguous() for n in names]
    remain_list = [fisher_r[n].contiguous() for n in names]
    max_ratio = engine.max_ratio(forget_list, remain_list)

    if mode == "shift":
        candidates = [1, -1]

        def apply(sign: int) -> None:
            engine.shift_(live, forget_list, remain_list, max_ratio, lambda1, lambda2, float(sign))
    else:
        gen = generator or _default_generator(live[0].device)
        states = []
        candidates = list(range(draws))

        def apply(draw: int) -> None:
            if draw == len(states):
                states.append(gen.get_state())
            else:
                gen.set_state(states[draw])
            engine.gaussian_(live, forget_list, remain_list, max_ratio, lambda1, lambda2, tau, gen)

    # Each candidate is applied, scored on the codes and undone, except the last one, which
    # stays applied: when it wins, neither an undo/redo nor a re-scoring pass is needed (the
    # kernels are deterministic, so re-applying a candidate gives the same parameters and
    # accuracy it was scored with).
    accuracies = []
    for k, candidate in enumerate(candidates):
        apply(candidate)
        accuracies.append(code_accuracy(model, codes, classes, output_fn=output_fn, chunk_size=chunk_size, engine=engine))
        if k < len(candidates) - 1:
            _restore(live, originals)
    scores = [accuracy.score for accuracy in accuracies]
    if mode == "shift":
        best = 0 if scores[0] > scores[1] else 1
    else:
        best = max(range(len(scores)), key=lambda k: (scores[k], -k))
    if best != len(candidates) - 1:
        _restore(live, originals)
        if mode == "gaussian":
            final_state = gen.get_state()
        apply(candidates[best])
        if mode == "gaussian":
            gen.set_state(final_state)
    after = accuracies[best]
    return ForgetResult(
        model=model,
        sign=candidates[best] if mode == "shift" else None,
        code_accuracy_before=before,
        code_accuracy_after=after,
        seconds=0.0,
        mode=mode,
        lambda1=lambda1,
        lambda2=lambda2,
        candidate_scores=scores,
        backend=engine.backend_for(live[0].device),
    )
