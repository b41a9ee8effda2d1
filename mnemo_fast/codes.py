"""Mnemonic codes: one fixed random signal per class, and the training-time mixer.

A code has the shape of one model input and carries its class's label. During training a
sample is replaced by its class's code with probability ``t_mix`` (docs/METHOD.md, "Training with codes"),
so the model learns the codes; at forgetting time the codes stand in for the training data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from safetensors.torch import safe_open, save_file

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
    #: spatial smoothing factor of :meth:`generate` (1: i.i.d. values, the paper's codes)
    smooth: int = 1

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
        if isinstance(self.smooth, bool) or not isinstance(self.smooth, int) or not 1 <= self.smooth <= MAX_SMOOTH:
            raise ValueError(f"smooth must be an integer in [1, {MAX_SMOOTH}], got {self.smooth!r}")
        if self.smooth > 1 and self.vocab is not None:
            raise ValueError("token codes cannot be smooth (smooth=1)")

    @classmethod
    def generate(
        cls,
        num_classes: int,
        shape: Sequence[int],
        per_class: int = 1,
        seed: int = 0,
        distribution: str = "uniform",
        smooth: int = 1,
    ) -> "MnemonicCodes":
        """Draw K=``per_class`` codes of ``shape`` for each of ``num_classes`` classes.

        ``distribution``: "uniform" (U[0, 1), the authors' code, default) or "normal"
        (N(0, 1), the paper's text). Drawn on the CPU in float32 from ``torch.Generator``
        seeded with ``seed``, so the same arguments always give the same codes.

        ``smooth`` = s > 1 gives low-frequency codes (not in the paper; docs/METHOD.md,
        "Mnemonic codes"): the values are drawn on a grid s times coarser along the spatial
        dims (the last two of a shape of 2 or more dims, e.g. H, W of [C, H, W]; the only dim
        of a 1-d shape), ceil(H / s) x ceil(W / s), and upsampled to ``shape`` by bilinear
        (linear) interpolation. Interpolated uniform values stay in [0, 1). s = 1 (default)
        is the paper's i.i.d. value per element.
        """
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if isinstance(smooth, bool) or not isinstance(smooth, int) or not 1 <= smooth <= MAX_SMOOTH:
            raise ValueError(f"smooth must be an integer in [1, {MAX_SMOOTH}], got {smooth!r}")
        if num_classes < 1 or per_class < 1:
            raise ValueError(
                f"num_classes and per_class must be >= 1, got {num_classes} and {per_class}"
            )
        shape = tuple(int(s) for s in shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"code shape must be non-empty and positive, got {shape}")
        generator = torch.Generator().manual_seed(seed)
        draw = torch.rand if distribution == "uniform" else torch.randn
        if smooth == 1:
            tensor = draw((num_classes, per_class, *shape), generator=generator)
        else:
            tensor = _smooth_draw(draw, (num_classes, per_class, *shape), smooth, generator)
        return cls(tensor, seed=seed, distribution=distribution, smooth=smooth)

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
        return MnemonicCodes(self.tensor.to(*args, **kwargs), self.seed, self.distribution, smooth=self.smooth)

    def fingerprint(self) -> str:
        """sha256 (hex) of what identifies these codes: tensor bytes, dtype, shape, seed,
        distribution (and ``smooth`` when > 1, so the paper's codes keep their fingerprint).

        Equal codes give equal fingerprints on any device; :meth:`save` records it and
        :meth:`load` checks it, ``adapt_with_codes`` records it in its checkpoints.
        """
        digest = hashlib.sha256()
        tensor = self.tensor.detach().contiguous().cpu()
        header = [_FORMAT, str(tensor.dtype), list(tensor.shape), self.seed, self.distribution]
        if self.vocab is not None:
            header.append(list(self.vocab))
        if self.smooth != 1:
            header.append({"smooth": self.smooth})
        digest.update(json.dumps(header).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def metadata(self) -> dict[str, str]:
        return {
            "format": _FORMAT,
            "num_classes": str(self.num_classes),
            "per_class": str(self.per_class),
            "shape": json.dumps(list(self.shape)),
            "seed": "" if self.seed is None else str(self.seed),
            "distribution": self.distribution or "",
            "vocab": "" if self.vocab is None else json.dumps(list(self.vocab)),
            "smooth": str(self.smooth),
            "fingerprint": self.fingerprint(),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the codes and the metadata that regenerates them to a safetensors file."""
        save_file({"codes": self.tensor.contiguous().cpu()}, str(path), metadata=self.metadata())

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> "MnemonicCodes":
        """Read codes saved by :meth:`save`; every bad file raises :class:`CodesFileError`.

        A missing file raises ``FileNotFoundError``. Refused, each with the path and what is
        wrong: a directory; an empty, truncated, corrupt or non-safetensors file; no ``codes``
        tensor; missing metadata (``format``, ``num_classes``, ``per_class``, ``shape``) or
        metadata that is not valid (bad JSON, a non-integer or out-of-range seed, an unknown
        ``distribution``: only "uniform", "normal" or none are known, so no file skips the
        checks below); a tensor that is not floating point, holds NaN or inf, or whose shape
        contradicts ``num_classes``, ``per_class`` and ``shape``; a ``smooth`` that is not an
        integer in [1, MAX_SMOOTH] (absent: 1, files written before it existed).

        With ``verify`` the file's integrity is checked too: its recorded ``fingerprint``
        (tensor bytes, dtype, shape, seed, distribution; files written before it existed have
        none) must match the stored tensor, and codes with a seed and a distribution are
        regenerated (with their ``smooth``) and must equal the stored tensor exactly (an
        altered file raises).
        """
        meta, tensor = _read_codes_file(path)
        shape = _metadata_shape(path, meta)
        num_classes = _metadata_int(path, meta, "num_classes", low=1)
        per_class = _metadata_int(path, meta, "per_class", low=1)
        seed = None
        if meta.get("seed"):
            seed = _metadata_int(path, meta, "seed", low=_SEED_RANGE[0], high=_SEED_RANGE[1])
        distribution = meta.get("distribution") or None
        if distribution is not None and distribution not in DISTRIBUTIONS + (TOKENS,):
            raise CodesFileError(
                f"{path}: unknown distribution {distribution!r} in the metadata "
                f"(known: {', '.join(DISTRIBUTIONS + (TOKENS,))}, or none)"
            )
        vocab = _metadata_vocab(path, meta)
        smooth = _metadata_int(path, meta, "smooth", low=1, high=MAX_SMOOTH) if meta.get("smooth") else 1
        if smooth != 1 and vocab is not None:
            raise CodesFileError(f"{path}: token codes cannot have smooth={smooth} (only 1)")
        expected_shape = (num_classes, per_class, *shape)
        if tuple(tensor.shape) != expected_shape:
            raise CodesFileError(
                f"{path}: the codes tensor has shape {tuple(tensor.shape)}, but the metadata says "
                f"num_classes={num_classes}, per_class={per_class}, shape={list(shape)}: "
                f"expected {expected_shape}"
            )
        if vocab is None and not tensor.is_floating_point():
            raise CodesFileError(f"{path}: the codes tensor must be floating point, got {tensor.dtype}")
        if vocab is None and not bool(torch.isfinite(tensor).all()):
            raise CodesFileError(f"{path}: the codes tensor contains NaN or inf")
        try:
            codes = cls(tensor, seed=seed, distribution=distribution, vocab=vocab, smooth=smooth)
        except ValueError as error:  # token ids: dtype or range
            raise CodesFileError(f"{path}: {error}") from None
        if not verify:
            return codes
        recorded = meta.get("fingerprint")
        if recorded is not None and recorded != codes.fingerprint():
            raise CodesFileError(
                f"{path}: the codes do not match their recorded fingerprint (sha256 of tensor, shape, "
                f"seed, distribution); the file was altered or corrupted"
            )
        if seed is not None and distribution is not None:
            if vocab is not None:
                if distribution != TOKENS or len(shape) != 1:
                    raise CodesFileError(f"{path}: token codes need distribution 'tokens' and one length")
                expected = cls.generate_tokens(num_classes, shape[0], vocab[1], per_class, seed, low=vocab[0])
            else:
                expected = cls.generate(num_classes, shape, per_class, seed, distribution, smooth=smooth)
            if not torch.equal(expected.tensor.to(tensor.dtype), tensor):  # codes saved after .to(dtype)
                raise CodesFileError(
                    f"{path}: codes do not match their metadata (seed={seed}, "
                    f"distribution={distribution}, smooth={smooth}); the file was altered"
                )
        return codes


class CodesFileError(ValueError):
    """A codes file that cannot be used: unreadable, incomplete, or contradicting itself.

    The message names the file and what is wrong with it.
    """


#: Largest ``smooth`` of :meth:`MnemonicCodes.generate` (a bound for files: a coarser grid than
#: one value per spatial dim changes nothing, so no real code needs more).
MAX_SMOOTH = 1 << 16


def _smooth_draw(draw, full: tuple[int, ...], smooth: int, generator: torch.Generator) -> torch.Tensor:
    """[*full] values drawn on a grid ``smooth`` times coarser along the spatial dims (the last
    two when full[2:] has 2 or more dims, else the last) and upsampled (bi)linearly."""
    spatial = full[-2:] if len(full) >= 4 else full[-1:]
    coarse = tuple(-(-n // smooth) for n in spatial)
    low = draw((*full[:-len(spatial)], *coarse), generator=generator)
    flat = low.reshape(-1, 1, *coarse)
    mode = "bilinear" if len(spatial) == 2 else "linear"
    up = torch.nn.functional.interpolate(flat, size=spatial, mode=mode, align_corners=False)
    return up.reshape(full).contiguous()


#: Seeds ``torch.Generator.manual_seed`` accepts (and so :meth:`MnemonicCodes.generate`).
_SEED_RANGE = (-(2**63), 2**64 - 1)
_REQUIRED = ("format", "num_classes", "per_class", "shape")


def _read_codes_file(path: str | os.PathLike) -> tuple[dict[str, str], torch.Tensor]:
    """(metadata, the ``codes`` tensor) of a codes file, or CodesFileError / FileNotFoundError."""
    where = Path(path)
    if not where.exists():
        raise FileNotFoundError(f"{path}: no such codes file")
    if where.is_dir():
        raise CodesFileError(f"{path}: is a directory, not a codes file")
    try:
        with safe_open(str(where), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            names = list(handle.keys())
            if meta.get("format") != _FORMAT:
                raise CodesFileError(
                    f"{path}: not a mnemo_fast codes file (metadata format={meta.get('format')!r}, "
                    f"expected {_FORMAT!r})"
                )
            missing = [key for key in _REQUIRED if key not in meta]
            if missing:
                raise CodesFileError(f"{path}: the metadata lacks {', '.join(missing)}")
            if "codes" not in names:
                raise CodesFileError(f"{path}: no 'codes' tensor in the file (it holds {names})")
            tensor = handle.get_tensor("codes")
    except CodesFileError:
        raise
    except Exception as error:  # safetensors' parse errors, OS errors: one error with the path
        raise CodesFileError(f"{path}: not a readable safetensors file ({_first_line(error)})") from error
    return meta, tensor


def _metadata_int(path, meta: dict[str, str], key: str, low: int, high: int | None = None) -> int:
    text = meta[key]
    if not re.fullmatch(r"-?[0-9]+", text.strip()):
        raise CodesFileError(f"{path}: metadata {key}={text!r} is not an integer")
    value = int(text)
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise CodesFileError(f"{path}: metadata {key}={value} is out of range (must be {allowed})")
    return value


def _metadata_vocab(path, meta: dict[str, str]) -> tuple[int, int] | None:
    """The (low, high) token-id range of token codes, None for signal codes."""
    text = meta.get("vocab") or ""
    if not text:
        return None
    try:
        vocab = json.loads(text)
    except (ValueError, RecursionError):
        vocab = None
    if (not isinstance(vocab, list) or len(vocab) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in vocab) or not 0 <= vocab[0] < vocab[1]):
        raise CodesFileError(f"{path}: metadata vocab={text!r} must be a JSON list [low, high] with 0 <= low < high")
    return vocab[0], vocab[1]


def _metadata_shape(path, meta: dict[str, str]) -> tuple[int, ...]:
    try:
        shape = json.loads(meta["shape"])
    except (ValueError, RecursionError):
        raise CodesFileError(f"{path}: metadata shape={meta['shape']!r} is not valid JSON") from None
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)):
        raise CodesFileError(
            f"{path}: metadata shape={meta['shape']!r} must be a non-empty JSON list of positive integers"
        )
    return tuple(shape)


class MnemonicMix(torch.utils.data.Dataset):
    """Wrap a map-style dataset of (x, y): with probability ``t_mix`` return (code of y, y).

    The choice is a pure function of (seed, epoch, index), so it is the same in every
    DataLoader worker and every run. Call :meth:`set_epoch` to draw new replacements each
    epoch (as the paper's per-iteration replacement does); with K codes per class one of the
    class's codes is picked the same way.

    ``shift`` = s > 0 (not in the paper; docs/METHOD.md, "Training with codes") augments the
    codes: a replacing code is rolled (circularly) by an offset drawn uniformly from [-s, s]
    along each spatial dim (the last two of a code of 2 or more dims, else the last), drawn
    the same way. 0 (default): the code as it is.
    """

    def __init__(self, dataset: Any, codes: MnemonicCodes, t_mix: float, seed: int = 0, shift: int = 0):
        if not 0.0 <= float(t_mix) <= 1.0:
            raise ValueError(f"t_mix must be in [0, 1], got {t_mix}")
        if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
            raise ValueError(f"shift must be an integer >= 0, got {shift!r}")
        if shift and codes.is_tokens:
            raise ValueError("token codes cannot be shifted (shift=0)")
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
        self.shift = shift
        self.dims = tuple(range(-min(2, len(codes.shape)), 0))  # the spatial dims of one code
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def is_replaced(self, index: int) -> tuple[bool, int]:
        """Whether sample ``index`` is replaced this epoch, and which of its class's codes."""
        replaced, k, _ = self._draw(index)
        return replaced, k

    def _draw(self, index: int) -> tuple[bool, int, tuple[int, ...]]:
        """(replaced, code index, roll offsets per spatial dim) of sample ``index`` this epoch;
        the first two draws are those of the codes without ``shift``."""
        rng = np.random.default_rng((self.seed, self.epoch, int(index)))
        replaced, k = bool(rng.random() < self.t_mix), int(rng.integers(self.codes.per_class))
        offsets = tuple(int(o) for o in rng.integers(-self.shift, self.shift + 1, len(self.dims))) if self.shift else ()
        return replaced, k, offsets

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        x, y = self.dataset[index]
        replaced, k, offsets = self._draw(index)
        if replaced:
            code = self.codes.tensor[int(y), k]
            if offsets:
                code = torch.roll(code, offsets, self.dims)
            x = code.to(torch.as_tensor(x).dtype) if torch.is_tensor(x) else code
        return x, y


def _first_line(error: BaseException) -> str:
    """The first line of an error's message (torch appends C++ stack traces to some)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
