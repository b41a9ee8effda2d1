"""The path of a call, decided in one place: :func:`decide` (issue 23).

Which engine runs, what computes the Fisher ("cpu-ext", "cuda-ext", "hooks-aten",
"reference") and whether the perturbation is fused, from the device, whether the model is
sharded and the engine's abilities (the extension's: CPU kernels, CUDA kernels built with an
image for the GPU). :func:`mnemo_fast.engines.decide` is its public face (it fills in the
default engine); the fast engines' methods, ``backend()`` and ``explain`` all read its answer.
What stays per tensor (contiguous, one device per fused call) is the fast engine's ``_fused``.

It reads engines by their attributes only, so it imports no engine (the fast engine imports it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .devices import generator_fits

#: What each Fisher path is, for :attr:`Decision.why`.
RUNS = {
    "cpu-ext": "layer rules on the compiled CPU kernels",
    "cuda-ext": "layer rules on the compiled CUDA kernels",
    "hooks-aten": "layer rules on ATen ops",
    "reference": "per-sample gradients (torch.func)",
}


@dataclass(frozen=True)
class Decision:
    """The path of one call.

    - ``engine``: the engine to call (what :func:`mnemo_fast.engines.select` returns);
    - ``fisher``: what computes the Fisher on the device: "cpu-ext", "cuda-ext", "hooks-aten"
      or "reference" (what ``backend()`` and ``explain(...).backend`` answer);
    - ``perturbation``: "fused" (the compiled kernels) or "reference" (the paper's formula);
    - ``why``: one line saying why.
    """

    engine: object
    fisher: str
    perturbation: str
    why: str

    def __str__(self) -> str:
        return f"fisher {self.fisher}, perturbation {self.perturbation}: {self.why}"


def decide(
    engine,
    device: torch.device | None = None,
    *,
    sharded: bool = False,
    generator: torch.Generator | None = None,
    shards=None,
    why: tuple[str, ...] = (),
) -> Decision:
    """The path of ``engine``'s work on ``device``.

    - On a ``device`` an engine's kernels do not run on (``runs_on``: the CPU always, a GPU
      when the build has CUDA kernels with an image for it), its ``fallback`` takes its place
      (the fused engine's: the hooks engine on ATen ops, whose perturbation is the reference's).
    - ``sharded`` (DTensor) parameters: an engine that cannot take shards (``takes_shards``
      False: the reference's torch.func) gives way to ``shards`` (the hooks engine on ATen
      ops) for the Fisher; the perturbation stays the engine's own (elementwise on the shards).
    - An engine that splits the work across ranks (``inner``: the distributed one) is the
      engine to call; its path is its inner engine's.
    - ``generator`` (the Gaussian draw): one serving another device than ``device`` is drawn
      from as torch.randn does, on the reference's formula.
    - ``why``: reasons decided before (the default engine's), put first.

    No ``device``: no fallback is taken and ``fisher`` is the engine's own name.
    """
    reasons = list(why)
    inner = getattr(engine, "inner", None)
    if inner is not None:  # split across ranks: each rank runs its inner engine's path
        path = decide(inner, device, sharded=sharded, generator=generator, shards=shards, why=why)
        return Decision(engine, path.fisher, path.perturbation, f"{engine.name}: {path.why}")
    runner = engine
    if device is not None:
        while not getattr(runner, "runs_on", lambda d: True)(device) and getattr(runner, "fallback", None) is not None:
            reasons.append(f"the {runner.name} kernels do not run on {device}")
            runner = runner.fallback
    fused = bool(getattr(runner, "fused_perturbation", False))
    if fused and generator is not None and device is not None and not generator_fits(generator.device, device):
        fused = False
        reasons.append(f"the generator serves {generator.device}, not {device}")
    if sharded and not getattr(runner, "takes_shards", False) and shards is not None:
        reasons.append(f"the {runner.name} engine cannot take sharded parameters")
        runner = shards
    if device is None:
        fisher = runner.name
    elif getattr(runner, "runs_on", None) is not None:  # a fast engine: its kernels name the path
        fisher = f"{device.type}-ext" if getattr(runner, "compiled", False) else runner.name
    else:
        fisher = runner.backend_for(device)
    reasons.append(RUNS.get(fisher, f"the {fisher} engine"))
    return Decision(runner, fisher, "fused" if fused else "reference", "; ".join(reasons))
