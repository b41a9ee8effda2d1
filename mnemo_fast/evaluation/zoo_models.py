"""Models of the zoo benchmark (benchmarks/zoo.py): small classifiers of the kinds users bring.

Image models take [N, C, H, W] (8x8 digits, 28x28 Fashion-MNIST) and return logits; the
Hugging Face ones (ViT, ConvNeXt, BERT) are built from tiny configs (no weights, no downloads;
needs ``transformers``) and return their usual output objects (``.logits``), as a user's model
would. None of these was used to design the method's calibration.

- ``mlp``: Flatten, two ReLU hidden layers (256, 128), a linear head.
- ``cnn``: three 3x3 convolutions with ReLU and no normalisation, a max-pool, adaptive pooling
  to 2x2, a ReLU hidden layer, a linear head.
- ``cnn-bn``: the same with BatchNorm after each convolution.
- ``resnet18``: the package's CIFAR-style ResNet-18 (:mod:`mnemo_fast.evaluation.resnet`), width 8.
- ``mixer``: an MLP-Mixer (Tolstikhin et al., 2021): patch embedding, two blocks of token- and
  channel-mixing MLPs with pre-LayerNorm and GELU, mean pooling, LayerNorm, a linear head.
- ``vit``: ``transformers`` ViTForImageClassification, 2 layers, width 32, 2 heads.
- ``convnext``: ``transformers`` ConvNextForImageClassification, 2 stages of one block (16, 32).
- ``bert``: ``transformers`` BertForSequenceClassification, 2 layers, width 32, 2 heads (token ids).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

IMAGE_ARCHS = ("mlp", "cnn", "cnn-bn", "resnet18", "mixer", "vit", "convnext")
TEXT_ARCHS = ("bert",)
ARCHS = IMAGE_ARCHS + TEXT_ARCHS


class MLP(nn.Sequential):
    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (256, 128)):
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        super().__init__(*layers, nn.Linear(width, num_classes))


class CNN(nn.Sequential):
    """conv16-conv32-maxpool-conv64, ReLU, adaptive average pooling to 2x2, fc 128, head;
    ``batchnorm`` puts a BatchNorm2d after each convolution."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, batchnorm: bool = False):
        def conv(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1)] + ([nn.BatchNorm2d(cout)] if batchnorm else []) + [nn.ReLU()]

        super().__init__(
            *conv(input_shape[0], 16), *conv(16, 32), nn.MaxPool2d(2), *conv(32, 64),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64 * 4, 128), nn.ReLU(), nn.Linear(128, num_classes),
        )


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, token_hidden), nn.GELU(), nn.Linear(token_hidden, tokens))
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(nn.Linear(dim, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, tokens, dim]
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class Mixer(nn.Module):
    """A small MLP-Mixer: patches of ``patch`` pixels embedded by a strided convolution."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, patch: int, dim: int = 32, depth: int = 2):
        super().__init__()
        c, h, w = input_shape
        tokens = (h // patch) * (w // patch)
        self.embed = nn.Conv2d(c, dim, patch, stride=patch)
        self.blocks = nn.Sequential(*[MixerBlock(tokens, dim, 2 * tokens, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


def patch_size(input_shape: Sequence[int]) -> int:
    """2 for 8x8 digits (16 patches), 4 for 28x28 (49 patches)."""
    return 2 if input_shape[-1] <= 16 else 4


def build(arch: str, input_shape: Sequence[int], num_classes: int, *, vocab: int = 128, seq_len: int = 16) -> nn.Module:
    """A randomly initialised ``arch`` (:data:`ARCHS`) for images of ``input_shape`` [C, H, W]
    (text: token ids [N, ``seq_len``] below ``vocab``; ``input_shape`` is then ignored)."""
    if arch == "mlp":
        return MLP(input_shape, num_classes)
    if arch in ("cnn", "cnn-bn"):
        return CNN(input_shape, num_classes, batchnorm=arch == "cnn-bn")
    if arch == "resnet18":
        from .resnet import resnet18
        return resnet18(input_shape, num_classes, width=8)
    if arch == "mixer":
        return Mixer(input_shape, num_classes, patch_size(input_shape))
    import transformers as tf
    if arch == "vit":
        config = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              image_size=input_shape[-1], patch_size=patch_size(input_shape),
                              num_channels=input_shape[0], num_labels=num_classes)
        return tf.ViTForImageClassification(config)
    if arch == "convnext":
        config = tf.ConvNextConfig(num_channels=input_shape[0], patch_size=patch_size(input_shape),
                                   hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=num_classes)
        return tf.ConvNextForImageClassification(config)
    if arch == "bert":
        config = tf.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=seq_len + 4, num_labels=num_classes,
                               pad_token_id=0)
        return tf.BertForSequenceClassification(config)
    raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
