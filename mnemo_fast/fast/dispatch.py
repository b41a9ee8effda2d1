"""The path of a call, decided in one place: :func:`decide` (issue 23).

Which engine runs, what computes the Fisher ("cpu-ext", "cuda-ext", "hooks-aten",
"reference") and whether the perturbation is fused, from the device, whether the model is
sharded and the engine's abilities (the extension's: CPU kernels, CUDA kernels built with an
image for the GPU). :func:`mnemo_fast.engines.decide` is its public face (it fills in the
default engine); the fast engines' methods, ``backend()`` and ``explain`` all read its answer.
:func:`decide_linear`, below, picks the path of each Linear Fisher sum (squares-gemm,
chunked-bmm or the fused kernel) from its sizes, dtype, device and free memory.
What stays per tensor (contiguous, one device per fused call) is the fast engine's ``_fused``.

It reads engines by their attributes only, so it imports no engine (the fast engine imports it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dtypes import accumulation_dtype
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


# ---- the Linear Fisher's path: decide_linear -------------------------------------------------
#
# sum_n (g_n^T x_n)^2 over T positions (the Linear rule, the attention rule's projections, the
# operation-level linear uses, a convolution with one output position) has three ways to run;
# decide_linear picks one from the sizes alone, so CI tests its choices without a GPU.
# docs/FAST_PATH.md, "Which Linear path: the dispatch rule"; benchmarks/LINEAR-PATHS.md.

#: The Linear Fisher's paths, for :attr:`LinearPath.path`.
LINEAR_PATHS = ("squares-gemm", "chunked-bmm", "fused")

#: CPU: the per-sample gradients (and bf16/fp16 operands cast to float32) of one chunk of the
#: chunked path take at most this many bytes. A fixed budget (the CPU has no free-memory figure
#: worth trusting), measured: chunks of 4-16 samples of 768 x 768 (9-36 MiB) time alike, the
#: whole batch of 64 (144 MiB) 1.7x slower; the last-level cache is what counts
#: (benchmarks/LINEAR-PATHS.md).
CPU_CHUNK_BYTES = 16 * 2**20

#: CPU, compiled kernel present, T > 1: the fused kernel below this T, chunked-bmm from it on.
#: Measured (benchmarks/LINEAR-PATHS.md: one thread on a shared 2-core machine, N = 64): the
#: batched GEMM is 1.0-1.4x faster from T = 128 on at 256 -> 256, 768 -> 768 and 768 -> 3072,
#: the fused kernel up to 3x faster at T = 16-64.
CPU_BMM_MIN_T = 128

#: CUDA: a chunk of the chunked path takes at most this fraction of the free memory (what the
#: driver reports free plus what torch's allocator caches unused). WAITS FOR A GPU MEASUREMENT:
#: a first guess leaving room for the rest of the pass.
CUDA_FREE_FRACTION = 0.25

#: CUDA, compiled kernel present: chunked-bmm from this T on. WAITS FOR A GPU MEASUREMENT: the
#: one GPU figure (benchmarks/GPU.md, H200) has the fused kernel (float32 FMA tiles, no tensor
#: cores) at 2.29 ms for T = 197, 64 x 768 x 768, against about 1.1 ms for the batched GEMM
#: (estimated from 8 samples), so every T > 1 goes to cuBLAS until .ci/gpu_bench.py's
#: crossover table says otherwise.
CUDA_BMM_MIN_T = 2

#: CUDA, compiled kernel present: chunks of fewer samples than this go to the fused kernel
#: instead (it holds no per-sample gradient). WAITS FOR A GPU MEASUREMENT: 1 takes the batched
#: GEMM whenever one sample's gradient fits the budget.
CUDA_MIN_CHUNK = 1


@dataclass(frozen=True)
class LinearPath:
    """The path of one Linear Fisher sum.

    - ``path``: "squares-gemm" (T = 1: one GEMM of squares), "chunked-bmm" (per-sample
      gradients of ``chunk`` samples at a time by a batched GEMM) or "fused" (the compiled
      kernel, which never holds a per-sample gradient);
    - ``chunk``: samples per batched GEMM on "chunked-bmm" (at least 1); the number of samples
      on the other paths (all in one call);
    - ``reason``: one line saying why.
    """

    path: str
    chunk: int
    reason: str

    def __str__(self) -> str:
        chunk = f" (chunk {self.chunk})" if self.path == "chunked-bmm" else ""
        return f"{self.path}{chunk}: {self.reason}"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def linear_sample_bytes(t: int, d_in: int, d_out: int, dtype: torch.dtype) -> int:
    """Bytes one sample takes on the chunked path: its gradient ``[d_out, d_in]`` in the
    accumulation dtype, plus its operands cast to that dtype when ``dtype`` is narrower."""
    acc = accumulation_dtype(dtype)
    cast = t * (d_in + d_out) if acc != dtype else 0
    return _itemsize(acc) * (d_out * d_in + cast)


def linear_budget(device_type: str, free_bytes: int | None) -> tuple[int, str]:
    """(bytes a chunk may take, where that figure comes from)."""
    if device_type == "cuda" and free_bytes is not None:
        return int(CUDA_FREE_FRACTION * free_bytes), f"{CUDA_FREE_FRACTION:g} of {_mib(free_bytes)} free"
    return CPU_CHUNK_BYTES, "the fixed budget"


def linear_chunk(n: int, t: int, d_in: int, d_out: int, dtype: torch.dtype, device_type: str,
                 free_bytes: int | None = None) -> int:
    """Samples per batched GEMM of the chunked path: as many as the budget holds
    (:func:`linear_budget`, :func:`linear_sample_bytes` each), at most ``n``, at least one."""
    budget, _ = linear_budget(device_type, free_bytes)
    return max(1, min(n, budget // linear_sample_bytes(t, d_in, d_out, dtype)))


def _mib(b: int) -> str:
    return f"{b / 2**20:.1f} MiB" if b < 2**30 else f"{b / 2**30:.1f} GiB"


def decide_linear(
    n: int,
    t: int,
    d_in: int,
    d_out: int,
    dtype: torch.dtype,
    device_type: str,
    *,
    free_bytes: int | None = None,
    fused: bool = False,
) -> LinearPath:
    """The path of ``sum_n (g_n^T x_n)^2`` for ``n`` samples of ``t`` positions, a
    ``[d_out, d_in]`` weight, operands of ``dtype`` on a ``device_type`` ("cpu", "cuda", ...)
    device with ``free_bytes`` free (CUDA; None: unknown, the fixed CPU budget is used);
    ``fused``: the compiled kernel exists for this device. A pure function of its arguments.

    - T = 1: "squares-gemm", ``(g^2)^T (x^2)``, exact and one plain GEMM (the fused kernels
      take the same branch).
    - The chunk: as many samples as the budget holds (``linear_sample_bytes`` each; the budget:
      :data:`CPU_CHUNK_BYTES` on the CPU, :data:`CUDA_FREE_FRACTION` of the free memory on a
      GPU), at most ``n``, at least one.
    - No compiled kernel: "chunked-bmm", a chunk of one sample even when that sample alone is
      over the budget.
    - CPU with the kernel: "fused" below :data:`CPU_BMM_MIN_T` (measured crossover,
      benchmarks/LINEAR-PATHS.md), else "chunked-bmm"; "fused" too when one sample is over the
      budget.
    - CUDA with the kernel: "chunked-bmm" from :data:`CUDA_BMM_MIN_T` on (every T > 1 until a GPU
      measures otherwise), "fused" when the budget holds fewer than :data:`CUDA_MIN_CHUNK`
      samples.
    """
    if t == 1:
        return LinearPath("squares-gemm", max(n, 1), "T = 1: one GEMM of squares (g^2)^T (x^2), exact")
    per_sample = linear_sample_bytes(t, d_in, d_out, dtype)
    budget, source = linear_budget(device_type, free_bytes)
    fits = budget // per_sample
    chunk = linear_chunk(n, t, d_in, d_out, dtype, device_type, free_bytes)
    held = f"{chunk} of {n} samples' gradients ({_mib(chunk * per_sample)}) within {_mib(budget)} ({source})"
    if not fused:
        if fits < 1:
            return LinearPath("chunked-bmm", 1, f"no compiled kernel on {device_type}; one sample's gradient "
                              f"({_mib(per_sample)}) is over {_mib(budget)} ({source}): one at a time")
        return LinearPath("chunked-bmm", chunk, f"no compiled kernel on {device_type}: {held}")
    if fits < 1:
        return LinearPath("fused", max(n, 1), f"one sample's gradient ({_mib(per_sample)}) is over "
                          f"{_mib(budget)} ({source}); the fused kernel holds none")
    if device_type == "cuda":
        if t < CUDA_BMM_MIN_T:
            return LinearPath("fused", max(n, 1), f"T = {t} < {CUDA_BMM_MIN_T} on CUDA")
        if chunk < min(CUDA_MIN_CHUNK, max(n, 1)):
            return LinearPath("fused", max(n, 1), f"only {chunk} samples per chunk fit {_mib(budget)} ({source})")
        return LinearPath("chunked-bmm", chunk, f"T = {t} >= {CUDA_BMM_MIN_T} on CUDA: cuBLAS batched GEMM "
                          f"(the fused kernel was slower at T = 197; the thresholds wait for a GPU run); {held}")
    if t < CPU_BMM_MIN_T:
        return LinearPath("fused", max(n, 1), f"T = {t} < {CPU_BMM_MIN_T}: the fused CPU kernel measured faster")
    return LinearPath("chunked-bmm", chunk, f"T = {t} >= {CPU_BMM_MIN_T}: batched GEMM measured faster on the "
                      f"CPU; {held}")
