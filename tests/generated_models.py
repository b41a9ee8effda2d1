"""Small random whole models for the Fisher diagonal, and a brute-force batch-1 loop to judge them.

A helper module (not a test file): :func:`model_specs` is a Hypothesis strategy of model
*specifications* (plain dicts, so a shrunk failure prints as a readable recipe), :func:`build`
turns one into an ``nn.Module`` (float32, eval mode, seeded weights) with inputs and targets,
and :func:`check_fisher` applies the pass rule of ``tests/test_generated_models.py``.

A model is a stem, a few blocks over a hidden state ``h`` [N, T, d] and a pooled head:

- stems: ``embed`` (Embedding on int ids [N, T], optionally looked up twice, or a second
  lookup, of it or another Embedding, on ids changed in place after the first), ``linear``
  (Linear on float features [N, T, F]), ``conv2d`` (Conv2d with groups/dilation/stride on
  [N, C, H, W], optional BatchNorm2d/GroupNorm and a second Conv2d, flattened to [N, H'W', d]);
- blocks: ``linear`` (on 3-D, 4-D ``[N, T, 2, d/2]`` or rows folded to 2-D ``[N*T, d]``),
  ``shared`` (one Linear, LayerNorm, Conv1d or nn.MultiheadAttention called twice), ``gate``
  (Linear on the pooled 2-D [N, d]), ``conv1d`` (groups, dilation, stride, padding), ``norm``
  (LayerNorm, nn.RMSNorm, a hand-written RMSNorm, BatchNorm1d in eval, GroupNorm), ``mha``
  (nn.MultiheadAttention with key_padding_mask / attn_mask, batch_first or not), ``attn``
  (hand-written softmax(QK^T)V with Linear projections, fused qkv split by slicing, causal
  and padding masks, a per-head Linear on 4-D), ``raw`` (raw nn.Parameters: ``F.linear``,
  ``@``, ``addmm``, a layer scale, a position table or a bias added, a class token
  concatenated in front), ``posemb`` (an Embedding of position ids, broadcast or expanded over
  the batch), ``reshape`` (view/transpose/permute, indexing, slicing, flip, cat), ``dropout``
  (module, in-place module, functional; eval mode);
- heads: pooling (mean, sum, max, first, last, or a Linear on 3-D then the mean), then a
  Linear, a raw ``F.linear``/``@``, or a head tied to the Embedding (``p @ emb.weight[:C].t()``);
  the output is a tensor, ``{"logits": ...}`` or an object with ``.logits``.

Most blocks can apply an operation to a layer's *output* (``relu_``, ``F.relu(inplace=True)``,
``nn.ReLU(inplace=True)``, ``leaky_relu``, ``tanh_``, ``mul_``, ``add_``, ``+=``, ``t[..., 0] =
0``), and the linear/raw blocks also to the layer's *input* after the layer has read it
(``y = lin(h); h.relu_(); h + y``). Every in-place operation is written as ``t = op(t)`` with
an out-of-place twin: :func:`set_inplace` (``False``) turns the model into the same function
without in-place operations, which :func:`exact_fisher` uses as the ground truth. PyTorch
itself refuses some of these models (an in-place write to a tensor autograd saved for the
backward); their mathematical Fisher is still the twin's.

Also drawn: ``detach`` of a Linear's input or output, frozen parameters (about a quarter, from
``freeze_seed``), N = 1..6, and how the fast call is made (``chunk_size`` None/1/2, the default
engine or the ATen hooks engine). Weights are seeded from ``seed`` with non-trivial values
(norm affines and BatchNorm running statistics random, :func:`init_weights`).

Two torch 2.13 CPU bugs are kept out of the draws (they would break the ground truth or the
run, not the package): BatchNorm2d's backward at batch 1 with a channels-last-strided output
gradient (BatchNorm2d only before a second Conv2d), and a segfault of dilated 1x1 convolutions
(kernel size 1 drawn without dilation); see the notes in :func:`stems`.
"""

from __future__ import annotations

import copy
import math
import random
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

Tensor = torch.Tensor

#: Operations on a tensor, simplest first (Hypothesis shrinks towards the first).
OPS = ("none", "relu", "F.relu", "nn.ReLU", "leaky", "tanh", "mul", "add", "iadd", "fill0", "gelu")
#: Those that write in place (when the model's ``inplace`` flag is on).
INPLACE_OPS = {"relu", "F.relu", "nn.ReLU", "leaky", "tanh", "mul", "add", "iadd", "fill0"}
T_MAX = 16


# ---- operations with an out-of-place twin -----------------------------------------------------

def apply_op(t: Tensor, op: str, inplace: bool, other: Tensor | None = None, relu: nn.Module | None = None) -> Tensor:
    """``op`` on ``t``, in place when ``inplace`` (and ``op`` writes in place), else its twin.
    ``other``: the tensor ``iadd`` adds (``t += other``); ``relu``: the block's nn.ReLU."""
    if op == "none":
        return t
    if op == "relu":
        return t.relu_() if inplace else torch.relu(t)
    if op == "F.relu":
        return F.relu(t, inplace=inplace)
    if op == "nn.ReLU":  # the module's own ``inplace`` flag, switched by set_inplace
        return relu(t)
    if op == "leaky":
        return F.leaky_relu(t, 0.1, inplace=inplace)
    if op == "tanh":
        return t.tanh_() if inplace else torch.tanh(t)
    if op == "mul":
        return t.mul_(1.5) if inplace else t * 1.5
    if op == "add":
        return t.add_(0.25) if inplace else t + 0.25
    if op == "iadd":
        if inplace:
            t += other
            return t
        return t + other
    if op == "fill0":
        if inplace:
            t[..., 0] = 0.0
            return t
        return t.index_fill(-1, torch.zeros(1, dtype=torch.long, device=t.device), 0.0)
    if op == "gelu":
        return F.gelu(t)
    raise ValueError(op)


class Block(nn.Module):
    """A block: ``forward(h [N, T, d], ctx) -> h'``; ``ctx['mask']``: [N, T] bool, True =
    padding (column 0 never), or None. ``inplace``: in-place ops on (set_inplace)."""

    def __init__(self, spec: dict):
        super().__init__()
        self.inplace = True
        self.relu = nn.ReLU(inplace=True)
        self.spec = spec

    def op(self, t: Tensor, op: str, other: Tensor | None = None) -> Tensor:
        return apply_op(t, op, self.inplace, other, self.relu)


def set_inplace(model: nn.Module, flag: bool) -> nn.Module:
    """Switch every in-place operation of a model on or off (its twin): every module's
    boolean ``inplace`` attribute (the blocks', nn.ReLU's, nn.Dropout's)."""
    for m in model.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = flag
    return model


# ---- custom pieces ------------------------------------------------------------------------------

class CustomRMSNorm(nn.Module):
    """Llama-style: ``weight * x * rsqrt(mean(x^2) + eps)`` (a raw parameter, no layer rule)."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


@dataclass
class Output:
    """A model output carrying its logits as an attribute (Hugging Face style)."""

    logits: Tensor


def logits_of(output) -> Tensor:
    """The logits of a generated model's output (tensor, ``{"logits"}`` or ``.logits``)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):
        return output["logits"]
    return output.logits


# ---- stems ----------------------------------------------------------------------------------------

class Stem(nn.Module):
    def __init__(self, spec: dict, d: int):
        super().__init__()
        self.spec = spec
        self.inplace = True
        self.relu = nn.ReLU(inplace=True)
        kind = spec["stem"]
        if kind == "embed":
            self.emb = nn.Embedding(spec["V"], d, padding_idx=spec["padding_idx"])
            if spec["second"] == "other":
                self.emb2 = nn.Embedding(spec["V"], d)
        elif kind == "linear":
            self.lin = nn.Linear(spec["F"], d, bias=spec["bias"])
            self.register_buffer("not_first", torch.arange(T_MAX) > 0, persistent=False)
        elif kind == "conv2d":
            c = spec["conv"]
            self.conv = nn.Conv2d(spec["C"], d, c["k"], c["stride"], c["padding"], c["dilation"], c["groups"],
                                  bias=spec["bias"])
            if spec["norm"] == "bn":
                self.norm = nn.BatchNorm2d(d, affine=spec["affine"])
            elif spec["norm"] == "gn":
                self.norm = nn.GroupNorm(2, d, affine=spec["affine"])
            if spec["second"] is not None:
                k2, g2 = spec["second"]
                self.conv2 = nn.Conv2d(d, d, k2, padding=k2 // 2, groups=g2)
        else:
            raise ValueError(kind)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        s = self.spec
        kind = s["stem"]
        if kind == "embed":
            mask = x == 0
            if s["second"] is None:
                return self.emb(x), {"mask": mask}
            if s["second"] == "twice":  # the same Embedding looked up twice (other ids, no in-place)
                return self.emb(x) + self.emb((x + 1).remainder(s["V"])), {"mask": mask}
            ids = x.clone()
            h = self.emb(ids)
            # the ids the first lookup read, changed in place before a second lookup
            ids = ids.add_(1).remainder_(s["V"]) if self.inplace else (ids + 1).remainder(s["V"])
            return h + (self.emb if s["second"] == "same" else self.emb2)(ids), {"mask": mask}
        if kind == "linear":
            mask = (x[..., 0] > 0.7) & self.not_first[: x.shape[1]]
            return apply_op(self.lin(x), s["op"], self.inplace, None, self.relu), {"mask": mask}
        h = self.conv(x)
        if s["norm"] is not None:
            h = self.norm(h)
        h = apply_op(h, s["op"], self.inplace, None, self.relu)
        if s["second"] is not None:
            h = self.conv2(h)
        return h.flatten(2).transpose(1, 2), {"mask": None}


# ---- blocks ----------------------------------------------------------------------------------

class LinearBlock(Block):
    """Linear on 3-D ``h``, on a 4-D view ``[N, T, 2, d/2]`` or on rows folded ``[N*T, d]``;
    an op on its output, optionally one on its input after it was read; residual; detach."""

    def __init__(self, spec, d):
        super().__init__(spec)
        width = d // 2 if spec["rank"] == "4d" else d
        self.lin = nn.Linear(width, width, bias=spec["bias"])

    def forward(self, h, ctx):
        s = self.spec
        n, t, d = h.shape
        x = h.detach() if s["detach"] == "input" else h
        if s["rank"] == "4d":
            y = self.lin(x.reshape(n, t, 2, d // 2)).reshape(n, t, d)
        elif s["rank"] == "fold":
            y = self.lin(x.reshape(n * t, d)).view(n, t, d)
        else:
            y = self.lin(x)
        y = self.op(y, s["op"], other=h)
        if s["detach"] == "output":
            y = y.detach()
        if s["input_op"] != "none":  # the layer's input, changed after the layer read it
            h = self.op(h, s["input_op"], other=y)
            return h if s["input_op"] == "iadd" else h + y
        return h + y if s["residual"] else y


class SharedBlock(Block):
    """One module called twice: ``f(op(f(h)))``, f a Linear, LayerNorm, Conv1d (same length)
    or nn.MultiheadAttention (self-attention)."""

    def __init__(self, spec, d):
        super().__init__(spec)
        module = spec.get("module", "linear")
        if module == "linear":
            self.lin = nn.Linear(d, d, bias=spec["bias"])
        elif module == "layernorm":
            self.norm = nn.LayerNorm(d, bias=spec["bias"])
        elif module == "conv1d":
            self.conv = nn.Conv1d(d, d, 3, padding=1, groups=2, bias=spec["bias"])
        else:
            self.mha = nn.MultiheadAttention(d, 2, bias=spec["bias"], batch_first=True)

    def f(self, h):
        module = self.spec.get("module", "linear")
        if module == "linear":
            return self.lin(h)
        if module == "layernorm":
            return self.norm(h)
        if module == "conv1d":
            return self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.mha(h, h, h, need_weights=False)[0]

    def forward(self, h, ctx):
        s = self.spec
        y = self.f(self.op(self.f(h), s["op"], other=h))
        return h + y if s["residual"] else y


class GateBlock(Block):
    """Linear on the pooled 2-D ``[N, d]``, a sigmoid gate over the positions."""

    def __init__(self, spec, d):
        super().__init__(spec)
        self.lin = nn.Linear(d, d)

    def forward(self, h, ctx):
        g = self.op(self.lin(h.mean(1)), self.spec["op"], other=h[:, 0])
        return h * torch.sigmoid(g)[:, None]


class Conv1dBlock(Block):
    def __init__(self, spec, d):
        super().__init__(spec)
        self.conv = nn.Conv1d(d, d, spec["k"], spec["stride"], spec["padding"], spec["dilation"], spec["groups"],
                              bias=spec["bias"])

    def forward(self, h, ctx):
        s = self.spec
        x = h.transpose(1, 2) if s["layout"] == "transpose" else h.permute(0, 2, 1)
        y = self.op(self.conv(x), s["op"])
        if y.shape[-1] != h.shape[1]:
            ctx["mask"] = None
        return y.transpose(1, 2)


class NormBlock(Block):
    """A norm (optionally pre-norm residual with a Linear), an op on its output."""

    def __init__(self, spec, d):
        super().__init__(spec)
        kind, affine = spec["norm"], spec["affine"]
        if kind == "layernorm":
            self.norm = nn.LayerNorm(d, elementwise_affine=affine)
        elif kind == "nn.rmsnorm":
            self.norm = nn.RMSNorm(d, elementwise_affine=affine)
        elif kind == "rmsnorm":
            self.norm = CustomRMSNorm(d)
        elif kind == "batchnorm":
            self.norm = nn.BatchNorm1d(d, affine=affine)
        elif kind == "groupnorm":
            self.norm = nn.GroupNorm(2, d, affine=affine)
        else:
            raise ValueError(kind)
        if spec["prenorm"]:
            self.lin = nn.Linear(d, d)

    def forward(self, h, ctx):
        s = self.spec
        if s["norm"] in ("batchnorm", "groupnorm"):
            y = self.norm(h.transpose(1, 2)).transpose(1, 2)
        else:
            y = self.norm(h)
        y = self.op(y, s["op"], other=h)
        return h + self.lin(y) if s["prenorm"] else y


class MHABlock(Block):
    """nn.MultiheadAttention, self-attention, with key_padding_mask and/or attn_mask."""

    def __init__(self, spec, d):
        super().__init__(spec)
        self.mha = nn.MultiheadAttention(d, spec["heads"], bias=spec["bias"], batch_first=spec["batch_first"])
        self.register_buffer("causal", torch.ones(T_MAX, T_MAX, dtype=torch.bool).triu(1), persistent=False)

    def forward(self, h, ctx):
        s = self.spec
        t = h.shape[1]
        kpm = ctx["mask"] if s["kpm"] else None
        attn_mask = None
        if s["causal"] == "bool":
            attn_mask = self.causal[:t, :t]
        elif s["causal"] == "float":
            attn_mask = torch.zeros(t, t, dtype=h.dtype, device=h.device)
            attn_mask = attn_mask.masked_fill(self.causal[:t, :t], float("-inf"))
            if kpm is not None:  # the same mask type for both
                kpm = torch.zeros(kpm.shape, dtype=h.dtype, device=h.device).masked_fill(kpm, float("-inf"))
        q = h if s["batch_first"] else h.transpose(0, 1)
        y, _ = self.mha(q, q, q, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=s["need_weights"])
        if not s["batch_first"]:
            y = y.transpose(0, 1)
        y = self.op(y, s["op"], other=h)
        return h + y if s["residual"] else y


class AttentionBlock(Block):
    """Hand-written multi-head softmax(QK^T / sqrt(dh)) V with Linear projections."""

    def __init__(self, spec, d):
        super().__init__(spec)
        if spec["fused"]:
            self.qkv = nn.Linear(d, 3 * d)
        else:
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d)
        if spec["head_linear"]:
            self.per_head = nn.Linear(d // spec["heads"], d // spec["heads"])
        self.o = nn.Linear(d, d)
        self.register_buffer("causal", torch.ones(T_MAX, T_MAX, dtype=torch.bool).triu(1), persistent=False)

    def forward(self, h, ctx):
        s = self.spec
        n, t, d = h.shape
        heads = s["heads"]
        if s["fused"]:
            qkv = self.qkv(h)
            q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
        else:
            q, k, v = self.q(h), self.k(h), self.v(h)
        q, k, v = (z.reshape(n, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))  # [N, H, T, dh]
        if s["head_linear"]:
            v = self.per_head(v)  # Linear on 4-D
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // heads)
        if s["causal"]:
            scores = scores.masked_fill(self.causal[:t, :t], float("-inf"))
        if s["kpm"] and ctx["mask"] is not None:
            scores = scores.masked_fill(ctx["mask"][:, None, None, :], float("-inf"))
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, t, d)
        y = self.op(self.o(a), s["op"], other=h)
        return h + y if s["residual"] else y


class RawBlock(Block):
    """Raw nn.Parameters used directly: F.linear, @, addmm (GPT-2 Conv1D), a layer scale,
    a position table added over the batch, a bias added."""

    def __init__(self, spec, d):
        super().__init__(spec)
        kind = spec["raw"]
        if kind == "F.linear":
            self.weight, self.bias = nn.Parameter(torch.zeros(d, d)), nn.Parameter(torch.zeros(d))
        elif kind == "matmul":
            self.weight = nn.Parameter(torch.zeros(d, d))
        elif kind == "addmm":
            self.weight, self.bias = nn.Parameter(torch.zeros(d, d)), nn.Parameter(torch.zeros(d))
        elif kind == "scale":
            self.scale = nn.Parameter(torch.ones(d))
        elif kind == "pos_add":
            self.pos = nn.Parameter(torch.zeros(T_MAX, d))
        elif kind == "bias_add":
            self.bias = nn.Parameter(torch.zeros(d))
        elif kind == "cls":
            self.cls = nn.Parameter(torch.zeros(1, 1, d))
        else:
            raise ValueError(kind)

    def forward(self, h, ctx):
        s = self.spec
        n, t, d = h.shape
        kind = s["raw"]
        if kind == "F.linear":
            y = F.linear(h, self.weight, self.bias)
        elif kind == "matmul":
            y = h @ self.weight
        elif kind == "addmm":
            y = torch.addmm(self.bias, h.reshape(n * t, d), self.weight).view(n, t, d)
        elif kind == "scale":
            y = h * self.scale
        elif kind == "pos_add":
            y = h + self.pos[:t]
        elif kind == "cls":  # a class token in front (ViT): T + 1 positions
            if ctx["mask"] is not None:
                ctx["mask"] = torch.cat([torch.zeros_like(ctx["mask"][:, :1]), ctx["mask"]], 1)
            return torch.cat([self.cls.expand(n, 1, d), h], 1)
        else:
            y = h + self.bias
        y = self.op(y, s["op"], other=h)
        if s["input_op"] != "none":
            h = self.op(h, s["input_op"], other=y)
            return h if s["input_op"] == "iadd" else h + y
        return h + y if s["residual"] else y


class PosEmbBlock(Block):
    """An Embedding of position ids (a buffer): [T] broadcast over the batch, or expanded."""

    def __init__(self, spec, d):
        super().__init__(spec)
        self.pos = nn.Embedding(T_MAX, d)
        self.register_buffer("ids", torch.arange(T_MAX), persistent=False)

    def forward(self, h, ctx):
        n, t, _ = h.shape
        ids = self.ids[:t].expand(n, t) if self.spec["expand"] else self.ids[:t]
        return h + self.pos(ids)


def _first_unmasked(mask: Tensor) -> Tensor:
    """The padding mask with position 0 never masked: a causal row 0 then sees one key (else
    softmax over no key gives NaN)."""
    return mask & (torch.arange(mask.shape[1], device=mask.device) > 0)


class ReshapeBlock(Block):
    """view/transpose/permute, indexing, slicing, flip, cat (no parameters)."""

    def __init__(self, spec, d):
        super().__init__(spec)
        g = torch.Generator().manual_seed(spec["perm_seed"])
        self.register_buffer("perm", torch.randperm(d, generator=g), persistent=False)
        self.register_buffer("tperm", torch.randperm(spec["T"], generator=g), persistent=False)

    def forward(self, h, ctx):
        how = self.spec["how"]
        n, t, d = h.shape
        mask = ctx["mask"]
        if how == "split_transpose":
            return h.view(n, t, 2, d // 2).transpose(2, 3).reshape(n, t, d)
        if how == "permute_roundtrip":
            return h.permute(0, 2, 1).contiguous().permute(0, 2, 1) * 1.0
        if how == "index":
            return h[:, :, self.perm]
        if how == "index_T":
            ctx["mask"] = None if mask is None else _first_unmasked(mask[:, self.tperm])
            return h[:, self.tperm]
        if how == "slice_T":
            ctx["mask"] = None if mask is None else mask[:, ::2]
            return h[:, ::2]
        if how == "flip":
            ctx["mask"] = None if mask is None else _first_unmasked(mask.flip(1))
            return h.flip(1)
        if how == "slice_cat":
            return torch.cat([h[..., : d // 2] * 2.0, h[..., d // 2 :]], -1)
        raise ValueError(how)


class DropoutBlock(Block):
    def __init__(self, spec, d):
        super().__init__(spec)
        self.drop = nn.Dropout(0.3, inplace=spec["how"] == "module_inplace")

    def forward(self, h, ctx):
        if self.spec["how"] == "functional":
            return F.dropout(h, 0.3, self.training)
        return self.drop(h)


BLOCKS: dict[str, type] = {
    "linear": LinearBlock, "shared": SharedBlock, "gate": GateBlock, "conv1d": Conv1dBlock, "norm": NormBlock,
    "mha": MHABlock, "attn": AttentionBlock, "raw": RawBlock, "posemb": PosEmbBlock, "reshape": ReshapeBlock,
    "dropout": DropoutBlock,
}


# ---- head and the whole model ----------------------------------------------------------------

class Head(nn.Module):
    def __init__(self, spec: dict, d: int):
        super().__init__()
        self.spec = spec
        c = spec["classes"]
        if spec["head"] == "linear":
            self.lin = nn.Linear(d, c, bias=spec["bias"])
        elif spec["head"] in ("F.linear", "matmul"):
            self.weight = nn.Parameter(torch.zeros(c, d) if spec["head"] == "F.linear" else torch.zeros(d, c))
            self.bias = nn.Parameter(torch.zeros(c)) if spec["bias"] else None

    def forward(self, h: Tensor, stem: Stem) -> Tensor:
        s = self.spec
        pool = s["pool"]
        if pool == "linear_then_mean":  # a Linear on 3-D, then the mean over positions
            return self.lin(h).mean(1)
        p = {"mean": lambda: h.mean(1), "sum": lambda: h.sum(1), "max": lambda: h.amax(1),
             "first": lambda: h[:, 0], "last": lambda: h[:, -1]}[pool]()
        if s["head"] == "linear":
            return self.lin(p)
        if s["head"] == "F.linear":
            return F.linear(p, self.weight, self.bias)
        if s["head"] == "matmul":
            out = p @ self.weight
            return out + self.bias if self.bias is not None else out
        return p @ stem.emb.weight[: s["classes"]].t()  # tied to the Embedding


class GeneratedModel(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        d = spec["d"]
        self.stem = Stem(spec["stem"], d)
        self.blocks = nn.ModuleList(BLOCKS[b["kind"]](b, d) for b in spec["blocks"])
        self.head = Head(spec["head"], d)

    def forward(self, x):
        h, ctx = self.stem(x)
        for block in self.blocks:
            h = block(h, ctx)
        logits = self.head(h, self.stem)
        out = self.spec["head"]["out"]
        return logits if out == "tensor" else {"logits": logits} if out == "dict" else Output(logits)


# ---- weights, inputs ---------------------------------------------------------------------------

NORMS = (nn.LayerNorm, nn.RMSNorm, CustomRMSNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """Deterministic, non-trivial values: weights ~ N(0, 1/fan_in), biases ~ N(0, 0.25),
    norm scales 1 + N(0, 0.09), norm shifts N(0, 0.09), BatchNorm running statistics random."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=g)
            if isinstance(module, NORMS) or name == "scale":
                p.copy_(1 + 0.3 * noise if name in ("weight", "scale") else 0.3 * noise)
            elif isinstance(module, nn.Embedding):
                p.copy_(noise)
            elif p.dim() >= 2:
                p.copy_(noise / math.sqrt(max(1, p[0].numel())))
            else:
                p.copy_(0.5 * noise)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(0.3 * torch.randn(module.running_mean.shape, generator=g))
            module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=g))
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            module.weight[module.padding_idx] = 0.0


def freeze(model: nn.Module, freeze_seed: int | None) -> None:
    """requires_grad_(False) on about a quarter of the parameters (None: none)."""
    if freeze_seed is None:
        return
    rng = random.Random(freeze_seed)
    for _, p in model.named_parameters():
        if rng.random() < 0.25:
            p.requires_grad_(False)


def make_inputs(spec: dict, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    n, stem = spec["N"], spec["stem"]
    if stem["stem"] == "embed":
        x = torch.randint(0, stem["V"], (n, stem["T"]), generator=g)
        x[:, 0] = torch.randint(1, stem["V"], (n,), generator=g)  # a padding mask never covers column 0
    elif stem["stem"] == "linear":
        x = torch.randn(n, stem["T"], stem["F"], generator=g)
    else:
        x = torch.randn(n, stem["C"], stem["H"], stem["W"], generator=g)
    y = torch.randint(0, spec["head"]["classes"], (n,), generator=g)
    return x, y


def build(spec: dict) -> tuple[nn.Module, Tensor, Tensor]:
    """(model in eval mode, float32, seeded; inputs [N, ...]; targets [N])."""
    model = GeneratedModel(spec)
    init_weights(model, spec["seed"])
    freeze(model, spec["freeze_seed"])
    model.eval()
    x, y = make_inputs(spec, spec["seed"])
    return model, x, y


def uses_inplace(spec: dict) -> bool:
    """Whether the model writes in place anywhere (then its out-of-place twin differs)."""
    stem = spec["stem"]
    ops = [stem.get("op", "none")] + [b.get(k, "none") for b in spec["blocks"] for k in ("op", "input_op")]
    return (stem["stem"] == "embed" and stem["second"] in ("same", "other")) or any(
        op in INPLACE_OPS for op in ops) or any(b["kind"] == "dropout" and b["how"] == "module_inplace"
                                                for b in spec["blocks"])


# ---- the strategy ------------------------------------------------------------------------------

def _divisors(n: int, among=(1, 2, 4)) -> list[int]:
    return [g for g in among if n % g == 0]


# A kernel of size 1 is drawn without dilation (it changes nothing there): torch 2.13's CPU
# float32 Conv1d(8, 8, 1, stride=2, padding=1, dilation=2, groups=2 or 4) on a length-1 input
# corrupts memory (a segfault, at once or later), which would take the whole test run down.


@st.composite
def stems(draw, d: int):
    kind = draw(st.sampled_from(["linear", "embed", "conv2d"]))
    if kind == "linear":
        spec = dict(stem="linear", F=draw(st.integers(1, 5)), T=draw(st.integers(1, 5)), bias=draw(st.booleans()),
                    op=draw(st.sampled_from([op for op in OPS if op != "iadd"])))
        return spec, spec["T"]
    if kind == "embed":
        spec = dict(stem="embed", V=draw(st.integers(2, 9)), T=draw(st.integers(1, 5)),
                    padding_idx=draw(st.sampled_from([None, 0])),
                    second=draw(st.sampled_from([None, "twice", "same", "other"])))
        return spec, spec["T"]
    c = draw(st.integers(1, 4))
    groups = draw(st.sampled_from([g for g in (1, 2, 4) if c % g == 0 and d % g == 0]))
    k = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2)) if k > 1 else 1  # no dilated 1x1 kernels (see above)
    padding = draw(st.integers(0, 1))
    reach = dilation * (k - 1) + 1
    h = draw(st.integers(max(1, reach - 2 * padding), max(4, reach)))
    w = draw(st.integers(max(1, reach - 2 * padding), max(4, reach)))
    least = max(1, reach - 2 * padding)
    size = lambda z: (z + 2 * padding - reach) // stride + 1  # noqa: E731
    while size(h) * size(w) > T_MAX:  # keep T = H'W' within the position tables
        h, w = (h - 1, w) if h >= w and h > least else (h, w - 1)
    out = [size(h), size(w)]
    # BatchNorm2d only before a second Conv2d: torch 2.13's CPU batch-norm backward (eval) is
    # wrong at batch 1 when its output gradient is channels-last strided and its input is not
    # (what flatten(2).transpose(1, 2) to [N, T, d] gives it; weight, bias and input gradients
    # off by O(1)), so the batch-1 loop itself would be wrong (batch >= 2 is right)
    second = draw(st.sampled_from([None, (1, 1), (3, 1), (1, 2), (3, d)]))
    spec = dict(stem="conv2d", C=c, H=h, W=w, bias=draw(st.booleans()),
                conv=dict(k=k, stride=stride, padding=padding, dilation=dilation, groups=groups),
                norm=draw(st.sampled_from([None, "bn", "gn"] if second is not None else [None, "gn"])),
                affine=draw(st.booleans()),
                op=draw(st.sampled_from(["none", "relu", "F.relu", "nn.ReLU", "mul", "gelu"])), second=second)
    return spec, out[0] * out[1]


@st.composite
def blocks(draw, d: int, t: int):
    """One block spec for a hidden state [N, t, d], and the T after it."""
    kind = draw(st.sampled_from(list(BLOCKS)))
    op = draw(st.sampled_from(OPS))
    if kind == "linear":
        return dict(kind=kind, rank=draw(st.sampled_from(["3d", "4d", "fold"])), bias=draw(st.booleans()), op=op,
                    input_op=draw(st.sampled_from(["none", "relu", "mul", "add", "iadd", "tanh", "fill0"])),
                    residual=draw(st.booleans()), detach=draw(st.sampled_from([None, "input", "output"]))), t
    if kind == "shared":
        return dict(kind=kind, module=draw(st.sampled_from(["linear", "layernorm", "conv1d", "mha"])),
                    bias=draw(st.booleans()), op=op, residual=draw(st.booleans())), t
    if kind == "gate":
        return dict(kind=kind, op=op if op != "iadd" else "none"), t
    if kind == "conv1d":
        k, stride, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
        dilation = dilation if k > 1 else 1  # no dilated 1x1 kernels (see above)
        padding = draw(st.integers(0, 2))
        reach = dilation * (k - 1) + 1
        padding = max(padding, -(-(reach - t) // 2))
        t2 = (t + 2 * padding - reach) // stride + 1
        if t2 > T_MAX:
            padding, t2 = 0, (t - reach) // stride + 1
            if t2 < 1:
                k, dilation, t2 = 1, 1, (t - 1) // stride + 1
        return dict(kind=kind, k=k, stride=stride, dilation=dilation, padding=padding,
                    groups=draw(st.sampled_from(_divisors(d))), bias=draw(st.booleans()),
                    op=op if op != "iadd" else "relu", layout=draw(st.sampled_from(["transpose", "permute"]))), t2
    if kind == "norm":
        norms = ["layernorm", "rmsnorm", "nn.rmsnorm", "batchnorm", "groupnorm"]
        return dict(kind=kind, norm=draw(st.sampled_from(norms)),
                    affine=draw(st.booleans()), op=op, prenorm=draw(st.booleans())), t
    if kind == "mha":
        return dict(kind=kind, heads=draw(st.sampled_from([1, 2])), bias=draw(st.booleans()),
                    batch_first=draw(st.booleans()), kpm=draw(st.booleans()),
                    causal=draw(st.sampled_from([None, "bool", "float"])), need_weights=draw(st.booleans()),
                    op=op, residual=draw(st.booleans())), t
    if kind == "attn":
        return dict(kind=kind, heads=draw(st.sampled_from([1, 2])), fused=draw(st.booleans()),
                    causal=draw(st.booleans()), kpm=draw(st.booleans()), head_linear=draw(st.booleans()),
                    op=op, residual=draw(st.booleans())), t
    if kind == "raw":
        raw = draw(st.sampled_from(["F.linear", "matmul", "addmm", "scale", "pos_add", "bias_add", "cls"]))
        if raw == "cls" and t >= T_MAX:
            raw = "bias_add"
        return dict(kind=kind, raw=raw, op=op, input_op=draw(st.sampled_from(["none", "relu", "mul", "iadd"])),
                    residual=draw(st.booleans())), t + 1 if raw == "cls" else t
    if kind == "posemb":
        return dict(kind=kind, expand=draw(st.booleans())), t
    if kind == "reshape":
        how = draw(st.sampled_from(["split_transpose", "permute_roundtrip", "index", "index_T", "slice_T", "flip",
                                    "slice_cat"]))
        after = (t + 1) // 2 if how == "slice_T" else t
        return dict(kind=kind, how=how, T=t, perm_seed=draw(st.integers(0, 99))), after
    return dict(kind="dropout", how=draw(st.sampled_from(["module", "module_inplace", "functional"]))), t


@st.composite
def model_specs(draw, max_blocks: int = 4):
    """A whole-model specification (a dict; :func:`build` makes the model). ``chunk`` and
    ``engine`` are how the fast call is made (``chunk_size``; the default engine or the hooks
    engine on ATen ops, :func:`fast_call`)."""
    d = draw(st.sampled_from([4, 8]))
    stem, t = draw(stems(d))
    embed = stem["stem"] == "embed"
    chain = []
    for _ in range(draw(st.integers(0, max_blocks))):
        block, t = draw(blocks(d, t))
        chain.append(block)
    classes = draw(st.integers(2, 4))
    heads = ["linear", "F.linear", "matmul"] + (["tied"] if embed and stem["V"] >= classes else [])
    pools = ["mean", "sum", "max", "first", "last", "linear_then_mean"]
    head = dict(classes=classes, pool=draw(st.sampled_from(pools)),
                head=draw(st.sampled_from(heads)), bias=draw(st.booleans()),
                out=draw(st.sampled_from(["tensor", "dict", "object"])))
    if head["pool"] == "linear_then_mean":
        head["head"] = "linear"
    n = draw(st.integers(1, 6))
    return dict(d=d, stem=stem, blocks=chain, head=head, N=n, seed=draw(st.integers(0, 2**16)),
                freeze_seed=draw(st.one_of(st.none(), st.integers(0, 2**16))),
                chunk=draw(st.sampled_from([None, 1, 2])), engine=draw(st.sampled_from(["default", "aten"])))


# ---- ground truth and the pass rule ----------------------------------------------------------

def brute_force_fisher(model: nn.Module, x: Tensor, y: Tensor, output_fn: Callable = logits_of) -> dict[str, Tensor]:
    """sum_n (dL_n/dw)^2 by one forward/backward per sample (batch of 1), for every trainable
    parameter (tied ones once): ``F.cross_entropy(..., reduction="sum")`` and
    ``torch.autograd.grad``. Independent of mnemo_fast. Raises what autograd raises."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    sums = {name: torch.zeros_like(p) for name, p in params.items()}
    if not params:
        return sums
    with torch.enable_grad():
        for i in range(x.shape[0]):
            loss = F.cross_entropy(output_fn(model(x[i : i + 1])), y[i : i + 1], reduction="sum")
            if not loss.requires_grad:  # every trainable parameter is cut off (detach): zero
                continue
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for name, g in zip(params, grads):
                if g is not None:
                    sums[name] += g.square()
    return sums


def fast_call(spec: dict) -> Callable:
    """``mnemo_fast.fisher_diagonal`` (sums) as the spec asks: chunk size and engine."""
    import mnemo_fast as mf
    from mnemo_fast.fast.engine import HOOKS_ATEN

    engine = HOOKS_ATEN if spec.get("engine") == "aten" else None

    def call(model, x, y):
        return mf.fisher_diagonal(model, x, y, reduction="sum", chunk_size=spec.get("chunk"), engine=engine)

    return call


def float64_copy(model: nn.Module, inplace: bool) -> nn.Module:
    return set_inplace(copy.deepcopy(model).double(), inplace)


def _double(x: Tensor) -> Tensor:
    return x.double() if x.is_floating_point() else x


class Exact:
    """The ground truth of one model on ``x``, ``y``: ``fisher``, float64, by the batch-1 loop on
    the model's out-of-place twin. Computed when needed (what a passing model never needs):
    ``refused``, None if PyTorch runs the model as written (then its own float64 loop must
    equal the twin's: a check of the generator itself), else why it refuses it; ``rounding``
    {name: max|float32 loop - fisher|}, how far the same loop in the model's own float32 lands
    (the conditioning of the model: a GroupNorm over a few nearly equal values loses digits in
    any float32 computation, the fast one included). ``check_twin``: check the twin now."""

    _UNSET = object()

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, check_twin: bool = False):
        self.fisher = brute_force_fisher(float64_copy(model, inplace=False), _double(x), y)
        assert all(bool(e.isfinite().all()) for e in self.fisher.values()), "generator bug: a non-finite exact Fisher"
        self._model, self._x, self._y = model, x, y
        self._refused, self._rounding = self._UNSET, None
        if check_twin:
            self.refused  # noqa: B018 (computes and checks)

    @property
    def refused(self) -> str | None:
        if self._refused is self._UNSET:
            try:
                as_written = brute_force_fisher(float64_copy(self._model, inplace=True), _double(self._x), self._y)
            except RuntimeError as error:
                self._refused = f"{type(error).__name__}: {str(error)[:120]}"
            else:
                self._refused = None
                for name, e in self.fisher.items():
                    atol = 1e-12 * max(1.0, e.abs().max().item())
                    assert torch.allclose(as_written[name], e, rtol=1e-9, atol=atol), \
                        f"generator bug: the out-of-place twin differs from the model at {name}"
        return self._refused

    @property
    def rounding(self) -> dict[str, float]:
        if self._rounding is None:
            loop32 = brute_force_fisher(set_inplace(copy.deepcopy(self._model), False), self._x, self._y)
            self._rounding = {name: (loop32[name].double() - e).abs().max().item() if e.numel() else 0.0
                              for name, e in self.fisher.items()}
        return self._rounding


def exact_fisher(model: nn.Module, x: Tensor, y: Tensor, check_twin: bool = False) -> Exact:
    """:class:`Exact` of ``model`` on ``x``, ``y``."""
    return Exact(model, x, y, check_twin)


#: A result may be off by this many times the float32 loop's own rounding error.
ROUNDING_SLACK = 8.0
#: ... and by this fraction of the largest Fisher entry of the whole model.
FLOOR = 1e-6


def relative_errors(got: dict[str, Tensor], exact: Exact, tol: float) -> dict[str, float]:
    """{name: max|got - exact| / max|exact|} of the parameters off by more than
    ``tol * max|exact|``, plus :data:`ROUNDING_SLACK` times the float32 loop's own error
    (ill-conditioned models), plus :data:`FLOOR` of the largest entry of any parameter: float32
    rounding in the backward reaches every gradient at about the scale of the largest ones (a
    gradient that is exactly zero, e.g. a softmax-invariant key bias, or a small one behind a
    GroupNorm's cancellation, gets that noise in any float32 computation)."""
    fisher = exact.fisher
    assert set(got) == set(fisher), f"parameters differ: {sorted(set(got) ^ set(fisher))}"
    floor = FLOOR * max((e.abs().max().item() for e in fisher.values() if e.numel()), default=0.0)
    bad = {}
    for name, e in fisher.items():
        g = got[name].double()
        assert g.shape == e.shape, f"{name}: shape {tuple(g.shape)} != {tuple(e.shape)}"
        scale = e.abs().max().item() if e.numel() else 0.0
        err = (g - e).abs().max().item() if e.numel() else 0.0
        if not err <= tol * scale + floor and not err <= tol * scale + ROUNDING_SLACK * exact.rounding[name] + floor:
            bad[name] = err / scale if scale > 0 else math.inf  # (NaN fails too)
    return bad


def _named(name: str, messages: list[str]) -> bool:
    module = name.rpartition(".")[0]
    return any(name in m or (module and module + "." in m) for m in messages)


def _state(model: nn.Module) -> list:
    return [(n, t.detach().clone(), t.requires_grad) for n, t in model.named_parameters(remove_duplicate=False)] + [
        (n, t.clone(), None) for n, t in model.named_buffers()]


def _assert_unchanged(before: list, model: nn.Module, what: str) -> None:
    after = _state(model)
    for (name, a, flag), (_, b, flag2) in zip(before, after):
        assert flag == flag2 and a.shape == b.shape and torch.equal(a, b), f"{what} changed {name}"


@dataclass
class Verdict:
    """What :func:`check_fisher` found: ``bad`` {name: relative error} of silent mismatches."""

    bad: dict[str, float]
    warned: dict[str, float]
    refused: str | None
    error: str | None


def check_fisher(model: nn.Module, x: Tensor, y: Tensor, fisher: Callable, tol: float = 1e-4,
                 exact: Exact | None = None) -> Verdict:
    """Run ``fisher(model, x, y)`` (sums), judge it against :func:`exact_fisher`; never raises
    for a wrong result (the caller asserts on ``Verdict.bad``/``error``), but asserts that the
    call leaves the model's parameters, buffers, flags, modes and the inputs as they were.
    A mismatching parameter counts as warned (allowed) when a warning during the call names
    it or its module. An exception counts as an error unless PyTorch refuses the model too."""
    before, x0, modes = _state(model), x.clone(), [m.training for m in model.modules()]
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            got = fisher(model, x, y)
        except Exception as e:  # noqa: BLE001 (judged below)
            got, error = None, f"{type(e).__name__}: {e}"
    _assert_unchanged(before, model, "the Fisher call")
    assert torch.equal(x, x0), "the Fisher call changed its inputs"
    assert modes == [m.training for m in model.modules()], "the Fisher call changed a module's mode"
    exact = exact if exact is not None else exact_fisher(model, x, y)
    if got is None:
        return Verdict({}, {}, exact.refused, None if exact.refused else error)
    mismatched = relative_errors(got, exact, tol)
    messages = [str(w.message) for w in caught]
    warned = {n: e for n, e in mismatched.items() if _named(n, messages)}
    bad = {n: e for n, e in mismatched.items() if n not in warned}
    return Verdict(bad, warned, exact.refused if bad else None, None)


def describe(verdict: Verdict) -> str:
    parts = []
    if verdict.error:
        parts.append(f"raised on a model PyTorch runs: {verdict.error}")
    if verdict.bad:
        parts.append("silent mismatch (relative error per parameter): "
                     + ", ".join(f"{n}: {e:.3g}" for n, e in sorted(verdict.bad.items())))
    if verdict.refused:
        parts.append(f"(PyTorch itself refuses the model as written: {verdict.refused}; exact = its out-of-place twin)")
    return "; ".join(parts)
