"""benchmarks/unlearning_sweep.py's code variants: names, row keys, cache, report (tiny sizes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import unlearning_sweep as sweep  # noqa: E402


def test_parse_variant_names():
    assert sweep.parse_variant("paper") == {"smooth": 1, "per_class": 1, "t_mix": 0.1, "shift": 0}
    assert sweep.parse_variant("s4-k2-t0.2-shift3") == {"smooth": 4, "per_class": 2, "t_mix": 0.2, "shift": 3}
    for bad in ("x4", "sfour", "k", "s4-"):
        with pytest.raises(ValueError, match="unknown code variant setting"):
            sweep.parse_variant(bad)


def test_variant_is_part_of_the_row_key(tmp_path):
    rows = tmp_path / "rows.jsonl"
    base = {"data": "digits", "model": "cnn", "seed": 0, "forget": 1, "method": "auto", "A_R": 0.9, "F": 0.0}
    lines = [base, base | {"variant": "k4", "A_R": 0.8}, base | {"method": "original", "F": 0.95},
             base | {"method": "original", "F": 0.97, "variant": "k4"}]
    rows.write_text("".join(json.dumps(r) + "\n" for r in lines))
    loaded = sweep.load_rows(rows)
    assert loaded[("digits", "cnn", 0, 1, "auto")]["A_R"] == 0.9
    assert loaded[("digits", "cnn codes=k4", 0, 1, "auto")]["A_R"] == 0.8
    text = sweep.codes_report(loaded)
    assert "| digits / cnn | paper | 1 | **1/1** |" in text and "| digits / cnn | k4 | 1 | **0/1** |" in text


def test_trained_variant_is_cached_under_its_own_name(tmp_path, monkeypatch):
    monkeypatch.setitem(sweep.EPOCHS, "digits", 1)
    torch.manual_seed(0)
    train = TensorDataset(torch.rand(12, 1, 4, 4), torch.arange(12) % 3)
    case = sweep.trained(tmp_path, "digits", "mlp", 0, train, train, "s2-k2-shift1")
    assert case.codes.per_class == 2 and case.codes.smooth == 2
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["digits-mlp-s0-e1-t0.1-codes-s2-k2-shift1.safetensors"]
    again = sweep.trained(tmp_path, "digits", "mlp", 0, train, train, "s2-k2-shift1")  # from the cache
    for a, b in zip(case.net.state_dict().values(), again.net.state_dict().values()):
        assert torch.equal(a, b)
