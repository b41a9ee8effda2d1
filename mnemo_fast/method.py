"""The one-shot forgetting method, written once against an engine (docs/METHOD.md).

Data flows one way: codes -> (engine) Fisher pair -> (engine) candidate perturbations, each
scored on the codes and undone -> the best candidate applied -> result. ``mnemo_fast`` and
``mnemo_fast.reference`` expose these functions bound to the fast and the reference engine.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch

from . import engines, validation
from .calibration import blocks as _blocks
from .calibration import dampen as _dampen
from . import verdict as verdicts
from .calibration import DEFAULT_LAMBDA2, Calibration, Criterion, SearchOptions, calibrate_session, warn_if_unmet
from .codes import MnemonicCodes
from .dtypes import accumulation_dtype
from .fast.devices import default_generator  # cuda:0 is index 0, not "the current device"
from .modeling import OutputFn, eval_mode, logits_of
from .stack import user_stacklevel
from .validation import ForgetWarning
from .verdict import Verdict
from .session import (  # noqa: F401 (re-exported: the method's vocabulary)
    CandidateSession,
    CodeAccuracy,
    ParamSelector,
    accuracy_of,
    code_inputs,
    correct_predictions,
    fisher_of,
    model_dtype_device,
    only_parameters,
    parameter_filter,
)

Tensor = torch.Tensor
MODES = ("shift", "gaussian", "dampen")
#: ``calibration=`` options that mode="dampen" takes: the criterion's (its search has no others)
DAMPEN_OPTIONS = ("depth", "max_forget_prob", "min_retain_margin", "heldout")


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
    calibration: Calibration | None = None  # with lambda1="auto": how lambda1 was chosen
    verdict: Verdict | None = None  # is the result clean, by the codes (and a retain sample)? mnemo_fast/verdict.py

    @property
    def flagged(self) -> bool:
        """The verdict flags the result (``verdict.reasons`` say why)."""
        return self.verdict is not None and self.verdict.flagged


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
    if not torch.is_tensor(inputs) or not torch.is_tensor(targets):
        raise TypeError(f"inputs and targets must be tensors, got {type(inputs).__name__} and {type(targets).__name__}")
    if inputs.shape[0] == 0 or targets.shape != (inputs.shape[0],):
        raise ValueError(
            f"need N >= 1 inputs and targets of shape [N]; got inputs {tuple(inputs.shape)} "
            f"and targets {tuple(targets.shape)}"
        )
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be class indices (an integer tensor), got {targets.dtype}")
    chunk_size = validation.chunk_size(chunk_size)
    engine = engines.resolve(engine)
    with engines.forwards(engine, model), eval_mode(model), only_parameters(model, params):
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
    element no code touches ends at eps/|C| (docs/METHOD.md, "Fisher information from the codes").
    """
    eps = validation.number("eps", eps, strict=False)  # 0 gives the plain Fisher average (no floor)
    chunk_size = validation.chunk_size(chunk_size)
    validation.usable_codes(codes)
    engine = engines.resolve(engine)
    forget = validation.forget_classes(codes, forget_classes)
    remain = [c for c in range(codes.num_classes) if c not in forget]

    def pair() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return tuple(
            fisher_of(engine, model, *code_inputs(model, codes, classes), len(classes), codes.per_class,
                      eps, chunk_size, output_fn)
            for classes in (forget, remain)
        )

    with engines.forwards(engine, model), eval_mode(model), only_parameters(model, params):
        return pair()


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
    lambda1, lambda2 = validation.number("lambda1", lambda1), validation.number("lambda2", lambda2)
    engine = engines.resolve(engine)
    names = _aligned(forget_fisher, remain_fisher)
    forget = [forget_fisher[n].contiguous() for n in names]
    remain = [remain_fisher[n].contiguous() for n in names]
    shifts = [torch.zeros_like(f, dtype=accumulation_dtype(f.dtype)) for f in forget]
    validation.representable({"lambda1": lambda1, "lambda2": lambda2}, forget)
    max_ratio = engine.max_ratio(forget, remain)
    engine.shift_(shifts, forget, remain, max_ratio, lambda1, lambda2, 1.0)
    # |shift| <= min(lambda1 * max_ratio, lambda2): proven finite from [L] numbers where it can be
    validation.result_finite(names, shifts, max_ratio, {n: 0.0 for n in names}, lambda1, lambda2, "shift")
    return dict(zip(names, shifts))


@torch.no_grad()
def perturb_(model: torch.nn.Module, shifts: Mapping[str, Tensor], sign: int) -> torch.nn.Module:
    """``w <- w + sign * shift`` for each named parameter in ``shifts``; returns ``model``."""
    sign = validation.sign(sign)
    params = dict(model.named_parameters())
    unknown = [name for name in shifts if name not in params]
    if unknown:
        raise ValueError(f"shifts name parameters the model does not have: {unknown}")
    for name, step in shifts.items():
        if not torch.is_tensor(step) or not step.is_floating_point():
            raise TypeError(f"shift for {name!r} must be a floating-point tensor, got {getattr(step, 'dtype', type(step))}")
        if step.shape != params[name].shape:
            raise ValueError(f"shift for {name!r} has shape {tuple(step.shape)}, parameter {tuple(params[name].shape)}")
    # all or nothing: every new value is checked (one tensor at a time) before any is written
    for name, step in shifts.items():
        if not bool(torch.isfinite(params[name] + (sign * step).to(params[name].dtype)).all()):
            raise validation.UnlearningError(
                f"perturb_ would make parameter {name!r} NaN or inf (its shift is not finite or "
                f"overflows {params[name].dtype}); the model was left as it was")
    for name, step in shifts.items():
        params[name].add_((sign * step).to(params[name].dtype))
    return model


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
    chunk_size = validation.chunk_size(chunk_size)
    validation.usable_codes(codes)
    forget = validation.forget_classes(codes, forget_classes)
    inputs, labels = code_inputs(model, codes, range(codes.num_classes))
    engine = engines.resolve(engine)
    score = getattr(engine, "correct", correct_predictions)
    with engines.forwards(engine, model):
        correct = score(model, inputs, labels, chunk_size, output_fn)
    is_forget = torch.isin(labels, torch.tensor(forget, device=labels.device))
    return accuracy_of(correct, is_forget)


def forget(
    model: torch.nn.Module,
    codes: MnemonicCodes,
    forget_classes: Iterable[int] | int,
    *,
    lambda1: float | str,
    lambda2: float | Sequence[float] | None = None,
    mode: str = "shift",
    tau: float = 1.0,
    draws: int = 2,
    inplace: bool = False,
    generator: torch.Generator | None = None,
    eps: float = 1e-16,
    chunk_size: int | None = None,
    output_fn: OutputFn = logits_of,
    params: ParamSelector = None,
    calibration: Mapping[str, object] | None = None,
    engine=None,
    retain: tuple[Tensor, Tensor] | None = None,
) -> ForgetResult:
    """Make ``model`` forget ``forget_classes`` in one shot, from the codes alone.

    mode="shift" (the paper): w += s * alpha_l * eta with one sign s for the model, the sign
    with the better code score A_R + E_F (+1 only if strictly better). mode="gaussian": w +=
    [eta > tau] * alpha_l * eta * z, z ~ N(0, 1) from ``generator`` (torch's default one if
    None), best of ``draws`` draws by the same score. mode="dampen" (after Selective Synaptic
    Dampening, from the codes' Fisher): w *= min(lambda2 / eta, 1) where eta > lambda1, so
    ``lambda1`` is the threshold and ``lambda2`` SSD's lambda (default 1); with
    ``lambda1="auto"`` the threshold is one notch below the largest of a scan whose result meets
    the forget side (:mod:`mnemo_fast.calibration.dampen`; docs/METHOD.md, "Dampening");
    ``calibration`` then takes only the criterion's options and ``heldout``; with ``params=None``
    norms and embeddings are left alone. Candidates are applied, scored and undone on one
    copy of the parameters; no model is copied per candidate.

    ``lambda1="auto"`` chooses lambda1 from the codes alone (:func:`mnemo_fast.calibration.calibrate`;
    ``lambda2`` may then be left out, for the search's own ``DEFAULT_LAMBDA2`` = 10, or be a list
    to search too; a fixed ``lambda1`` needs ``lambda2``; ``calibration`` passes its criterion options,
    e.g. ``{"depth": 0.5}``), on the same Fisher pair as the forgetting itself; the choice is a
    :class:`mnemo_fast.calibration.Calibration` in ``result.calibration``. Two more
    ``calibration`` options refine it (:mod:`mnemo_fast.calibration.blocks`, docs/METHOD.md, "Per-block
    steps and held-out scoring"): ``"blocks"`` scales the chosen step per block, by top-level
    module (``"module"``, **the default** in shift mode), per layer of a repeated stack
    (``"layer"``: a transformer's encoder layers) or per tensor (``"tensor"``); the scales
    are in ``result.calibration.diagnostics["blocks"]``; ``"blocks": False`` keeps the global
    step alone (the calibration before per-block steps). ``"heldout": True`` (or a number of
    codes, K >= 2) takes the Fisher from some of each class's codes and scores the search on
    the others.
    ``params`` perturbs only the selected parameters (e.g. ``"blocks.11.*"``: the last
    block), computing the Fisher for those alone; ``chunk_size`` bounds how many codes go
    through the model at once; ``output_fn`` picks the logits from a model that returns an
    object or a dict (default: the tensor itself, ``.logits`` or ``["logits"]``).

    A new model is returned unless ``inplace=True``; in-place edits happen completely or not
    at all (any failure restores the parameters and, in Gaussian mode, the generator's state).
    Bad input raises ``UnlearningError`` (a ValueError), a value of the wrong kind ``TypeError``,
    before the model is touched; a chosen candidate that leaves a parameter NaN or inf is undone
    and raises (docs/METHOD.md, "Inputs that are refused"). A result that the codes say did not
    work (a forget class still recognised, or most retained codes lost) warns with
    :class:`ForgetWarning` (docs/METHOD.md, "When forget warns").

    Every result carries a ``verdict`` (:class:`mnemo_fast.verdict.Verdict`; ``result.flagged``):
    the criterion of ``lambda1="auto"`` judged on the codes after the step, and, with ``retain=(x,
    y)``, real samples of the remaining classes (a validation split: their accuracy may drop at
    most 2 points; rows of a forget class must end at most 1% right). The Fisher still comes from
    the codes alone. A flagged result is returned with a :class:`ForgetWarning` (docs/METHOD.md,
    "The verdict").
    """
    start = time.perf_counter()
    args = _checked(model, codes, forget_classes, lambda1=lambda1, lambda2=lambda2, mode=mode, tau=tau, draws=draws,
                    generator=generator, eps=eps, chunk_size=chunk_size, output_fn=output_fn, params=params,
                    calibration=calibration, inplace=inplace, engine=engine, retain=retain)
    with engines.forwards(args.engine, model):
        session = _open_session(model, codes, args)
        run = _run_candidates(session, codes, args)
    warned = warn_if_unmet(run.calibration, run.before, run.after) or (
        run.calibration is not None and not run.calibration.feasible)  # an infeasible calibration has warned
    if not warned:
        warned = _warn_if_not_forgotten(session, args.classes, run.before, run.after, run.lambda1, args.auto, mode)
    if run.verdict.flagged and not warned:  # the verdict's reasons, where no warning above said it
        warnings.warn(f"forget {list(args.classes)}: the result is flagged ({run.verdict.evidence}): "
                      + "; ".join(run.verdict.reasons), ForgetWarning, stacklevel=user_stacklevel())
    return ForgetResult(
        model=session.model,
        sign=run.candidates[run.best] if mode == "shift" else None,  # dampen: no sign
        code_accuracy_before=run.before,
        code_accuracy_after=run.after,
        seconds=time.perf_counter() - start,
        mode=mode,
        lambda1=run.lambda1,
        lambda2=run.lambda2,
        candidate_scores=[accuracy.score for accuracy in run.accuracies],
        backend=args.engine.backend_for(session.live[0].device),
        calibration=run.calibration,
        verdict=run.verdict,
    )


@dataclass(frozen=True)
class _Arguments:
    """:func:`forget`'s arguments as checked by :func:`_checked`, and what the checks found."""

    lambda1: float | str
    lambda2: float | list[float]
    auto: bool
    mode: str
    tau: float
    draws: int
    generator: torch.Generator | None
    eps: float
    chunk_size: int | None
    output_fn: OutputFn
    params: ParamSelector
    inplace: bool
    search: SearchOptions | None       # lambda1="auto": the search's options
    refine: dict                       # lambda1="auto": blocks, heldout (mnemo_fast.calibration.blocks)
    classes: list[int]
    fisher_codes: MnemonicCodes        # the codes the Fisher pair comes from
    scoring_codes: MnemonicCodes | None  # held-out scoring: the codes the choice is scored on
    engine: engines.Engine
    largest: dict[str, float]          # max |w| per parameter: proves the result finite later
    retain: tuple[Tensor, Tensor] | None  # a real sample (inputs, labels) for the verdict


def _checked(model, codes, forget_classes, *, lambda1, lambda2, mode, tau, draws, generator, eps, chunk_size,
             output_fn, params, calibration, inplace, engine, retain) -> _Arguments:
    """Every check of :func:`forget`, in its order, before anything runs on the model
    (docs/REFUSALS.md): the tests name which error comes first."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "dampen":  # lambda2 is SSD's lambda, one number: min(lam / eta, 1)
        if isinstance(lambda2, (list, tuple)) or (torch.is_tensor(lambda2) and lambda2.dim() > 0):
            raise TypeError(f"mode='dampen' takes one lambda2 (the dampening's lam), got {lambda2!r}")
        lambda2 = _dampen.DEFAULT_LAM if lambda2 is None else lambda2
    if lambda2 is None:  # "auto" starts its search from the calibration's own lambda2
        if not (isinstance(lambda1, str) and lambda1 == "auto"):
            validation.lambdas(lambda1, DEFAULT_LAMBDA2)  # a bad lambda1 is named first
            raise TypeError(f"forget() with a fixed lambda1={lambda1!r} needs lambda2 (a number > 0, e.g. "
                            f"{DEFAULT_LAMBDA2:g}); only lambda1='auto' has a default lambda2")
        lambda2 = DEFAULT_LAMBDA2
    lambda1, lambda2 = validation.lambdas(lambda1, lambda2)
    auto = lambda1 == "auto"
    if mode == "dampen":
        lambda2 = lambda2[0] if isinstance(lambda2, list) else lambda2  # "auto" returns the candidates' list
        unknown = [name for name in (calibration or {}) if name not in DAMPEN_OPTIONS]
        if unknown:
            raise validation.UnlearningError(f"calibration option {unknown[0]!r} is not one of mode='dampen' "
                                             f"(it takes {', '.join(DAMPEN_OPTIONS)})")
    if mode == "gaussian":
        tau = validation.number("tau", tau, strict=False)
        draws = validation.integer("draws", draws, minimum=1)
        generator = validation.generator(generator)
    eps = validation.number("eps", eps)  # it floors f_R, the divisor of eta
    chunk_size = validation.chunk_size(chunk_size)
    if calibration and not auto:
        raise validation.UnlearningError(f"calibration options {calibration!r} need lambda1='auto', got lambda1={lambda1:g}")
    # blocks (per-block steps: by module unless calibration says otherwise, in shift mode), heldout
    search, refine = (_blocks.refinement_options(calibration, _blocks.DEFAULT if mode == "shift" else None)
                      if auto else ({}, {}))
    # mode="dampen": None means "the dampening's own criterion" (mnemo_fast.calibration.dampen.criterion_for)
    search = SearchOptions.from_calibration(search) if auto and (mode != "dampen" or search) else None
    validation.usable_codes(codes)
    classes = validation.forget_classes(codes, forget_classes)
    retain = validation.retain_sample(retain, codes, classes)
    if refine.get("blocks") and mode != "shift":
        raise validation.UnlearningError("calibration option blocks needs mode='shift'")
    fisher_codes, scoring_codes = _blocks.split_codes(codes, refine["heldout"]) if "heldout" in refine else (codes, None)
    validation.copyable(model, inplace)  # before anything runs: a sharded model is edited in place only
    engine = engines.resolve(engine)
    largest = validation.trainable_model(model)
    validation.representable({"lambda1": lambda1, "lambda2": lambda2}, model.parameters())
    validation.batch_statistics(model)
    validation.finite_buffers(model)
    if mode == "dampen" and params is None:  # norms and embeddings left alone (calibration/dampen.py),
        default = _dampen.default_params(model)   # unless nothing else is trainable
        params = default if any(map(default, largest)) else None
    if not any(map(parameter_filter(params), largest)):
        raise validation.UnlearningError(f"params={params!r} selects none of the trainable parameters")
    return _Arguments(lambda1, lambda2, auto, mode, tau, draws, generator, eps, chunk_size, output_fn, params, inplace,
                      search, refine, classes, fisher_codes, scoring_codes, engine, largest, retain)


def _open_session(model: torch.nn.Module, codes: MnemonicCodes, args: _Arguments) -> CandidateSession:
    """The candidate session on ``model`` (``inplace``) or on its copy, after one forget code's
    forward proves the codes fit the model with logits that depend on the selected parameters."""
    batch = code_inputs(model, codes, range(codes.num_classes))  # built once: the probe's and the session's
    first = args.classes[0] * codes.per_class  # the first code of the first forget class
    with only_parameters(model, args.params):  # the probe's logits must depend on the perturbed parameters
        validation.code_batch_fits(model, codes, batch[0][first : first + 1], args.output_fn)
    target = model if args.inplace else validation.copy_of(model)
    return CandidateSession(target, args.fisher_codes, args.classes, engine=args.engine, eps=args.eps,
                            chunk_size=args.chunk_size, output_fn=args.output_fn, params=args.params,
                            source=None if args.inplace else model,
                            batch=batch if args.fisher_codes is codes else None)


@dataclass
class _Run:
    """What :func:`_run_candidates` chose: the applied candidate is ``candidates[best]``."""

    before: CodeAccuracy
    calibration: Calibration | None
    lambda1: float
    lambda2: float
    candidates: list
    accuracies: list[CodeAccuracy]
    best: int
    verdict: Verdict

    @property
    def after(self) -> CodeAccuracy:
        return self.accuracies[self.best]


def _run_candidates(session: CandidateSession, codes: MnemonicCodes, args: _Arguments) -> _Run:
    """Score the codes before, calibrate (``lambda1="auto"``), apply the chosen candidate and
    prove every parameter finite. Any failure restores the parameters and, in Gaussian mode,
    the generator's state, then raises: in-place edits happen completely or not at all."""
    classes, lambda1, lambda2, generator = args.classes, args.lambda1, args.lambda2, args.generator
    generator_state, steps, calibration = None, None, None
    try:
        if args.scoring_codes is not None:  # held-out scoring: the Fisher from some codes, the choice on the others
            session.score_on(args.scoring_codes, classes)
        before = session.accuracy_before()
        if session.logits_before is not None:  # the Fisher's forwards (or one plain pass) gave them
            validation.finite_logits(session.logits_before, session.labels)
        session.before_logits()  # kept for the verdict (an engine scoring the codes itself: one pass now)
        if args.retain is not None:
            session.use_retain_sample(*args.retain)
        validation.forget_fisher_nonzero(session.forget_fisher, session.max_ratio, args.eps, len(classes),
                                         codes.num_classes - len(classes), args.engine)
        if args.mode == "dampen":
            criterion, confirm = _dampen_criteria(session, args)
            if args.auto:  # the threshold scan leaves the chosen dampening applied, and its verdict
                calibration = _dampen.calibrate_dampening(session, lambda2, criterion, classes, confirm=confirm)
                lambda1, verdict = calibration.lambda1, calibration.diagnostics["verdict"]
            else:
                session.dampen(lambda1, lambda2)
                verdict = _verdict(session, args, confirm)
            best, candidates, accuracies = 0, [None], [session.accuracy()]  # |w| only shrinks: finite as it was
            return _Run(before, calibration, lambda1, lambda2, candidates, accuracies, best, verdict)
        if args.auto:  # its search starts from the lambda2 candidates
            calibration = calibrate_session(session, lambda2, args.search)
            lambda1, lambda2 = calibration.lambda1, calibration.lambda2
            if args.refine.get("blocks"):
                steps = calibration.diagnostics["blocks"] = _blocks.block_steps(session, calibration,
                                                                                by=args.refine["blocks"])
        if args.mode == "gaussian":
            if generator is None:
                generator = default_generator(session.live[0].device)
            generator_state = generator.get_state()  # given back if anything below fails
        if steps is not None:  # the blocks' sign and its step scaled per block (mnemo_fast.calibration.blocks),
            # scored once: what session.choose does with one sign, without scoring the unscaled step
            session.shift(lambda1, lambda2, steps.sign)
            _blocks.apply_scales(session, steps.tensor_scales)
            best, candidates, accuracies = 0, [steps.sign], [session.accuracy()]
            bound = max(1.0, steps.gain)
        else:
            best, candidates, accuracies = session.choose(
                args.mode, lambda1, lambda2, tau=args.tau, draws=args.draws, generator=generator,
                sign=calibration.sign if calibration is not None and args.mode == "shift" else None)
            bound = 1.0
        validation.result_finite(session.names, session.live, session.max_ratio, args.largest, lambda1 * bound,
                                 lambda2 * bound, args.mode, args.engine)
        verdict = _verdict(session, args)
    except BaseException:
        session.restore()
        if generator_state is not None:
            generator.set_state(generator_state)
        raise
    return _Run(before, calibration, lambda1, lambda2, candidates, accuracies, best, verdict)


def _dampen_criteria(session: CandidateSession, args: _Arguments) -> tuple[Criterion, Criterion]:
    """mode="dampen"'s (search, verdict) criteria: the caller's ``calibration=`` options for
    both, else the dampening's own (:mod:`mnemo_fast.calibration.dampen`: the search relaxed on
    the codes where the retain sample's forget-class rows judge the forgetting, the verdict not)."""
    has_rows = session.retain_labels is not None and bool(
        torch.isin(session.retain_labels, torch.tensor(args.classes, device=session.retain_labels.device)).any())
    options = args.search.criterion if args.search is not None else None
    return _dampen.criterion_for(options, has_rows), _dampen.verdict_criterion_for(options)


def _verdict(session: CandidateSession, args: _Arguments, criterion: Criterion | None = None) -> Verdict:
    """The :class:`Verdict` of the step left applied (:meth:`CandidateSession.verdict`):
    ``criterion`` (else the caller's ``calibration=`` options, else the defaults) on the codes
    after it, and the retain sample's accuracies where one was given."""
    if criterion is None:
        criterion = args.search.criterion if args.search is not None else Criterion()
    return session.verdict(criterion, args.classes)


#: A forget class counts as still recognised when more than this fraction of its codes is
#: still classified as the class after the step (with one code per class: that code); the
#: retained codes count as lost when at most this fraction of them is still right after it.
RECOGNISED = 0.5


def _warn_if_not_forgotten(session: CandidateSession, classes: Sequence[int], before: CodeAccuracy,
                           after: CodeAccuracy, lambda1: float, auto: bool, mode: str) -> bool:
    """A :class:`ForgetWarning` when the codes say the step did not work: a forget class whose
    codes are still recognised (:data:`RECOGNISED`), or retained codes mostly right before and
    mostly wrong after. The per-class count runs only when some forget code is still right."""
    problems = []
    if after.forget > 0:
        kept = session.class_accuracy(session.hits, classes)
        still = [(c, a) for c, a in zip(classes, kept) if a > RECOGNISED]
        if still:
            was = dict(zip(classes, session.class_accuracy(session.hits_before, classes)))
            more = f" and {len(still) - 10} more" if len(still) > 10 else ""
            names = ", ".join(str(c) for c, _ in still[:10]) + more
            shown = ", ".join(f"class {c} {was[c]:.0%} -> {a:.0%}" for c, a in still[:10])
            if not auto:
                hint = (f"try lambda1='auto' or a smaller threshold lambda1 than {lambda1:g}" if mode == "dampen"
                        else f"try lambda1='auto' or a larger lambda1 than {lambda1:g}")
            elif mode == "gaussian":
                hint = "the Gaussian draws did not move its codes: try more draws or mode='shift'"
            else:
                hint = "check that the codes stand for the class in this model (mnemo_fast.diagnose)"
            one = len(still) == 1
            problems.append(f"{'class' if one else 'classes'} {names} still recognised after the step (codes "
                            f"classified as their class, before -> after: {shown}), so "
                            f"{'it' if one else 'they'} may not be forgotten; {hint}")
    if after.retain <= RECOGNISED < before.retain:
        hint = ("check the model on real samples" if auto else
                f"try lambda1='auto' or a {'larger' if mode == 'dampen' else 'smaller'} lambda1 than {lambda1:g}")
        problems.append(f"the step left {after.retain:.0%} of the retained classes' codes classified correctly "
                        f"(before: {before.retain:.0%}), so the model may be damaged; {hint}")
    if problems:
        warnings.warn(f"forget {list(classes)}: " + "; and ".join(problems), ForgetWarning,
                      stacklevel=user_stacklevel())
    return bool(problems)
