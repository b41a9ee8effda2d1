"""Each compiled kernel vs its best plain-PyTorch equivalent (correctness first, then time).

Run: python benchmarks/bench_kernels.py [--quick]
Prints median times (torch.utils.benchmark) and the analytical extra memory of each
method (CPU max-RSS deltas are swamped by torch's own import and allocator caching).
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from mnemo_fast.fast import _ext, ops
from mnemo_fast.reference import kernels as ref

CHUNK = 32  # samples per bmm in the chunked plain-PyTorch versions


def linear_plain(g, x):
    if g.shape[1] == 1:  # one GEMM on squared operands
        return g[:, 0].square().t() @ x[:, 0].square()
    d = x.new_zeros(g.shape[2], x.shape[2])
    for n0 in range(0, g.shape[0], CHUNK):
        d += torch.bmm(g[n0 : n0 + CHUNK].transpose(1, 2), x[n0 : n0 + CHUNK]).square_().sum(0)
    return d


def conv_plain(g, x, k, s, p, dil, groups):
    n, c = x.shape[:2]
    out = g.shape[1]
    d = x.new_zeros(groups, out // groups, c // groups * k[0] * k[1])
    for n0 in range(0, n, CHUNK):
        cols = F.unfold(x[n0 : n0 + CHUNK], k, dil, p, s)
        b = cols.shape[0]
        cols = cols.view(b, groups, -1, cols.shape[-1]).transpose(0, 1).flatten(0, 1)
        gg = g[n0 : n0 + CHUNK].reshape(b, groups, out // groups, -1).transpose(0, 1).flatten(0, 1)
        gs = torch.bmm(gg, cols.transpose(1, 2)).square_().view(groups, b, out // groups, -1)
        d += gs.sum(1)
    return d.view(out, c // groups, *k)


def shift_plain(params, forget, remain, lambda1, lambda2, sign):
    from mnemo_fast.reference import perturb

    for p, f, r in zip(params, forget, remain):
        p.add_((sign * perturb.shift(f, r, lambda1, lambda2)).to(p.dtype))


def make_case(kind, shape):
    gen = torch.Generator().manual_seed(0)
    if kind == "linear":
        n, t, o, i = shape
        return torch.randn(n, t, o, generator=gen), torch.randn(n, t, i, generator=gen)
    if kind == "conv":
        n, c, o, hw, k = shape
        x = torch.randn(n, c, hw, hw, generator=gen)
        g = torch.randn(n, o, hw, hw, generator=gen)  # stride 1, padding k//2
        return g, x, [k, k], [1, 1], [k // 2, k // 2], [1, 1], 1
    numel = shape[0]
    f = [torch.rand(numel, generator=gen) * 1e-6]
    r = [torch.rand(numel, generator=gen) * 1e-6]
    return [torch.randn(numel, generator=gen)], f, r


def methods(kind):
    if kind == "linear":
        return {"kernel": ops.sum_sq_grad_linear, "plain": linear_plain}
    if kind == "conv":
        return {"kernel": ops.sum_sq_grad_conv2d, "plain": conv_plain}

    def kernel(params, f, r):
        ops.perturb_shift_(params, f, r, ops.perturb_max_ratio(f, r), 0.1, 1.0, -1.0)

    return {
        "kernel": kernel,
        "plain": lambda params, f, r: shift_plain(params, f, r, 0.1, 1.0, -1.0),
        "clone": lambda params, f, r: params[0].clone(),
    }


def workspace_mb(kind, shape):
    """Analytical extra memory (fp32) beyond inputs and output: (kernel, plain chunked)."""
    threads = torch.get_num_threads()
    if kind == "linear":
        n, t, o, i = shape
        plain = min(n, CHUNK) * o * i if t > 1 else n * (o + i)
        kernel = threads * (1 << 16) if t > 1 else n * (o + i)
    elif kind == "conv":
        n, c, o, hw, k = shape
        cols = c * k * k * hw * hw
        plain = min(n, CHUNK) * (cols + o * c * k * k)
        kernel = min(n * cols, max(cols, 1 << 22)) + threads * (1 << 16)
    else:
        plain, kernel = 6 * shape[0], 0  # ~6 live temporaries of the formula vs none
    return kernel * 4 / 2**20, plain * 4 / 2**20


def check(kind, args):
    if kind == "linear":
        torch.testing.assert_close(ops.sum_sq_grad_linear(*args), linear_plain(*args), rtol=1e-4, atol=1e-3)
    elif kind == "conv":
        torch.testing.assert_close(ops.sum_sq_grad_conv2d(*args), conv_plain(*args), rtol=1e-4, atol=1e-3)
    else:
        params, f, r = args
        a, b = [params[0].clone()], [params[0].clone()]
        methods(kind)["kernel"](a, f, r)
        shift_plain(b, f, r, 0.1, 1.0, -1.0)
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)


CASES = [
    ("linear", (1000, 1, 784, 1000)),
    ("linear", (64, 16, 1024, 1024)),
    ("linear", (256, 32, 512, 512)),
    ("linear", (1000, 16, 256, 256)),
    ("linear", (128, 64, 1024, 256)),
    ("conv", (128, 32, 64, 16, 3)),
    ("conv", (256, 3, 32, 32, 5)),
    ("conv", (64, 64, 128, 8, 3)),
    ("perturb", (11_000_000,)),
    ("perturb", (100_000,)),
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="first case of each kind only")
    opts = parser.parse_args()
    assert _ext.available(), _ext.load_error()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    seen = set()
    for kind, shape in CASES:
        if opts.quick and kind in seen:
            continue
        seen.add(kind)
        args = make_case(kind, shape)
        check(kind, args)
        times = {}
        for name, fn in methods(kind).items():
            timer = benchmark.Timer("fn(*args)", globals={"fn": fn, "args": args})
            times[name] = timer.blocked_autorange(min_run_time=1.0).median * 1e3
        line = "  ".join(f"{name} {ms:8.2f} ms" for name, ms in times.items())
        line += "  workspace kernel {:.1f} MB, plain {:.1f} MB".format(*workspace_mb(kind, shape))
        ratios = "  ".join(f"kernel/{b} = {times['kernel'] / times[b]:.2f}x" for b in times if b != "kernel")
        print(f"{kind:8s} {str(shape):28s} {line}  {ratios}")


if __name__ == "__main__":
    main()
