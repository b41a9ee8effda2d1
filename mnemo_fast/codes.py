"""Mnemonic codes: one fixed random signal per class, and the training-time mixer.

A code has the shape of one model input and carries its class's label. During training a
sample is replaced by its class's code with probability ``t_mix`` (docs/METHOD.md, "Training with codes"),
so the model learns the codes; at forgetting time the codes stand in for the training data.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, safe_open, save_file

DISTRIBUTIONS = ("uniform", "normal")
#: integer token ids drawn uniformly from a vocabulary range (codes for text models)
TOKENS = "tokens"
_FORMAT = "mnemo_fast.codes/1"


@dataclass(frozen=True)
class MnemonicCodes:
    """Per-class codes, ``tensor`` of shape [C, K, *shape] (C classes, K codes per class).

    Build with :meth:`generate` (seeded, regenerable), :meth:`generate_tokens` (token ids for
    text models) or :meth:`load`. Codes are floating point (signals), or int64 token ids when
    ``vocab`` = (low, high) names the range they were drawn from.
    """

    tensor: torch.Tensor
    seed: int | None = None
    distribution: str | None = None
    vocab: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.tensor.dim() < 3:
            raise ValueError(
                f"codes tensor must have shape [num_classes, per_class, *input_shape], "
                f"got {tuple(self.tensor.shape)}"
            )
        if self.vocab is not None:
            low, high = self.vocab
            if self.tensor.dtype != torch.int64:
                raise ValueError(f"token codes must be int64 token ids, got {self.tensor.dtype}")
            if self.tensor.numel() and not (low <= int(self.tensor.min()) and int(self.tensor.max()) < high):
                raise ValueError(f"token codes must lie in the vocabulary range [{low}, {high})")
        elif not self.tensor.is_floating_point():
            raise ValueError(
                f"codes must be floating point, got {self.tensor.dtype} (token ids: use "
                f"MnemonicCodes.generate_tokens, or pass vocab=(low, high))"
            )
        if self.num_classes < 1 or self.per_class < 1:
            raise ValueError("codes need at least one class and one code per class")

    @classmethod
    def generate(
        cls,
        num_classes: int,
        shape: Sequence[int],
        per_class: int = 1,
        seed: int = 0,
        distribution: str = "uniform",
    ) -> "MnemonicCodes":
        """Draw K=``per_class`` codes of ``shape`` for each of ``num_classes`` classes.

        ``distribution``: "uniform" (U[0, 1), the authors' code, default) or "normal"
        (N(0, 1), the paper's text). Drawn on the CPU in float32 from ``torch.Generator``
        seeded with ``seed``, so the same arguments always give the same codes.
        """
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if num_classes < 1 or per_class < 1:
            raise ValueError(
                f"num_classes and per_class must be >= 1, got {num_classes} and {per_class}"
            )
        shape = tuple(int(s) for s in shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"code shape must be non-empty and positive, got {shape}")
        generator = torch.Generator().manual_seed(seed)
        draw = torch.rand if distribution == "uniform" else torch.randn
        tensor = draw((num_classes, per_class, *shape), generator=generator)
        return cls(tensor, seed=seed, distribution=distribution)

    @classmethod
    def generate_tokens(
        cls,
        num_classes: int,
        length: int,
        vocab_size: int,
        per_class: int = 1,
        seed: int = 0,
        low: int = 0,
    ) -> "MnemonicCodes":
        """K=``per_class`` random token sequences of ``length`` ids per class, for a model whose
        input is a [N, length] int64 tensor of token ids (docs/METHOD.md, "Codes for token
        models"). Ids are drawn uniformly from [``low``, ``vocab_size``): set ``low`` past the
        special tokens (padding, [CLS], ...) the model must not see in a code. Full length, no
        padding: a model that takes an attention mask is called without one (every position
        attended). Seeded like :meth:`generate`.
        """
        if num_classes < 1 or per_class < 1:
            raise ValueError(
                f"num_classes and per_class must be >= 1, got {num_classes} and {per_class}"
            )
        if int(length) < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if not 0 <= int(low) < int(vocab_size):
            raise ValueError(f"need 0 <= low < vocab_size, got low={low}, vocab_size={vocab_size}")
        generator = torch.Generator().manual_seed(seed)
        tensor = torch.randint(int(low), int(vocab_size), (num_classes, per_class, int(length)), generator=generator)
        return cls(tensor, seed=seed, distribution=TOKENS, vocab=(int(low), int(vocab_size)))

    @property
    def is_tokens(self) -> bool:
        """The codes are token ids (int64), not signals."""
        return self.vocab is not None

    @property
    def num_classes(self) -> int:
        return self.tensor.shape[0]

    @property
    def per_class(self) -> int:
        return self.tensor.shape[1]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one code (= one model input)."""
        return tuple(self.tensor.shape[2:])

    def check_classes(self, classes: Iterable[int]) -> list[int]:
        """Return ``classes`` as a list of ints, raising if one is not a class of the codes."""
        result = [int(c) for c in classes]
        bad = [c for c in result if not 0 <= c < self.num_classes]
        if bad:
            raise ValueError(
                f"unknown class(es) {bad}: the codes cover classes 0..{self.num_classes - 1}"
            )
        return result

    def batch(self, classes: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """All codes of ``classes``: inputs [len(classes) * K, *shape], labels [len * K] (int64)."""
        classes = self.check_classes(classes)
        index = torch.tensor(classes, dtype=torch.long)
        inputs = self.tensor[index].reshape(-1, *self.shape)
        labels = index.repeat_interleave(self.per_class)
        return inputs, labels

    def to(self, *args: Any, **kwargs: Any) -> "MnemonicCodes":
        if self.is_tokens:  # token ids stay int64 whatever dtype is asked: only the device moves
            moved = self.tensor.to(*args, **kwargs).to(torch.int64)
            return MnemonicCodes(moved, self.seed, self.distribution, self.vocab)
        return MnemonicCodes(self.tensor.to(*args, **kwargs), self.seed, self.distribution)

    def metadata(self) -> dict[str, str]:
        return {
            "format": _FORMAT,
            "num_classes": str(self.num_classes),
            "per_class": str(self.per_class),
            "shape": json.dumps(list(self.shape)),
            "seed": "" if self.seed is None else str(self.seed),
            "distribution": self.distribution or "",
            "vocab": "" if self.vocab is None else json.dumps(list(self.vocab)),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the codes and the metadata that regenerates them to a safetensors file."""
        save_file({"codes": self.tensor.contiguous().cpu()}, str(path), metadata=self.metadata())

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> "MnemonicCodes":
        """Read codes saved by :meth:`save`.

        With ``verify`` and a recorded seed, the codes are regenerated from the metadata and
        must match the stored tensor exactly (a corrupted or hand-edited file raises).
        """
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a mnemo_fast codes file (format={meta.get('format')!r})")
        tensor = load_file(str(path))["codes"]
        seed = int(meta["seed"]) if meta.get("seed") else None
        vocab = tuple(json.loads(meta["vocab"])) if meta.get("vocab") else None
        codes = cls(tensor, seed=seed, distribution=meta.get("distribution") or None, vocab=vocab)
        if codes.shape != tuple(json.loads(meta["shape"])):
            raise ValueError(f"{path}: stored codes do not have the recorded shape {meta['shape']}")
        if verify and seed is not None and codes.distribution in DISTRIBUTIONS + (TOKENS,):
            if codes.is_tokens:
                expected = cls.generate_tokens(codes.num_classes, codes.shape[0], codes.vocab[1],
                                               codes.per_class, seed, low=codes.vocab[0])
            else:
                expected = cls.generate(
                    codes.num_classes, codes.shape, codes.per_class, seed, codes.distribution
                )
            if not torch.equal(expected.tensor, tensor if codes.is_tokens else tensor.float()):
                raise ValueError(
                    f"{path}: codes do not match their metadata (seed={seed}, "
                    f"distribution={codes.distribution}); the file was altered"
                )
        return codes


class MnemonicMix(torch.utils.data.Dataset):
    """Wrap a map-style dataset of (x, y): with probability ``t_mix`` return (code of y, y).

    The choice is a pure function of (seed, epoch, index), so it is the same in every
    DataLoader worker and every run. Call :meth:`set_epoch` to draw new replacements each
    epoch (as the paper's per-iteration replacement does); with K codes per class one of the
    class's codes is picked the same way.
    """

    def __init__(self, dataset: Any, codes: MnemonicCodes, t_mix: float, seed: int = 0):
        if not 0.0 <= float(t_mix) <= 1.0:
            raise ValueError(f"t_mix must be in [0, 1], got {t_mix}")
        if len(dataset) == 0:
            raise ValueError("MnemonicMix needs a non-empty dataset")
        x, _ = dataset[0]
        x_shape = tuple(torch.as_tensor(x).shape)
        if x_shape != codes.shape:
            raise ValueError(
                f"code shape {codes.shape} does not match the dataset's input shape {x_shape}"
            )
        self.dataset = dataset
        self.codes = codes
        self.t_mix = float(t_mix)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def is_replaced(self, index: int) -> tuple[bool, int]:
        """Whether sample ``index`` is replaced this epoch, and which of its class's codes."""
        rng = np.random.default_rng((self.seed, self.epoch, int(index)))
        return bool(rng.random() < self.t_mix), int(rng.integers(self.codes.per_class))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        x, y = self.dataset[index]
        replaced, k = self.is_replaced(index)
        if replaced:
            code = self.codes.tensor[int(y), k]
            x = code.to(torch.as_tensor(x).dtype) if torch.is_tensor(x) else code
        return x, y
