"""Compiled CPU operators vs their pure-PyTorch twins, both from the op table
(mnemo_fast.fast.ops.OPS), plus ground truth from batch-1 autograd and the paper's formula."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mnemo_fast.fast import _ext

if not _ext.available():
    pytest.skip(f"mnemo_fast._C unavailable: {_ext.load_error()}", allow_module_level=True)

from mnemo_fast.dtypes import accumulation_dtype  # noqa: E402
from mnemo_fast.fast import ops  # noqa: E402
from mnemo_fast.fast.ops import TWINS  # noqa: E402
from mnemo_fast.reference import perturb  # noqa: E402

LOW = (torch.bfloat16, torch.float16)


def case_id(case: dict) -> str:
    return "-".join(f"{k}{v}".replace("torch.", "").replace(" ", "") for k, v in case.items())


def tol(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 1e-5}


def maybe_strided(t: torch.Tensor, strided: bool) -> torch.Tensor:
    """The same values, as a non-contiguous view when asked."""
    if not strided:
        return t
    return t.transpose(0, -1).contiguous().transpose(0, -1)


# --- sum_sq_grad_linear ----------------------------------------------------------------------

LINEAR = [
    dict(N=1, T=1, out=3, inp=5, dtype=torch.float32, strided=False),
    dict(N=9, T=1, out=17, inp=33, dtype=torch.float64, strided=True),
    dict(N=1, T=7, out=5, inp=4, dtype=torch.float32, strided=False),
    dict(N=13, T=6, out=70, inp=300, dtype=torch.float32, strided=True),
    dict(N=40, T=3, out=130, inp=257, dtype=torch.float64, strided=False),
    dict(N=3, T=16, out=1, inp=600, dtype=torch.float64, strided=True),
]


def linear_inputs(case: dict) -> tuple:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(case["N"], case["T"], case["out"], generator=gen, dtype=case["dtype"])
    x = torch.randn(case["N"], case["T"], case["inp"], generator=gen, dtype=case["dtype"])
    return maybe_strided(g, case["strided"]), maybe_strided(x, case["strided"])


def test_sum_sq_grad_linear_matches_batch_one_autograd():
    gen = torch.Generator().manual_seed(1)
    layer = torch.nn.Linear(6, 4, bias=False).double()
    x = torch.randn(5, 3, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)
    per_sample = [torch.autograd.grad(layer(x[n]), layer.weight, g[n])[0] for n in range(5)]
    expected = torch.stack(per_sample).square().sum(0)
    torch.testing.assert_close(ops.sum_sq_grad_linear(g, x), expected)


def low_precision_error_ok(fast_low, ref_fn, args64, dtype) -> None:
    """flash-attention rule: the kernel's error vs float64 is at most ~2x plain PyTorch's in `dtype`."""
    exact = ref_fn(*args64)
    plain_low = _plain_low_precision(ref_fn, args64, dtype)
    fast_err = (fast_low.double() - exact).abs().max().item()
    plain_err = (plain_low.double() - exact).abs().max().item()
    assert fast_err <= 2 * plain_err + 1e-6 * exact.abs().max().item(), (fast_err, plain_err)


def _plain_low_precision(ref_fn, args64, dtype):
    if ref_fn is TWINS.sum_sq_grad_linear:
        g, x = (a.to(dtype) for a in args64)
        return torch.einsum("nto,nti->noi", g, x).square().sum(0)
    g, x, *rest = args64
    k, s, p, d, groups = rest
    n, c = x.shape[:2]
    cols = F.unfold(x.to(dtype), k, d, p, s).view(n, groups, c // groups * k[0] * k[1], -1)
    go = g.to(dtype).reshape(n, groups, g.shape[1] // groups, -1)
    return torch.einsum("ngol,ngkl->ngok", go, cols).square().sum(0).reshape(g.shape[1], c // groups, *k)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("T", [1, 8])
def test_sum_sq_grad_linear_low_precision(dtype, T):
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(24, T, 40, generator=gen, dtype=torch.float64)
    x = torch.randn(24, T, 50, generator=gen, dtype=torch.float64)
    g, x = g.to(dtype).double(), x.to(dtype).double()  # exactly representable in `dtype`
    fast = ops.sum_sq_grad_linear(g.to(dtype), x.to(dtype))
    assert fast.dtype == torch.float32
    low_precision_error_ok(fast, TWINS.sum_sq_grad_linear, (g, x), dtype)


# --- sum_sq_grad_conv2d / conv1d ------------------------------------------------------------

CONV = [
    dict(N=1, cin=3, cout=4, hw=(6, 5), k=(3, 3), s=(1, 1), p=(0, 0), d=(1, 1), groups=1),
    dict(N=5, cin=4, cout=6, hw=(9, 8), k=(3, 2), s=(2, 1), p=(1, 2), d=(1, 2), groups=2),
    dict(N=3, cin=6, cout=6, hw=(7, 7), k=(3, 3), s=(1, 1), p=(1, 1), d=(1, 1), groups=6),
    dict(N=4, cin=8, cout=70, hw=(10, 10), k=(1, 1), s=(3, 3), p=(0, 0), d=(1, 1), groups=1),
    dict(N=2, cin=2, cout=3, hw=(5, 6), k=(5, 6), s=(1, 1), p=(0, 0), d=(1, 1), groups=1),
]


def conv_inputs(case, dtype, gen):
    x = torch.randn(case["N"], case["cin"], *case["hw"], generator=gen, dtype=dtype)
    w = torch.empty(case["cout"], case["cin"] // case["groups"], *case["k"], dtype=dtype)
    y = F.conv2d(x, w, None, case["s"], case["p"], case["d"], case["groups"])
    g = torch.randn(y.shape, generator=gen, dtype=dtype)
    return g, x


def conv_args(case):
    return [list(case["k"]), list(case["s"]), list(case["p"]), list(case["d"]), case["groups"]]


def test_sum_sq_grad_conv2d_matches_batch_one_autograd():
    case = CONV[1]
    g, x = conv_inputs(case, torch.float64, torch.Generator().manual_seed(4))
    w = torch.zeros(case["cout"], case["cin"] // case["groups"], *case["k"], dtype=torch.float64,
                    requires_grad=True)
    per_sample = [
        torch.autograd.grad(F.conv2d(x[n : n + 1], w, None, case["s"], case["p"], case["d"],
                                     case["groups"]), w, g[n : n + 1])[0]
        for n in range(x.shape[0])
    ]
    expected = torch.stack(per_sample).square().sum(0)
    torch.testing.assert_close(ops.sum_sq_grad_conv2d(g, x, *conv_args(case)), expected)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_sum_sq_grad_conv2d_low_precision(dtype):
    case = CONV[1]
    g, x = conv_inputs(case, torch.float64, torch.Generator().manual_seed(5))
    g, x = g.to(dtype).double(), x.to(dtype).double()
    fast = ops.sum_sq_grad_conv2d(g.to(dtype), x.to(dtype), *conv_args(case))
    low_precision_error_ok(fast, TWINS.sum_sq_grad_conv2d, (g, x, *conv_args(case)), dtype)


@pytest.mark.parametrize("stride, padding, dilation, groups", [(1, 0, 1, 1), (2, 3, 2, 2)])
def test_sum_sq_grad_conv1d(stride, padding, dilation, groups):
    gen = torch.Generator().manual_seed(6)
    conv = torch.nn.Conv1d(4, 6, 3, stride, padding, dilation, groups, bias=False).double()
    x = torch.randn(5, 4, 20, generator=gen, dtype=torch.float64)
    g = torch.randn(conv(x).shape, generator=gen, dtype=torch.float64)
    per_sample = [torch.autograd.grad(conv(x[n : n + 1]), conv.weight, g[n : n + 1])[0] for n in range(5)]
    expected = torch.stack(per_sample).square().sum(0)
    got = ops.sum_sq_grad_conv1d(g, x, 3, stride, padding, dilation, groups)
    torch.testing.assert_close(got, expected)


# --- perturbation ---------------------------------------------------------------------------

def fishers(shapes, dtype, seed, special=True):
    """Fisher pairs with tiny magnitudes and, when `special`, zeros, infs and NaN ratios."""
    gen = torch.Generator().manual_seed(seed)
    forget, remain = [], []
    for shape in shapes:
        f = torch.rand(shape, generator=gen, dtype=torch.float64) * 1e-6
        r = torch.rand(shape, generator=gen, dtype=torch.float64) * 1e-6
        if special and f.numel() >= 4:
            f.view(-1)[0] = 0.0  # eta 0
            r.view(-1)[1] = 0.0  # eta +inf
            f.view(-1)[2] = r.view(-1)[2] = 0.0  # NaN -> 0
            r.view(-1)[3] = float("nan")
        if special and f.numel() >= 12:  # the same in the last elements (the vector loops' tails)
            f.view(-1)[-1] = 0.0
            r.view(-1)[-2] = 0.0
            f.view(-1)[-3] = r.view(-1)[-3] = 0.0
            r.view(-1)[-4] = -1e-7  # negative: log would give NaN, so eta 0
            f.view(-1)[-5] = -0.0
        forget.append(f.to(dtype))
        remain.append(r.to(dtype))
    return forget, remain


SHAPES = {"one": [(37,)], "several": [(64, 33), (5,), (3, 4, 5), (1,), (1000,)]}
FISHER_DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def assert_close_ulps(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to a few dozen ulps of the compute dtype: the kernels divide (0.5 ulp), the
    reference follows exp(log f - log r), which loses ~|log f| ulps (~14-20 here) to cancellation."""
    eps = torch.finfo(got.dtype if got.dtype.is_floating_point else torch.float32).eps
    torch.testing.assert_close(got, want, rtol=64 * eps, atol=0.0, equal_nan=True)


def test_perturb_max_ratio_without_finite_ratio_is_zero():
    forget = [torch.ones(5), torch.full((3,), float("nan"))]
    remain = [torch.zeros(5), torch.ones(3)]
    assert ops.perturb_max_ratio(forget, remain).tolist() == [0.0, 0.0]


PARAM_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("fisher_dtype", FISHER_DTYPES, ids=str)
@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
def test_perturb_shift(shapes, fisher_dtype, param_dtype, sign):
    forget, remain = fishers(shapes, fisher_dtype, seed=8)
    gen = torch.Generator().manual_seed(9)
    params = [torch.randn(s, generator=gen).to(param_dtype) for s in shapes]
    before = [p.clone() for p in params]
    expected = [p.clone() for p in params]
    for p, f, r in zip(expected, forget, remain):
        p.add_((sign * perturb.shift(f, r, 0.1, 1.0)).to(p.dtype))
    max_ratio = ops.perturb_max_ratio(forget, remain)
    ops.perturb_shift_(params, forget, remain, max_ratio, 0.1, 1.0, sign)
    for got, want, old in zip(params, expected, before):
        # Fast and reference steps agree to a few ulps of the compute dtype; the parameter
        # dtype can turn that into one rounding step of its own.
        step = torch.finfo(param_dtype).eps * want.abs().double() + 64 * 1.2e-7 * (want.double() - old.double()).abs()
        assert ((got.double() - want.double()).abs() <= step).all()


def test_perturb_shift_is_as_accurate_as_the_reference():
    """The kernels' eta = f / r must be at least as close to the exact ratio as the reference's
    exp(log f - log r), which loses ~|log f| ulps to cancellation."""
    forget, remain = fishers([(100_000,)], torch.float32, seed=10, special=False)
    exact = forget[0].double() / remain[0].double()
    fast = [torch.zeros(100_000)]
    ops.perturb_shift_(fast, forget, remain, torch.ones(1), 1.0, 1.0, 1.0)  # alpha = 1: p = eta
    fast_err = ((fast[0].double() - exact).abs() / exact).max()
    ref_err = ((perturb.raw_ratio(forget[0], remain[0]).double() - exact).abs() / exact).max()
    assert fast_err <= 1.1 * ref_err + 2 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fisher_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
def test_perturb_gaussian_matches_reference_draws(shapes, fisher_dtype, param_dtype):
    forget, remain = fishers(shapes, fisher_dtype, seed=11)
    params = [torch.randn(s, generator=torch.Generator().manual_seed(12)).to(param_dtype) for s in shapes]
    before = [p.clone() for p in params]
    expected = [p.clone() for p in params]
    tau = 1.0
    gen = torch.Generator().manual_seed(13)
    for p, f, r in zip(expected, forget, remain):
        p.add_(perturb.gaussian_noise(f, r, 0.1, 1.0, tau, gen, p).to(p.dtype))
    max_ratio = ops.perturb_max_ratio(forget, remain)
    ops.perturb_gaussian_(params, forget, remain, max_ratio, 0.1, 1.0, tau,
                          torch.Generator().manual_seed(13))
    for got, want, old, f, r in zip(params, expected, before, forget, remain):
        step = torch.finfo(param_dtype).eps * want.abs().double() + 64 * 1.2e-7 * (want.double() - old.double()).abs()
        assert ((got.double() - want.double()).abs() <= step).all()
        masked = ~(perturb.ratio(f, r) > tau)
        assert torch.equal(got[masked], old[masked])  # eta <= tau: untouched
        assert not torch.equal(got[~masked], old[~masked]) or not (~masked).any()


def test_perturb_gaussian_uses_the_global_generator_by_default():
    forget, remain = fishers([(50,)], torch.float32, seed=14)
    a, b = [torch.zeros(50)], [torch.zeros(50)]
    m = ops.perturb_max_ratio(forget, remain)
    torch.manual_seed(15)
    ops.perturb_gaussian_(a, forget, remain, m, 0.1, 1.0, 0.0)
    torch.manual_seed(15)
    TWINS.perturb_gaussian_(b, forget, remain, m, 0.1, 1.0, 0.0, None)
    assert_close_ulps(a[0], b[0])


def test_argument_errors_name_the_argument():
    forget, remain = fishers([(4, 4)], torch.float32, seed=16)
    m = ops.perturb_max_ratio(forget, remain)
    with pytest.raises(RuntimeError, match=r"params\[0\] must be contiguous"):
        ops.perturb_shift_([torch.zeros(4, 4).t()], forget, remain, m, 0.1, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="forget and remain must have the same length"):
        ops.perturb_max_ratio(forget, [])
    with pytest.raises(RuntimeError, match="grad_output"):
        ops.sum_sq_grad_linear(torch.zeros(2, 3), torch.zeros(2, 1, 3))
    with pytest.raises(RuntimeError, match="groups"):
        ops.sum_sq_grad_conv2d(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 4, 4), 3, groups=2)


# --- every op of the table: compiled vs twin, same arguments -------------------------------

CONV1D = [
    dict(N=1, cin=2, cout=3, L=9, k=3, s=1, p=0, d=1, groups=1),
    dict(N=5, cin=4, cout=6, L=20, k=3, s=2, p=3, d=2, groups=2),
]
EDGE_FISHERS = {
    "all_zero": lambda: ([torch.zeros(6)], [torch.zeros(6)]),  # eta NaN -> 0, max 0: alpha = lambda1
    "zero_forget": lambda: ([torch.zeros(4)], [torch.rand(4) + 0.1]),
    "zero_remain": lambda: ([torch.rand(5) + 0.1], [torch.zeros(5)]),  # only +inf: no finite eta
    "inf_values": lambda: ([torch.tensor([float("inf"), 1.0, float("inf"), 2.0, 0.0])],
                           [torch.tensor([1.0, float("inf"), float("inf"), 1.0, 0.0])]),
}


def conv1d_inputs(case: dict, dtype: torch.dtype) -> tuple:
    gen = torch.Generator().manual_seed(19)
    x = torch.randn(case["N"], case["cin"], case["L"], generator=gen, dtype=dtype)
    w = torch.empty(case["cout"], case["cin"] // case["groups"], case["k"], dtype=dtype)
    g = torch.randn(F.conv1d(x, w, None, case["s"], case["p"], case["d"], case["groups"]).shape,
                    generator=gen, dtype=dtype)
    return g, x, case["k"], case["s"], case["p"], case["d"], case["groups"]


def perturb_args(name: str, forget, remain, param_dtype=torch.float32, sign=-1.0):
    if name == "perturb_max_ratio":
        return forget, remain
    params = [torch.randn(f.shape, generator=torch.Generator().manual_seed(20)).to(param_dtype) for f in forget]
    if name == "perturb_dampen_":  # threshold 0.7, lam 0.5: every dampened element shrinks
        return params, forget, remain, 0.7, 0.5
    m = TWINS.perturb_max_ratio(forget, remain)  # the same max ratio for both paths
    last = sign if name == "perturb_shift_" else 0.7  # the sign, or tau (no exact ratio ties it)
    return (params, forget, remain, m, 0.1, 1.0, last) + ((20,) if name == "perturb_gaussian_" else ())


def table_cases():
    """(op name, case id, argument factory) covering every op of the table."""
    for case in LINEAR:
        yield "sum_sq_grad_linear", case_id(case), lambda case=case: linear_inputs(case)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for case in CONV:
            for strided in (False, True):
                def conv(case=case, dtype=dtype, strided=strided):
                    g, x = conv_inputs(case, dtype, torch.Generator().manual_seed(3))
                    return (maybe_strided(g, strided), maybe_strided(x, strided), *conv_args(case))
                yield "sum_sq_grad_conv2d", f"{case_id(case)}-{dtype}-strided{strided}", conv
        for case in CONV1D:
            yield "sum_sq_grad_conv1d", f"{case_id(case)}-{dtype}", lambda case=case, dtype=dtype: conv1d_inputs(case, dtype)
    zeros = dict(N=3, T=4, out=5, inp=6, dtype=torch.float32, strided=False)
    yield "sum_sq_grad_linear", "zero_grads", lambda: tuple(torch.zeros_like(t) for t in linear_inputs(zeros))
    for name in ("perturb_max_ratio", "perturb_shift_", "perturb_gaussian_", "perturb_dampen_"):
        for label, shapes in SHAPES.items():
            for fisher_dtype in FISHER_DTYPES:
                for param_dtype in (torch.float32, torch.bfloat16):
                    yield name, f"{label}-{fisher_dtype}-param{param_dtype}", \
                        lambda n=name, sh=shapes, fd=fisher_dtype, pd=param_dtype: perturb_args(n, *fishers(sh, fd, seed=21), pd)
        for label, make in EDGE_FISHERS.items():
            yield name, label, lambda n=name, make=make: perturb_args(n, *make())
    yield "perturb_shift_", "sign+1", lambda: perturb_args("perturb_shift_", *fishers([(40,)], torch.float32, 22), sign=1.0)


TABLE_CASES = [pytest.param(name, make, id=f"{name}-{label}".replace("torch.", "")) for name, label, make in table_cases()]


def run(fn, name: str, args: tuple):
    """The op's result: its output, or the parameters it edits in place (on a copy)."""
    if not name.endswith("_"):
        return fn(*args)
    params = [p.clone() for p in args[0]]
    rest = list(args[1:])
    if name == "perturb_gaussian_":
        rest[-1] = torch.Generator().manual_seed(rest[-1])  # the same draws for both paths
    fn(params, *rest)
    return params


@pytest.mark.parametrize("name, make", TABLE_CASES)
def test_compiled_op_matches_its_twin(name, make):
    op = ops.OPS[name]
    args = make()
    got, want = run(op.compiled, name, args), run(op.twin, name, args)
    if name.startswith("sum_sq_grad"):
        assert got.dtype == want.dtype == accumulation_dtype(args[1].dtype)
        torch.testing.assert_close(got, want, **tol(args[1].dtype))
    elif name == "perturb_max_ratio":
        assert got.dtype == want.dtype
        assert_close_ulps(got, want)
    elif name == "perturb_dampen_":  # a product: a few ulps of the compute dtype relative to the result
        for g, w, old in zip(got, want, args[0]):
            assert g.dtype == w.dtype == old.dtype
            step = (torch.finfo(old.dtype).eps + 64 * 1.2e-7) * w.abs().double()
            assert ((g.double() - w.double()).abs() <= step).all()
    else:
        for g, w, old in zip(got, want, args[0]):
            assert g.dtype == w.dtype == old.dtype
            # eta by division vs exp(log - log): a few ulps of the compute dtype, which the
            # parameter dtype can turn into one rounding step of its own
            step = torch.finfo(old.dtype).eps * w.abs().double() + 64 * 1.2e-7 * (w.double() - old.double()).abs()
            assert ((g.double() - w.double()).abs() <= step).all()


def test_every_op_of_the_table_is_compared_with_its_twin():
    assert {name for name, _, _ in table_cases()} == set(ops.OPS)
    for op in ops.OPS.values():
        assert op.compiled is getattr(ops.COMPILED, op.name) and op.twin is getattr(TWINS, op.name)
        assert op.compiled is not op.twin


def test_a_class_with_one_code_through_the_layer_rules():
    """class_fishers with one code per class: every rule sees one sample per class; the
    compiled ops and their twins (through the same hooks and rules) agree."""
    import mnemo_fast as mf
    import mnemo_fast.reference
    from mnemo_fast.fast.engine import EXTENSION, HOOKS_ATEN
    import models_zoo as zoo

    for build in (zoo.cnn, zoo.vit):  # conv, norms; linear T > 1, attention, broadcast
        torch.manual_seed(0)
        model, shape = build()
        model = model.double()
        classes = list(model.parameters())[-1].shape[0]
        codes = mf.MnemonicCodes.generate(classes, shape, per_class=1, seed=4)
        codes = codes.to(torch.float64)
        fast = mf.class_fishers(model, codes, [1], engine=EXTENSION)
        twin = mf.class_fishers(model, codes, [1], engine=HOOKS_ATEN)
        for got, want in zip(fast, twin):
            assert list(got) == list(want)
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-30, msg=name)
        # both hooks engines share the rules: the reference (torch.func) is the independent truth
        exact = mnemo_fast.reference.class_fishers(model, codes, [1])
        for got, want in zip(fast, exact):
            assert list(got) == list(want)
            for name in want:
                scale = want[name].abs().max().item()
                torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-10 * scale, msg=name)


# --- opcheck and torch.compile --------------------------------------------------------------

def opcheck_cases():
    gen = torch.Generator().manual_seed(17)
    g, x = torch.randn(3, 4, 5, generator=gen), torch.randn(3, 4, 6, generator=gen)
    cg, cx = conv_inputs(CONV[1], torch.float32, gen)
    forget, remain = fishers([(8, 3), (5,)], torch.float32, seed=18)
    m = TWINS.perturb_max_ratio(forget, remain)
    params = [torch.randn(8, 3), torch.randn(5)]
    return {
        "sum_sq_grad_linear": (g, x),
        "sum_sq_grad_linear_T1": (g[:, :1], x[:, :1]),
        "sum_sq_grad_linear_strided": (maybe_strided(g, True), torch.cat([x, x], 2)[:, :, ::2]),
        "sum_sq_grad_conv2d": (cg, cx, *conv_args(CONV[1])),
        "sum_sq_grad_conv2d_strided": (maybe_strided(cg, True), maybe_strided(cx, True), *conv_args(CONV[1])),
        "perturb_max_ratio": (forget, remain),
        "perturb_shift_": (params, forget, remain, m, 0.1, 1.0, -1.0),
        "perturb_gaussian_": (params, forget, remain, m, 0.1, 1.0, 0.5, None),
        "perturb_dampen_": (params, forget, remain, 0.7, 0.5),
    }


def opcheck_op(name: str):
    """The operator of an opcheck case (cases of one op differ by a suffix)."""
    return getattr(torch.ops.mnemo_fast, name.removesuffix("_T1").removesuffix("_strided"))


@pytest.mark.parametrize("name", list(opcheck_cases()))
def test_opcheck(name):
    op = opcheck_op(name)
    torch.library.opcheck(op, opcheck_cases()[name])


def test_sum_sq_grad_linear_under_torch_compile():
    g, x = torch.randn(4, 3, 5), torch.randn(4, 3, 6)
    compiled = torch.compile(ops.sum_sq_grad_linear, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(g, x), TWINS.sum_sq_grad_linear(g, x))


def test_disable_env_var_turns_the_extension_off():
    code = "import mnemo_fast.fast._ext as e; print(e.available(), e.load_error())"
    env = {**os.environ, "MNEMO_FAST_DISABLE_EXT": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("False disabled")
