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


# --- smooth codes (generate(smooth=s)) and shifted codes in training (MnemonicMix(shift=s)) ---


def _roughness(t):
    """Mean absolute difference of neighbours along the last dim."""
    return (t[..., 1:] - t[..., :-1]).abs().mean().item()


def test_smooth_codes_are_seeded_low_frequency_and_in_range():
    paper = mf.MnemonicCodes.generate(4, (1, 12, 12), per_class=2, seed=3)
    assert torch.equal(mf.MnemonicCodes.generate(4, (1, 12, 12), per_class=2, seed=3, smooth=1).tensor, paper.tensor)
    smooth = mf.MnemonicCodes.generate(4, (1, 12, 12), per_class=2, seed=3, smooth=4)
    assert smooth.tensor.shape == (4, 2, 1, 12, 12) and smooth.smooth == 4 and paper.smooth == 1
    assert torch.equal(smooth.tensor, mf.MnemonicCodes.generate(4, (1, 12, 12), per_class=2, seed=3, smooth=4).tensor)
    assert not torch.equal(smooth.tensor, mf.MnemonicCodes.generate(4, (1, 12, 12), per_class=2, seed=4, smooth=4).tensor)
    assert 0 <= smooth.tensor.min() and smooth.tensor.max() < 1
    assert _roughness(smooth.tensor) < 0.5 * _roughness(paper.tensor)
    # smooth along both spatial dims, not across channels or codes
    assert _roughness(smooth.tensor.transpose(-1, -2)) < 0.5 * _roughness(paper.tensor)
    # 1-d and 2-d shapes, sizes that the factor does not divide, a factor larger than the size
    assert mf.MnemonicCodes.generate(3, (10,), smooth=3).tensor.shape == (3, 1, 10)
    assert mf.MnemonicCodes.generate(3, (5, 7), smooth=2, distribution="normal").tensor.shape == (3, 1, 5, 7)
    flat = mf.MnemonicCodes.generate(2, (1, 3, 3), smooth=100).tensor
    assert torch.allclose(flat, flat[..., :1, :1].expand_as(flat))  # one value per code


@pytest.mark.parametrize("smooth", [0, -1, 1.5, True, "2", (1 << 16) + 1])
def test_smooth_rejects_bad_values(smooth):
    with pytest.raises(ValueError, match="smooth"):
        mf.MnemonicCodes.generate(3, (1, 4, 4), smooth=smooth)
    with pytest.raises(ValueError, match="smooth"):
        mf.MnemonicCodes(torch.rand(3, 1, 4), smooth=smooth)
    with pytest.raises(ValueError, match="token codes cannot be smooth"):
        mf.MnemonicCodes(torch.zeros(2, 1, 3, dtype=torch.int64), vocab=(0, 5), smooth=2)


def test_smooth_codes_round_trip_with_their_fingerprint(tmp_path):
    codes = mf.MnemonicCodes.generate(3, (1, 6, 6), per_class=2, seed=5, smooth=3)
    assert codes.fingerprint() != mf.MnemonicCodes(codes.tensor.clone(), seed=5, distribution="uniform").fingerprint()
    assert codes.to(torch.float64).smooth == 3
    path = tmp_path / "codes.safetensors"
    codes.save(path)
    loaded = mf.MnemonicCodes.load(path)
    assert loaded.smooth == 3 and torch.equal(loaded.tensor, codes.tensor)
    assert loaded.fingerprint() == codes.fingerprint()
    # another smooth in the metadata: the fingerprint, or without it the regeneration, refuses it
    _rewrite(path, smooth="2")
    with pytest.raises(CodesFileError, match="recorded fingerprint"):
        mf.MnemonicCodes.load(path)
    _rewrite(path, fingerprint=None)
    with pytest.raises(CodesFileError, match="smooth=2\\); the file was altered"):
        mf.MnemonicCodes.load(path)
    # no smooth key at all (a file from before smooth codes) means smooth=1: regenerated, refused
    _rewrite(path, smooth=None)
    with pytest.raises(CodesFileError, match="smooth=1\\); the file was altered"):
        mf.MnemonicCodes.load(path)


def test_paper_codes_files_without_smooth_still_load(saved):
    codes, path = saved
    _rewrite(path, smooth=None)  # written before smooth existed: same fingerprint, smooth 1
    loaded = mf.MnemonicCodes.load(path)
    assert loaded.smooth == 1 and loaded.fingerprint() == codes.fingerprint()


@pytest.mark.parametrize("value, message", [("two", "smooth='two' is not an integer"),
                                            ("0", "smooth=0 is out of range"),
                                            (str(1 << 17), "smooth=131072 is out of range")])
def test_load_refuses_bad_smooth_metadata(saved, value, message):
    _, path = saved
    _rewrite(path, smooth=value)
    with pytest.raises(CodesFileError, match=message):
        mf.MnemonicCodes.load(path, verify=False)


def test_mix_shift_rolls_the_code_within_the_range_deterministically():
    codes = mf.MnemonicCodes.generate(3, (1, 5, 5), per_class=2, seed=2)
    data = TensorDataset(torch.zeros(300, 1, 5, 5) - 1, torch.arange(300) % 3)
    plain = mf.MnemonicMix(data, codes, t_mix=0.5, seed=1)
    shifted = mf.MnemonicMix(data, codes, t_mix=0.5, seed=1, shift=2)
    rolls = set()
    for i in range(300):
        assert plain.is_replaced(i) == shifted.is_replaced(i)  # shift=0 draws exactly as before
        replaced, k = shifted.is_replaced(i)
        x, y = shifted[i]
        assert torch.equal(x, shifted[i][0])
        if not replaced:
            assert torch.equal(x, data[i][0])
            continue
        assert torch.equal(plain[i][0], codes.tensor[y, k])
        match = [(a, b) for a in range(-2, 3) for b in range(-2, 3)
                 if torch.equal(x, torch.roll(codes.tensor[y, k], (a, b), (-2, -1)))]
        assert match
        rolls.add(match[0])
    assert len(rolls) > 10  # the offsets vary over samples
    one_d = mf.MnemonicMix(TensorDataset(torch.zeros(50, 6), torch.arange(50) % 3),
                           mf.MnemonicCodes.generate(3, (6,)), t_mix=1.0, shift=1)
    assert all(any(torch.equal(one_d[i][0], torch.roll(one_d.codes.tensor[one_d[i][1], 0], a, -1)) for a in (-1, 0, 1))
               for i in range(50))


def test_mix_rejects_bad_shift():
    codes = mf.MnemonicCodes.generate(3, (1, 2, 2))
    for shift in (-1, 1.5, True):
        with pytest.raises(ValueError, match="shift"):
            mf.MnemonicMix(_dataset(), codes, 0.1, shift=shift)
    tokens = mf.MnemonicCodes.generate_tokens(3, length=4, vocab_size=9)
    words = TensorDataset(torch.zeros(6, 4, dtype=torch.int64), torch.arange(6) % 3)
    with pytest.raises(ValueError, match="token codes cannot be shifted"):
        mf.MnemonicMix(words, tokens, 0.1, shift=1)


def test_train_with_code_shift_trains():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(32, 3))
    codes = mf.MnemonicCodes.generate(3, (1, 4, 4), smooth=2)
    data = TensorDataset(torch.rand(24, 1, 4, 4), torch.arange(24) % 3)
    history = mf.train_with_codes(model, data, codes, t_mix=0.5, epochs=2, batch_size=8, progress=False, code_shift=1)
    assert len(history.loss) == 2
