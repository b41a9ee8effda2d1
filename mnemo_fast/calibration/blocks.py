"""Per-block steps and held-out scoring for ``forget(lambda1="auto")`` (docs/METHOD.md,
"Per-block steps and held-out scoring").

Not in the paper. Both refine the calibration of :mod:`mnemo_fast.calibration` and run on its
:class:`mnemo_fast.session.CandidateSession` through the session's own API (``set_shift``,
``live``/``originals``, ``logits``). Per-block steps by module are on by default in
``forget(lambda1="auto")`` (shift mode; ``calibration={"blocks": False}``: the global step
alone, as before); held-out scoring is off by default.

- **Per-block steps** (``calibration={"blocks": "module"}`` or ``"tensor"``): after the global
  step (lambda1, lambda2, sign) is chosen, each block's shift (a block: the parameters of one
  top-level child module, or one parameter tensor) gets a scale ``s_b``, searched on the
  codes: shrink a block's step while the forget side holds and the retained codes' median
  margin ratio improves; then, if the forget side is not met, grow all scales together (up to
  ``MAX_GROWTH``, kept only where ``min(depth, retained margin ratio)`` improves) to turn the
  retained margin won back into forgetting; then one more shrink pass. Per tensor the shift becomes ``s_b * alpha_l * eta``.
- **Held-out scoring** (``calibration={"heldout": True}`` or a number of codes): with K >= 2
  codes per class, the Fisher pair comes from the first K - H codes of each class and the
  calibration (and the sign) is scored on the other H, codes that were not in the Fisher.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import torch

from .. import validation
from .search import Calibration, Criterion, Trial, _Prober, _judge
from .search import _balance as _calibration_balance
from ..codes import MnemonicCodes
from ..session import CandidateSession, code_logits

Tensor = torch.Tensor

#: What ``calibration={"blocks": ...}`` accepts: a block is a top-level child module, a layer
#: of a repeated stack (a numbered child: ``encoder.layer.3``) or a tensor (:func:`block_names`).
BLOCKS = ("module", "layer", "tensor")
#: Relative scales tried for a block in each shrink pass (its current scale times each).
SHRINK = (0.0, 0.25, 0.5)
#: The grow stage multiplies every scale by 2^(k/2), k = 1, 2, ... up to this factor; the
#: finiteness check of ``forget`` then bounds the shift by :attr:`BlockSteps.gain` times the
#: global step's bound.
MAX_GROWTH = 8.0
#: A shrink is kept only if it raises the median retained margin ratio by at least this much.
MIN_GAIN = 0.01
#: The refinement options of ``forget(calibration=...)`` handled here (the rest go to the search).
OPTIONS = ("blocks", "heldout")
#: ``forget(lambda1="auto", mode="shift")``'s blocks when ``calibration`` names none (the
#: sweeps of benchmarks/UNLEARNING.md); ``calibration={"blocks": False}`` turns them off.
DEFAULT = "module"


@dataclass
class BlockSteps:
    """Per-block scales of the global step and what the codes said.

    ``blocks``: block names (a module path or a parameter name); ``scales``: one scale per
    block; ``tensor_scales``: one per session tensor (aligned with ``session.names``);
    ``start``/``end``: the code statistics (:class:`mnemo_fast.calibration.Trial`) of the global
    step and of the scaled one; ``trials``: forwards of the codes spent; ``sign``: the sign of
    the step they scale (the calibration's; -1 where it leaves the sign to ``forget``).
    """

    blocks: list[str]
    scales: list[float]
    tensor_scales: list[float]
    start: Trial
    end: Trial
    trials: int = 0
    sign: int = -1                # the sign the scales were searched for (forget applies it)
    history: list[tuple[str, float, float]] = field(default_factory=list)  # (block, scale, ratio)

    @property
    def gain(self) -> float:
        """The largest tensor scale (>= 0): the applied shift is bounded by ``gain`` times the
        global step's bound."""
        return max(self.tensor_scales, default=0.0)


def refinement_options(options: Mapping[str, object] | None, default_blocks: str | None = None) -> tuple[dict, dict]:
    """Split ``forget``'s ``calibration=`` dict into (search options, refinement options),
    the refinement ones checked: ``blocks`` in :data:`BLOCKS`, True (= "module") or False/None
    (off); ``heldout`` True/False or an integer >= 1 (codes per class held out). Without a
    ``blocks`` key, ``default_blocks`` applies (``forget`` passes :data:`DEFAULT` in shift mode)."""
    if options and not isinstance(options, Mapping):  # falsy: no options, as before
        raise TypeError(f"calibration must be a dict of options or None, got {options!r}")
    options = dict(options or {})
    search = {k: v for k, v in options.items() if k not in OPTIONS}
    refine = {}
    blocks = options.get("blocks", default_blocks)
    if blocks is True:
        blocks = "module"
    if blocks not in (None, False) and blocks not in BLOCKS:
        raise validation.UnlearningError(f"calibration option blocks must be one of {BLOCKS}, True or False, "
                                         f"got {blocks!r}")
    if blocks:
        refine["blocks"] = blocks
    heldout = options.get("heldout")
    if heldout is not None and heldout is not False:
        if heldout is not True:
            heldout = validation.integer("heldout", heldout, minimum=1)
        refine["heldout"] = heldout
    return search, refine


def split_codes(codes: MnemonicCodes, heldout: bool | int) -> tuple[MnemonicCodes, MnemonicCodes]:
    """(Fisher codes, scoring codes): the first K - H codes of each class and the last H
    (H = ``heldout``; True: K // 2 rounded up). Needs K >= 2 and 1 <= H < K."""
    k = codes.per_class
    h = (k - k // 2) if heldout is True else int(heldout)
    if k < 2:
        raise validation.UnlearningError(
            f"held-out scoring needs at least 2 codes per class (one for the Fisher, one to score); "
            f"these codes have {k} (MnemonicCodes.generate(per_class=...))")
    if not 1 <= h < k:
        raise validation.UnlearningError(f"heldout must leave at least one of the {k} codes per class for the "
                                         f"Fisher, got {heldout}")
    t = codes.tensor
    return MnemonicCodes(t[:, : k - h].contiguous()), MnemonicCodes(t[:, k - h:].contiguous())


def block_names(names: Sequence[str], by: str) -> tuple[list[str], list[int]]:
    """(block names, block index per tensor), blocks in the order they first appear.

    - ``"tensor"``: one block per parameter.
    - ``"module"``: parameters grouped by their top-level child module, descending through
      prefixes shared by every parameter (a wrapper ``model.net.*`` groups by ``net.<child>``).
    - ``"layer"``: each layer of a repeated stack is a block: a parameter whose name has a
      numbered part (an ``nn.ModuleList``/``nn.Sequential`` index) belongs to the prefix up to
      its first one (``bert.encoder.layer.3.attention.self.query.weight`` ->
      ``bert.encoder.layer.3``); any other parameter to its shortest prefix that holds no layer
      (``bert.embeddings``, ``bert.pooler``, ``classifier``). A Hugging Face transformer gets
      embeddings, one block per layer and the head, where ``"module"`` gives body and head.
    """
    if by == "tensor":
        return list(names), list(range(len(names)))
    parts = [n.split(".") for n in names]
    if by == "layer":
        layers = [_layer_key(p) for p in parts]
        holds_layer = {".".join(k.split(".")[:i]) for k in layers if k for i in range(1, k.count(".") + 2)}
        keys = [k or _shortest_free_prefix(p, holds_layer) for k, p in zip(layers, parts)]
    else:
        depth = 1
        while (len({tuple(p[:depth]) for p in parts}) == 1 and all(len(p) > depth + 1 for p in parts)):
            depth += 1
        keys = [".".join(p[:depth]) if len(p) > depth else ".".join(p[:-1]) or p[0] for p in parts]
    blocks: list[str] = []
    for key in keys:
        if key not in blocks:
            blocks.append(key)
    return blocks, [blocks.index(k) for k in keys]


def _layer_key(parts: list[str]) -> str | None:
    """The name up to its first numbered part (a layer of a stack), None if no part is numbered."""
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return None


def _shortest_free_prefix(parts: list[str], holds_layer: set[str]) -> str:
    """The shortest prefix of a parameter's name that is not (a prefix of) a layer block."""
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if prefix not in holds_layer:
            return prefix
    return ".".join(parts)


class _Scaler:
    """The global step's per-tensor shift ``delta`` (read once from the session's live
    parameters after ``set_shift``) and the live values written as ``originals + s * delta``
    for a block's tensors. Holds one extra parameter-sized copy (``delta``), except for the
    session's input layers (:meth:`mnemo_fast.session.CandidateSession.trial_logits`): an
    ``nn.Linear`` fed the codes themselves is never written; :meth:`logits` computes its output
    under the scaled step as ``A + s g B`` (the calibration's trials do the same, equal to a
    forward of the written values up to float rounding)."""

    def __init__(self, session: CandidateSession, lambda1: float, lambda2: float, sign: int):
        self.session = session
        session.set_shift(lambda1, lambda2, sign)
        self.layers = session._input_layers()
        skip = self.layers.positions if self.layers is not None else ()
        self.gains = session._gains(lambda1, lambda2, sign) if self.layers is not None else None
        self.scales = [1.0] * len(session.live)
        self.delta = [None if k in skip else p - o for k, (p, o) in enumerate(zip(session.live, session.originals))]

    @torch.no_grad()
    def write(self, tensors: Sequence[int], scale: float) -> None:
        live, originals = self.session.live, self.session.originals
        for i in tensors:
            self.scales[i] = scale
            if self.delta[i] is not None:
                torch.add(originals[i], self.delta[i], alpha=scale, out=live[i])

    @torch.no_grad()
    def logits(self) -> Tensor:
        """[N, C] float32 logits of the codes under the scales written so far."""
        session = self.session
        if self.layers is None:
            return session.logits()
        with self.layers.candidate([g * s for g, s in zip(self.gains, self.scales)]):
            return code_logits(session.model, session.inputs, session.chunk_size, session.output_fn)


class _Scorer:
    """The calibration's judged statistics (:meth:`mnemo_fast.calibration.search._Prober.statistics`)
    of the logits ``logits()`` gives (the model as it is now), on the session's scoring codes;
    ``count``: forwards spent."""

    def __init__(self, session: CandidateSession, criterion: Mapping[str, float], logits):
        self.session, self.logits = session, logits
        self.prober = _Prober(session, lambda trial: _judge(trial, **criterion))
        self.count = 0

    @torch.no_grad()
    def __call__(self, lambda1: float, lambda2: float, sign: int) -> Trial:
        self.count += 1
        return self.prober.judge(self.prober.statistics(self.logits(), lambda1, lambda2, sign))


def _holds(t: Trial, ref: Trial) -> bool:
    """The forget side holds against ``ref``: met if ``ref`` met it; else every forget code
    still wrong and the depth no shallower than 98% of ``ref``'s."""
    if ref.forget_ok:
        return t.forget_ok
    return t.forget_max_margin < 0 and t.forget_depth >= ref.forget_depth - 0.02 * abs(ref.forget_depth)


def _better(t: Trial, best: Trial, ref: Trial) -> bool:
    """A shrink to ``t`` is kept over ``best``: the forget side holds (:func:`_holds`) and the
    retained margin ratio rises by MIN_GAIN."""
    return _holds(t, ref) and t.retain_margin_ratio >= best.retain_margin_ratio + MIN_GAIN


def _balance(t: Trial) -> float:
    """The calibration's balance (min(depth, retained margin ratio)) where every forget code is
    wrong, else -inf: a step that leaves a forget code right never wins the grow stage."""
    return _calibration_balance(t) if t.forget_max_margin < 0 else -math.inf


@torch.no_grad()
def block_steps(session: CandidateSession, calibration: Calibration, *, by: str = "module",
                passes: int = 2) -> BlockSteps:
    """Per-block scales of ``calibration``'s step (module docstring), searched on the session's
    codes; the session's parameters are restored on return. Cost: about
    ``(passes + 1) * 3 * blocks + 6`` forwards of the codes (no Fisher, no backward)."""
    if by not in BLOCKS:
        raise validation.UnlearningError(f"blocks must be one of {BLOCKS}, got {by!r}")
    l1, l2 = calibration.lambda1, calibration.lambda2
    sign = calibration.sign if calibration.sign is not None else -1
    blocks, owner = block_names(session.names, by)
    members = [[i for i, b in enumerate(owner) if b == k] for k in range(len(blocks))]
    scales = [1.0] * len(blocks)
    history: list[tuple[str, float, float]] = []
    try:
        scaler = _Scaler(session, l1, l2, sign)
        score = _Scorer(session, calibration.diagnostics.get("criterion", asdict(Criterion())), scaler.logits)
        start = current = score(l1, l2, sign)

        def shrink(current: Trial, ref: Trial) -> Trial:
            for b, tensors in enumerate(members):
                if scales[b] == 0.0:
                    continue
                best, best_scale = current, scales[b]
                for rel in SHRINK:
                    scaler.write(tensors, scales[b] * rel)
                    t = score(l1, l2, sign)
                    if _better(t, best, ref):
                        best, best_scale = t, scales[b] * rel
                scales[b] = best_scale
                scaler.write(tensors, best_scale)
                if best is not current:
                    history.append((blocks[b], best_scale, best.retain_margin_ratio))
                current = best
            return current

        for _ in range(passes):
            current = shrink(current, start)
        if not current.forget_ok:  # grow every scale together: spend the margin won back on forgetting
            base, best = list(scales), current
            for k in range(1, int(round(2 * math.log2(MAX_GROWTH))) + 1):
                g = 2 ** (k / 2)
                for b, tensors in enumerate(members):
                    scaler.write(tensors, base[b] * g)
                t = score(l1, l2, sign)
                if t.forget_ok and t.retain_ok:
                    best, grown = t, g
                    break
                if _balance(t) > _balance(best):  # never a step that only the forget side likes
                    best, grown = t, g
            if best is not current:
                scales[:] = [s * grown for s in base]
                history.append(("*", grown, best.retain_margin_ratio))
                current = shrink(best, best)
        end = current  # (the live values are not written back: the session is restored below)
    finally:
        session.restore()
    return BlockSteps(blocks=blocks, scales=scales, tensor_scales=[scales[b] for b in owner], start=start,
                      end=end, trials=score.count, sign=sign, history=history)


@torch.no_grad()
def apply_scales(session: CandidateSession, tensor_scales: Sequence[float]) -> None:
    """With the global step applied to the session's live parameters, make tensor l's shift
    ``tensor_scales[l]`` times it (``originals + s * (live - originals)``)."""
    for p, o, s in zip(session.live, session.originals, tensor_scales):
        if s != 1.0:
            p.sub_(o).mul_(s).add_(o)
