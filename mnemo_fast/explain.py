"""Which path computes each parameter's Fisher, and why: ``mnemo_fast.explain``.

The fast engine batches a parameter's per-sample squared gradients when a layer rule, the
broadcast rule or an operation-level rule can take it, and sends the rest to the exact but
slower generic per-sample path (docs/FAST_PATH.md, "Which parameter goes where"). This module
reports that choice per parameter, so a user can check a model before relying on its speed,
and warns once per model when a call sends parameters to the generic path.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from . import engines
from .fast.dispatch import LinearPath
from .fast.ops import linear_path_for
from .fast.plan import GenericPathWarning, Route  # noqa: F401 (part of this module's API)
from .modeling import eval_mode, logits_of
from .session import ParamSelector, only_parameters
from .sharding import any_sharded

Tensor = torch.Tensor

#: The paths a parameter can take.
PATHS = ("rule", "broadcast", "operation", "joined", "generic", "reference")


@dataclass
class Explanation:
    """The route of every trainable parameter (in the model's order), on ``backend``;
    ``decision``: the call's path and why, as :func:`mnemo_fast.engines.decide` gave it;
    ``linear``: name -> the Linear path of each Linear Fisher sum of that parameter (a Linear
    weight: one; ``in_proj_weight``: q, k, v), as :func:`mnemo_fast.fast.dispatch.decide_linear`
    decides it for these inputs on their device now (its free memory). Each route's ``detail``
    ends with it."""

    backend: str
    routes: list[Route] = field(default_factory=list)
    decision: str = ""
    linear: dict[str, tuple[LinearPath, ...]] = field(default_factory=dict)

    @property
    def generic(self) -> list[Route]:
        """The parameters no rule takes (the generic per-sample path); those that join
        their pass (path "joined") are not counted: they are not its cause."""
        return [r for r in self.routes if r.path == "generic"]

    def counts(self) -> dict[str, int]:
        out = {path: 0 for path in PATHS}
        for r in self.routes:
            out[r.path] += 1
        return {path: n for path, n in out.items() if n}

    def __str__(self) -> str:
        width = max((len(r.name) for r in self.routes), default=4)
        lines = [f"backend {self.backend}: " + ", ".join(f"{n} {path}" for path, n in self.counts().items())]
        lines += [f"  path: {self.decision}"] if self.decision else []
        lines += [f"  {r.name:<{width}}  {r.path:<9}  {r.detail}" for r in self.routes]
        return "\n".join(lines)


def explain(
    model: torch.nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    output_fn: Callable[[object], Tensor] = logits_of,
    params: ParamSelector = None,
    engine=None,
) -> Explanation:
    """How the Fisher of ``model`` on ``inputs`` [N, ...] / ``targets`` [N] would be computed,
    per trainable parameter: which rule takes it, or why it goes to the generic path. Runs
    the planner's probes (forwards on one and on two samples), not the Fisher itself. Give at
    least two different inputs, as :func:`mnemo_fast.forget` does with the codes: with one,
    folded samples cannot be told apart."""
    decision = engines.decide(engine, inputs.device, sharded=any_sharded(model.parameters()))
    engine = engines.resolve(engine)
    backend, why = decision.fisher, str(decision)
    with engines.forwards(engine, model), eval_mode(model), only_parameters(model, params):
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        routes = getattr(engine, "routes", None)
        if routes is None:
            return Explanation(backend, [Route(name, "reference", "per-sample gradients (torch.func)")
                                         for name in names], why)
        found = routes(model, inputs, targets, output_fn)
    listed = [found[name] for name in names]
    compiled = backend in ("cpu-ext", "cuda-ext")
    linear = {r.name: tuple(linear_path_for(inputs.shape[0], t, d_in, d_out, dtype, inputs.device, compiled)
                            for t, d_in, d_out, dtype in r.linear) for r in listed if r.linear}
    listed = [replace(r, detail=f"{r.detail}; linear path {_paths(linear[r.name])}") if r.name in linear else r
              for r in listed]
    return Explanation(backend, listed, why, linear)


def _paths(paths: tuple[LinearPath, ...]) -> str:
    """One path, or each sum's (q, k, v of an attention's in_proj_weight) when they differ."""
    shown = list(dict.fromkeys(str(p) for p in paths))
    return shown[0] if len(shown) == 1 else " | ".join(f"{i + 1}: {p}" for i, p in enumerate(map(str, paths)))
