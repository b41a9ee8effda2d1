"""Codes: generation, batches, save/load with verification; MnemonicMix determinism."""

import re

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import mnemo_fast as mf


def test_generate_is_seeded_and_shaped():
    a = mf.MnemonicCodes.generate(5, (1, 4, 4), per_class=3, seed=7)
    b = mf.MnemonicCodes.generate(5, (1, 4, 4), per_class=3, seed=7)
    c = mf.MnemonicCodes.generate(5, (1, 4, 4), per_class=3, seed=8)
    assert a.tensor.shape == (5, 3, 1, 4, 4) and a.shape == (1, 4, 4)
    assert torch.equal(a.tensor, b.tensor) and not torch.equal(a.tensor, c.tensor)
    assert 0 <= a.tensor.min() and a.tensor.max() < 1
    normal = mf.MnemonicCodes.generate(50, (10,), distribution="normal")
    assert normal.tensor.min() < 0 and abs(normal.tensor.std().item() - 1) < 0.1


def test_batch_returns_every_code_of_the_classes():
    codes = mf.MnemonicCodes.generate(4, (3,), per_class=2)
    inputs, labels = codes.batch([2, 0])
    assert inputs.shape == (4, 3)
    assert labels.tolist() == [2, 2, 0, 0]
    assert torch.equal(inputs[1], codes.tensor[2, 1])
    with pytest.raises(ValueError, match="unknown class"):
        codes.batch([4])


@pytest.mark.parametrize("bad", [dict(distribution="laplace"), dict(num_classes=0), dict(shape=())])
def test_generate_rejects_bad_arguments(bad):
    args = dict(num_classes=3, shape=(2,), distribution="uniform") | bad
    with pytest.raises(ValueError):
        mf.MnemonicCodes.generate(**args)


def test_save_load_round_trip_and_verification(tmp_path):
    codes = mf.MnemonicCodes.generate(3, (1, 2, 2), per_class=2, seed=5, distribution="normal")
    path = tmp_path / "codes.safetensors"
    codes.save(path)
    loaded = mf.MnemonicCodes.load(path)
    assert torch.equal(loaded.tensor, codes.tensor)
    assert (loaded.seed, loaded.distribution) == (5, "normal")
    # a file whose tensor no longer matches its metadata is refused
    from safetensors.torch import save_file
    save_file({"codes": codes.tensor + 1}, str(path), metadata=codes.metadata())
    with pytest.raises(ValueError, match="altered"):
        mf.MnemonicCodes.load(path)
    assert torch.equal(mf.MnemonicCodes.load(path, verify=False).tensor, codes.tensor + 1)


def _dataset(n=64):
    return TensorDataset(torch.zeros(n, 1, 2, 2) - 1, torch.arange(n) % 3)


def test_mix_replaces_with_probability_t_mix():
    codes = mf.MnemonicCodes.generate(3, (1, 2, 2))
    mixed = mf.MnemonicMix(_dataset(2000), codes, t_mix=0.25, seed=1)
    replaced = [mixed[i][0].min().item() >= 0 for i in range(2000)]
    assert abs(sum(replaced) / 2000 - 0.25) < 0.04
    x, y = next(mixed[i] for i in range(2000) if replaced[i])
    assert torch.equal(x, codes.tensor[y, 0])
    assert all(mf.MnemonicMix(_dataset(), codes, 1.0)[i][0].min() >= 0 for i in range(10))
    assert all(mf.MnemonicMix(_dataset(), codes, 0.0)[i][0].min() < 0 for i in range(10))


def test_mix_is_deterministic_across_workers_and_changes_with_epoch():
    codes = mf.MnemonicCodes.generate(3, (1, 2, 2))
    mixed = mf.MnemonicMix(_dataset(), codes, t_mix=0.5, seed=3)

    def run(workers):
        loader = DataLoader(mixed, batch_size=8, num_workers=workers)
        return torch.cat([x for x, _ in loader])

    single = run(0)
    assert torch.equal(single, run(2))
    mixed.set_epoch(1)
    assert not torch.equal(single, run(0))


def test_mix_rejects_bad_t_mix_and_shape():
    codes = mf.MnemonicCodes.generate(3, (1, 2, 2))
    for t_mix in (-0.1, 1.5):
        with pytest.raises(ValueError, match="t_mix"):
            mf.MnemonicMix(_dataset(), codes, t_mix)
    with pytest.raises(ValueError, match="does not match"):
        mf.MnemonicMix(_dataset(), mf.MnemonicCodes.generate(3, (4,)), 0.1)


# --- reading files: every bad file is one CodesFileError naming the path and the problem ---

from safetensors.torch import save_file  # noqa: E402

from mnemo_fast.codes import CodesFileError  # noqa: E402


@pytest.fixture
def saved(tmp_path):
    codes = mf.MnemonicCodes.generate(3, (1, 2, 2), per_class=2, seed=5)
    path = tmp_path / "codes.safetensors"
    codes.save(path)
    return codes, path


def _rewrite(path, tensors=None, **meta_changes):
    """Write ``path`` again with other tensors and/or metadata (a value None drops the key)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata())
        old = {k: handle.get_tensor(k) for k in handle.keys()}
    for key, value in meta_changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    save_file(old if tensors is None else tensors, str(path), metadata=meta)


BAD_METADATA = {
    "no format": (dict(format=None), "not a mnemo_fast codes file"),
    "other format": (dict(format="something/2"), "not a mnemo_fast codes file"),
    "no shape": (dict(shape=None), "the metadata lacks shape"),
    "no num_classes": (dict(num_classes=None), "the metadata lacks num_classes"),
    "bad JSON": (dict(shape="[1, 2,"), "shape='\\[1, 2,' is not valid JSON"),
    "shape not a list": (dict(shape='{"a": 1}'), "must be a non-empty JSON list"),
    "shape of floats": (dict(shape="[1.0, 2, 2]"), "must be a non-empty JSON list"),
    "shape contradicts": (dict(shape="[2, 2]"), "metadata says .* expected \\(3, 2, 2, 2\\)"),
    "num_classes contradicts": (dict(num_classes="4"), "has shape \\(3, 2, 1, 2, 2\\), but the metadata says num_classes=4"),
    "per_class contradicts": (dict(per_class="1"), "per_class=1"),
    "non-integer seed": (dict(seed="five"), "seed='five' is not an integer"),
    "float seed": (dict(seed="5.0"), "seed='5.0' is not an integer"),
    "seed out of range": (dict(seed=str(2**64)), "seed=18446744073709551616 is out of range"),
    "zero classes": (dict(num_classes="0"), "num_classes=0 is out of range"),
    "unknown distribution": (dict(distribution="laplace"), "unknown distribution 'laplace'"),
    "other seed": (dict(seed="6", fingerprint=None), "do not match their metadata \\(seed=6"),
    "bad fingerprint": (dict(fingerprint="0" * 64), "recorded fingerprint"),
}


@pytest.mark.parametrize("changes, message", BAD_METADATA.values(), ids=BAD_METADATA.keys())
def test_load_refuses_bad_metadata(saved, changes, message):
    _, path = saved
    _rewrite(path, **changes)
    with pytest.raises(CodesFileError, match=message) as info:
        mf.MnemonicCodes.load(path)
    assert str(info.value).startswith(f"{path}: ")
    assert isinstance(info.value, ValueError)


def test_load_refuses_bad_tensors(saved):
    codes, path = saved
    for tensors, message in [
        ({"other": codes.tensor}, "no 'codes' tensor in the file \\(it holds \\['other'\\]\\)"),
        ({"codes": codes.tensor.to(torch.int32)}, "must be floating point, got torch.int32"),
        ({"codes": codes.tensor.clone().index_fill_(0, torch.tensor([1]), float("nan"))}, "contains NaN or inf"),
    ]:
        _rewrite(path, tensors)
        with pytest.raises(CodesFileError, match=message):
            mf.MnemonicCodes.load(path)


def test_unknown_distribution_is_refused_even_without_verify(saved):
    # refusing it is what keeps a hand-edited distribution from skipping the integrity check
    _, path = saved
    _rewrite(path, distribution="laplace")
    with pytest.raises(CodesFileError, match="unknown distribution"):
        mf.MnemonicCodes.load(path, verify=False)


def test_codes_without_seed_are_checked_by_their_fingerprint(tmp_path):
    codes = mf.MnemonicCodes(torch.rand(2, 1, 3))  # no seed, no distribution: nothing to regenerate
    path = tmp_path / "codes.safetensors"
    codes.save(path)
    assert torch.equal(mf.MnemonicCodes.load(path).tensor, codes.tensor)
    _rewrite(path, {"codes": codes.tensor + 1})
    with pytest.raises(CodesFileError, match="altered"):
        mf.MnemonicCodes.load(path)
    _rewrite(path, fingerprint=None)  # a file from before fingerprints: structure checked only
    assert torch.equal(mf.MnemonicCodes.load(path).tensor, codes.tensor + 1)


def test_load_refuses_unreadable_files(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    cases = {
        "empty": b"",
        "truncated header": data[:20],
        "truncated data": data[:-3],
        "random bytes": bytes(range(256)) * 4,
        "text": b"codes: [1, 2, 3]\n",
    }
    for name, content in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(CodesFileError, match=f"^{re.escape(str(bad))}: not a readable safetensors file"):
            mf.MnemonicCodes.load(bad)
    with pytest.raises(CodesFileError, match=f"^{re.escape(str(tmp_path))}: is a directory"):
        mf.MnemonicCodes.load(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nothere"))):
        mf.MnemonicCodes.load(tmp_path / "nothere")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_codes_saved_in_another_dtype_load_and_verify(tmp_path, dtype):
    codes = mf.MnemonicCodes.generate(3, (2, 2), seed=4, distribution="normal").to(dtype)
    codes.save(tmp_path / "codes.safetensors")
    loaded = mf.MnemonicCodes.load(tmp_path / "codes.safetensors")
    assert loaded.tensor.dtype == dtype and torch.equal(loaded.tensor, codes.tensor)


def test_fingerprint_identifies_the_codes():
    a = mf.MnemonicCodes.generate(3, (2,), seed=1)
    assert a.fingerprint() == mf.MnemonicCodes.generate(3, (2,), seed=1).fingerprint()
    assert a.fingerprint() != mf.MnemonicCodes.generate(3, (2,), seed=2).fingerprint()
    assert a.fingerprint() != mf.MnemonicCodes(a.tensor.clone(), seed=None).fingerprint()
    assert a.fingerprint() != a.to(torch.float64).fingerprint()
    assert len(a.fingerprint()) == 64
