"""Property-based tests (Hypothesis): the fast path against the reference on random layer
configurations and on sizes drawn across the kernels' block boundaries, with shrinking to a
minimal failing case.

Block boundaries (where a size decides how the work is cut, so an off-by-one hides there):

- CPU conv (``csrc/cpu/sum_sq_grad_conv2d.cpp``): im2col blocks of
  ``max(1, 2^22 // (C * kh * kw * L))`` samples (the column budget, ``kColsBudget``);
- CPU accumulation (``csrc/cpu/sum_sq_grad.h``): D tiles of 64 output x 256 input features,
  ``2^16 // (64 * 256) = 4`` samples per bmm, and sample splits when there are fewer tiles than
  threads (so the thread count matters);
- ATen twins (``fast/ops.py``): blocks of ``_BLOCK_BYTES // (4 * per-sample elements)`` samples,
  patched here so that small problems need one, several and one-sample blocks;
- CUDA (``csrc/cuda/sum_sq_tile.cuh``, noted only, these tests run on the CPU): D tiles of
  64 x 64, 16 positions staged per step, up to 64 sample splits, conv im2col blocks of
  256 MiB; tests/test_ops_cuda.py covers those on a GPU.

float64 must match to 1e-10 relative to the largest entry; float32 to 1e-5 of the exact (float64)
value of the same numbers. Every test draws a few examples (``max_examples`` small,
``deadline=None``: the first call of an op compiles nothing but warms caches unevenly).
"""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given, settings, strategies as st  # noqa: E402

import mnemo_fast as mf  # noqa: E402
import mnemo_fast.reference as ref  # noqa: E402
from mnemo_fast.fast import _ext, ops  # noqa: E402
from mnemo_fast.fast.engine import EXTENSION, HOOKS_ATEN  # noqa: E402
from mnemo_fast.reference.engine import REFERENCE  # noqa: E402

COMPILED = _ext.available()
ENGINES = [HOOKS_ATEN, EXTENSION] if COMPILED else [HOOKS_ATEN]
needs_ext = pytest.mark.skipif(not COMPILED, reason="mnemo_fast._C unavailable")
#: few examples per test for the suite; MNEMO_FAST_EXAMPLES=300 for a long search
FEW = settings(max_examples=int(os.environ.get("MNEMO_FAST_EXAMPLES", "12")), deadline=None)
CONV_BUDGET = 1 << 22  # kColsBudget of the CPU conv kernel, in elements


def assert_close_to_max(got: torch.Tensor, exact: torch.Tensor, rel: float, msg: str = "") -> None:
    """|got - exact| <= rel * max|exact| everywhere (and rel relative where entries are large)."""
    scale = exact.abs().max().item()
    torch.testing.assert_close(got.to(exact.dtype), exact, rtol=rel, atol=rel * scale, msg=lambda m: f"{msg}: {m}")


def tolerance(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


@contextlib.contextmanager
def threads(n: int):
    """The CPU kernels split samples over threads when D has fewer tiles than threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def twin_block(samples: int, per_sample_elements: int):
    """The ATen twins' block budget set so that a block holds ``samples`` samples."""
    return mock.patch.object(ops, "_BLOCK_BYTES", 4 * per_sample_elements * samples)


# ---- the ops: compiled and twin vs an independent float64 formula ---------------------------

@needs_ext
@FEW
@given(n=st.integers(1, 9), t=st.sampled_from([1, 2, 5, 17]), out=st.sampled_from([1, 3, 63, 64, 65, 130]),
       inp=st.sampled_from([1, 7, 255, 256, 257, 300]), dtype=st.sampled_from([torch.float32, torch.float64]),
       nthreads=st.integers(1, 3), block=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_sum_sq_grad_linear_across_tiles_and_blocks(n, t, out, inp, dtype, nthreads, block, seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, t, out, generator=gen, dtype=dtype)
    x = torch.randn(n, t, inp, generator=gen, dtype=dtype)
    exact = torch.einsum("nto,nti->noi", g.double(), x.double()).square().sum(0)
    with threads(nthreads):
        compiled = ops.sum_sq_grad_linear(g, x)
    with twin_block(block, out * inp):
        twin = ops.twin_sum_sq_grad_linear(g, x)
    assert compiled.dtype == twin.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_max(compiled, exact, tolerance(dtype), "compiled")
    assert_close_to_max(twin, exact, tolerance(dtype), "twin")


@st.composite
def conv_configs(draw, max_size=9):
    """A Conv2d configuration whose output has at least one position."""
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    p = (draw(st.integers(0, k[0] // 2 + 1)), draw(st.integers(0, 1)))
    least = [max(1, d[i] * (k[i] - 1) + 1 - 2 * p[i]) for i in range(2)]
    hw = tuple(draw(st.integers(least[i], least[i] + max_size)) for i in range(2))
    return dict(cin=cin, cout=cout, k=k, s=s, p=p, d=d, groups=groups, hw=hw)


def conv_problem(c: dict, n: int, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c["cin"], *c["hw"], generator=gen, dtype=dtype)
    w = torch.zeros(c["cout"], c["cin"] // c["groups"], *c["k"], dtype=dtype)
    g = torch.randn(F.conv2d(x, w, None, c["s"], c["p"], c["d"], c["groups"]).shape, generator=gen, dtype=dtype)
    return g, x, [list(c["k"]), list(c["s"]), list(c["p"]), list(c["d"]), c["groups"]]


def conv_exact(g, x, args):
    """float64 per-sample weight gradients by autograd (vmap over samples), squared and summed."""
    k, s, p, d, groups = args
    w = torch.zeros(g.shape[1], x.shape[1] // groups, *k, dtype=torch.float64)

    def one(xn, gn):
        return torch.func.vjp(lambda w: F.conv2d(xn[None], w, None, s, p, d, groups), w)[1](gn[None])[0]

    return torch.vmap(one)(x.double(), g.double()).square().sum(0)


@needs_ext
@FEW
@given(c=conv_configs(), n=st.integers(1, 6), dtype=st.sampled_from([torch.float32, torch.float64]),
       nthreads=st.integers(1, 3), block=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_sum_sq_grad_conv2d_random_configurations(c, n, dtype, nthreads, block, seed):
    g, x, args = conv_problem(c, n, dtype, seed)
    exact = conv_exact(g, x, args)
    with threads(nthreads):
        compiled = ops.sum_sq_grad_conv2d(g, x, *args)
    kk = c["k"][0] * c["k"][1]
    with twin_block(block, c["cout"] * c["cin"] // c["groups"] * kk):
        twin = ops.twin_sum_sq_grad_conv2d(g, x, *args)
    assert_close_to_max(compiled, exact, tolerance(dtype), "compiled")
    assert_close_to_max(twin, exact, tolerance(dtype), "twin")


# The column budget: C * kh * kw * L elements per sample against 2^22. C = 4, 2x2 kernel
# (16 columns per position), output 256 x w positions: w = 512 puts exactly two samples in a
# block (2^21 per sample), w = 513 one sample per block; N = 1, 2, 3 lands on each side.
@needs_ext
@pytest.mark.parametrize("width", [512, 513], ids=["2-per-block", "1-per-block"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_sum_sq_grad_conv2d_column_budget(n, width):
    c = dict(cin=4, cout=2, k=(2, 2), s=(1, 1), p=(0, 0), d=(1, 1), groups=1, hw=(257, width + 1))
    g, x, args = conv_problem(c, n, torch.float32, seed=n)
    per_sample = 4 * 4 * 256 * width
    assert (CONV_BUDGET // per_sample, per_sample) == ((2, 2**21) if width == 512 else (1, 2**21 + 4096))
    exact = ops.twin_sum_sq_grad_conv2d(g.double(), x.double(), *args)  # one block in float64
    assert_close_to_max(ops.sum_sq_grad_conv2d(g, x, *args), exact, 1e-5)


# ---- whole layers: fast engines vs the reference ---------------------------------------------

class Broadcast(nn.Module):
    """A raw parameter [D] broadcast over an activation [N, T, D] as ``use`` says."""

    def __init__(self, length: int, dim: int, use: str, alpha: float):
        super().__init__()
        self.length, self.use, self.alpha = length, use, alpha
        self.b = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        if self.use == "add":
            return torch.add(x, self.b, alpha=self.alpha)
        if self.use == "sub":
            return torch.sub(x, self.b, alpha=self.alpha)
        if self.use == "expand":  # [T, D]: no sample dimension, the generic path takes it
            return x + self.b.expand(self.length, -1)
        return (x.transpose(0, 1) + self.b).transpose(0, 1)  # added on [T, N, D]


@st.composite
def layers(draw):
    """(module, input maker (n, generator) -> input) for one random layer."""
    kind = draw(st.sampled_from(["linear", "conv1d", "conv2d", "embedding", "layernorm", "broadcast"]))
    t = draw(st.integers(1, 5))
    if kind == "linear":
        inp, out = draw(st.integers(1, 70)), draw(st.integers(1, 70))
        layer = nn.Linear(inp, out, bias=draw(st.booleans()))
        return layer, lambda n, g: torch.randn(n, t, inp, generator=g)
    if kind == "embedding":
        vocab, dim = draw(st.integers(1, 12)), draw(st.integers(1, 8))
        pad = draw(st.sampled_from([None, 0]))
        return nn.Embedding(vocab, dim, padding_idx=pad), lambda n, g: torch.randint(0, vocab, (n, t), generator=g)
    if kind == "layernorm":
        dim = draw(st.integers(1, 9))
        layer = nn.LayerNorm(dim, elementwise_affine=draw(st.booleans()), bias=draw(st.booleans()))
        return layer, lambda n, g: torch.randn(n, t, dim, generator=g)
    if kind == "broadcast":
        dim, use = draw(st.integers(1, 6)), draw(st.sampled_from(["add", "sub", "expand", "positions_first"]))
        layer = Broadcast(t, dim, use, draw(st.sampled_from([1.0, 3.0, 0.5, -2.0])))
        return layer, lambda n, g: torch.randn(n, t, dim, generator=g)
    c = draw(conv_configs(max_size=5))
    mode = draw(st.sampled_from(["zeros", "zeros", "circular", "reflect", "replicate"]))
    dims = 2 if kind == "conv2d" else 1
    # padding other than zeros needs padding < size (reflect's rule, kept for all): redraw the rest
    assume(mode == "zeros" or all(c["p"][i] < c["hw"][i] for i in range(dims)))
    if kind == "conv2d":
        layer = nn.Conv2d(c["cin"], c["cout"], c["k"], c["s"], c["p"], c["d"], c["groups"], bias=draw(st.booleans()),
                          padding_mode=mode)
        return layer, lambda n, g: torch.randn(n, c["cin"], *c["hw"], generator=g)
    layer = nn.Conv1d(c["cin"], c["cout"], c["k"][0], c["s"][0], c["p"][0], c["d"][0], c["groups"],
                      bias=draw(st.booleans()), padding_mode=mode)
    return layer, lambda n, g: torch.randn(n, c["cin"], c["hw"][0], generator=g)


def with_head(layer: nn.Module, x: torch.Tensor, classes: int = 3) -> nn.Module:
    """``layer``, tanh (so the head's input depends on every parameter), flatten, a Linear head."""
    with torch.no_grad():
        features = layer(x[:1]).flatten(1).shape[1]
    return nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.Linear(features, classes))


@FEW
@given(layer=layers(), n=st.integers(1, 6), chunk=st.sampled_from(["none", "1", "n-1", "n"]),
       dtype=st.sampled_from([torch.float32, torch.float64]), engine=st.sampled_from(ENGINES),
       block=st.sampled_from([1, 4096, 64 << 20]), seed=st.integers(0, 2**16))
def test_fast_fisher_equals_reference_on_random_layers(layer, n, chunk, dtype, engine, block, seed):
    torch.manual_seed(seed)
    module, make = layer
    gen = torch.Generator().manual_seed(seed)
    x = make(n, gen)
    model = with_head(module, x)
    y = torch.randint(0, 3, (n,), generator=gen)
    chunk_size = {"none": None, "1": 1, "n-1": max(n - 1, 1), "n": n}[chunk]
    exact = ref.fisher_diagonal(model.double(), x.double() if x.is_floating_point() else x, y, reduction="sum")
    model = model.to(dtype)
    x = x.to(dtype) if x.is_floating_point() else x
    with mock.patch.object(ops, "_BLOCK_BYTES", block):
        got = mf.fisher_diagonal(model, x, y, reduction="sum", chunk_size=chunk_size, engine=engine)
    assert list(got) == list(exact)
    for name, value in exact.items():
        assert got[name].dtype == dtype
        assert_close_to_max(got[name], value, tolerance(dtype), name)


# ---- the perturbation: zero and inf Fisher values, random shapes ------------------------------

@st.composite
def fisher_pairs(draw):
    """Fisher pairs of random shapes with zeros, +inf, NaN and ordinary values in both."""
    shapes = draw(st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4))
    special = st.sampled_from([0.0, float("inf"), float("nan"), 1e-300, 3.0])
    forget, remain = [], []
    for shape in shapes:
        numel = int(torch.tensor(shape).prod().item()) if shape else 1
        values = st.lists(st.one_of(st.floats(1e-12, 1e3), special), min_size=2 * numel, max_size=2 * numel)
        flat = torch.tensor(draw(values), dtype=torch.float64)
        forget.append(flat[:numel].reshape(shape))
        remain.append(flat[numel:].reshape(shape))
    return forget, remain


def eta_by_division(f, r):
    """eta = f / r with the kernels' rules (NaN -> 0); the same function as the reference's
    exp(log f - log r), with one rounding instead of three."""
    eta = f / r
    return torch.where(torch.isnan(eta), torch.zeros_like(eta), eta)


@needs_ext
@FEW
@given(pair=fisher_pairs(), lambdas=st.sampled_from([(1e-3, 10.0), (0.1, 1.0), (5.0, 1e-6)]),
       sign=st.sampled_from([1.0, -1.0]), seed=st.integers(0, 2**16))
def test_perturbation_ops_equal_the_formula_in_float64(pair, lambdas, sign, seed):
    forget, remain = pair
    lambda1, lambda2 = lambdas
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(f.shape, generator=gen, dtype=torch.float64) for f in forget]
    # max ratio: bitwise the division form, within the reference's own rounding of its log form
    got_max = ops.perturb_max_ratio(forget, remain)
    etas = [eta_by_division(f, r) for f, r in zip(forget, remain)]
    want_max = torch.stack([e[torch.isfinite(e)].max() if torch.isfinite(e).any() else e.new_zeros(()) for e in etas])
    assert torch.equal(got_max, want_max)
    torch.testing.assert_close(REFERENCE.max_ratio(forget, remain), want_max, rtol=1e-12, atol=0)
    # shift: bitwise the formula; the reference within its rounding, with the same special cases
    shifted = [p.clone() for p in params]
    ops.perturb_shift_(shifted, forget, remain, got_max, lambda1, lambda2, sign)
    by_reference = [p.clone() for p in params]
    REFERENCE.shift_(by_reference, forget, remain, want_max, lambda1, lambda2, sign)
    for p, e, m, got, reference in zip(params, etas, want_max, shifted, by_reference):
        # lambda2 / max as torch divides a scalar by a tensor: reciprocal, then product
        alpha = min(lambda1, (1.0 / m.item()) * lambda2) if m > 0 else lambda1
        want = p + sign * (alpha * torch.where(torch.isinf(e), m, e))
        assert torch.equal(got, want)
        assert torch.isfinite(got).all()
        # the reference's log-form eta differs by ~1e-12 relative to the *shift*; the sum p + shift
        # then rounds relative to its operands, so a cancellation (p close to -shift) is no error
        shift = (alpha * torch.where(torch.isinf(e), m, e)).abs()
        bound = 1e-12 * shift + 4 * torch.finfo(torch.float64).eps * (p.abs() + shift) + 1e-300
        assert ((reference - want).abs() <= bound).all()


@needs_ext
@FEW
@given(pair=fisher_pairs(), tau=st.sampled_from([0.0, 0.5, 2.0]), seed=st.integers(0, 2**16))
def test_gaussian_op_draws_like_the_reference_in_float64(pair, tau, seed):
    forget, remain = pair
    params = [torch.zeros(f.shape, dtype=torch.float64) for f in forget]
    m = ops.perturb_max_ratio(forget, remain)
    got = [p.clone() for p in params]
    ops.perturb_gaussian_(got, forget, remain, m, 0.1, 1.0, tau, torch.Generator().manual_seed(seed))
    want = [p.clone() for p in params]
    REFERENCE.gaussian_(want, forget, remain, m, 0.1, 1.0, tau, torch.Generator().manual_seed(seed))
    for g, w, f, r in zip(got, want, forget, remain):
        assert torch.isfinite(g).all()
        assert torch.equal(g == 0, w == 0)  # the same mask eta <= tau, draw for draw
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-300)
