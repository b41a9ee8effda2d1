"""CUDA operators vs their pure-PyTorch twins (mnemo_fast.fast.ops.TWINS) on the GPU (runs only
where a GPU and the CUDA kernels are present; CI is CPU-only and compile-checks the .cu files instead)."""

from __future__ import annotations

import pytest
import torch

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
