"""nn.Conv1d / nn.Conv2d through the conv2d op (Conv1d as an image of height 1); zero or
other padding modes (the input is padded here first, the op then runs unpadded); the bias
gets sum_n (sum over positions of g_n)^2. Depthwise convolutions (one input channel per
group) take a grouped convolution instead: docs/FAST_PATH.md, "Conv1d / Conv2d via im2col
blocks" and "Depthwise convolutions"."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Calls, Rule, Tensor, acc, has_bias, has_weight, square_sum


class ConvRule(Rule):
    max_calls = 1  # calls of different spatial sizes cannot share one kernel call

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, (nn.Conv1d, nn.Conv2d)) and not isinstance(module.padding, str) \
            and not isinstance(module, nn.modules.conv._ConvTransposeNd)

    def _as_2d(self, module, x: Tensor, g: Tensor):
        """(input, grad_output, kernel, stride, padding, dilation) of the equivalent Conv2d."""
        two_d = isinstance(module, nn.Conv2d)
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = (0, 0)
        else:
            padding = module.padding if two_d else (0, module.padding[0])
        if two_d:
            return x, g, module.kernel_size, module.stride, padding, module.dilation
        lift = lambda p: (1, p[0])  # noqa: E731
        return (x.unsqueeze(2), g.unsqueeze(2), lift(module.kernel_size), lift(module.stride),
                padding, lift(module.dilation))

    def accumulate(self, module, calls: Calls, kernels) -> dict[str, Tensor]:
        (inp, grad), = calls
        out = {}
        if has_weight(module):
            x, g, k, s, p, d = self._as_2d(module, inp, grad)
            if module.groups > 1 and module.in_channels == module.groups:
                d2 = depthwise_sum_sq(acc(g), acc(x), k, s, p, d)
            elif module.groups == 1 and g[0, 0].numel() == 1:
                # One output position (a late stage's downsampling, a conv as the head): each
                # sample's gradient is the outer product g_n x_n^T of its one input window, so
                # the linear kernel's T = 1 path (one GEMM on squared operands) takes it.
                cols = F.unfold(x, k, dilation=d, padding=p, stride=s).transpose(1, 2)  # [N, 1, C*kk]
                d2 = kernels.linear_fisher(g.reshape(g.shape[0], 1, -1).contiguous(), cols.contiguous())
            else:
                d2 = kernels.sum_sq_grad_conv2d(g.contiguous(), x.contiguous(), k, s, p, d, module.groups)
            out["weight"] = d2.view(module.weight.shape)
        if has_bias(module):
            out["bias"] = square_sum(grad.flatten(2).sum(2))
        return out


#: Output maps this small (late stages of a network: 1x1, 2x2) take a sum over positions: the
#: grouped convolution would have a kernel (g) smaller than its padding, a case oneDNN leaves to
#: a slow per-group loop (80-100x slower at 1x1 maps, 32 x 1024 groups).
_FEW_POSITIONS = 16


def depthwise_sum_sq(g: Tensor, x: Tensor, kernel_size, stride, padding, dilation) -> Tensor:
    """sum_n (per-sample weight gradient)^2 [O, 1, kh, kw] of a depthwise conv2d (groups = C,
    O = C * m) from its input x [N, C, H, W] and output gradient g [N, O, oh, ow].

    Sample n's gradient of output channel o = c * m + j correlates x_n[c] with g_n[o]:
    ``w[kh, kw] = sum_(i, j) g[i, j] * x_pad[i * s + kh * d, j * s + kw * d]``, a convolution
    of x_pad with g as its kernel, stride and dilation swapped. One grouped convolution with
    N * C groups (one per sample and channel) computes all of them: [N * O, kh', kw'], where
    kh' >= kh (the forward drops rows the stride does not reach), cropped to the kernel. The
    im2col kernel would copy each input k*k times for matrix products of one row."""
    if g.shape[2] * g.shape[3] <= _FEW_POSITIONS:
        padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else x
        return _depthwise_by_positions(g, padded, kernel_size, stride, dilation)
    n, c, h, w = x.shape
    o = g.shape[1]
    per_sample = F.conv2d(x.reshape(1, n * c, h, w), g.reshape(n * o, 1, *g.shape[2:]),
                          stride=tuple(dilation), padding=tuple(padding), dilation=tuple(stride), groups=n * c)
    per_sample = per_sample[0, :, : kernel_size[0], : kernel_size[1]].reshape(n, o, 1, *kernel_size)
    return torch.square(per_sample).sum(0)


def _depthwise_by_positions(g: Tensor, x: Tensor, kernel_size, stride, dilation) -> Tensor:
    """:func:`depthwise_sum_sq` on a padded ``x`` [N, C, H, W] as a sum over the few output
    positions (i, j) of g[n, o, i, j] times the input window that position sees."""
    n, c = x.shape[:2]
    o = g.shape[1]
    x = x.repeat_interleave(o // c, dim=1) if o != c else x  # channel o reads input channel o // m
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    per_sample = torch.zeros(n, o, kh, kw, dtype=x.dtype, device=x.device)
    for i in range(g.shape[2]):
        for j in range(g.shape[3]):
            window = x[:, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
            per_sample += g[:, :, i, j, None, None] * window
    return torch.square(per_sample).sum(0).unsqueeze(1)
