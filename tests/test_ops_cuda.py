"""CUDA operators vs their pure-PyTorch twins (mnemo_fast.fast.ops.TWINS) on the GPU (runs only
where a GPU and the CUDA kernels are present; CI is CPU-only and compile-checks the .cu files instead).

The second half is the first-GPU-run plan: generators, special Fishers, tile and block edges,
layouts, dtypes, many tensors, devices and streams, 2^31 elements. `make gpu-check` runs it
with compute-sanitizer and the GPU benchmarks (.ci/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mnemo_fast.fast import _ext

if not (torch.cuda.is_available() and _ext.available() and _ext.has_cuda_kernels()):
    pytest.skip("needs a GPU and the CUDA build of mnemo_fast._C", allow_module_level=True)

from mnemo_fast.fast import ops  # noqa: E402
from mnemo_fast.fast.ops import TWINS as twin  # noqa: E402
from test_ops_cpu import CONV, LINEAR, SHAPES, case_id, conv_args, conv_inputs, fishers  # noqa: E402

CUDA = torch.device("cuda")


def tol(dtype):
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", LINEAR, ids=case_id)
def test_sum_sq_grad_linear_cuda(case, dtype):
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(case["N"], case["T"], case["out"], generator=gen).to(dtype)
    x = torch.randn(case["N"], case["T"], case["inp"], generator=gen).to(dtype)
    want = twin.sum_sq_grad_linear(g.double(), x.double())
    got = ops.sum_sq_grad_linear(g.to(CUDA), x.to(CUDA)).cpu()
    low = dtype in (torch.bfloat16, torch.float16)
    torch.testing.assert_close(got.double(), want, **({"rtol": 1e-3, "atol": 1e-3} if low else tol(dtype)))


@pytest.fixture
def tf32(request):
    """torch's float32 matmul precision for one test ("highest": TF32 off; "high": allowed)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(getattr(request, "param", "highest"))
    yield torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", LINEAR, ids=case_id)
def test_chunked_bmm_linear_cuda(case, dtype, chunk, tf32):
    """The chunked-bmm path (cuBLAS batched GEMM, TF32 off) against the float64 twin."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(case["N"], case["T"], case["out"], generator=gen).to(dtype)
    x = torch.randn(case["N"], case["T"], case["inp"], generator=gen).to(dtype)
    want = twin.sum_sq_grad_linear(g.double(), x.double())
    got = ops.chunked_sum_sq_grad_linear(g.to(CUDA), x.to(CUDA), chunk)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.cpu().double(), want, **tol(dtype))  # low precision: fp32 sums of the same values


@pytest.mark.parametrize("tf32", ["highest", "high"], indirect=True)
def test_linear_fisher_cuda_takes_the_path_the_rule_picks(tf32):
    gen = torch.Generator().manual_seed(1)
    g, x = torch.randn(64, 197, 96, generator=gen), torch.randn(64, 197, 80, generator=gen)
    want = twin.sum_sq_grad_linear(g.double(), x.double())
    gc, xc = g.to(CUDA), x.to(CUDA)
    path = ops.linear_path(gc, xc, compiled=True)
    assert path.path == "chunked-bmm" and 1 <= path.chunk <= 64  # every T > 1 on CUDA until measured otherwise
    close = {"rtol": 1e-4, "atol": 1e-5} if tf32 == "highest" else {"rtol": 1e-2, "atol": 1e-2}  # TF32: 10-bit mantissas
    torch.testing.assert_close(ops.COMPILED.linear_fisher(gc, xc).cpu().double(), want, **close)
    one = ops.COMPILED.linear_fisher(gc[:, :1], xc[:, :1]).cpu().double()  # squares-gemm
    torch.testing.assert_close(one, twin.sum_sq_grad_linear(g[:, :1].double(), x[:, :1].double()), **close)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CONV, ids=case_id)
def test_sum_sq_grad_conv2d_cuda(case, dtype):
    g, x = conv_inputs(case, dtype, torch.Generator().manual_seed(3))
    want = twin.sum_sq_grad_conv2d(g, x, *conv_args(case))
    got = ops.sum_sq_grad_conv2d(g.to(CUDA), x.to(CUDA), *conv_args(case)).cpu()
    torch.testing.assert_close(got, want, **tol(dtype))


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
def test_perturb_shift_cuda(shapes, sign):
    forget, remain = fishers(shapes, torch.float32, seed=8, special=True)
    params = [torch.randn(s) for s in shapes]
    want = [p.clone() for p in params]
    twin.perturb_shift_(want, forget, remain, twin.perturb_max_ratio(forget, remain), 1e-3, 10.0, sign)
    on_gpu = [p.to(CUDA) for p in params]
    f, r = [t.to(CUDA) for t in forget], [t.to(CUDA) for t in remain]
    ops.perturb_shift_(on_gpu, f, r, ops.perturb_max_ratio(f, r), 1e-3, 10.0, sign)
    for got, w in zip(on_gpu, want):
        torch.testing.assert_close(got.cpu(), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fisher_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
def test_perturb_dampen_cuda(shapes, fisher_dtype, param_dtype):
    """The CUDA dampening against the CPU kernel (both divide; the same roundings up to one
    rounding of the parameter dtype), zeros, infs and NaN ratios included."""
    forget, remain = fishers(shapes, fisher_dtype, seed=8, special=True)
    params = [torch.randn(s, generator=torch.Generator().manual_seed(3)).to(param_dtype) for s in shapes]
    want = [p.clone() for p in params]
    ops.perturb_dampen_(want, forget, remain, 0.7, 0.5)
    got = [p.to(CUDA) for p in params]
    ops.perturb_dampen_(got, [t.to(CUDA) for t in forget], [t.to(CUDA) for t in remain], 0.7, 0.5)
    for g, w in zip(got, want):
        assert g.dtype == param_dtype
        torch.testing.assert_close(g.cpu(), w, rtol=torch.finfo(param_dtype).eps, atol=0.0)


def test_perturb_dampen_cuda_many_tensors_and_empties():
    shapes = [(i % 7 + 1, 3) for i in range(150)] + [(0,), (0, 4)]
    forget, remain = fishers(shapes, torch.float32, seed=13, special=True)
    params = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    want = [p.clone() for p in params]
    ops.perturb_dampen_(want, forget, remain, 0.9, 1.0)
    got = on(CUDA, params)
    ops.perturb_dampen_(got, on(CUDA, forget), on(CUDA, remain), 0.9, 1.0)
    for a, w in zip(got, want):
        torch.testing.assert_close(a.cpu(), w, rtol=1e-6, atol=0.0)


def test_perturb_gaussian_cuda_distribution_mask_and_reproducibility():
    n = 1 << 20
    forget = [torch.full((n,), 4.0, device=CUDA), torch.full((1000,), 0.5, device=CUDA)]
    remain = [torch.ones(n, device=CUDA), torch.ones(1000, device=CUDA)]
    max_ratio = ops.perturb_max_ratio(forget, remain)

    def draw(seed):
        params = [torch.zeros(n, device=CUDA), torch.zeros(1000, device=CUDA)]
        gen = torch.Generator(CUDA).manual_seed(seed)
        ops.perturb_gaussian_(params, forget, remain, max_ratio, 1.0, 2.0, 1.0, gen)
        return params

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    # eta = 4 everywhere, alpha = min(1, 2/4) = 0.5: update = 2 * z
    assert abs(a[0].mean().item()) < 0.01 and abs(a[0].std().item() - 2.0) < 0.01
    assert torch.count_nonzero(a[1]) == 0  # eta 0.5 <= tau: masked out


# ==== The first-GPU-run plan (issue 14): each finding of the static review gets a test. ====
from test_ops_cpu import maybe_strided  # noqa: E402

from types import SimpleNamespace  # noqa: E402

from mnemo_fast.dtypes import accumulation_dtype  # noqa: E402
from mnemo_fast.reference import perturb  # noqa: E402

LOW = (torch.bfloat16, torch.float16)


def on(device, tensors):
    return [t.to(device) for t in tensors]


def _eta(f, r):
    """eta = f / r in the compute dtype, with the kernels' rules: 0 unless both are >= 0, NaN -> 0,
    -0 counts as +0. The same function as the twins' exp(log f - log r), rounded once."""
    dtype = accumulation_dtype(f.dtype)
    f, r = f.to(dtype), r.to(dtype)
    e = (f + 0.0) / (r + 0.0)
    return torch.where((f >= 0) & (r >= 0) & ~torch.isnan(e), e, torch.zeros_like(e))


def _division_max_ratio(forget, remain):
    """[L]: per tensor the largest finite eta (0 if none), eta by division."""
    out = []
    for f, r in zip(forget, remain):
        e = _eta(f, r)
        finite = e[torch.isfinite(e)]
        out.append(finite.max() if finite.numel() else e.new_zeros(()))
    return torch.stack(out).to(accumulation_dtype(forget[0].dtype))


def _division_shift_(params, forget, remain, max_ratio, lambda1, lambda2, sign):
    """In place: p += sign * (alpha * eta), eta by division (+inf -> max ratio), alpha as the
    kernels compute it (reciprocal of the max ratio times lambda2, at most lambda1)."""
    for p, f, r, m in zip(params, forget, remain, max_ratio):
        e = _eta(f, r)
        m = m.to(e.dtype)
        alpha = torch.clamp((1.0 / m) * lambda2, max=lambda1) if m != 0 else torch.tensor(lambda1, dtype=e.dtype)
        p.add_((sign * (alpha * torch.where(torch.isinf(e), m, e))).to(p.dtype))  # the step, then the add


#: The reference of the ops on the GPU: the twins for the Fisher sums (float64), and for the
#: perturbation the division form of the formula, which the CPU and CUDA kernels both round once
#: (the twins' exp(log f - log r) differs by a few dozen ulps; tests/test_ops_cpu.py checks that).
ref = SimpleNamespace(sum_sq_grad_linear=twin.sum_sq_grad_linear, sum_sq_grad_conv2d=twin.sum_sq_grad_conv2d,
                      perturb_max_ratio=_division_max_ratio, perturb_shift_=_division_shift_)


def ref_linear64(g, x):
    """The float64 reference on the GPU (the CPU would be slow for the large cases)."""
    return ref.sum_sq_grad_linear(g.double(), x.double())


# --- Gaussian: generators, reproducibility, special Fishers, dtypes, long runs -------------------

def gaussian_setup(n=4096, dtype=torch.float32, device=CUDA):
    forget = [torch.full((n,), 4.0, device=device), torch.full((n,), 4.0, device=device)]
    remain = [torch.ones(n, device=device), torch.ones(n, device=device)]
    return forget, remain, ops.perturb_max_ratio(forget, remain)


def gaussian_draw(generator, n=4096, dtype=torch.float32):
    forget, remain, max_ratio = gaussian_setup(n)
    params = [torch.zeros(n, device=CUDA, dtype=dtype), torch.zeros(n, device=CUDA, dtype=dtype)]
    ops.perturb_gaussian_(params, forget, remain, max_ratio, 1.0, 2.0, 1.0, generator)
    return params


@pytest.mark.parametrize("spec", [None, "cuda", "cuda:0"], ids=["default", "Generator(cuda)", "Generator(cuda:0)"])
def test_gaussian_generators_reproduce_and_differ(spec):
    def fresh():
        if spec is None:
            torch.cuda.manual_seed(5)
            return None
        return torch.Generator(spec).manual_seed(5)

    gen = fresh()
    a = gaussian_draw(gen)
    again = gaussian_draw(gen)  # the generator advanced: other noise
    b = gaussian_draw(fresh())  # same seed: same noise
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], again[0])
    assert not torch.equal(a[0], a[1])  # identical tensors in one call get their own noise
    assert torch.count_nonzero(a[0]) == a[0].numel()


def test_gaussian_generator_of_another_gpu_is_refused():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with pytest.raises(RuntimeError, match="generator is on cuda:1"):
        gaussian_draw(torch.Generator("cuda:1"))


def test_gaussian_special_fishers_follow_the_reference_mask():
    forget, remain = fishers([(4096,), (37,)], torch.float32, seed=4, special=True)
    forget[0][100] = float("inf")
    forget[0][101] = -1.0
    forget[0][102] = float("nan")
    max_ratio = ref.perturb_max_ratio(forget, remain)
    tau = 0.5
    params = [torch.zeros(s.shape, device=CUDA) for s in forget]
    f, r = on(CUDA, forget), on(CUDA, remain)
    ops.perturb_gaussian_(params, f, r, max_ratio.to(CUDA), 1e-3, 10.0, tau, torch.Generator("cuda").manual_seed(0))
    for p, fl, rl, m in zip(params, forget, remain, max_ratio):
        mask = perturb.ratio(fl, rl, m) > tau
        assert torch.equal(p.cpu() != 0, mask)
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_gaussian_parameter_dtypes(dtype):
    n = 1 << 20
    params = gaussian_draw(torch.Generator("cuda").manual_seed(1), n=n, dtype=dtype)
    assert params[0].dtype == dtype
    z = params[0].double() / 2.0  # eta 4, alpha 0.5: update = 2 z
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1.0) < 0.01


def test_gaussian_no_nan_over_2_pow_28_draws():
    n = 1 << 28
    forget, remain, max_ratio = gaussian_setup(n)
    params = [torch.zeros(n, device=CUDA), torch.zeros(n, device=CUDA)]
    ops.perturb_gaussian_(params, forget, remain, max_ratio, 1.0, 2.0, 1.0, torch.Generator("cuda").manual_seed(2))
    for p in params:
        assert torch.isfinite(p).all()
        assert p.abs().max().item() < 2.0 * 7.0  # |z| < 7 over 2^28 normals (p ~ 1e-11 per draw)


# --- Linear: several position tiles and splits, strides, TF32 ----------------------------------

@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(9, 37, 130, 257), (200, 17, 5, 3), (3, 1, 130, 257)], ids=str)
def test_linear_tiles_splits_and_strides(shape, dtype, strided):
    N, T, out, inp = shape
    gen = torch.Generator().manual_seed(7)
    g = maybe_strided(torch.randn(N, T, out, generator=gen).to(dtype).to(CUDA), strided)
    x = maybe_strided(torch.randn(N, T, inp, generator=gen).to(dtype).to(CUDA), strided)
    got = ops.sum_sq_grad_linear(g, x)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tolerance = {"rtol": 2e-3, "atol": 2e-3} if dtype in LOW else tol(dtype)
    torch.testing.assert_close(got.double(), ref_linear64(g, x), **tolerance)


@pytest.mark.parametrize("T", [1, 5])
def test_linear_ignores_tf32(T):
    gen = torch.Generator().manual_seed(8)
    g = torch.randn(64, T, 96, generator=gen).to(CUDA)
    x = torch.randn(64, T, 80, generator=gen).to(CUDA)
    old = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        got = ops.sum_sq_grad_linear(g, x)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old[0]
        torch.set_float32_matmul_precision(old[1])
    # TF32 rounds the operands to 10 mantissa bits (relative error ~1e-3)
    torch.testing.assert_close(got.double(), ref_linear64(g, x), rtol=1e-5, atol=1e-5)


# --- Conv2d: several im2col blocks, blocks with no samples, low precision, channels_last ---------

def conv_case_on_gpu(N, cin, cout, hw, dtype, groups=1, channels_last=False):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(N, cin, *hw, generator=gen).to(dtype).to(CUDA)
    y = F.conv2d(x.float(), torch.empty(cout, cin // groups, 3, 3, device=CUDA), None, 1, 1, 1, groups)
    g = torch.randn(y.shape, generator=gen).to(dtype).to(CUDA)
    if channels_last:
        x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    args = [[3, 3], [1, 1], [1, 1], [1, 1], groups]
    return g, x, args


@pytest.mark.parametrize("N", [64, 55], ids=["3-blocks", "last-block-1-sample"])
def test_conv_several_im2col_blocks(N):
    # cin 64, 3x3, 64x64: 9.4 MB of columns per sample, 27 samples per 256 MiB block
    g, x, args = conv_case_on_gpu(N, 64, 64, (64, 64), torch.float32)
    got = ops.sum_sq_grad_conv2d(g, x, *args)
    want = ref.sum_sq_grad_conv2d(g.double(), x.double(), *args)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_conv_dtypes_and_layouts(dtype, channels_last):
    g, x, args = conv_case_on_gpu(6, 8, 12, (11, 9), dtype, groups=2, channels_last=channels_last)
    got = ops.sum_sq_grad_conv2d(g, x, *args)
    want = ref.sum_sq_grad_conv2d(g.double(), x.double(), *args)
    tolerance = {"rtol": 2e-3, "atol": 2e-3} if dtype in LOW else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(got.double(), want, **tolerance)


# --- perturb_max_ratio / shift: reference, fp64 atomics, chunks, many tensors, dtypes, empties ---

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_max_ratio_matches_reference(dtype):
    forget, remain = fishers([(64, 33), (5,), (3, 4, 5), (1,), (10000,)], dtype, seed=11, special=True)
    got = ops.perturb_max_ratio(on(CUDA, forget), on(CUDA, remain))
    assert got.dtype == dtype
    torch.testing.assert_close(got.cpu(), ref.perturb_max_ratio(forget, remain), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_max_ratio_maximum_in_a_later_chunk(dtype):
    n = 5 * 4096 + 17
    forget = torch.ones(n, dtype=dtype)
    forget[4 * 4096 + 3] = 7.5  # the fifth chunk of 4096 elements
    remain = torch.ones(n, dtype=dtype)
    assert ops.perturb_max_ratio([forget.to(CUDA)], [remain.to(CUDA)]).item() == 7.5


def test_more_than_64_tensors_mixed_dtypes_and_empties():
    shapes = [(i % 7 + 1, 3) for i in range(150)] + [(0,), (0, 4)]
    forget, remain = fishers(shapes, torch.float32, seed=12, special=True)
    forget[3] = forget[3].half()  # computes in float32 like the rest
    ratio = ops.perturb_max_ratio(on(CUDA, forget), on(CUDA, remain))
    torch.testing.assert_close(ratio.cpu(), ref.perturb_max_ratio(forget, remain), rtol=0, atol=0)
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    params = [torch.randn(s, generator=torch.Generator().manual_seed(i)).to(dtypes[i % 4]) for i, s in enumerate(shapes)]
    want = [p.clone() for p in params]
    ref.perturb_shift_(want, forget, remain, ref.perturb_max_ratio(forget, remain), 1e-3, 10.0, 1.0)
    got = on(CUDA, params)
    ops.perturb_shift_(got, on(CUDA, forget), on(CUDA, remain), ratio, 1e-3, 10.0, 1.0)
    for a, w in zip(got, want):
        torch.testing.assert_close(a.cpu(), w, rtol=1e-5, atol=1e-6)


def test_shift_denormal_fisher_like_the_cpu():
    # without flush-to-zero a denormal f_R gives a huge finite eta, exactly as on the CPU
    forget = [torch.tensor([1e-30, 1.0, 0.0, 1e-39])]
    remain = [torch.tensor([1e-39, 1.0, 1e-39, 1.0])]
    params = [torch.tensor([1e-40, 0.0, 1e-40, 0.0])]
    want = [p.clone() for p in params]
    by_formula = [p.clone() for p in params]  # and both against the formula, not only each other
    ref.perturb_shift_(by_formula, forget, remain, ref.perturb_max_ratio(forget, remain), 1e-3, 10.0, 1.0)
    ops.perturb_shift_(want, forget, remain, ops.perturb_max_ratio(forget, remain), 1e-3, 10.0, 1.0)
    got = on(CUDA, params)
    ops.perturb_shift_(got, on(CUDA, forget), on(CUDA, remain),
                       ops.perturb_max_ratio(on(CUDA, forget), on(CUDA, remain)), 1e-3, 10.0, 1.0)
    assert torch.equal(got[0].cpu(), want[0])
    assert torch.equal(got[0].cpu(), by_formula[0])


# --- devices and streams --------------------------------------------------------------------------

def test_non_current_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    dev = torch.device("cuda", 1)
    forget, remain = fishers([(300,)], torch.float32, seed=13, special=True)
    with torch.cuda.device(0):
        ratio = ops.perturb_max_ratio(on(dev, forget), on(dev, remain))
        assert ratio.device == dev
        p = [torch.zeros(300, device=dev)]
        ops.perturb_gaussian_(p, on(dev, forget), on(dev, remain), ratio, 1e-3, 10.0, 0.0, None)
        g = torch.randn(4, 3, 20, device=dev)
        torch.testing.assert_close(ops.sum_sq_grad_linear(g, g).cpu().double(), ref_linear64(g, g).cpu())


def test_side_stream():
    forget, remain = fishers([(5000,)], torch.float32, seed=14, special=True)
    f, r = on(CUDA, forget), on(CUDA, remain)
    params = [torch.randn(5000, device=CUDA)]
    want = [params[0].clone()]
    ops.perturb_shift_(want, f, r, ops.perturb_max_ratio(f, r), 1e-3, 10.0, -1.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.perturb_shift_(params, f, r, ops.perturb_max_ratio(f, r), 1e-3, 10.0, -1.0)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(params[0], want[0])


def test_tensor_with_2_pow_31_elements():
    n = (1 << 31) + 5
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs ~30 GiB of GPU memory")
    forget = torch.ones(n, device=CUDA)
    forget[-1] = 3.0  # past the 32-bit index range
    remain = torch.ones(n, device=CUDA)
    ratio = ops.perturb_max_ratio([forget], [remain])
    assert ratio.item() == 3.0
    params = [torch.zeros(n, device=CUDA)]
    ops.perturb_shift_(params, [forget], [remain], ratio, 1.0, 3.0, 1.0)  # alpha 1: step = eta
    assert params[0][-1].item() == 3.0 and params[0][0].item() == 1.0
    del forget, remain, params
    torch.cuda.empty_cache()


def test_kernel_image_probe_on_this_gpu():
    assert _ext.kernel_image(torch.cuda.current_device())
    import mnemo_fast

    assert mnemo_fast.backend("cuda") == "cuda-ext"


# --- opcheck, strided inputs, the low-precision tolerance rule (tests/test_ops_cpu.py does the same on the CPU) ---
from test_ops_cpu import low_precision_error_ok, opcheck_cases, opcheck_op  # noqa: E402


def _to_cuda(value):
    if isinstance(value, torch.Tensor):
        return value.to(CUDA)
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return [t.to(CUDA) for t in value]
    return value


@pytest.mark.parametrize("name", list(opcheck_cases()))
def test_opcheck_cuda(name):
    """Schema, fake kernel, aliasing and dispatch of every op on CUDA tensors."""
    torch.library.opcheck(opcheck_op(name), tuple(_to_cuda(a) for a in opcheck_cases()[name]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_conv_strided_inputs(dtype):
    case = CONV[1]
    g, x = conv_inputs(case, dtype, torch.Generator().manual_seed(21))
    want = twin.sum_sq_grad_conv2d(g.double(), x.double(), *conv_args(case))
    got = ops.sum_sq_grad_conv2d(maybe_strided(g.to(CUDA), True), maybe_strided(x.to(CUDA), True), *conv_args(case))
    torch.testing.assert_close(got.cpu().double(), want, **tol(dtype))


def test_perturb_ops_with_strided_fishers():
    """Parameters must be contiguous (the op says so); the Fisher tensors need not be."""
    forget, remain = fishers([(33, 64)], torch.float32, seed=22, special=True)
    f, r = [forget[0].t().to(CUDA)], [remain[0].t().to(CUDA)]
    assert not f[0].is_contiguous()
    ratio = ops.perturb_max_ratio(f, r)
    assert torch.equal(ratio.cpu(), ref.perturb_max_ratio([forget[0].t()], [remain[0].t()]))
    params = [torch.randn(64, 33, device=CUDA)]
    want = [params[0].cpu().clone()]
    ref.perturb_shift_(want, [forget[0].t()], [remain[0].t()], ratio.cpu(), 1e-3, 10.0, -1.0)
    ops.perturb_shift_(params, f, r, ratio, 1e-3, 10.0, -1.0)
    torch.testing.assert_close(params[0].cpu(), want[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("T", [1, 8, 40])
def test_linear_low_precision_rule(dtype, T):
    """flash-attention's rule: the kernel's error against float64 is at most ~2x that of plain
    PyTorch in the same low precision (no guessed tolerance)."""
    gen = torch.Generator().manual_seed(23)
    g = torch.randn(24, T, 130, generator=gen, dtype=torch.float64).to(dtype).double().to(CUDA)
    x = torch.randn(24, T, 70, generator=gen, dtype=torch.float64).to(dtype).double().to(CUDA)
    fast = ops.sum_sq_grad_linear(g.to(dtype), x.to(dtype))
    assert fast.dtype == torch.float32
    low_precision_error_ok(fast, twin.sum_sq_grad_linear, (g, x), dtype)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_conv_low_precision_rule(dtype):
    case = CONV[1]
    g, x = conv_inputs(case, torch.float64, torch.Generator().manual_seed(24))
    g, x = g.to(dtype).double().to(CUDA), x.to(dtype).double().to(CUDA)
    fast = ops.sum_sq_grad_conv2d(g.to(dtype), x.to(dtype), *conv_args(case))
    low_precision_error_ok(fast, twin.sum_sq_grad_conv2d, (g, x, *conv_args(case)), dtype)
