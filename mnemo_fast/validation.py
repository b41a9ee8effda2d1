"""Checks on what a caller hands to the method and on what the method hands back.

Every input check runs before the model is touched, so a failure leaves the caller's model as
it was. A bad value raises :class:`UnlearningError` (a ValueError) and a value of the wrong
kind (a string or a bool for a number, a float for a class) raises ``TypeError``; the message
names the argument, the value and what is allowed. docs/REFUSALS.md lists every case. The
result checks (:func:`result_finite`) run after the chosen candidate is applied and leave the
rollback to the caller's session.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import types
from collections import OrderedDict
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from .codes import MnemonicCodes
from .dtypes import accumulation_dtype
from .modeling import eval_mode
from .sharding import any_sharded, local

Tensor = torch.Tensor

#: |z| of a Gaussian draw never reaches this (Box-Muller on 64-bit uniforms stays below 10):
#: the bound that proves a Gaussian candidate finite without reading the parameters again.
GAUSSIAN_BOUND = 1e3


class UnlearningError(ValueError):
    """Bad input to an unlearning call (a ValueError, so ``except ValueError`` catches it)."""


class ForgetWarning(UserWarning):
    """A forget whose result on the codes says it may not have worked: a forget class whose
    codes are still recognised after the step, or retained codes mostly misclassified by it
    (:func:`mnemo_fast.forget`; docs/METHOD.md, "When forget warns"). The calibration's
    :class:`mnemo_fast.calibration.CalibrationWarning` is one too."""


# ---- numbers -------------------------------------------------------------------------------

def _is_bool(value: object) -> bool:
    return isinstance(value, (bool, np.bool_)) or (torch.is_tensor(value) and value.dtype == torch.bool)


def _scalar(name: str, value: object, allowed: str) -> object:
    """A Python scalar from a Python number, a numpy scalar or a 0-d tensor; TypeError else."""
    if _is_bool(value):
        raise TypeError(f"{name} must be {allowed}, got the bool {value!r}")
    if torch.is_tensor(value):
        if value.dim() != 0 or value.is_complex() or value.device.type == "meta":
            raise TypeError(f"{name} must be {allowed}, got a tensor of shape {tuple(value.shape)} "
                            f"({value.dtype}, {value.device.type}); only 0-d real tensors are numbers")
        return value.item()
    if (isinstance(value, np.ndarray) and value.ndim == 0) or isinstance(value, np.generic):
        return value.item()
    return value


def number(name: str, value: object, *, minimum: float = 0.0, strict: bool = True,
           maximum: float = math.inf) -> float:
    """``value`` as a finite float in (minimum, maximum] (``strict``) or [minimum, maximum].

    Accepts Python numbers, numpy scalars and 0-d tensors; bools and strings are TypeErrors,
    NaN, inf and values out of range are :class:`UnlearningError`."""
    low = "(" if strict else "["
    allowed = f"a finite number in {low}{minimum:g}, {maximum:g}]" if math.isfinite(maximum) else (
        f"a finite number {'>' if strict else '>='} {minimum:g}")
    scalar = _scalar(name, value, allowed)
    if not isinstance(scalar, numbers.Real):
        raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    try:
        result = float(scalar)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result) or result > maximum or result < minimum or (strict and result == minimum):
        raise UnlearningError(f"{name} must be {allowed}, got {scalar!r}")
    return result


def integer(name: str, value: object, *, minimum: int) -> int:
    """``value`` as an int >= ``minimum``: Python and numpy integers and 0-d integer tensors;
    bools, floats (even ``3.0``) and strings are TypeErrors."""
    allowed = f"an integer >= {minimum}"
    scalar = _scalar(name, value, allowed)
    if not isinstance(scalar, numbers.Integral):
        raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    if int(scalar) < minimum:
        raise UnlearningError(f"{name} must be {allowed}, got {scalar!r}")
    return int(scalar)


def sign(value: object) -> int:
    """+1 or -1 (a number equal to one of them; bools and strings are TypeErrors)."""
    scalar = _scalar("sign", value, "+1 or -1")
    if not isinstance(scalar, numbers.Real):
        raise TypeError(f"sign must be +1 or -1, got {value!r} ({type(value).__name__})")
    if scalar not in (1, -1):
        raise UnlearningError(f"sign must be +1 or -1, got {value!r}")
    return int(scalar)


def chunk_size(value: object) -> int | None:
    """None (all codes in one pass) or an integer >= 1."""
    return None if value is None else integer("chunk_size", value, minimum=1)


def lambdas(lambda1: object, lambda2: object) -> tuple[float | str, float | list[float]]:
    """(lambda1, lambda2) checked: lambda1 a finite number > 0 or "auto"; lambda2 a finite
    number > 0, or with "auto" also a non-empty list of them (each a candidate)."""
    if isinstance(lambda1, str):
        if lambda1 != "auto":
            raise UnlearningError(f"lambda1 must be a finite number > 0 or 'auto', got {lambda1!r}")
        return lambda1, lambda2_list(lambda2)
    lambda1 = number("lambda1", lambda1)
    if isinstance(lambda2, (list, tuple, np.ndarray)) or (torch.is_tensor(lambda2) and lambda2.dim() > 0):
        raise TypeError(f"lambda2 must be one finite number > 0 (a list of candidates only with "
                        f"lambda1='auto'), got {lambda2!r}")
    return lambda1, number("lambda2", lambda2)


def representable(values: Mapping[str, float | str | Sequence[float]], tensors: Iterable[Tensor]) -> None:
    """Each lambda fits the dtype the shift is computed in (float32, or float64 for float64
    tensors): a larger one cannot enter the computation (the result would be inf or NaN)."""
    dtype = min((accumulation_dtype(t.dtype) for t in tensors if t.is_floating_point()), key=lambda d: torch.finfo(d).max,
                default=torch.float32)
    largest = torch.finfo(dtype).max
    for name, value in values.items():
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if not isinstance(v, str) and v > largest:
                raise UnlearningError(f"{name}={v:g} is larger than the largest {dtype} ({largest:g}), the "
                                      f"dtype the shift is computed in: use a smaller {name}")


def lambda2_list(lambda2: object) -> list[float]:
    """The lambda2 candidates of ``lambda1="auto"``: one number or a non-empty sequence of
    them (list, tuple, 1-d array or tensor), each finite and > 0."""
    if isinstance(lambda2, str):
        raise TypeError(f"lambda2 must be a finite number > 0 or a list of them, got the string {lambda2!r}")
    if isinstance(lambda2, (list, tuple, np.ndarray)) or (torch.is_tensor(lambda2) and lambda2.dim() > 0):
        values = [number(f"lambda2[{k}]", v) for k, v in enumerate(list(lambda2))]
        if not values:
            raise UnlearningError("lambda2 is an empty list: give at least one candidate")
        return values
    return [number("lambda2", lambda2)]


def _range(name: str, value: object) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a pair (lo, hi) of finite numbers, 0 < lo < hi; got {value!r}")
    pair = list(value)
    if len(pair) != 2:
        raise UnlearningError(f"{name} must be a pair (lo, hi) of finite numbers, 0 < lo < hi; got {value!r}")
    lo, hi = number(f"{name}[0]", pair[0]), number(f"{name}[1]", pair[1])
    if not lo < hi:
        raise UnlearningError(f"{name} must be a pair (lo, hi) of finite numbers, 0 < lo < hi; got {value!r}")
    return lo, hi


#: What the calibration options must be (name -> check); options the search takes but that are
#: not listed here are passed through unchecked.
CALIBRATION_CHECKS: dict[str, Callable[[str, object], object]] = {
    "depth": lambda n, v: number(n, v, strict=False),
    "max_forget_prob": lambda n, v: number(n, v, maximum=1.0),
    "min_retain_margin": lambda n, v: number(n, v, strict=False),
    "lambda1_range": _range,
    "steps": lambda n, v: integer(n, v, minimum=0),
}


def calibration_options(options: Mapping[str, object] | None, accepted: Iterable[str]) -> dict[str, object]:
    """The ``calibration=`` options of ``forget(lambda1="auto")``, checked: names the search
    accepts (``accepted``), values in range (:data:`CALIBRATION_CHECKS`)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"calibration must be a dict of options or None, got {options!r}")
    accepted = set(accepted)
    checked = {}
    for name, value in options.items():
        if name not in accepted:
            raise TypeError(f"calibration option {name!r} is unknown; allowed: {sorted(accepted)}")
        check = CALIBRATION_CHECKS.get(name)
        checked[name] = value if check is None else check(name, value)
    return checked


def generator(value: object) -> torch.Generator | None:
    """None (torch's default generator) or a ``torch.Generator``."""
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {value!r}")
    return value


# ---- classes and codes -----------------------------------------------------------------------

_CLASSES = "an int, a numpy integer, a 0-d integer tensor, or a list of them"


def _class(value: object, where: str) -> int:
    if _is_bool(value) or isinstance(value, (str, bytes)):
        raise TypeError(f"forget_classes must be {_CLASSES}; got {value!r}{where}")
    scalar = value.item() if torch.is_tensor(value) and value.dim() == 0 else value
    scalar = scalar.item() if isinstance(scalar, np.ndarray) and scalar.ndim == 0 else scalar
    if not isinstance(scalar, numbers.Integral) or _is_bool(scalar):
        raise TypeError(f"forget_classes must be {_CLASSES}; got {value!r} ({type(value).__name__}){where}")
    return int(scalar)


def forget_classes(codes: MnemonicCodes, classes: Iterable[int] | int) -> list[int]:
    """Sorted unique forget classes. Strings ("12" is not classes 1 and 2), floats, bools and
    None are TypeErrors; empty, unknown or all classes are :class:`UnlearningError`."""
    if isinstance(classes, (str, bytes)) or classes is None or _is_bool(classes):
        raise TypeError(f"forget_classes must be {_CLASSES}; got {classes!r}")
    if (torch.is_tensor(classes) and classes.dim() == 0) or (isinstance(classes, np.ndarray) and classes.ndim == 0) \
            or isinstance(classes, (numbers.Number, np.generic)):
        values = [_class(classes, "")]
    elif isinstance(classes, Iterable):
        values = [_class(c, f" in {classes!r}") for c in classes]
    else:
        raise TypeError(f"forget_classes must be {_CLASSES}; got {classes!r} ({type(classes).__name__})")
    try:
        chosen = sorted(set(codes.check_classes(values)))
    except ValueError as error:
        raise UnlearningError(f"forget_classes: {error}") from None
    if not chosen:
        raise UnlearningError("forget_classes is empty: name at least one class to forget")
    if len(chosen) == codes.num_classes:
        raise UnlearningError(
            f"forget_classes names all {codes.num_classes} classes: at least one must remain"
        )
    return chosen


def usable_codes(codes: object) -> MnemonicCodes:
    """MnemonicCodes with values: on a real device (not meta); floating point and finite, or
    token ids (int64 within their vocabulary range, checked by MnemonicCodes itself)."""
    if not isinstance(codes, MnemonicCodes):
        raise TypeError(f"codes must be a MnemonicCodes (MnemonicCodes.generate or .load), got {type(codes).__name__}")
    t = codes.tensor
    if t.device.type == "meta":
        raise UnlearningError("the codes are on the meta device (shapes without values): move them to a "
                              "real device, e.g. codes.to('cpu')")
    if codes.is_tokens:
        return codes
    if not t.is_floating_point():
        raise UnlearningError(f"the codes must be floating point, got {t.dtype}")
    if not all_finite([t]):
        bad = (~torch.isfinite(t.reshape(t.shape[0], -1))).any(1).nonzero().view(-1).tolist()
        raise UnlearningError(f"the codes of class(es) {bad} contain NaN or inf")
    return codes


def retain_sample(retain: object, codes: MnemonicCodes, classes: Sequence[int]) -> tuple[Tensor, Tensor] | None:
    """``forget(..., retain=(x, y))``: real samples ``x`` [M, *codes.shape] (floating point and
    finite, or token ids like the codes) with labels ``y`` [M] (integers in 0..C-1), at least one
    of a remaining class; rows of a forget class are allowed (they check the forgetting). None
    stays None. The tensors are returned as given (the session moves them to the model)."""
    if retain is None:
        return None
    if not isinstance(retain, (tuple, list)) or len(retain) != 2:
        raise TypeError(f"retain must be a pair (inputs, labels) of tensors, got {type(retain).__name__}")
    x, y = retain
    if not torch.is_tensor(x) or not torch.is_tensor(y):
        raise TypeError(f"retain must be a pair of tensors (inputs [M, ...], labels [M]), got "
                        f"({type(x).__name__}, {type(y).__name__})")
    if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise UnlearningError(f"retain labels must be a 1-D integer tensor [M], got {y.dtype} of shape {tuple(y.shape)}")
    if x.shape[0] != y.shape[0] or y.shape[0] == 0:
        raise UnlearningError(f"retain needs as many inputs as labels, at least one: got {x.shape[0]} inputs "
                              f"and {y.shape[0]} labels")
    if tuple(x.shape[1:]) != tuple(codes.shape):
        raise UnlearningError(f"retain inputs are of shape {list(x.shape[1:])} per sample, the codes of shape "
                              f"{list(codes.shape)}: both must be what the model takes")
    if codes.is_tokens:
        if x.is_floating_point():
            raise UnlearningError(f"the codes are token ids, the retain inputs are {x.dtype}: pass token ids")
    elif not x.is_floating_point():
        raise UnlearningError(f"retain inputs must be floating point like the codes, got {x.dtype}")
    elif not all_finite([x]):
        raise UnlearningError("the retain inputs contain NaN or inf")
    bad = sorted(set(int(c) for c in y[(y < 0) | (y >= codes.num_classes)].tolist()))
    if bad:
        raise UnlearningError(f"retain labels {bad[:10]} are not classes of the codes (0..{codes.num_classes - 1})")
    if bool(torch.isin(y, torch.tensor(list(classes), device=y.device)).all()):
        raise UnlearningError("every retain sample is of a forget class: a retain sample needs rows of the "
                              "remaining classes")
    return x, y


# ---- the model ------------------------------------------------------------------------------

def copyable(model: torch.nn.Module, inplace: bool) -> None:
    """A model with sharded (FSDP2/DTensor) parameters is edited in place only: checked first,
    before a calibration or a check's forward has run on it."""
    if not inplace and any_sharded(model.parameters()):
        raise UnlearningError(
            "a model with sharded (FSDP2/DTensor) parameters cannot be copied here: pass "
            "inplace=True (each rank edits its own shard, all or nothing)"
        )


def copy_of(model: torch.nn.Module) -> torch.nn.Module:
    """``copy.deepcopy(model)`` for ``inplace=False`` (:func:`plain_copy` where it gives the same
    model faster), or an error that says what to do."""
    try:
        fast = plain_copy(model)
        return fast if fast is not None else copy.deepcopy(model)
    except Exception as error:  # noqa: BLE001 (whatever deepcopy raises, the remedy is the same)
        raise UnlearningError(
            f"inplace=False forgets in a copy of the model, but copy.deepcopy failed "
            f"({type(error).__name__}: {error}); pass inplace=True to forget in the model itself "
            f"(all or nothing: any failure restores its parameters)"
        ) from error


_ATOMIC = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, type,
           types.FunctionType, types.BuiltinFunctionType)
_CONTAINERS = ("_parameters", "_buffers", "_modules")


def _atomic(value: object) -> bool:
    """A value ``copy.deepcopy`` returns as it is (numbers, strings, dtypes, devices, classes,
    plain functions) or a tuple/frozenset of them."""
    if isinstance(value, (tuple, frozenset)):
        return all(_atomic(v) for v in value)
    return isinstance(value, _ATOMIC)


def _whole_storage(t: Tensor) -> bool:
    """A plain strided tensor that alone spans its storage (so a clone equals its deepcopy)."""
    return (type(t) is torch.Tensor and t.layout == torch.strided and not t.is_quantized and t.grad is None
            and not t.requires_grad and not vars(t) and t.device.type in ("cpu", "cuda") and t.is_contiguous()
            and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size())


@torch.no_grad()
def plain_copy(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model ``copy.deepcopy`` would return, built without its generic Python: each module a
    new object of its class with a copy of its ``__dict__``, each parameter
    ``Parameter(p.data.clone(), p.requires_grad)`` (what ``Parameter.__deepcopy__`` does),
    each buffer a clone, shared modules and tensors shared in the copy as in the original.

    None (use ``copy.deepcopy``) unless that is provably the same: classes that keep
    ``nn.Module``'s copy protocol (no ``__deepcopy__``, ``__reduce_ex__``, ``__getstate__``
    of their own, no ``__setstate__`` but torch.nn's, which only fills in attributes missing
    from old pickles); attributes deepcopy would return unchanged (see
    :func:`_atomic`) or containers of them, no hook of any kind, no compiled forward;
    parameters of exactly ``nn.Parameter``; buffers plain tensors that span their own
    storage, none sharing one."""
    memo: dict[int, object] = {}
    storages: set[int] = set()
    Module = torch.nn.Module

    def module_copy(m: Module):
        if id(m) in memo:
            return memo[id(m)]
        cls = type(m)
        if (getattr(cls, "__deepcopy__", None) is not None or cls.__reduce_ex__ is not object.__reduce_ex__
                or cls.__reduce__ is not object.__reduce__ or cls.__getstate__ is not Module.__getstate__
                or not (cls.__setstate__ is Module.__setstate__  # torch's own: defaults for old pickles
                        or getattr(cls.__setstate__, "__module__", "").startswith("torch.nn.modules."))
                or "_compiled_call_impl" in m.__dict__):
            raise _NotPlain
        state = {}
        for key, value in m.__dict__.items():
            if key in _CONTAINERS:
                continue
            if _atomic(value):
                state[key] = value
            elif type(value) in (dict, OrderedDict, set, list):
                if value:  # hooks (callables) and anything else not atomic: deepcopy decides
                    items = value.items() if isinstance(value, dict) else ((v, None) for v in value)
                    if not all(_atomic(k) and _atomic(v) for k, v in items) or key.endswith("hooks"):
                        raise _NotPlain
                state[key] = type(value)(value)
            else:
                raise _NotPlain
        new = cls.__new__(cls)
        memo[id(m)] = new
        params = type(m._parameters)()
        for key, p in m._parameters.items():
            if p is not None and id(p) not in memo:
                if type(p) is not torch.nn.Parameter:
                    raise _NotPlain
                memo[id(p)] = torch.nn.Parameter(p.data.clone(memory_format=torch.preserve_format), p.requires_grad)
            params[key] = None if p is None else memo[id(p)]
        buffers = type(m._buffers)()
        for key, b in m._buffers.items():
            if b is not None and id(b) not in memo:
                if not _whole_storage(b) or b.untyped_storage().data_ptr() in storages:
                    raise _NotPlain
                if b.numel():
                    storages.add(b.untyped_storage().data_ptr())
                memo[id(b)] = b.clone(memory_format=torch.preserve_format)
            buffers[key] = None if b is None else memo[id(b)]
        modules = type(m._modules)()
        for key, child in m._modules.items():
            modules[key] = None if child is None else module_copy(child)
        state.update(_parameters=params, _buffers=buffers, _modules=modules)
        new.__dict__.update(state)
        return new

    try:
        return module_copy(model)
    except _NotPlain:
        return None


class _NotPlain(Exception):
    """:func:`plain_copy` cannot prove its copy equal to ``copy.deepcopy``'s."""


def trainable_model(model: torch.nn.Module) -> dict[str, float]:
    """The model has trainable, floating-point, finite parameters on a real device.

    Returns {name: max |w|} of each trainable parameter (a sharded one: this rank's shard), read
    in the same pass as the finiteness check; :func:`result_finite` uses it to prove the
    forgotten parameters finite without reading them again.
    """
    # a sharded parameter is checked on this rank's shard (forget_distributed agrees across ranks)
    params = [(n, local(p)) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise UnlearningError("the model has no trainable parameters (requires_grad=True) to perturb")
    for name, p in params:
        if not p.is_floating_point():
            raise UnlearningError(f"parameter {name!r} is not floating point ({p.dtype})")
        if p.device.type == "meta":
            raise UnlearningError(f"parameter {name!r} is on the meta device (no values): load the weights first")
    largest = _max_abs([p for _, p in params])
    for (name, _), value in zip(params, largest):
        if not math.isfinite(value):
            raise UnlearningError(f"parameter {name!r} contains NaN or inf: refusing to forget")
    return {name: value for (name, _), value in zip(params, largest)}


@torch.no_grad()
def _max_abs(tensors: Sequence[Tensor]) -> list[float]:
    """max |t| of each tensor (NaN if it holds a NaN, inf if an inf; 0 if empty): one read pass
    each (aminmax: exact, no overflow) and one host sync per device."""
    result = [0.0] * len(tensors)
    by_device: dict[torch.device, list[tuple[int, Tensor, Tensor]]] = {}
    for k, t in enumerate(tensors):
        if t.numel():
            low, high = torch.aminmax(t.detach())
            by_device.setdefault(t.device, []).append((k, low.double(), high.double()))
    for entries in by_device.values():
        lows, highs = torch.stack([e[1] for e in entries]), torch.stack([e[2] for e in entries])
        for (k, _, _), value in zip(entries, torch.maximum(highs, lows.neg()).tolist()):
            result[k] = value  # maximum propagates NaN
    return result


def batch_statistics(model: torch.nn.Module) -> None:
    """No BatchNorm normalizes with the batch's own statistics in eval mode
    (``track_running_stats=False``): a sample's output would depend on the other samples in its
    batch, so per-sample gradients (the Fisher of docs/METHOD.md) are not defined."""
    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
                and module.running_mean is None and module.running_var is None):
            raise UnlearningError(
                f"module {name!r} ({type(module).__name__}) has track_running_stats=False: it "
                f"normalizes with the statistics of each batch even in eval mode, so a code's output "
                f"depends on the other codes in its batch and per-sample gradients (the Fisher) are "
                f"not defined; use running statistics (track_running_stats=True, trained) or a "
                f"per-sample norm (LayerNorm, GroupNorm)"
            )


def finite_buffers(model: torch.nn.Module) -> None:
    """The floating buffers a forward reads hold no NaN; BatchNorm's running mean and variance
    no inf either (other buffers may hold -inf/inf on purpose, e.g. attention masks)."""
    named = [(n, b) for n, b in model.named_buffers() if b.is_floating_point() and b.device.type != "meta"]
    if not named or all_finite([local(b) for _, b in named]):
        return
    stats = {
        id(b)
        for module in model.modules()
        if isinstance(module, torch.nn.modules.batchnorm._NormBase)
        for b in (module.running_mean, module.running_var)
        if b is not None
    }
    for name, b in named:
        b = local(b)
        if id(b) in stats and not bool(torch.isfinite(b).all()):
            raise UnlearningError(f"buffer {name!r} (normalization statistics) contains NaN or inf: refusing to forget")
        if bool(torch.isnan(b).any()):
            raise UnlearningError(f"buffer {name!r} contains NaN: refusing to forget")


@torch.no_grad()
def all_finite(tensors: list[torch.Tensor]) -> bool:
    """No NaN or inf in any of ``tensors``. NaN or inf anywhere makes its tensor's sum
    non-finite, so the sums decide with one host sync per device; a sum can also overflow,
    and only then is each tensor checked exactly."""
    return _all_sums_finite(tensors) or all(bool(torch.isfinite(t).all()) for t in tensors)


@torch.no_grad()
def _all_sums_finite(tensors: list[torch.Tensor]) -> bool:
    """One read pass per tensor and one host sync per device (not one per tensor)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t.detach().sum(dtype=accumulation_dtype(t.dtype)).double())
    return all(bool(torch.isfinite(torch.stack(sums)).all()) for sums in by_device.values())


# ---- what the forward returns ------------------------------------------------------------------

def code_batch_fits(
    model: torch.nn.Module,
    codes: MnemonicCodes,
    inputs: torch.Tensor,
    output_fn: Callable[[object], torch.Tensor],
) -> None:
    """One forward pass on one code [1, *shape]: the shapes agree, there is one logit per class,
    the logits are finite and connected to the parameters that require grad (the caller
    narrows those to the perturbed ones). Grad mode builds the graph of that one code but
    runs no backward; a sharded model's probe runs without grad (FSDP hooks expect a backward)."""
    connection = not any_sharded(model.parameters())
    try:
        # train-mode BatchNorm would update its statistics (a model in eval mode already: no switch)
        mode = eval_mode(model) if any(m.training for m in model.modules()) else contextlib.nullcontext()
        with torch.set_grad_enabled(connection), mode:
            logits = output_fn(model(inputs[:1]))
    except (RuntimeError, ValueError) as error:
        raise UnlearningError(
            f"code shape {codes.shape} does not fit the model's input: the forward pass on a "
            f"code failed with: {error}"
        ) from None
    if not torch.is_tensor(logits):
        raise UnlearningError(f"the model's output (through output_fn) is a {type(logits).__name__}, "
                              f"not a tensor of logits: pass output_fn= to pick the logits")
    if logits.dim() != 2 or logits.shape[-1] != codes.num_classes:
        raise UnlearningError(
            f"the model returns logits of shape {tuple(logits.shape)} for one code, but the "
            f"codes cover {codes.num_classes} classes (expected [1, {codes.num_classes}])"
        )
    if connection and not logits.requires_grad:
        raise UnlearningError(
            "the model's logits are not connected to the parameters to perturb (they do not require "
            "grad: the forward detaches its output or runs under torch.no_grad, or params= selects "
            "parameters the output does not depend on): the Fisher would be the epsilon floor alone"
        )
    if not bool(torch.isfinite(logits.detach()).all()):
        raise UnlearningError(f"the model's logits on a code are not finite: {logits.detach().tolist()}")


def finite_logits(logits: Tensor, labels: Tensor) -> None:
    """The codes' logits [N, C] (before forgetting) are finite; else name the classes."""
    finite = torch.isfinite(logits).all(-1)
    if not bool(finite.all()):
        bad = sorted(set(labels[~finite].tolist()))
        raise UnlearningError(f"the model's logits on the codes of class(es) {bad} contain NaN or inf")


def everywhere(engine, flag: bool, device: torch.device) -> bool:
    """``flag`` on every process of the engine (its ``all_ranks``; a one-process engine: ``flag``)."""
    agree = getattr(engine, "all_ranks", None)
    return flag if agree is None else agree(flag, device)


@torch.no_grad()
def forget_fisher_nonzero(forget_fisher: Sequence[Tensor], max_ratio: Tensor, eps: float,
                          num_forget: int, num_remain: int, engine=None) -> None:
    """Some code's gradient of the forget classes touches a selected parameter: f_F is not the
    epsilon floor eps/|C_F| everywhere. Where f_F is the floor, eta <= (eps/|C_F|)/(eps/|C_R|)
    = |C_R|/|C_F| (f_R >= its floor), so a larger max_ratio [L] proves it without a pass."""
    if bool((max_ratio.double() > 1.0001 * num_remain / num_forget).any()):
        return  # max_ratio is the same on every rank: every rank returns here, or none does
    touched = False
    for f in forget_fisher:
        floor = torch.zeros((), dtype=f.dtype, device=f.device).add_(eps)
        if num_forget != 1:
            floor = floor.div_(num_forget)
        if f.numel() and bool((f.amax() > floor * 1.0001).item()):
            touched = True
            break
    if not everywhere(engine, not touched, max_ratio.device):  # a shard elsewhere may be touched
        return
    raise UnlearningError(
        "the forget classes' codes give a zero gradient to every selected parameter (their Fisher "
        "is the epsilon floor alone): the logits do not depend on the perturbed parameters there, "
        "so the method has nothing to go on"
    )


# ---- the result -------------------------------------------------------------------------------

@torch.no_grad()
def result_finite(names: Sequence[str], live: Sequence[Tensor], max_ratio: Tensor,
                  largest: Mapping[str, float] | None, lambda1: float, lambda2: float, mode: str,
                  engine=None) -> None:
    """The parameters after the chosen candidate are finite; else :class:`UnlearningError`
    (the caller restores them).

    Proven without a pass where it can be: the shift of tensor l is at most alpha_l * max_ratio_l
    = min(lambda1 * max_ratio_l, lambda2) (times :data:`GAUSSIAN_BOUND` for a Gaussian draw),
    so |w| + that bound below half the dtype's largest value (``largest`` holds max |w| from
    :func:`trainable_model`) cannot overflow. Otherwise one :func:`all_finite` pass decides.
    With a distributed ``engine`` every rank reaches the same verdict (one collective).
    """
    finite = (largest is not None and _proven(names, live, max_ratio, largest, lambda1, lambda2, mode)) \
        or all_finite(list(live))
    if everywhere(engine, finite, max_ratio.device):
        return
    name = next((repr(n) for n, p in zip(names, live) if not bool(torch.isfinite(p).all())), "on another rank")
    raise UnlearningError(
        f"forgetting with lambda1={lambda1:g}, lambda2={lambda2:g} makes parameter {name} NaN or "
        f"inf (the shift overflows its dtype); the model was left as it was: use smaller lambdas"
    )


def _proven(names, live, max_ratio, largest, lambda1, lambda2, mode) -> bool:
    ratios = max_ratio.double().tolist() if len(live) else []
    scale = GAUSSIAN_BOUND if mode == "gaussian" else 1.0
    for name, p, m in zip(names, live, ratios):
        if name not in largest or not math.isfinite(m):
            return False
        alpha = min(lambda1, lambda2 / m) if m > 0 else lambda1
        step = alpha * m * scale
        if not (alpha < torch.finfo(accumulation_dtype(p.dtype)).max / 2
                and largest[name] + 2 * step < torch.finfo(p.dtype).max / 2):
            return False
    return True
