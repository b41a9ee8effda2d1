"""Small models covering the layer types the Fisher engines must handle (built in code)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mnemo_fast.evaluation import models


class EmbeddingBag(nn.Module):
    """Token ids [N, T] -> Embedding -> mean over T -> Linear. Repeated ids within a sample."""

    def __init__(self, vocab: int = 12, dim: int = 6, num_classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


class NormNet(nn.Module):
    """Linear on [N, T, d] -> LayerNorm -> GELU -> GroupNorm over channels -> pooled head."""

    def __init__(self, dim: int = 8, num_classes: int = 3):
        super().__init__()
        self.proj = nn.Linear(5, dim)
        self.norm = nn.LayerNorm(dim)
        self.group = nn.GroupNorm(2, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):  # x [N, T, 5]
        h = nn.functional.gelu(self.norm(self.proj(x)))
        h = self.group(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h.mean(1))


def mlp(num_classes: int = 4):
    return models.MLP((1, 4, 4), num_classes, hidden=7), (1, 4, 4)


def cnn(num_classes: int = 4):
    return models.SmallCNN((1, 8, 8), num_classes, width=3), (1, 8, 8)


def embedding_bag(num_classes: int = 4):
    return EmbeddingBag(num_classes=num_classes), "ids"


def norm_net(num_classes: int = 3):
    return NormNet(num_classes=num_classes), (6, 5)


def make_inputs(shape, n: int, generator: torch.Generator, vocab: int = 12):
    if shape == "ids":
        return torch.randint(0, vocab, (n, 5), generator=generator)
    return torch.randn((n, *shape), generator=generator)


class BasicBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class TinyResNet(nn.Module):
    """A CIFAR-style stem, two residual blocks (one strided via a 1x1 downsample), BatchNorm."""

    def __init__(self, num_classes: int = 4, width: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.block1 = BasicBlock(width)
        self.down = nn.Conv2d(width, 2 * width, 1, stride=2)
        self.block2 = BasicBlock(2 * width)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        h = self.block2(self.down(self.block1(self.stem(x))))
        return self.head(h.mean((2, 3)))


class TinyTransformer(nn.Module):
    """Embedding + learned positions (a raw parameter) + one encoder layer (MHA, LayerNorm,
    GELU) + head: attention projections and the raw parameter take the generic path."""

    def __init__(self, vocab: int = 12, dim: int = 8, num_classes: int = 4, length: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.position = nn.Parameter(torch.randn(length, dim) * 0.1)
        self.layer = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, activation="gelu", batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids):
        h = self.layer(self.embed(ids) + self.position)
        return self.head(self.norm(h).mean(1))


class MaskedTransformer(nn.Module):
    """Sequence-first encoder (batch_first=False) with a causal mask and a key padding mask
    from token id 0: exercises the attention rule's layouts and masks."""

    def __init__(self, vocab: int = 12, dim: int = 8, num_classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layer = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids):  # ids [N, T]
        length = ids.shape[1]
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
        padding = ids == 0
        padding[:, 0] = False  # keep one key per sample
        h = self.layer(self.embed(ids).transpose(0, 1), src_mask=causal, src_key_padding_mask=padding)
        return self.head(h.mean(0))


class TinyViT(nn.Module):
    """Patch embedding (Conv2d), a class token expanded to every sample and a position
    embedding added to every sample (raw parameters), one pre-norm encoder block with
    attention from one qkv Linear and scaled_dot_product_attention, head on the class token."""

    def __init__(self, num_classes: int = 4, dim: int = 8, heads: int = 2):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(0.1 * torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.1 * torch.randn(1, 5, dim))
        self.norm1, self.norm2, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, num_classes)
        self.heads = heads

    def forward(self, x):  # x [N, 3, 8, 8] -> 4 patches + class token
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
        n, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)
        h = h + self.proj(attended)
        h = h + self.mlp(self.norm2(h))
        return self.head(self.norm(h)[:, 0])


class Scale(nn.Module):
    """A custom layer with raw parameters: no rule, generic path."""

    def __init__(self, features: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(features) + 0.1 * torch.randn(features))
        self.offset = nn.Parameter(0.1 * torch.randn(features))

    def forward(self, x):
        return x * self.gain + self.offset


class TiedAndShared(nn.Module):
    """Conv1d, a Linear called twice, a custom layer and a weight tied between two Linears."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular")
        self.shared = nn.Linear(6, 6)
        self.scale = Scale(6)
        self.first = nn.Linear(6, 6, bias=False)
        self.second = nn.Linear(6, 6)
        self.second.weight = self.first.weight
        self.head = nn.Linear(6, num_classes)

    def forward(self, x):  # x [N, 2, 6]
        h = self.conv(x).mean(1)
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        h = self.second(torch.relu(self.first(self.scale(h))))
        return self.head(h)


def resnet(num_classes: int = 4):
    return TinyResNet(num_classes), (3, 8, 8)


def transformer(num_classes: int = 4):
    return TinyTransformer(num_classes=num_classes), "ids"


def tied_and_shared(num_classes: int = 4):
    return TiedAndShared(num_classes), (2, 6)


def masked_transformer(num_classes: int = 4):
    return MaskedTransformer(num_classes=num_classes), "ids"


def vit(num_classes: int = 4):
    return TinyViT(num_classes), (3, 8, 8)


class Depthwise(nn.Module):
    """Depthwise convolutions (groups = input channels): with a channel multiplier, stride,
    dilation and padding; a Conv1d one with circular padding; one on a 2x2 map (the few
    output positions path); MobileNet/ConvNeXt style. Then a conv with one output position."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.dw = nn.Conv2d(3, 6, 3, stride=2, padding=2, groups=3)
        self.pw = nn.Conv2d(6, 4, 1)
        self.dw2 = nn.Conv2d(4, 4, (3, 2), padding=(2, 0), dilation=(2, 1), groups=4, bias=False)
        self.dw1d = nn.Conv1d(4, 4, 3, padding=1, padding_mode="circular", groups=4)
        self.small = nn.Conv2d(4, 8, 3, stride=(1, 2), padding=2, dilation=(2, 1), groups=4)  # 2x2 map
        self.down = nn.Conv2d(8, 5, 2, stride=2)  # one output position: the linear kernel's T = 1 path
        self.head = nn.Linear(4 + 5, num_classes)

    def forward(self, x):
        h = self.dw2(torch.tanh(self.pw(torch.tanh(self.dw(x)))))
        tiny = self.small(F.adaptive_avg_pool2d(h, 2))  # few output positions: a sum over them
        one = self.down(torch.tanh(tiny[:, :, :2, :2]))  # [N, 5, 1, 1]
        h = self.dw1d(h.flatten(2))
        return self.head(torch.cat([torch.tanh(h).mean(2), torch.tanh(one).flatten(1)], 1))


def depthwise(num_classes: int = 4):
    return Depthwise(num_classes), (3, 9, 8)


# ---- parameters outside the modules the layer rules know (tests/test_operations.py, FSDP2) ----
class Conv1D(nn.Module):
    """GPT-2's linear layer: a raw [in, out] weight through addmm on rows [N * T, in]."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(0.3 * torch.randn(d_in, d_out))
        self.bias = nn.Parameter(0.1 * torch.randn(d_out))

    def forward(self, x):
        shape = x.shape[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(shape)


class RMSNorm(nn.Module):
    def __init__(self, d, offset=False):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.offset = offset

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return ((1 + self.weight) if self.offset else self.weight) * x  # Gemma-style: (1 + w)


class ChannelsFirstNorm(nn.Module):
    """ConvNeXt's norm on [N, C, H, W]: F.layer_norm on the permuted tensor."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(c))
        self.bias = nn.Parameter(0.1 * torch.randn(c))

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, 1e-6).permute(0, 3, 1, 2)


class TextBlock(nn.Module):
    """Token ids [N, T] -> logits: Conv1D projections, RMSNorm (plain and offset), a layer
    scale, a hand-added bias with alpha, a division by a raw parameter, a tied weight."""

    def __init__(self, vocab=20, d=8, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.proj = Conv1D(d, 2 * d)
        self.back = Conv1D(2 * d, d)
        self.norm = RMSNorm(d)
        self.norm2 = RMSNorm(d, offset=True)
        self.gamma = nn.Parameter(0.5 + 0.1 * torch.randn(d))
        self.shift = nn.Parameter(0.1 * torch.randn(d))
        self.temperature = nn.Parameter(1 + 0.1 * torch.rand(1))
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        h = self.norm(self.embed(ids))
        h = h + self.gamma[None, None, :] * self.back(torch.tanh(self.proj(h)))
        h = torch.add(self.norm2(h), self.shift, alpha=3.0) / self.temperature
        return self.head(h.mean(1))


class WindowBlock(nn.Module):
    """Images [N, C, H, W] -> logits, Swin-like: windows folded into the leading dimension
    ([N * windows, T, d]), attention projections on the folded rows, and a relative-position
    bias table indexed by a buffer and added to the folded scores; a channels-first norm."""

    def __init__(self, c=3, d=8, window=2, heads=2, classes=3):
        super().__init__()
        self.window, self.heads = window, heads
        self.norm = ChannelsFirstNorm(c)
        self.embed = nn.Conv2d(c, d, 1)
        self.qkv = nn.Linear(d, 3 * d)
        self.table = nn.Parameter(0.1 * torch.randn((2 * window - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("index", rel[..., 0] * (2 * window - 1) + rel[..., 1])
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.embed(self.norm(x))  # [N, d, H, W]
        n, d, hh, ww = h.shape
        w = self.window
        windows = h.view(n, d, hh // w, w, ww // w, w).permute(0, 2, 4, 3, 5, 1).reshape(-1, w * w, d)
        q, k, v = self.qkv(windows).chunk(3, dim=-1)
        split = lambda t: t.view(t.shape[0], w * w, self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        bias = self.table[self.index.view(-1)].view(w * w, w * w, self.heads).permute(2, 0, 1)
        scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5) + bias
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(-1, w * w, d)
        return self.head(out.reshape(n, -1, d).mean(1))
