"""One candidate session: the Fisher pair once, then candidates applied, scored and undone.

:func:`mnemo_fast.forget`, :func:`mnemo_fast.calibration.calibrate` and the baselines all run
on a :class:`CandidateSession`: it computes f_F and f_R from the codes once (the codes' logits
before forgetting come from the same forwards where the engine runs plain batched forwards),
holds the live parameters (a sharded one: this rank's shard) and their original values,
applies a candidate perturbation in place, scores it on the codes (at most ``chunk_size``
codes per forward) and undoes it. No copy of the model is made per candidate.
(docs/METHOD.md, "Fisher information from the codes" and "Choosing the sign".)
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from . import engines, validation
from . import verdict as verdicts
from .codes import MnemonicCodes
from .modeling import OutputFn, eval_mode, logits_of, trainable_parameters
from .dtypes import accumulation_dtype

Tensor = torch.Tensor
ParamSelector = Callable[[str], bool] | str | Iterable[str] | None


@dataclass(frozen=True)
class CodeAccuracy:
    """Accuracy on the codes: ``forget`` on the forget classes' codes, ``retain`` on the rest."""

    forget: float
    retain: float

    @property
    def score(self) -> float:
        """The candidate score of the specification: A_R + E_F = retain + (1 - forget)."""
        return self.retain + (1.0 - self.forget)


def better_sign(score_plus: float, score_minus: float) -> int:
    """The sign rule: +1 only if its score is strictly better than -1's."""
    return 1 if score_plus > score_minus else -1


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
    if selector is None:  # every parameter kept: nothing to drop or restore
        yield
        return
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
    """The codes of ``classes`` as (inputs [n*K, *shape], labels [n*K]) on the model's device,
    signals in the model's dtype (token ids stay int64)."""
    dtype, device = model_dtype_device(model)
    inputs, labels = codes.batch(classes)
    if inputs.is_floating_point():
        inputs = inputs.to(dtype=dtype)
    return inputs.to(device=device), labels.to(device)


@torch.no_grad()
def code_logits(model: torch.nn.Module, inputs: Tensor, chunk_size: int | None = None,
                output_fn: OutputFn = logits_of) -> Tensor:
    """[N, C] float32 logits of the model in eval mode, at most ``chunk_size`` inputs per forward."""
    step = chunk_size or max(inputs.shape[0], 1)
    # a model already in eval mode (forget's scoring passes) skips the mode switch and restore
    mode = eval_mode(model) if any(m.training for m in model.modules()) else contextlib.nullcontext()
    with mode:
        if 0 < inputs.shape[0] <= step:  # one chunk: no concatenation (a copy of the logits)
            return output_fn(model(inputs)).float()
        return torch.cat([output_fn(model(inputs[start : start + step])).float()
                          for start in range(0, inputs.shape[0], step)])


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
    return code_logits(model, inputs, chunk_size, output_fn).argmax(-1) == labels


def accuracy_of(correct: Tensor, is_forget: Tensor) -> CodeAccuracy:
    """CodeAccuracy from [N] hits and the [N] forget mask."""
    hits = correct.float()
    forget, retain = torch.stack([hits[is_forget].mean(), hits[~is_forget].mean()]).tolist()  # one transfer
    return CodeAccuracy(forget=forget, retain=retain)


def fisher_of(engine, model, inputs: Tensor, labels: Tensor, num_classes: int, per_class: int,
              eps: float, chunk_size: int | None, output_fn: OutputFn) -> dict[str, Tensor]:
    """f = (eps + sum_{codes} g^2 / K) / |C| for the class set whose K codes each are ``inputs``
    (docs/METHOD.md, "Fisher information from the codes"). Model in eval mode already."""
    sums = engine.sum_squared_grads(model, inputs, labels, chunk_size, output_fn)
    return _scaled(sums, num_classes, per_class, eps)


def _scaled(sums: dict[str, Tensor], num_classes: int, per_class: int, eps: float) -> dict[str, Tensor]:
    """The sums S made f = ((S / K) + eps) / |C| in place (the formula's order)."""
    # In place: no second parameter-sized copy; a division by 1 (one code per class, one class)
    # is exact and skipped (one pass less each).
    for s in sums.values():
        if per_class != 1:
            s.div_(per_class)
        s.add_(eps)
        if num_classes != 1:
            s.div_(num_classes)
    return sums


class _OutputRecorder:
    """Records (input, logits) of every plain forward of the root module, so the codes' logits
    before forgetting can be read off the Fisher's own forwards instead of a forward of their own."""

    def __init__(self, model: torch.nn.Module, output_fn: OutputFn):
        self.records: list[tuple[Tensor, Tensor]] = []
        self.output_fn = output_fn
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        x = args[0] if args else None
        if not torch.is_tensor(x) or torch._C._functorch.is_functorch_wrapped_tensor(x):
            return  # torch.func's per-sample forwards: nothing that may leave the transform
        try:
            logits = self.output_fn(output)
        except Exception:  # noqa: BLE001 (a forward this recorder cannot read is simply not used)
            return
        if torch.is_tensor(logits) and not torch._C._functorch.is_functorch_wrapped_tensor(logits):
            self.records.append((x, logits.detach()))

    def logits_for(self, inputs: Tensor) -> Tensor | None:
        """[N, C] logits of ``inputs`` when the last recorded forwards covered exactly its rows,
        in order, as views of it (the engine ran the model on ``inputs`` itself); else None."""
        rows, found, end = inputs.shape[0], [], inputs.shape[0]
        if rows == 0 or not inputs.is_contiguous():
            return None
        row_bytes = inputs[0].numel() * inputs.element_size()
        for x, logits in reversed(self.records):
            n = x.shape[0] if x.dim() == inputs.dim() else -1
            if n <= 0 or n > end or x.shape[1:] != inputs.shape[1:] or logits.dim() != 2 or logits.shape[0] != n:
                return None
            if x.data_ptr() != inputs.data_ptr() + (end - n) * row_bytes or not x.is_contiguous():
                return None
            found.append(logits)
            end -= n
            if end == 0:
                return torch.cat(found[::-1]).float()
        return None

    _hook.mnemo_fast_passive = True  # observes only: the fast engine's plan cache ignores it

    def close(self) -> None:
        self.handle.remove()
        self.records = []


_MODULE_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
_GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
                 "_global_backward_hooks")


class _InputLayers:
    """The ``nn.Linear`` layers of a session's model that are fed the codes themselves, for
    :meth:`CandidateSession.trial_logits`.

    A layer qualifies when, in one forward of the codes (a single chunk), it is called exactly
    once, on the codes tensor's own memory viewed as [N, in] (a flatten of the codes, nothing
    computed before it), it is a plain ``nn.Linear`` (no hook, no forward of its own; no global
    module hook), its weight is a live parameter and its bias live or frozen, in the dtype
    the shift is computed in. Per layer, A = linear(x, W, b) and B = linear(x, eta_W) [N, out]
    are computed once. In a trial the layer's ``forward`` is replaced by A + g_w B + g_b eta_b
    (its input checked to be that same view; any other input gets linear(x, W + g_w eta_W,
    b + g_b eta_b) computed on the spot), so its weight is neither written nor read.
    """

    def __init__(self, entries: list[tuple], positions: set[int]):
        self.entries, self.positions = entries, positions

    @staticmethod
    @torch.no_grad()
    def find(session: "CandidateSession") -> "_InputLayers | None":
        x, n = session.inputs, session.inputs.shape[0]
        engine = session.engine
        if (hasattr(engine, "correct") or hasattr(engine, "local") or not x.is_floating_point() or n == 0
                or not x.is_contiguous() or (session.chunk_size is not None and session.chunk_size < n)
                or any(getattr(torch.nn.modules.module, h, None) for h in _GLOBAL_HOOKS)):
            return None
        named = dict(session.model.named_parameters())
        position = {id(named[name]): k for k, name in enumerate(session.names)}
        etas = session._etas()
        candidates = {}
        for module in session.model.modules():
            if type(module) is not torch.nn.Linear or "forward" in vars(module) \
                    or any(getattr(module, h) for h in _MODULE_HOOKS):
                continue
            w, b = module.weight, module.bias
            k_w = position.get(id(w)) if w.requires_grad else None
            k_b = None if b is None or not b.requires_grad else position.get(id(b))
            if k_w is None or (b is not None and b.requires_grad and k_b is None):
                continue
            if any(etas[k].dtype != session.live[k].dtype for k in (k_w, k_b) if k is not None):
                continue  # float16/bfloat16: the trial rounds the candidate to the parameter's dtype
            candidates[module] = (k_w, k_b)
        if not candidates:
            return None
        calls: dict[torch.nn.Module, list[bool]] = {m: [] for m in candidates}

        def seen(module, args, kwargs):
            a = args[0] if len(args) == 1 and not kwargs else None
            calls[module].append(
                torch.is_tensor(a) and a.data_ptr() == x.data_ptr() and a.is_contiguous() and a.dtype == x.dtype
                and a.shape == (n, module.in_features) and a.numel() == x.numel())

        handles = [m.register_forward_pre_hook(seen, with_kwargs=True) for m in candidates]
        try:
            code_logits(session.model, x, session.chunk_size, session.output_fn)
        finally:
            for handle in handles:
                handle.remove()
        entries, positions = [], set()
        flat = x.view(n, -1)
        for module, (k_w, k_b) in candidates.items():
            if calls[module] != [True]:
                continue
            weight = session.originals[k_w]
            bias = module.bias if k_b is None else session.originals[k_b]
            a = torch.nn.functional.linear(flat, weight, None if bias is None else bias.detach())
            b = torch.nn.functional.linear(flat, etas[k_w])
            entries.append((module, flat, a, b, k_w, k_b, weight, bias, etas))
            positions |= {k_w} | ({k_b} if k_b is not None else set())
        return _InputLayers(entries, positions) if entries else None

    @contextlib.contextmanager
    def candidate(self, gains: list[float]) -> Iterator[None]:
        """Within the block the layers compute their output under the candidate ``gains``."""
        for module, flat, a, b, k_w, k_b, weight, bias, etas in self.entries:
            module.forward = functools.partial(_candidate_linear, flat, a, b, gains[k_w], weight, bias, etas[k_w],
                                               None if k_b is None else (gains[k_b], etas[k_b]))
        try:
            yield
        finally:
            for module, *_ in self.entries:
                del module.forward


def _candidate_linear(flat: Tensor, a: Tensor, b: Tensor, gain: float, weight: Tensor, bias: Tensor | None,
                      eta: Tensor, bias_shift: tuple[float, Tensor] | None, x: Tensor) -> Tensor:
    """The output of an input layer under the candidate: A + g_w B (+ g_b eta_b) for the codes'
    own view, else the layer on ``x`` with the candidate's parameters."""
    if x.data_ptr() == flat.data_ptr() and x.shape == flat.shape and x.stride() == flat.stride() and x.dtype == flat.dtype:
        out = torch.add(a, b, alpha=gain)
        if bias_shift is not None:
            out.add_(bias_shift[1], alpha=bias_shift[0])
        return out
    new_bias = bias if bias_shift is None else torch.add(bias, bias_shift[1], alpha=bias_shift[0])
    return torch.nn.functional.linear(x, torch.add(weight, eta, alpha=gain), new_bias)


class CandidateSession:
    """Perturb-score-undo on the live parameters of ``model`` (which it edits in place).

    Holds: ``names`` of the selected trainable parameters, ``live`` (the tensors edited: a
    sharded parameter's local shard), ``originals`` (their values on entry), ``forget_fisher``
    and ``remain_fisher`` (lists aligned with ``names``), ``max_ratio`` [L], the codes of all
    classes (``inputs`` [N, *shape], ``labels`` [N], ``is_forget`` [N]) and ``logits_before``
    [N, C] (float32). ``source``: the model ``model`` was copied from, left untouched, whose
    parameters then serve as the originals (no clone) and on which the Fisher's forwards run
    (same values; hooks and flags restored). ``batch``: ``code_inputs(model, codes,
    range(num_classes))`` when the caller has it already. The caller enters the engine's
    ``forwards`` context around the session.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        codes: MnemonicCodes,
        classes: Sequence[int],
        *,
        engine,
        eps: float = 1e-16,
        chunk_size: int | None = None,
        output_fn: OutputFn = logits_of,
        params: ParamSelector = None,
        source: torch.nn.Module | None = None,
        batch: tuple[Tensor, Tensor] | None = None,
    ):
        self.model, self.engine = model, engine
        self.chunk_size, self.output_fn = chunk_size, output_fn
        keep = parameter_filter(params)
        chosen = {name: p for name, p in trainable_parameters(model).items() if keep(name)}
        if not chosen:
            raise validation.UnlearningError(f"params={params!r} selects none of the trainable parameters")
        self.names = list(chosen)
        local = engines.local_of(engine)
        self.live = [local(p.detach()) for p in chosen.values()]
        if source is None:
            self.originals = [p.clone() for p in self.live]
        else:  # ``model`` is a copy of ``source``, which no candidate touches: its values are the originals
            named = dict(source.named_parameters())
            self.originals = [local(named[name].detach()) for name in self.names]
        self._use_codes(batch if batch is not None else code_inputs(model, codes, range(codes.num_classes)), classes)
        self.num_forget = len(classes)

        # The Fisher's forwards run on ``source`` when given: the same values as the copy, and the
        # caller's own model, whose plan the fast engine keeps between calls (a fresh copy per
        # call would be planned afresh each time). Its flags and hooks are restored on exit.
        fisher_model = model if source is None else source
        recorder = _OutputRecorder(fisher_model, output_fn)
        try:
            with eval_mode(fisher_model), only_parameters(fisher_model, params):
                forget_fisher, remain_fisher, forget_logits, remain_logits = self._fisher_pair(
                    fisher_model, recorder, len(classes), codes.num_classes - len(classes), codes.per_class, eps)
        finally:
            recorder.close()
        self.forget_fisher = [forget_fisher[n].contiguous() for n in self.names]
        self.remain_fisher = [remain_fisher[n].contiguous() for n in self.names]
        del forget_fisher, remain_fisher
        self.max_ratio = engine.max_ratio(self.forget_fisher, self.remain_fisher)
        self._eta: list[Tensor] | None = None
        self._trial: tuple[_InputLayers, list[float]] | None = None  # set by trial_logits until the next write
        self._layers_key: tuple | None = None
        self._layers: _InputLayers | None = None
        self.logits_before: Tensor | None = None
        self.hits: Tensor | None = None  # [N] bool: the codes right under the last candidate scored
        self.hits_before: Tensor | None = None  # [N] bool: right before any candidate
        self.retain_inputs: Tensor | None = None  # a real sample (use_retain_sample), and its logits before
        self.retain_labels: Tensor | None = None
        self.retain_before: Tensor | None = None
        if forget_logits is not None and remain_logits is not None and not hasattr(engine, "correct"):
            logits = forget_logits.new_empty((self.inputs.shape[0], forget_logits.shape[1]))
            logits[self.is_forget], logits[~self.is_forget] = forget_logits, remain_logits
            self.logits_before = logits

    def _use_codes(self, batch: tuple[Tensor, Tensor], classes: Sequence[int]) -> None:
        """Take ``batch`` (inputs [N, *shape], labels [N]) as the codes the session scores, with
        ``is_forget`` [N] marking the codes of ``classes``."""
        self.inputs, self.labels = batch
        self.is_forget = torch.isin(self.labels, torch.tensor(list(classes), device=self.labels.device))

    def score_on(self, codes: MnemonicCodes, classes: Sequence[int]) -> None:
        """Score candidates on ``codes`` (every class) instead of the codes the Fisher pair came
        from (held-out scoring, :mod:`mnemo_fast.calibration.blocks`); the logits before forgetting are
        recomputed on first use."""
        self._use_codes(code_inputs(self.model, codes, range(codes.num_classes)), classes)
        self.logits_before = None

    def use_retain_sample(self, inputs: Tensor, labels: Tensor) -> None:
        """Hold a real sample (``inputs`` [M, ...], ``labels`` [M]: ``forget(..., retain=)``) on the
        model's device and dtype, with its logits before any candidate in ``retain_before``
        [M, C] (float32). Call before applying a candidate."""
        dtype, device = model_dtype_device(self.model)
        self.retain_inputs = (inputs.to(dtype=dtype) if inputs.is_floating_point() else inputs).to(device)
        self.retain_labels = labels.to(device=device, dtype=torch.int64)
        self.retain_before = code_logits(self.model, self.retain_inputs, self.chunk_size, self.output_fn)

    def retain_logits(self) -> Tensor:
        """[M, C] float32 logits of the retain sample under the parameters as they are now (a
        full forward: after :meth:`trial_logits` the input layers' weights are not written, so
        this is for a candidate written with :meth:`set_shift`, :meth:`shift` or :meth:`gaussian`)."""
        if self._trial is not None:
            raise RuntimeError("retain_logits after trial_logits: the input layers hold their original values")
        return code_logits(self.model, self.retain_inputs, self.chunk_size, self.output_fn)

    def _fisher_pair(self, model: torch.nn.Module, recorder: "_OutputRecorder", num_forget: int, num_remain: int,
                     per_class: int, eps: float):
        """(f_F, f_R, forget codes' logits or None, retained codes' logits or None) of ``model``.
        An engine with ``sum_squared_grads_groups`` takes both code sets as one batch (forget
        codes first): one plan, and with ``one_pass_groups`` one forward+backward per chunk for
        the pair (else one per set); an engine without it: two calls."""
        engine, chunk_size, output_fn = self.engine, self.chunk_size, self.output_fn
        groups = getattr(engine, "sum_squared_grads_groups", None)
        if groups is not None:
            order = torch.cat([self.is_forget.nonzero().view(-1), (~self.is_forget).nonzero().view(-1)])
            inputs, labels = self.inputs.index_select(0, order), self.labels.index_select(0, order)
            split = int(self.is_forget.sum())
            # one forward+backward for both sets where the engine can cut its captures by rows
            one_pass = [True] if getattr(engine, "one_pass_groups", False) else []
            forget_sums, remain_sums = groups(model, inputs, labels, [split, inputs.shape[0] - split],
                                              chunk_size, output_fn, *one_pass)
            logits = recorder.logits_for(inputs)
            forget_logits, remain_logits = (None, None) if logits is None else (logits[:split], logits[split:])
            return (_scaled(forget_sums, num_forget, per_class, eps), _scaled(remain_sums, num_remain, per_class, eps),
                    forget_logits, remain_logits)
        forget_inputs, forget_labels = self.inputs[self.is_forget], self.labels[self.is_forget]
        remain_inputs, remain_labels = self.inputs[~self.is_forget], self.labels[~self.is_forget]
        forget_fisher = fisher_of(engine, model, forget_inputs, forget_labels, num_forget, per_class, eps,
                                  chunk_size, output_fn)
        forget_logits = recorder.logits_for(forget_inputs)
        recorder.records = []
        remain_fisher = fisher_of(engine, model, remain_inputs, remain_labels, num_remain, per_class, eps,
                                  chunk_size, output_fn)
        return forget_fisher, remain_fisher, forget_logits, recorder.logits_for(remain_inputs)

    # ---- candidates ------------------------------------------------------------------------
    @torch.no_grad()
    def shift(self, lambda1: float, lambda2: float, sign: int) -> None:
        """Apply w += sign * alpha_l * eta to the live parameters."""
        self._trial = None
        self.engine.shift_(self.live, self.forget_fisher, self.remain_fisher, self.max_ratio,
                           lambda1, lambda2, float(sign))

    @torch.no_grad()
    def set_shift(self, lambda1: float, lambda2: float, sign: int) -> None:
        """live = originals + sign * alpha_l * eta: the candidate of :meth:`shift`, written from
        the original values, so trials need no undo in between (one pass per tensor; eta is
        computed once and kept, one float32 tensor per parameter). Equal to :meth:`shift` up to
        rounding: for the calibration's trials; the chosen candidate is applied by :meth:`shift`."""
        self._trial = None
        self._write(self._gains(lambda1, lambda2, sign), skip=())

    def _etas(self) -> list[Tensor]:
        """eta of every live tensor (float32, float64 for float64), computed once and kept."""
        if self._eta is None:  # the engine's own shift with gain 1 (lambda1 = 1, lambda2 = inf) gives eta
            self._eta = [torch.zeros_like(p, dtype=accumulation_dtype(f.dtype)) for p, f in zip(self.live, self.forget_fisher)]
            self.engine.shift_(self._eta, self.forget_fisher, self.remain_fisher, self.max_ratio, 1.0, math.inf, 1.0)
        return self._eta

    def _gains(self, lambda1: float, lambda2: float, sign: int) -> list[float]:
        """sign * alpha_l of every live tensor (one host transfer)."""
        self._etas()
        gains = torch.clamp(lambda2 / self.max_ratio, max=lambda1).tolist() if len(self.live) else []
        return [sign * gain for gain in gains]

    @torch.no_grad()
    def _write(self, gains: list[float], skip) -> None:
        """live = originals + gain * eta for every tensor but the positions in ``skip``."""
        for k, (p, original, eta, gain) in enumerate(zip(self.live, self.originals, self._eta, gains)):
            if k in skip:
                continue
            if p.dtype == eta.dtype:
                torch.add(original, eta, alpha=gain, out=p)
            else:  # float16/bfloat16 parameter: the shift is computed in float32, written in its dtype
                p.copy_(original + (gain * eta).to(p.dtype))

    @torch.no_grad()
    def trial_logits(self, lambda1: float, lambda2: float, sign: int) -> Tensor:
        """[N, C] float32 logits of the codes under the candidate of :meth:`set_shift`: what the
        calibration scores in each trial. Equal to ``set_shift`` then :meth:`logits` up to float
        rounding, and cheaper where the model starts with input layers (:class:`_InputLayers`):
        an ``nn.Linear`` fed the codes themselves is linear in its parameters, so its output
        under the candidate is A + g_w B + g_b eta_b with A = linear(x, W, b) and
        B = linear(x, eta_W) computed once per session: a trial neither writes nor reads that
        layer's weight (at C = 10 on the paper's MLP, most of a trial's time). Until the next
        write (:meth:`set_shift`, :meth:`shift`, :meth:`gaussian`, :meth:`restore`) the
        parameters of those layers keep their original values and :meth:`logits` gives the
        candidate's logits the same way (bit for bit these). docs/METHOD.md, "Choosing the step
        from the codes"."""
        gains = self._gains(lambda1, lambda2, sign)
        layers = self._input_layers()
        self._write(gains, skip=layers.positions if layers is not None else ())
        self._trial = (layers, gains) if layers is not None else None
        return self.logits()

    def _input_layers(self) -> "_InputLayers | None":
        """The session's :class:`_InputLayers` for its current inputs, found once (None: none)."""
        key = (id(self.inputs), self.inputs._version, self.chunk_size)
        if self._layers_key != key:
            self._layers_key, self._layers = key, _InputLayers.find(self)
        return self._layers

    @torch.no_grad()
    def gaussian(self, lambda1: float, lambda2: float, tau: float, generator: torch.Generator) -> None:
        """Apply w += [eta > tau] * alpha_l * eta * z, z ~ N(0, 1) from ``generator``."""
        self._trial = None
        self.engine.gaussian_(self.live, self.forget_fisher, self.remain_fisher, self.max_ratio,
                              lambda1, lambda2, tau, generator)

    @torch.no_grad()
    def dampen(self, threshold: float, lam: float) -> None:
        """live = originals * [eta > threshold] min(lam / eta, 1) (mode="dampen"): written from the
        original values, so trials need no undo in between."""
        self.restore()
        self.engine.dampen_(self.live, self.forget_fisher, self.remain_fisher, threshold, lam)

    @torch.no_grad()
    def restore(self) -> None:
        """Undo every candidate: the live parameters get their original values back."""
        self._trial = None
        if self.live:
            torch._foreach_copy_(self.live, self.originals)  # one call: a copy per tensor, exact

    # ---- scores ----------------------------------------------------------------------------
    def correct(self) -> Tensor:
        """[N] bool hits of the model as it is now (the engine may split the codes across ranks)."""
        score = getattr(self.engine, "correct", correct_predictions)
        return score(self.model, self.inputs, self.labels, self.chunk_size, self.output_fn)

    def accuracy(self) -> CodeAccuracy:
        """The code accuracy of the model as it is now; its [N] hits stay in ``hits``."""
        self.hits = self.correct()
        return accuracy_of(self.hits, self.is_forget)

    def accuracy_before(self) -> CodeAccuracy:
        """The code accuracy before any candidate, from the Fisher's forwards where they gave
        the logits, else from one plain pass kept as ``logits_before`` (the method checks them
        finite); an engine that scores the codes itself (``correct``) scores them (call before
        applying a candidate). Its [N] hits stay in ``hits_before``."""
        if self.logits_before is None and not hasattr(self.engine, "correct"):
            self.logits_before = self.logits()
        if self.logits_before is not None:
            self.hits_before = self.logits_before.argmax(-1) == self.labels
            return accuracy_of(self.hits_before, self.is_forget)
        accuracy = self.accuracy()
        self.hits_before = self.hits
        return accuracy

    def class_accuracy(self, hits: Tensor, classes: Sequence[int]) -> list[float]:
        """The fraction of each of ``classes``' codes that ``hits`` [N] marks correct (one transfer)."""
        right = torch.zeros(int(self.labels.max()) + 1, device=hits.device).index_add_(0, self.labels, hits.float())
        count = torch.bincount(self.labels, minlength=right.shape[0]).to(right.dtype)
        index = torch.tensor(list(classes), device=hits.device)
        return (right.index_select(0, index) / count.index_select(0, index)).tolist()

    def logits(self) -> Tensor:
        """[N, C] float32 logits of all codes (every rank computes all of them); after
        :meth:`trial_logits`, the trial's."""
        if self._trial is not None:
            layers, gains = self._trial
            with layers.candidate(gains):
                return code_logits(self.model, self.inputs, self.chunk_size, self.output_fn)
        return code_logits(self.model, self.inputs, self.chunk_size, self.output_fn)

    def verdict(self, criterion, classes: Sequence[int]) -> verdicts.Verdict:
        """The :class:`mnemo_fast.verdict.Verdict` of the parameters as they are now: ``criterion``
        (a :class:`mnemo_fast.calibration.Criterion`) on the codes' logits before and now, and the
        retain sample's accuracies where the session holds one (:meth:`use_retain_sample`)."""
        return self.verdicts((criterion,), classes)[0]

    def verdicts(self, criteria: Sequence, classes: Sequence[int]) -> tuple[verdicts.Verdict, ...]:
        """:meth:`verdict` by each of ``criteria``, from one forward of the codes (and of the
        retain sample)."""
        sample = None
        if self.retain_inputs is not None:
            sample = verdicts.sample_accuracy(self.retain_before, self.retain_logits(), self.retain_labels, classes)
        before, now = self.before_logits(), self.logits()
        return tuple(verdicts.judge(before, now, self.labels, self.is_forget, criterion=criterion, sample=sample)
                     for criterion in criteria)

    def before_logits(self) -> Tensor:
        """[N, C] logits before any candidate (from the Fisher's forwards where possible)."""
        if self.logits_before is None:
            self.logits_before = self.logits()
        return self.logits_before

    # ---- the choice --------------------------------------------------------------------------
    def choose(self, mode: str, lambda1: float, lambda2: float, *, tau: float = 1.0, draws: int = 2,
               generator: torch.Generator | None = None,
               sign: int | None = None) -> tuple[int, list[int], list[CodeAccuracy]]:
        """Score every candidate and leave the best one applied: (best index, candidates, accuracies).

        mode "shift": candidates +1, -1 (+1 kept only if strictly better), or only ``sign``
        when one is given (chosen already, e.g. by the calibration); "gaussian": ``draws``
        draws from ``generator`` (ties: the first). Each candidate is applied, scored and
        undone, except the last, which stays applied: when it wins, no undo/redo or re-scoring
        is needed (the kernels are deterministic). Any failure restores the parameters.
        """
        if mode == "shift":
            candidates = [1, -1] if sign is None else [sign]

            def apply(sign: int) -> None:
                self.shift(lambda1, lambda2, sign)
        else:
            states: list[Tensor] = []
            candidates = list(range(draws))

            def apply(draw: int) -> None:
                if draw == len(states):
                    states.append(generator.get_state())
                else:
                    generator.set_state(states[draw])
                self.gaussian(lambda1, lambda2, tau, generator)

        try:
            accuracies, hits = [], []
            for k, candidate in enumerate(candidates):
                apply(candidate)
                accuracies.append(self.accuracy())
                hits.append(self.hits)
                if k < len(candidates) - 1:
                    self.restore()
            scores = [accuracy.score for accuracy in accuracies]
            if mode == "shift":
                best = 0 if len(scores) == 1 or better_sign(*scores) == 1 else 1
            else:
                best = max(range(len(scores)), key=lambda k: (scores[k], -k))
            if best != len(candidates) - 1:
                self.restore()
                final_state = generator.get_state() if mode == "gaussian" else None
                apply(candidates[best])
                if final_state is not None:
                    generator.set_state(final_state)
            self.hits = hits[best]  # the hits of the candidate left applied
        except BaseException:
            self.restore()
            raise
        return best, candidates, accuracies
