"""Hugging Face ``transformers`` classifiers built from configs (no weights, no downloads).

The models people bring to the method: text (BERT, RoBERTa, DistilBERT, GPT-2, Llama, Mistral,
Qwen2) and image (ViT, DeiT, Swin, ConvNeXt) classifiers, at a size given by ``layers``,
``width`` and ``seq_len``. Used by the tests (tiny sizes) and ``benchmarks/bench_hf.py``
(CPU-sized). Needs the optional extra ``pip install -e ".[hf]"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

TEXT_FAMILIES = ("bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "qwen2")
IMAGE_FAMILIES = ("vit", "deit", "swin", "convnext")
FAMILIES = TEXT_FAMILIES + IMAGE_FAMILIES


@dataclass
class HFModel:
    """A classifier and how to make inputs for it: ``inputs(n, generator)`` -> [n, T] token
    ids (text) or [n, C, H, W] images."""

    family: str
    model: torch.nn.Module
    inputs: Callable[[int, torch.Generator], torch.Tensor]
    num_classes: int


def build(family: str, *, num_classes: int = 4, layers: int = 2, width: int = 32, heads: int = 2,
          seq_len: int = 8, vocab: int = 64, image: int = 16, seed: int = 0) -> HFModel:
    """A randomly initialised ``family`` classifier in eval mode (dropout off), float32."""
    import transformers as tf

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    ffn = 2 * width
    text = dict(vocab_size=vocab, num_labels=num_classes, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    if family in ("bert", "roberta"):
        config_class = tf.BertConfig if family == "bert" else tf.RobertaConfig
        config = config_class(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                              intermediate_size=ffn, max_position_embeddings=seq_len + 4, **text)
        model = (tf.BertForSequenceClassification if family == "bert"
                 else tf.RobertaForSequenceClassification)(config)
    elif family == "distilbert":
        config = tf.DistilBertConfig(dim=width, n_layers=layers, n_heads=heads, hidden_dim=ffn,
                                     max_position_embeddings=seq_len + 4, **text)
        model = tf.DistilBertForSequenceClassification(config)
    elif family == "gpt2":
        config = tf.GPT2Config(n_embd=width, n_layer=layers, n_head=heads, n_inner=ffn,
                               n_positions=seq_len + 4, **text)
        model = tf.GPT2ForSequenceClassification(config)
    elif family in ("llama", "mistral", "qwen2"):
        config_class = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
        config = config_class(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                              num_key_value_heads=heads, intermediate_size=ffn,
                              max_position_embeddings=seq_len + 4, **text)
        model = {"llama": tf.LlamaForSequenceClassification, "mistral": tf.MistralForSequenceClassification,
                 "qwen2": tf.Qwen2ForSequenceClassification}[family](config)
    elif family in ("vit", "deit"):
        config_class = tf.ViTConfig if family == "vit" else tf.DeiTConfig
        config = config_class(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                              intermediate_size=ffn, image_size=image, patch_size=4, num_channels=3,
                              num_labels=num_classes)
        model = (tf.ViTForImageClassification if family == "vit" else tf.DeiTForImageClassification)(config)
    elif family == "swin":
        config = tf.SwinConfig(image_size=image, patch_size=2, num_channels=3, embed_dim=width // 2,
                               depths=[1] * layers, num_heads=[heads] * layers, window_size=2,
                               num_labels=num_classes)
        model = tf.SwinForImageClassification(config)
    else:  # convnext
        config = tf.ConvNextConfig(num_channels=3, hidden_sizes=[width // 2 * 2 ** i for i in range(layers)],
                                   num_stages=layers, depths=[1] * layers, num_labels=num_classes)
        model = tf.ConvNextForImageClassification(config)
    model.eval()

    if family in TEXT_FAMILIES:
        def inputs(n: int, generator: torch.Generator) -> torch.Tensor:
            return torch.randint(1, vocab, (n, seq_len), generator=generator)  # no pad token: full length
    else:
        def inputs(n: int, generator: torch.Generator) -> torch.Tensor:
            return torch.randn(n, 3, image, image, generator=generator)
    return HFModel(family, model, inputs, num_classes)
