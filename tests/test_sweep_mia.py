"""benchmarks/unlearning_sweep.py: the membership-inference field, the retrain method and the
targets report (a tiny MLP on random data, seconds)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import unlearning_sweep as sweep  # noqa: E402


def _case(tmp_path, monkeypatch):
    monkeypatch.setitem(sweep.EPOCHS, "digits", 2)
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.rand(60, 1, 4, 4, generator=g), torch.arange(60) % 3)
    test = TensorDataset(torch.rand(30, 1, 4, 4, generator=g), torch.arange(30) % 3)
    return sweep.trained(tmp_path, "digits", "mlp", 0, train, test, sweep.PAPER_VARIANT)


def test_rows_carry_the_forget_set_mia_and_retrain_is_cached(tmp_path, monkeypatch):
    from mnemo_fast.evaluation.metrics import forget_set_mia
    case = _case(tmp_path, monkeypatch)
    x, y = case.test.tensors
    rows = {m: sweep.run_case(case, 1, m, x, y) for m in ("original", "paper", "retrain", "ssd", "oracle")}
    for m, row in rows.items():
        assert 0.0 <= row["mia_auc"] <= 1.0, m
    assert rows["original"]["mia_auc"] == forget_set_mia(case.net, case.train, case.test, [1]).auc
    assert case.path("-retrain-1").exists()          # trained once, beside the model
    again = sweep.run_case(case, 1, "retrain", x, y)  # from the cache: the same model
    assert (again["A_R"], again["F"], again["mia_auc"]) == (rows["retrain"]["A_R"], rows["retrain"]["F"],
                                                            rows["retrain"]["mia_auc"])
    assert rows["retrain"]["F"] == 0.0                # the class was never seen: never predicted
    assert sweep.run_case(case, 1, "original", x, y)["A_R"] == rows["original"]["A_R"]  # memoised predictions


def test_targets_and_report_use_retrain_auc_else_chance():
    base = {"data": "d", "model": "m", "seed": 0}
    rows = {}
    for c, (auto_auc, retrain_auc) in enumerate([(0.53, 0.50), (0.58, 0.56), (0.58, None)]):
        for method, extra in [("original", {"A_R": 0.9, "F": 0.9, "mia_auc": 0.6}),
                              ("auto", {"A_R": 0.89, "F": 0.0, "mia_auc": auto_auc}),
                              ("ssd", {"A_R": 0.95, "F": 0.2})] + (
                [("retrain", {"A_R": 0.91, "F": 0.0, "mia_auc": retrain_auc})] if retrain_auc else []):
            rows[("d", "m", 0, c, method)] = base | {"forget": c, "method": method, **extra}
    # case 0: |0.53 - 0.50| ok; case 1: |0.58 - 0.56| ok; case 2: no retrain -> chance, 0.08 off
    assert sweep.mia_reference(rows, ("d", "m", 0, 2, "auto")) == (0.5, False)
    assert sweep.mia_counts(rows, [("d", "m", 0, c, "auto") for c in range(3)]) == "2/3 (0.563; 2 retrain refs)"
    targets = sweep.targets_report(rows)
    assert "| d / m | 3 | **3/3** | 3/3 (0) | 2/3 (0.563; 2 retrain refs) | 0.600 |" in targets
    text = sweep.report(rows)
    assert "| 0 | 0 | 90.0 (MIA 0.60) | 0.0 / -1.0 / 0.53 ✓ |" in text
    assert "| retrain | 2 |" in text


def test_mia_figure_is_written(tmp_path):
    rows = {("d", "m", 0, 0, m): {"data": "d", "model": "m", "seed": 0, "forget": 0, "method": m,
                                  "A_R": 0.9, "F": 0.0 if m != "original" else 0.9, "mia_auc": 0.55}
            for m in ("original", "auto", "retrain")}
    sweep.mia_figure(rows, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_sweep_methods_name_their_calibration_explicitly(tmp_path, monkeypatch):
    """Every `auto*` method of the sweep passes its calibration options explicitly (``blocks``
    always named), so a row's meaning does not follow the package's default; ``auto`` is the
    search without per-block steps."""
    case = _case(tmp_path, monkeypatch)
    x, y = case.test.tensors
    seen = []
    real = sweep.forget

    def recording(*args, **kwargs):
        seen.append(kwargs.get("calibration"))
        return real(*args, **kwargs)
    monkeypatch.setattr(sweep, "forget", recording)
    for method in ("auto", "auto-lambda1", "auto-blocks", "auto-blocks-tensor", "auto-repair"):
        seen.clear()
        sweep.run_case(case, 1, method, x, y)
        assert len(seen) == 1 and isinstance(seen[0], dict) and "blocks" in seen[0], (method, seen)
    assert sweep.REFINED["auto-heldout"] == {"heldout": True, "blocks": False}
    seen.clear()
    sweep.run_case(case, 1, "auto", x, y)
    assert seen == [{"blocks": False}]


def test_report_only_selects_data_model_combinations():
    rows = {(d, m, 0, 0, "original"): {"A_R": 0.9, "F": 0.9} for d, m in
            [("d", "m"), ("d", "m codes=k4"), ("e", "m")]}
    assert set(sweep.select(rows, ["d/m codes=k4"])) == {("d", "m codes=k4", 0, 0, "original")}
    assert sweep.select(rows, None) is rows


def test_report_gives_the_targets_of_auto_blocks_where_it_has_rows(tmp_path, capsys):
    import json
    path = tmp_path / "rows.jsonl"
    rows = [{"data": "d", "model": "m", "seed": 0, "forget": 0, "method": m, "A_R": 0.9,
             "F": 0.9 if m == "original" else 0.0, "mia_auc": 0.5} for m in ("original", "auto", "auto-blocks")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sweep.main(["--report", "--rows", str(path)])
    out = capsys.readouterr().out
    assert "#### The issue's targets, `auto`\n" in out and "#### The issue's targets, `auto-blocks`\n" in out
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    sweep.main(["--report", "--rows", str(path)])
    assert "`auto-blocks`" not in capsys.readouterr().out


def test_diagnose_mia_rows_carry_membership_from_held_out_training_samples(tmp_path, monkeypatch):
    case = _case(tmp_path, monkeypatch)
    x, y = case.test.tensors
    import pytest
    with pytest.raises(ValueError, match="held-out training images"):
        sweep.run_case(case, 1, "diagnose-mia", x, y)           # no held-out images on the case
    g = torch.Generator().manual_seed(1)
    case.heldout = TensorDataset(torch.rand(45, 1, 4, 4, generator=g), torch.arange(45) % 3)
    row = sweep.run_case(case, 1, "diagnose-mia", x, y)
    before, after = row["membership"]
    assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
    assert row["membership_samples"] == 15                      # 20 training vs 15 held-out of class 1
    assert row["membership_kept"] == (abs(after - 0.5) > 0.05)
    plain = sweep.run_case(case, 1, "diagnose", x, y)           # the old method: no membership fields
    assert "membership" not in plain and plain["verdict"] == row["verdict"]


def test_membership_report_counts_flags_against_the_mia_target():
    base = {"data": "d", "model": "m", "seed": 0}
    rows = {}
    # case 0: flagged, auto-blocks 0.62 vs chance -> missed; case 1: not flagged, 0.52 vs retrain 0.50 -> met;
    # case 2: not flagged but 0.57 vs chance -> missed
    for c, (kept, membership, auc, retrain) in enumerate([(True, (0.66, 0.64), 0.62, None),
                                                          (False, (0.51, 0.50), 0.52, 0.50),
                                                          (False, (0.53, 0.54), 0.57, None)]):
        rows[("d", "m", 0, c, "diagnose-mia")] = base | {"forget": c, "method": "diagnose-mia", "membership": membership,
                                                         "membership_kept": kept, "verdict": "ok"}
        rows[("d", "m", 0, c, "auto-blocks")] = base | {"forget": c, "method": "auto-blocks", "A_R": 0.9, "F": 0.0,
                                                        "mia_auc": auc}
        if retrain is not None:
            rows[("d", "m", 0, c, "retrain")] = base | {"forget": c, "method": "retrain", "A_R": 0.9, "F": 0.0,
                                                        "mia_auc": retrain}
    text = sweep.membership_report(rows)
    assert "| d / m | 3 | 1 | 0 | 1 | 1 | 0.567 / 0.560 |" in text
    assert "| d / m | 0 | 0 | 0.660 -> 0.640 | kept | 0.620 | 0.500 (chance) | missed |" in text
    assert "| d / m | 0 | 1 | 0.510 -> 0.500 | - | 0.520 | 0.500 | met |" in text
