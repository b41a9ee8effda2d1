"""Codes: generation, batches, save/load with verification; MnemonicMix determinism."""

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
