"""Each compiled op vs its pure-PyTorch twin, both from the op table (correctness first, then time).

Run: python benchmarks/bench_kernels.py [--quick]
Iterates :data:`mnemo_fast.fast.ops.OPS`: for every op, a few shapes; checks the compiled
result against the twin's, then prints median times (torch.utils.benchmark) of both and the
analytical extra memory of each (CPU max-RSS deltas are swamped by torch's own import and
allocator caching). The in-place perturbation ops are timed editing the same parameters
again and again; ``clone`` times one copy of them, the floor of one pass over the parameters.
"""

from __future__ import annotations

import argparse
import platform

import torch
from torch.utils import benchmark

from mnemo_fast.fast import _ext, ops

# Shapes per op: linear (N, T, out, in); conv2d (N, in, out, H=W, k); conv1d (N, in, out, L, k);
# perturbation (numel,).
SHAPES = {
    "sum_sq_grad_linear": [(1000, 1, 784, 1000), (64, 16, 1024, 1024), (256, 32, 512, 512),
                           (1000, 16, 256, 256), (128, 64, 1024, 256)],
    "sum_sq_grad_conv2d": [(128, 32, 64, 16, 3), (256, 3, 32, 32, 5), (64, 64, 128, 8, 3)],
    "sum_sq_grad_conv1d": [(128, 64, 64, 256, 5), (64, 128, 128, 64, 3)],
    "perturb_max_ratio": [(11_000_000,), (100_000,)],
    "perturb_shift_": [(11_000_000,), (100_000,)],
    "perturb_gaussian_": [(11_000_000,), (100_000,)],
    "perturb_dampen_": [(11_000_000,), (100_000,)],
}
THRESHOLD, LAM = 4.0, 1.0  # dampening: eta = f / r of two uniforms exceeds 4 for 1/8 of the elements
LAMBDA1, LAMBDA2, SIGN, TAU = 0.1, 1.0, -1.0, 1.0


def make_args(name: str, shape: tuple) -> tuple:
    """The op's arguments for ``shape`` (fp32, stride 1, padding k // 2)."""
    gen = torch.Generator().manual_seed(0)
    if name == "sum_sq_grad_linear":
        n, t, o, i = shape
        return torch.randn(n, t, o, generator=gen), torch.randn(n, t, i, generator=gen)
    if name.startswith("sum_sq_grad_conv"):
        n, c, o, size, k = shape
        spatial = (size, size) if name.endswith("2d") else (size,)
        x = torch.randn(n, c, *spatial, generator=gen)
        return torch.randn(n, o, *spatial, generator=gen), x, k, 1, k // 2, 1, 1
    numel = shape[0]
    forget = [torch.rand(numel, generator=gen) * 1e-6]
    remain = [torch.rand(numel, generator=gen) * 1e-6]
    if name == "perturb_max_ratio":
        return forget, remain
    if name == "perturb_dampen_":
        return [torch.randn(numel, generator=gen)], forget, remain, THRESHOLD, LAM
    max_ratio = ops.TWINS.perturb_max_ratio(forget, remain)
    last = (SIGN,) if name == "perturb_shift_" else (TAU, None)
    return ([torch.randn(numel, generator=gen)], forget, remain, max_ratio, LAMBDA1, LAMBDA2, *last)


def runner(name: str, fn, args: tuple, fresh: bool = False):
    """A no-argument call of ``fn``; with ``fresh``, an in-place op edits a copy of the
    parameters (returned) and the Gaussian draws from a generator seeded alike."""
    if not (fresh and name.endswith("_")):
        return lambda: fn(*args)
    params, rest = args[0], args[1:]

    def call():
        copy = [p.clone() for p in params]
        if name == "perturb_gaussian_":
            fn(copy, *rest[:-1], torch.Generator().manual_seed(0))
        else:
            fn(copy, *rest)
        return copy

    return call


def check(name: str, args: tuple) -> None:
    op = ops.OPS[name]
    got, want = runner(name, op.compiled, args, fresh=True)(), runner(name, op.twin, args, fresh=True)()
    if name == "perturb_gaussian_":  # same draws; eta by division vs exp(log - log)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    elif name == "perturb_dampen_":  # an eta within rounding of the threshold may fall either side
        _, forget, remain, threshold, _ = args
        eta = forget[0].double() / remain[0].double()
        clear = ((eta - threshold).abs() > 1e-5 * threshold)
        torch.testing.assert_close(got[0][clear], want[0][clear], rtol=1e-4, atol=1e-6)
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3 if name.startswith("sum") else 1e-6)


def workspace_mb(name: str, shape: tuple, block: int) -> tuple[float, float]:
    """Analytical extra memory (fp32) beyond inputs and output: (compiled, twin)."""
    threads = torch.get_num_threads()
    if name == "sum_sq_grad_linear":
        n, t, o, i = shape
        twin = min(n, block(n, o * i)) * o * i if t > 1 else n * (o + i)
        compiled = threads * (1 << 16) if t > 1 else n * (o + i)
    elif name.startswith("sum_sq_grad_conv"):
        n, c, o, size, k = shape
        taps, positions = (k * k, size * size) if name.endswith("2d") else (k, size)
        cols = c * taps * positions
        twin = min(n, block(n, o * c * taps)) * (cols + o * c * taps)
        compiled = min(n * cols, max(cols, 1 << 22)) + threads * (1 << 16)
    else:
        twin, compiled = 6 * shape[0], 0  # ~6 live temporaries of the formula vs none
    return compiled * 4 / 2**20, twin * 4 / 2**20


def median_ms(fn) -> float:
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1.0).median * 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="first shape of each op only")
    parser.add_argument("--ops", nargs="+", default=None, choices=list(ops.OPS), help="these ops only")
    opts = parser.parse_args()
    assert _ext.available(), _ext.load_error()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    for name, op in ops.OPS.items():
        if opts.ops and name not in opts.ops:
            continue
        for shape in SHAPES[name][: 1 if opts.quick else None]:
            args = make_args(name, shape)
            check(name, args)
            times = {"compiled": median_ms(runner(name, op.compiled, args)),
                     "twin": median_ms(runner(name, op.twin, args))}
            if name.endswith("_"):
                times["clone"] = median_ms(lambda: [p.clone() for p in args[0]])
            line = "  ".join(f"{path} {ms:8.2f} ms" for path, ms in times.items())
            line += "  workspace compiled {:.1f} MB, twin {:.1f} MB".format(*workspace_mb(name, shape, ops._block))
            ratios = "  ".join(f"compiled/{b} = {times['compiled'] / times[b]:.2f}x" for b in times if b != "compiled")
            print(f"{name:20s} {str(shape):24s} {line}  {ratios}")


if __name__ == "__main__":
    main()
