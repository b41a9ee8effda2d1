"""The op table: each fused op's compiled version beside its pure-PyTorch twin, one signature.

``sum_sq_grad_linear`` etc. call the compiled operators ``torch.ops.mnemo_fast.*`` (calling
one without the extension raises RuntimeError, see :func:`mnemo_fast.fast._ext.load_error`);
``twin_sum_sq_grad_linear`` etc. compute the same in ATen ops only, with bounded memory
(samples in blocks). The perturbation's twins are the reference's own formula on lists of
tensors (:func:`mnemo_fast.reference.perturb.max_ratios`, ``shift_``, ``gaussian_``, ``dampen_``), which the
reference engine runs too: the formula is written once. :data:`OPS` pairs them by name;
:data:`COMPILED` and :data:`TWINS` give one path of every op as attributes, which is what an
engine's layer rules call; their ``linear_fisher`` is the Linear Fisher by the path that
:func:`mnemo_fast.fast.dispatch.decide_linear` picks (:func:`linear_fisher`). The tests
(tests/test_ops_cpu.py) and benchmarks/bench_kernels.py iterate :data:`OPS`.

Importing this module never loads ``mnemo_fast._C``: the twins run without the extension (the
ATen-only hooks engine, ``HOOKS_ATEN``). The fake kernels (shapes only, for torch.compile) are
registered when the extension loads. Arithmetic follows
:func:`mnemo_fast.dtypes.accumulation_dtype`. docs/FAST_PATH.md, "Each compiled op has a
pure-PyTorch twin" and "The fused perturbation".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..dtypes import accumulation_dtype
from ..reference import perturb
from . import _ext, dispatch

Tensor = torch.Tensor
Ints = int | Sequence[int]

# Per-sample gradients of one block held at once by a twin: about this many bytes.
_BLOCK_BYTES = 64 * 2**20


def _library():
    """``torch.ops.mnemo_fast``, loading the extension on first use."""
    if not _ext.available():
        raise RuntimeError(f"mnemo_fast.fast.ops: compiled kernels unavailable ({_ext.load_error()})")
    return torch.ops.mnemo_fast


def _pair(v: Ints) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def _block(n: int, per_sample_elements: int) -> int:
    """Samples per block so that a block's per-sample gradients stay near _BLOCK_BYTES."""
    return max(1, min(n, _BLOCK_BYTES // max(4 * per_sample_elements, 1)))


# ---- sum_sq_grad_linear ------------------------------------------------------------------

def sum_sq_grad_linear(grad_output: Tensor, input: Tensor) -> Tensor:
    """Sum over samples of the squared per-sample weight gradients of a linear layer.

    grad_output [N, T, out], input [N, T, in] -> [out, in] (float64 for float64, else float32).
    Equivalent PyTorch: ``torch.einsum("nto,nti->noi", g, x).square().sum(0)``.
    """
    return _library().sum_sq_grad_linear.default(grad_output, input)


def twin_sum_sq_grad_linear(grad_output: Tensor, input: Tensor) -> Tensor:
    """Twin of :func:`sum_sq_grad_linear`: one GEMM on squared operands when T = 1, else
    per-sample gradients in blocks of samples (bmm)."""
    dtype = accumulation_dtype(input.dtype)
    g, x = grad_output.to(dtype), input.to(dtype)
    if g.shape[1] == 1:  # (g^2)^T (x^2): nothing per-sample is formed
        return g[:, 0].square().t() @ x[:, 0].square()
    n, _, out_features = g.shape
    acc = torch.zeros(out_features, x.shape[2], dtype=dtype, device=x.device)
    step = _block(n, out_features * x.shape[2])
    for start in range(0, n, step):
        per_sample = torch.bmm(g[start : start + step].transpose(1, 2), x[start : start + step])
        acc += per_sample.square_().sum(0)
    return acc


def squares_gemm_sum_sq_grad_linear(grad_output: Tensor, input: Tensor) -> Tensor:
    """The "squares-gemm" path of :func:`linear_fisher`, T = 1 only: ``(g^2)^T (x^2)``, one
    GEMM of squares, exact because each per-sample gradient is the outer product ``g_n x_n^T``."""
    if grad_output.shape[1] != 1:
        raise ValueError(f"squares-gemm needs T = 1, got T = {grad_output.shape[1]}")
    dtype = accumulation_dtype(input.dtype)
    return grad_output[:, 0].to(dtype).square().t() @ input[:, 0].to(dtype).square()


def chunked_sum_sq_grad_linear(grad_output: Tensor, input: Tensor, chunk: int) -> Tensor:
    """The "chunked-bmm" path of :func:`linear_fisher`: the per-sample gradients
    ``G_n = g_n^T x_n`` of ``chunk`` samples at a time by one batched GEMM (torch.bmm, so on a
    GPU cuBLAS, with TF32 exactly when torch's own matmul setting allows it), squared in place
    and added into the accumulator (float64 for float64, else float32: bf16/fp16 operands are
    cast to float32 first, one chunk at a time). At most ``chunk`` per-sample gradients exist
    at once, in one buffer reused by every chunk. grad_output [N, T, out], input [N, T, in]
    -> [out, in]. docs/FAST_PATH.md, "Which Linear path: the dispatch rule"."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    dtype = accumulation_dtype(input.dtype)
    n, out_features, in_features = grad_output.shape[0], grad_output.shape[2], input.shape[2]
    total = torch.zeros(out_features, in_features, dtype=dtype, device=input.device)
    chunk = min(chunk, n)
    if n == 0:
        return total
    buffer = torch.empty(chunk, out_features, in_features, dtype=dtype, device=input.device)
    for start in range(0, n, chunk):
        g = grad_output[start : start + chunk].to(dtype)
        x = input[start : start + chunk].to(dtype)
        per_sample = buffer[: g.shape[0]]
        torch.bmm(g.transpose(1, 2), x, out=per_sample)
        total += per_sample.square_().sum(0)
    return total


def free_bytes(device: torch.device) -> int | None:
    """Memory a chunk may take on ``device``: on a GPU, what the driver reports free plus what
    torch's caching allocator holds unused (``mem_get_info`` counts that as taken); None on
    other devices (the CPU's budget is fixed, :data:`.dispatch.CPU_CHUNK_BYTES`)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def linear_fisher(grad_output: Tensor, input: Tensor, fused: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """``sum_n (g_n^T x_n)^2`` over T positions by the path :func:`.dispatch.decide_linear`
    chooses from the sizes, dtype, device and free memory: "squares-gemm", "chunked-bmm", or
    "fused" (``fused``: the compiled :func:`sum_sq_grad_linear`, where it runs on the device;
    None on the ATen-only path). What the layer rules call (``kernels.linear_fisher``)."""
    path = linear_path(grad_output, input, fused is not None)
    if path.path == "squares-gemm":
        return squares_gemm_sum_sq_grad_linear(grad_output, input)
    if path.path == "fused":
        return fused(grad_output, input)
    return chunked_sum_sq_grad_linear(grad_output, input, path.chunk)


def linear_path(grad_output: Tensor, input: Tensor, compiled: bool) -> dispatch.LinearPath:
    """The :class:`.dispatch.LinearPath` of these operands (``compiled``: the path has the
    compiled kernels)."""
    n, t, d_out = grad_output.shape
    return linear_path_for(n, t, input.shape[2], d_out, input.dtype, input.device, compiled)


def linear_path_for(n: int, t: int, d_in: int, d_out: int, dtype: torch.dtype, device: torch.device,
                    compiled: bool) -> dispatch.LinearPath:
    """:func:`.dispatch.decide_linear` for these sizes on ``device`` as it is now (its free
    memory; ``compiled``: the path has the compiled kernels, which on a GPU run only where the
    build has an image for it). What :func:`linear_fisher` and ``explain`` ask."""
    fused = compiled and (device.type == "cpu" or (device.type == "cuda" and _ext.has_cuda_kernels(device)))
    return dispatch.decide_linear(n, t, d_in, d_out, dtype, device.type,
                                  free_bytes=free_bytes(device) if t != 1 else None, fused=fused)


# ---- sum_sq_grad_conv2d / conv1d ---------------------------------------------------------

def sum_sq_grad_conv2d(
    grad_output: Tensor,
    input: Tensor,
    kernel_size: Ints,
    stride: Ints = 1,
    padding: Ints = 0,
    dilation: Ints = 1,
    groups: int = 1,
) -> Tensor:
    """Sum over samples of the squared per-sample weight gradients of a Conv2d (zero padding).

    grad_output [N, out, Ho, Wo], input [N, in, H, W] -> [out, in/groups, kh, kw].
    Equivalent PyTorch: ``einsum("ngol,ngkl->ngok", g, unfold(x)).square().sum(0)`` per group.
    """
    args = (_pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation), int(groups))
    return _library().sum_sq_grad_conv2d.default(grad_output, input, *args)


def twin_sum_sq_grad_conv2d(
    grad_output: Tensor,
    input: Tensor,
    kernel_size: Ints,
    stride: Ints = 1,
    padding: Ints = 0,
    dilation: Ints = 1,
    groups: int = 1,
) -> Tensor:
    """Twin of :func:`sum_sq_grad_conv2d`: unfold + einsum per group, in blocks of samples."""
    kh, kw = _pair(kernel_size)
    dtype = accumulation_dtype(input.dtype)
    n, out_channels = grad_output.shape[:2]
    in_per_group, out_per_group = input.shape[1] // groups, out_channels // groups
    acc = torch.zeros(groups, out_per_group, in_per_group * kh * kw, dtype=dtype, device=input.device)
    step = _block(n, out_channels * in_per_group * kh * kw)
    for start in range(0, n, step):
        x = input[start : start + step].to(dtype)
        cols = F.unfold(x, (kh, kw), dilation=_pair(dilation), padding=_pair(padding), stride=_pair(stride))
        cols = cols.view(x.shape[0], groups, in_per_group * kh * kw, -1)
        g = grad_output[start : start + step].to(dtype).reshape(x.shape[0], groups, out_per_group, -1)
        acc += torch.einsum("ngol,ngkl->ngok", g, cols).square_().sum(0)
    return acc.view(out_channels, in_per_group, kh, kw)


def _conv1d_as_2d(conv2d: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The Conv1d op from a Conv2d one: the signal as an image of height 1."""

    def sum_sq_grad_conv1d(
        grad_output: Tensor,
        input: Tensor,
        kernel_size: Ints,
        stride: Ints = 1,
        padding: Ints = 0,
        dilation: Ints = 1,
        groups: int = 1,
    ) -> Tensor:
        """Conv1d: grad_output [N, out, Lo], input [N, in, L] -> [out, in/groups, k]."""

        def one(v: Ints) -> int:
            return int(v) if isinstance(v, int) else int(v[0])

        d = conv2d(grad_output.unsqueeze(2), input.unsqueeze(2), (1, one(kernel_size)),
                   (1, one(stride)), (0, one(padding)), (1, one(dilation)), groups)
        return d.squeeze(2)

    return sum_sq_grad_conv1d


#: Conv1d version of :func:`sum_sq_grad_conv2d`, run as a height-1 image.
sum_sq_grad_conv1d = _conv1d_as_2d(sum_sq_grad_conv2d)
#: Twin of :func:`sum_sq_grad_conv1d`.
twin_sum_sq_grad_conv1d = _conv1d_as_2d(twin_sum_sq_grad_conv2d)


# ---- perturbation ------------------------------------------------------------------------

def perturb_max_ratio(forget: Sequence[Tensor], remain: Sequence[Tensor]) -> Tensor:
    """Per tensor, the largest finite ``eta = f_F / f_R`` (NaN -> 0), 0 if none.

    The twin writes eta as ``exp(log f_F - log f_R)`` (the authors' formula); the CPU and
    CUDA kernels divide, the same function with one rounding, so results agree within the
    twin's own cancellation error (a few dozen ulps), not bitwise.
    Returns [L] (float64 when the Fishers are float64, else float32).
    """
    return _library().perturb_max_ratio.default(list(forget), list(remain))


def perturb_shift_(
    params: Sequence[Tensor],
    forget: Sequence[Tensor],
    remain: Sequence[Tensor],
    max_ratio: Tensor,
    lambda1: float,
    lambda2: float,
    sign: float,
) -> None:
    """In place, one pass per tensor: ``p += sign * min(lambda1, lambda2 / max_ratio[l]) * eta``.

    eta: NaN -> 0, +inf -> max_ratio[l]. params must be contiguous.
    """
    _library().perturb_shift_.default(list(params), list(forget), list(remain), max_ratio,
                                      float(lambda1), float(lambda2), float(sign))


def perturb_gaussian_(
    params: Sequence[Tensor],
    forget: Sequence[Tensor],
    remain: Sequence[Tensor],
    max_ratio: Tensor,
    lambda1: float,
    lambda2: float,
    tau: float,
    generator: torch.Generator | None = None,
) -> None:
    """In place: ``p += [eta > tau] * alpha_l * eta * z``, z drawn like ``torch.randn(p.shape)``.

    Draws tensor by tensor in list order from ``generator``; entries with eta <= tau are
    left untouched.
    """
    _library().perturb_gaussian_.default(list(params), list(forget), list(remain), max_ratio,
                                         float(lambda1), float(lambda2), float(tau), generator)


def perturb_dampen_(
    params: Sequence[Tensor],
    forget: Sequence[Tensor],
    remain: Sequence[Tensor],
    threshold: float,
    lam: float,
) -> None:
    """In place, one pass per tensor: ``p *= min(lam / eta, 1)`` where ``eta > threshold``.

    eta = f_F / f_R: NaN -> 0 (left as is), +inf kept (the element becomes 0). The product is
    taken in the Fisher's accumulation dtype and rounded once to the parameter's dtype.
    params must be contiguous.
    """
    _library().perturb_dampen_.default(list(params), list(forget), list(remain), float(threshold), float(lam))


# ---- the table -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Op:
    """One fused op: ``compiled`` runs the extension, ``twin`` is pure PyTorch; same signature."""

    name: str
    compiled: Callable
    twin: Callable


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("sum_sq_grad_linear", sum_sq_grad_linear, twin_sum_sq_grad_linear),
        Op("sum_sq_grad_conv2d", sum_sq_grad_conv2d, twin_sum_sq_grad_conv2d),
        Op("sum_sq_grad_conv1d", sum_sq_grad_conv1d, twin_sum_sq_grad_conv1d),
        Op("perturb_max_ratio", perturb_max_ratio, perturb.max_ratios),
        Op("perturb_shift_", perturb_shift_, perturb.shift_),
        Op("perturb_gaussian_", perturb_gaussian_, perturb.gaussian_),
        Op("perturb_dampen_", perturb_dampen_, perturb.dampen_),
    )
}
#: Every op's compiled version as an attribute (``COMPILED.sum_sq_grad_linear``), and
#: ``linear_fisher``: the Linear Fisher by the path the dispatch rule picks, the fused path
#: being the compiled kernel.
COMPILED = SimpleNamespace(**{name: op.compiled for name, op in OPS.items()},
                           linear_fisher=partial(linear_fisher, fused=sum_sq_grad_linear))
#: Every op's pure-PyTorch twin as an attribute (``TWINS.sum_sq_grad_linear``), and
#: ``linear_fisher`` without a fused path (squares-gemm or chunked-bmm).
TWINS = SimpleNamespace(**{name: op.twin for name, op in OPS.items()}, linear_fisher=linear_fisher)


# ---- fake kernels (shapes only), registered once the extension has loaded -------------------

def _register_fakes() -> None:
    def out_dtype(t: Tensor) -> torch.dtype:
        return accumulation_dtype(t.dtype)

    @torch.library.register_fake("mnemo_fast::sum_sq_grad_linear")
    def _(grad_output, input):
        torch._check(grad_output.dim() == 3 and input.dim() == 3, lambda: "expected [N, T, *] inputs")
        torch._check(grad_output.shape[0] == input.shape[0], lambda: "N must match")
        torch._check(grad_output.shape[1] == input.shape[1], lambda: "T must match")
        torch._check(grad_output.dtype == input.dtype, lambda: "dtypes must match")
        return input.new_empty((grad_output.shape[2], input.shape[2]), dtype=out_dtype(input))

    @torch.library.register_fake("mnemo_fast::sum_sq_grad_conv2d")
    def _(grad_output, input, kernel_size, stride, padding, dilation, groups):
        torch._check(grad_output.dim() == 4 and input.dim() == 4, lambda: "expected 4-d inputs")
        torch._check(grad_output.shape[0] == input.shape[0], lambda: "N must match")
        torch._check(input.shape[1] % groups == 0, lambda: "groups must divide in")
        torch._check(grad_output.shape[1] % groups == 0, lambda: "groups must divide out")
        for k in range(2):
            size = (input.shape[2 + k] + 2 * padding[k] - dilation[k] * (kernel_size[k] - 1) - 1) // stride[k] + 1
            torch._check(grad_output.shape[2 + k] == size, lambda: "output size mismatch")
        shape = (grad_output.shape[1], input.shape[1] // groups, kernel_size[0], kernel_size[1])
        return input.new_empty(shape, dtype=out_dtype(input))

    @torch.library.register_fake("mnemo_fast::perturb_max_ratio")
    def _(forget, remain):
        torch._check(len(forget) == len(remain), lambda: "forget and remain lengths differ")
        if not forget:
            return torch.empty(0)
        for f, r in zip(forget, remain):
            torch._check(f.shape == r.shape, lambda: "forget and remain shapes differ")
        return forget[0].new_empty((len(forget),), dtype=out_dtype(forget[0]))

    def check_lists(params, forget, remain, max_ratio=None):
        torch._check(len(params) == len(forget) == len(remain), lambda: "list lengths differ")
        if max_ratio is not None:  # perturb_dampen_ takes none
            torch._check(max_ratio.shape == (len(params),), lambda: "max_ratio must be [L]")
        for p, f, r in zip(params, forget, remain):
            torch._check(p.shape == f.shape == r.shape, lambda: "param and Fisher shapes differ")

    @torch.library.register_fake("mnemo_fast::perturb_shift_")
    def _(params, forget, remain, max_ratio, lambda1, lambda2, sign):
        check_lists(params, forget, remain, max_ratio)

    @torch.library.register_fake("mnemo_fast::perturb_gaussian_")
    def _(params, forget, remain, max_ratio, lambda1, lambda2, tau, generator):
        check_lists(params, forget, remain, max_ratio)

    @torch.library.register_fake("mnemo_fast::perturb_dampen_")
    def _(params, forget, remain, threshold, lam):
        check_lists(params, forget, remain)


_ext.when_loaded(_register_fakes)
