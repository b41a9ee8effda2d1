"""Fuzzing the file readers: any bytes give a loaded object or one documented error, never a crash.

``MnemonicCodes.load`` raises ``CodesFileError`` and ``models.load_checkpoint`` raises
``CheckpointError`` (both ValueError) for random bytes, truncations of a valid file, flipped
bytes and wrong metadata values; nothing else escapes.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import mnemo_fast as mf
from mnemo_fast.codes import CodesFileError
from mnemo_fast.evaluation import models
from mnemo_fast.evaluation.models import CheckpointError

#: MNEMO_FAST_FUZZ_EXAMPLES=5000 fuzzes longer (60 examples per test keep the suite fast).
FUZZ = settings(max_examples=int(os.environ.get("MNEMO_FAST_FUZZ_EXAMPLES", "60")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

#: Metadata values a hand-edited or corrupted file might hold.
VALUES = st.one_of(
    st.text(max_size=12),
    st.integers(-(2**70), 2**70).map(str),
    st.lists(st.integers(-3, 2**40), max_size=4).map(json.dumps),
    st.sampled_from(["", "[]", "[1, 2, 2]", "[1, 8, 8]", "[1.5]", "null", "{}", "[[[[[[", "3", "0", "-1",
                     "uniform", "normal", "mlp", "cnn", "resnet18", "mnemo_fast.codes/1", " 3", "1e3"]),
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A valid codes file and a valid (small) model checkpoint, as bytes, plus a scratch path."""
    tmp = tmp_path_factory.mktemp("fuzz")
    codes = mf.MnemonicCodes.generate(3, (1, 2, 2), per_class=2, seed=1)
    codes.save(tmp / "codes.safetensors")
    torch.manual_seed(0)
    model = models.build("cnn", (1, 2, 2), 3)
    models.save_checkpoint(model, tmp / "model.safetensors", name="cnn", input_shape=(1, 2, 2), num_classes=3)
    return {
        "codes": (tmp / "codes.safetensors").read_bytes(), "codes_object": codes,
        "model": (tmp / "model.safetensors").read_bytes(), "model_object": model,
        "scratch": tmp / "scratch.safetensors",
    }


def load_codes(path, original: mf.MnemonicCodes) -> None:
    """Load; a file that loads must hold the codes it was written with (a flip in padding)."""
    try:
        loaded = mf.MnemonicCodes.load(path)
    except CodesFileError as error:
        assert str(error).startswith(f"{path}: ") and "\n" not in str(error)
        return
    assert torch.equal(loaded.tensor, original.tensor)


def load_model(path, original: torch.nn.Module | None) -> None:
    try:
        loaded, _ = models.load_checkpoint(path)
    except CheckpointError as error:
        assert str(error).startswith(f"{path}: ") and "\n" not in str(error)
        return
    if original is not None:
        for a, b in zip(loaded.state_dict().values(), original.state_dict().values()):
            assert torch.equal(a, b)


@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes(files, data):
    path = files["scratch"]
    path.write_bytes(data)
    with pytest.raises(CodesFileError):
        mf.MnemonicCodes.load(path)
    with pytest.raises(CheckpointError):
        models.load_checkpoint(path)


@FUZZ
@given(which=st.sampled_from(["codes", "model"]), cut=st.floats(0, 1, exclude_max=True))
def test_truncated_files(files, which, cut):
    content = files[which]
    path = files["scratch"]
    path.write_bytes(content[: int(cut * len(content))])
    error = CodesFileError if which == "codes" else CheckpointError
    with pytest.raises(error):
        (mf.MnemonicCodes.load if which == "codes" else models.load_checkpoint)(path)


@FUZZ
@given(which=st.sampled_from(["codes", "model"]), position=st.floats(0, 1, exclude_max=True),
       value=st.integers(1, 255), header=st.booleans())
def test_flipped_bytes(files, which, position, value, header):
    content = bytearray(files[which])
    header_end = 8 + int.from_bytes(content[:8], "little")
    start, stop = (0, header_end) if header else (header_end, len(content))
    index = start + int(position * (stop - start))
    content[index] ^= value
    path = files["scratch"]
    path.write_bytes(bytes(content))
    if which == "codes":
        load_codes(path, files["codes_object"])
    else:  # a flip in the weights loads (other weights); nothing but CheckpointError may escape
        load_model(path, None)


@FUZZ
@given(changes=st.dictionaries(
    st.sampled_from(["format", "num_classes", "per_class", "shape", "seed", "distribution", "smooth",
                     "fingerprint"]),
    st.one_of(st.none(), VALUES), min_size=1, max_size=3))
def test_wrong_codes_metadata(files, changes):
    codes = files["codes_object"]
    meta = codes.metadata()
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    path = files["scratch"]
    save_file({"codes": codes.tensor}, str(path), metadata=meta)
    load_codes(path, codes)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(["model", "input_shape", "num_classes"]),
                               st.one_of(st.none(), VALUES), min_size=1, max_size=3),
       drop_tensor=st.booleans())
def test_wrong_model_metadata(files, changes, drop_tensor):
    model = files["model_object"]
    meta = {"model": "cnn", "input_shape": "[1, 2, 2]", "num_classes": "3"}
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if drop_tensor:
        state.pop("0.weight")
    path = files["scratch"]
    save_file(state, str(path), metadata=meta)
    load_model(path, None if drop_tensor else model)
