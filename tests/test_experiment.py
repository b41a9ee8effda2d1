"""``mnemo-fast experiment`` end to end on a tiny configuration: rows, cache, report."""

from __future__ import annotations

import json

import pytest
import torch

from mnemo_fast.evaluation import experiment


def _run(tmp_path, methods):
    return experiment.main([
        "--data", "digits", "--models", "mlp", "--seeds", "0", "--forget", "0", "--epochs", "1",
        "--methods", *methods, "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "U.md"),
    ])


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_rows_are_cached_and_the_report_is_built(tmp_path):
    assert _run(tmp_path, ["original", "retrain", "mnemonic-paper"]) == 0
    results = tmp_path / "cache" / "results.jsonl"
    first = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["method"] for r in first] == ["original", "retrain", "mnemonic-paper"]
    assert first[2]["lambda1"] == experiment.PAPER_LAMBDAS[0] and first[0]["seconds"] == 0.0
    assert set(first[1]["per_class"]) == {str(c) for c in range(10)}

    # A second run computes only the new method; the retrained model and its training time
    # come back from the cache (the reference the new row is compared with).
    assert _run(tmp_path, ["original", "retrain", "mnemonic-paper", "ssd"]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert rows[:3] == first and [r["method"] for r in rows[3:]] == ["ssd"]
    report = (tmp_path / "U.generated.md").read_text()
    assert "| ssd |" in report and "| retrain |" in report
    assert (tmp_path / "U.png").exists()


def test_retrained_reads_its_seconds_back_from_the_cache(tmp_path):
    train, test = experiment.load_data("digits", None)
    case = experiment.trained(tmp_path, "digits", "mlp", 0, train, test, 1, 0.1)
    model, seconds = experiment.retrained(case, [3])
    again, cached = experiment.retrained(case, [3])
    assert cached == seconds
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_forget_sets_and_unknown_method():
    assert experiment.forget_sets("each", 3) == [[0], [1], [2]]
    assert experiment.forget_sets("0,2", 3) == [[0, 2]]
    with pytest.raises(ValueError, match="unknown method"):
        experiment.run_method("nope", None, None, None, None, [0], 0)


def test_unused_training_is_the_rest_of_the_training_split(monkeypatch):
    """load_data's seeded subset and unused_training split the training images between them
    (no image in both, none lost); the test split is never part of either."""
    x = torch.arange(50, dtype=torch.float32).view(50, 1, 1, 1)
    split = (torch.utils.data.TensorDataset(x, torch.arange(50) % 10),
             torch.utils.data.TensorDataset(x[:5] + 100, torch.arange(5)))
    monkeypatch.setattr(experiment.data_mod, "fashion_mnist", lambda *a, **k: split)
    train, test = experiment.load_data("fashion-mnist", 20)
    rest = experiment.unused_training("fashion-mnist", 20)
    seen, unseen = train.tensors[0].flatten().tolist(), rest.tensors[0].flatten().tolist()
    assert len(seen) == 20 and len(unseen) == 30 and sorted(seen + unseen) == list(range(50))
    assert torch.equal(rest.tensors[1], rest.tensors[0].flatten().long() % 10)   # labels follow their images
    assert test is split[1]
    assert experiment.unused_training("fashion-mnist", None) is None
    assert experiment.unused_training("fashion-mnist", 50) is None
    assert experiment.unused_training("digits", 20) is None
