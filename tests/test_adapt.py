"""adapt_with_codes: a pre-trained model learns its codes, and resuming changes nothing."""

from __future__ import annotations

import copy
import re

import pytest
import torch

import mnemo_fast as mf
from mnemo_fast.evaluation import models
from mnemo_fast.training.adapt import adapt_with_codes


def _test_accuracy(model, test) -> float:
    x, y = test.tensors
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pretrained(digits_split):
    """An MLP trained on digits without codes (t_mix=0)."""
    train, _ = digits_split
    codes = mf.MnemonicCodes.generate(10, (1, 8, 8), seed=0)
    torch.manual_seed(0)
    model = models.MLP((1, 8, 8), 10, hidden=64)
    adapt_with_codes(model, train, codes, 150, t_mix=0.0, optimizer="adam", lr=1e-2, weight_decay=0.0, progress=False)
    return model, codes


def test_adaptation_learns_codes_and_keeps_accuracy(pretrained, digits_split):
    train, test = digits_split
    model, codes = copy.deepcopy(pretrained[0]), pretrained[1]
    before_codes = mf.code_accuracy(model, codes, [0]).retain
    before_test = _test_accuracy(model, test)
    adapt_with_codes(model, train, codes, 200, t_mix=0.2, lr=0.05, progress=False)
    after_codes = mf.code_accuracy(model, codes, [0])
    after_test = _test_accuracy(model, test)
    assert before_codes <= 0.5, f"the pre-trained model already knows its codes ({before_codes:.2f})"
    assert after_codes.retain >= 0.9 and after_codes.forget == 1.0, f"codes not learned: {after_codes}"
    assert after_test >= before_test - 0.03, f"test accuracy {before_test:.3f} -> {after_test:.3f}"
    assert not model.training


class Interrupting(torch.utils.data.Dataset):
    """A dataset that fails after ``limit`` reads, as a killed job would stop mid-run."""

    def __init__(self, dataset, limit: int):
        self.dataset, self.limit, self.reads = dataset, limit, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.reads += 1
        if self.reads > self.limit:
            raise KeyboardInterrupt("simulated interruption")
        return self.dataset[index]


SETTINGS = [
    dict(optimizer="sgd", lr=0.05, batch_size=32),
    dict(optimizer="adam", lr=3e-3, batch_size=48),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: s["optimizer"])
def test_resume_equals_uninterrupted(pretrained, digits_split, tmp_path, settings):
    train, _ = digits_split
    base, codes = pretrained
    steps, every = 40, 10
    uninterrupted = adapt_with_codes(copy.deepcopy(base), train, codes, steps, progress=False, **settings)

    with pytest.raises(KeyboardInterrupt):  # dies during step 26: the last checkpoint is step 20
        adapt_with_codes(copy.deepcopy(base), Interrupting(train, 25 * settings["batch_size"] + 5), codes, steps,
                         checkpoint_dir=tmp_path, checkpoint_every=every, progress=False, **settings)
    assert torch.load(tmp_path / "adapt.pt", weights_only=True)["step"] == 20
    resumed = adapt_with_codes(copy.deepcopy(base), train, codes, steps, checkpoint_dir=tmp_path,
                               checkpoint_every=every, progress=False, **settings)
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name}: max abs difference {(a - b).abs().max().item():.3g}"
    assert torch.load(tmp_path / "adapt.pt", weights_only=True)["step"] == steps


def test_checkpoint_of_other_settings_is_refused(pretrained, digits_split, tmp_path):
    train, _ = digits_split
    base, codes = pretrained
    adapt_with_codes(copy.deepcopy(base), train, codes, 3, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different settings"):
        adapt_with_codes(copy.deepcopy(base), train, codes, 6, lr=0.1, checkpoint_dir=tmp_path, progress=False)


def test_checkpoint_records_steps_and_codes(pretrained, digits_split, tmp_path):
    train, _ = digits_split
    base, codes = pretrained
    adapt_with_codes(copy.deepcopy(base), train, codes, 4, checkpoint_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / "adapt.pt", weights_only=True)
    assert (state["step"], state["steps"]) == (4, 4)
    assert state["codes_sha256"] == codes.fingerprint()


def test_resume_with_fewer_steps_than_done_is_refused(pretrained, digits_split, tmp_path):
    train, _ = digits_split
    base, codes = pretrained
    adapt_with_codes(copy.deepcopy(base), train, codes, 6, checkpoint_dir=tmp_path, progress=False)
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"already did 6 steps \(of 6 planned\), more than steps=4: pass steps >= 6"):
        adapt_with_codes(model, train, codes, 4, checkpoint_dir=tmp_path, progress=False)
    for a, b in zip(model.state_dict().values(), base.state_dict().values()):
        assert torch.equal(a, b)  # refused before anything changed
    # a longer run extends the checkpoint, as many steps as a fresh longer run
    extended = adapt_with_codes(copy.deepcopy(base), train, codes, 8, checkpoint_dir=tmp_path, progress=False)
    fresh = adapt_with_codes(copy.deepcopy(base), train, codes, 8, progress=False)
    assert torch.load(tmp_path / "adapt.pt", weights_only=True)["step"] == 8
    for a, b in zip(extended.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_with_other_codes_is_refused(pretrained, digits_split, tmp_path):
    train, _ = digits_split
    base, codes = pretrained
    adapt_with_codes(copy.deepcopy(base), train, codes, 3, checkpoint_dir=tmp_path, progress=False)
    other = mf.MnemonicCodes.generate(10, (1, 8, 8), seed=1)
    with pytest.raises(ValueError, match="written with other codes .*pass the codes it was trained with"):
        adapt_with_codes(copy.deepcopy(base), train, other, 6, checkpoint_dir=tmp_path, progress=False)
    # the same codes read back from a file are the same codes
    codes.save(tmp_path / "codes.safetensors")
    again = mf.MnemonicCodes.load(tmp_path / "codes.safetensors")
    adapt_with_codes(copy.deepcopy(base), train, again, 6, checkpoint_dir=tmp_path, progress=False)
    assert torch.load(tmp_path / "adapt.pt", weights_only=True)["step"] == 6


def test_unreadable_or_older_checkpoint(pretrained, digits_split, tmp_path):
    train, _ = digits_split
    base, codes = pretrained
    adapt_with_codes(copy.deepcopy(base), train, codes, 3, checkpoint_dir=tmp_path, progress=False)
    path = tmp_path / "adapt.pt"
    state = torch.load(path, weights_only=True)
    del state["steps"], state["codes_sha256"]  # as written before they were recorded
    torch.save(state, path)
    with pytest.warns(UserWarning, match="older checkpoint"):
        adapt_with_codes(copy.deepcopy(base), train, codes, 4, checkpoint_dir=tmp_path, progress=False)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(f"{path}: cannot read the checkpoint") + ".*resume=False"):
        adapt_with_codes(copy.deepcopy(base), train, codes, 4, checkpoint_dir=tmp_path, progress=False)
