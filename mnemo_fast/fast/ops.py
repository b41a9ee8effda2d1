"""Typed wrappers of the compiled operators ``torch.ops.mnemo_fast.*``.

Each op has a fake kernel (shapes only) so it traces under torch.compile, and a
pure-PyTorch twin with the same signature in :mod:`mnemo_fast.reference.kernels`.
Importing this module never fails; calling an op without the extension raises
RuntimeError (see :func:`mnemo_fast.fast._ext.load_error`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mnemo_fast.fast import _ext

Tensor = torch.Tensor


def _op(name: str):
    if not _ext.available():
        raise RuntimeError(f"mnemo_fast.fast.ops.{name}: compiled kernels unavailable ({_ext.load_error()})")
    return getattr(torch.ops.mnemo_fast, name).default


def _pair(v: int | Sequence[int]) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def sum_sq_grad_linear(grad_output: Tensor, input: Tensor) -> Tensor:
    """Sum over samples of the squared per-sample weight gradients of a linear layer.

    grad_output [N, T, out], input [N, T, in] -> [out, in] (float64 for float64, else float32).
    Equivalent PyTorch: ``torch.einsum("nto,nti->noi", g, x).square().sum(0)``.
    """
    return _op("sum_sq_grad_linear")(grad_output, input)


def sum_sq_grad_conv2d(
    grad_output: Tensor,
    input: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> Tensor:
    """Sum over samples of the squared per-sample weight gradients of a Conv2d (zero padding).

    grad_output [N, out, Ho, Wo], input [N, in, H, W] -> [out, in/groups, kh, kw].
    Equivalent PyTorch: ``einsum("ngol,ngkl->ngok", g, unfold(x)).square().sum(0)`` per group.
    """
    args = (_pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation), int(groups))
    return _op("sum_sq_grad_conv2d")(grad_output, input, *args)


def sum_sq_grad_conv1d(
    grad_output: Tensor,
    input: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> Tensor:
    """Conv1d version: grad_output [N, out, Lo], input [N, in, L] -> [out, in/groups, k].

    Runs the conv2d kernel on a height-1 image.
    """

    def one(v: int | Sequence[int]) -> int:
        return int(v) if isinstance(v, int) else int(v[0])

    d = sum_sq_grad_conv2d(
        grad_output.unsqueeze(2),
        input.unsqueeze(2),
        (1, one(kernel_size)),
        (1, one(stride)),
        (0, one(padding)),
        (1, one(dilation)),
        groups,
    )
    return d.squeeze(2)


def perturb_max_ratio(forget: Sequence[Tensor], remain: Sequence[Tensor]) -> Tensor:
    """Per tensor, the largest finite ``eta = f_F / f_R`` (NaN -> 0), 0 if none.

    The reference writes eta as ``exp(log f_F - log f_R)`` (the authors' formula); the CPU
    and CUDA kernels divide, the same function with one rounding (csrc/cpu/perturb.h), so results agree
    with the reference within its own cancellation error (a few dozen ulps), not bitwise.

    Returns [L] (float64 when the Fishers are float64, else float32).
    Equivalent PyTorch: ``torch.stack([reference.perturb.max_finite_ratio(f, r) ...])``.
    """
    return _op("perturb_max_ratio")(list(forget), list(remain))


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
    Equivalent PyTorch: ``p.add_((sign * reference.perturb.shift(f, r, lambda1, lambda2)).to(p.dtype))``.
    """
    _op("perturb_shift_")(list(params), list(forget), list(remain), max_ratio,
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
    left untouched. Equivalent PyTorch: ``p.add_(reference.perturb.gaussian_noise(...).to(p.dtype))``.
    """
    _op("perturb_gaussian_")(list(params), list(forget), list(remain), max_ratio,
                             float(lambda1), float(lambda2), float(tau), generator)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _register_fakes() -> None:
    @torch.library.register_fake("mnemo_fast::sum_sq_grad_linear")
    def _(grad_output, input):
        torch._check(grad_output.dim() == 3 and input.dim() == 3, lambda: "expected [N, T, *] inputs")
        torch._check(grad_output.shape[0] == input.shape[0], lambda: "N must match")
        torch._check(grad_output.shape[1] == input.shape[1], lambda: "T must match")
        torch._check(grad_output.dtype == input.dtype, lambda: "dtypes must match")
        return input.new_empty((grad_output.shape[2], input.shape[2]), dtype=_compute_dtype(input))

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
        return input.new_empty(shape, dtype=_compute_dtype(input))

    @torch.library.register_fake("mnemo_fast::perturb_max_ratio")
    def _(forget, remain):
        torch._check(len(forget) == len(remain), lambda: "forget and remain lengths differ")
        if not forget:
            return torch.empty(0)
        for f, r in zip(forget, remain):
            torch._check(f.shape == r.shape, lambda: "forget and remain shapes differ")
        return forget[0].new_empty((len(forget),), dtype=_compute_dtype(forget[0]))

    def check_lists(params, forget, remain, max_ratio):
        torch._check(len(params) == len(forget) == len(remain), lambda: "list lengths differ")
        torch._check(max_ratio.shape == (len(params),), lambda: "max_ratio must be [L]")
        for p, f, r in zip(params, forget, remain):
            torch._check(p.shape == f.shape == r.shape, lambda: "param and Fisher shapes differ")

    @torch.library.register_fake("mnemo_fast::perturb_shift_")
    def _(params, forget, remain, max_ratio, lambda1, lambda2, sign):
        check_lists(params, forget, remain, max_ratio)

    @torch.library.register_fake("mnemo_fast::perturb_gaussian_")
    def _(params, forget, remain, max_ratio, lambda1, lambda2, tau, generator):
        check_lists(params, forget, remain, max_ratio)


if _ext.available():
    _register_fakes()
