"""benchmarks/zoo.py end to end on a tiny config: rows, their keys, resumption, the cache and
the report's counts (one small MLP, two classes, one epoch: a few seconds)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import zoo  # noqa: E402


def _args(tmp_path, *settings):
    return ["--half", "tune", "--archs", "mlp", "--data", "digits", "--seeds", "0", "--classes", "0", "1",
            "--settings", *settings, "--epochs", "1", "--cache", str(tmp_path / "cache"),
            "--rows", str(tmp_path / "rows.jsonl"), "--bar-interval", "0"]


def _rows(tmp_path):
    return [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]


def test_zoo_end_to_end_on_a_tiny_config(tmp_path):
    assert zoo.main(_args(tmp_path, "codes", "retain64", "ssd")) == 0
    rows = _rows(tmp_path)
    assert {tuple(r[k] for k in zoo.KEY) for r in rows} == {
        ("mlp", "sgd", "digits", 0, c, s) for c in (0, 1) for s in ("codes", "retain64", "ssd")}
    assert len(rows) == 6
    for r in rows:
        assert r["half"] == "tune" and r["epochs"] == 1
        assert {"A_R_before", "F_before", "test_accuracy_before", "train_seconds"} <= r.keys()
        if r["setting"] == "codes":
            assert {"A_R", "F", "seconds", "warned", "warnings", "feasible", "flagged", "flag_source"} <= r.keys()
            assert isinstance(r["flagged"], bool)
        elif r["setting"] == "retain64":  # the held-out training split, never the test set
            assert r["n_retain"] == 64 and r["retain_source"] == "held-out part of the training split"
            assert "skipped" in r and "retain" in r["skipped"] or {"A_R", "F", "flagged"} <= r.keys()
        else:
            assert {"A_R", "F", "seconds", "ssd_fisher_seconds"} <= r.keys() and "flagged" not in r
    assert len(list((tmp_path / "cache").glob("mlp-sgd-digits-s0-e1.*"))) == 2  # weights and meta

    assert zoo.main(_args(tmp_path, "codes", "retain64", "ssd")) == 0  # resumed: nothing to compute
    assert len(_rows(tmp_path)) == 6

    out = tmp_path / "ZOO.md"
    out.write_text("# hand-written header\n\n<!-- zoo:begin -->\nold\n<!-- zoo:end -->\n\nfooter\n")
    summary = tmp_path / "UNLEARNING.md"
    summary.write_text("# results\n\n<!-- zoo-summary:begin -->\nold\n<!-- zoo-summary:end -->\n")
    assert zoo.main(["--report", "--rows", str(tmp_path / "rows.jsonl"), "--out", str(out),
                     "--summary", str(summary)]) == 0
    tables = summary.read_text()
    assert tables.startswith("# results") and "\nold\n" not in tables
    assert "#### codes alone" in tables and "tune half, forgotten per architecture: mlp" in tables
    md = out.read_text()
    assert md.startswith("# hand-written header") and md.rstrip().endswith("footer") and "\nold\n" not in md
    codes = [r for r in rows if r["setting"] == "codes"]
    kinds = Counter(zoo.outcome(r) for r in codes)
    assert sum(kinds.values()) == 2 and set(kinds) <= {"forgotten", "silent failure", "flagged failure", "false alarm"}
    forgotten = sum(zoo.forgotten(r) for r in codes)
    assert f"| mlp | sgd | digits | 2 | **{forgotten}/2** | {kinds['silent failure']} | " \
           f"{kinds['flagged failure']} | {kinds['false alarm']} |" in md
    assert "#### codes alone" in md and "tune half" in md and "Per architecture" in md and "| tune | mlp / sgd" in md
    assert "#### SSD with the real training data" in md


def test_a_dampen_setting_runs_forget_in_dampen_mode(tmp_path):
    assert zoo.main(_args(tmp_path, "dampen/codes", "dampen/val64")) == 0
    rows = _rows(tmp_path)
    assert {r["setting"] for r in rows} == {"dampen/codes", "dampen/val64"} and len(rows) == 4
    for r in rows:
        assert {"A_R", "F", "flagged", "lambda1"} <= r.keys() and r["sign"] is None  # dampening has no sign
        assert r["lambda2"] == 1.0
    val = [r for r in rows if r["setting"] == "dampen/val64"]
    assert all(r["n_retain"] == 64 and r["retain_source"].endswith("every class") for r in val)


def test_outcomes_and_the_split():
    base = {"A_R_before": 0.95, "F_before": 0.97}
    assert zoo.outcome(base | {"A_R": 0.94, "F": 0.0, "flagged": False}) == "forgotten"
    assert zoo.outcome(base | {"A_R": 0.94, "F": 0.0, "flagged": True}) == "false alarm"
    assert zoo.outcome(base | {"A_R": 0.90, "F": 0.0, "flagged": False}) == "silent failure"
    assert zoo.outcome(base | {"A_R": 0.95, "F": 0.02, "flagged": True}) == "flagged failure"
    tune, report = zoo.SPLIT["tune"], zoo.SPLIT["report"]
    assert not set(tune) & set(report)
    assert sorted(a for a, _ in tune) == sorted(a for a, _ in report) == sorted(zoo.zoo_models.ARCHS)
    assert Counter(r for _, r in tune) == Counter(r for _, r in report) == {"sgd": 4, "adamw": 4}


def test_a_validation_sample_a_calibration_study_and_training_alone(tmp_path):
    """val<N> draws from every class (the forget class's rows included, and judged); --calibration
    passes forget's options and records them; --train-only caches models and writes no row."""
    args = _args(tmp_path, "val256")
    args[args.index("--classes") + 1:args.index("--classes") + 3] = ["3"]
    assert zoo.main(args + ["--calibration", '{"depth": 2}']) == 0
    (row,) = _rows(tmp_path)
    assert row["setting"] == "val256" and row["calibration"] == {"depth": 2}
    assert row["n_retain"] == 256 and 0 < row["n_retain_forget_class"] < 256
    assert row["retain_source"] == "held-out part of the training split, every class"
    sample = row["verdict"]["sample"]
    assert sample["forget_rows"] == row["n_retain_forget_class"] and sample["retain_rows"] == 256 - sample["forget_rows"]
    assert sample["retain_drop_se"] >= 0 and {"forget_depth", "retain_codes_lost"} <= row["verdict"]["codes"].keys()

    fresh = tmp_path / "fresh"
    train = ["--half", "tune", "--archs", "mlp", "--data", "digits", "--seeds", "1", "--epochs", "1",
             "--cache", str(fresh / "cache"), "--rows", str(fresh / "rows.jsonl"), "--bar-interval", "0", "--train-only"]
    assert zoo.main(train) == 0
    assert not (fresh / "rows.jsonl").exists() or not (fresh / "rows.jsonl").read_text().strip()
    assert len(list((fresh / "cache").glob("mlp-sgd-digits-s1-e1.*"))) == 2


def test_retrain_and_the_mia_against_it(tmp_path):
    """The retrain setting trains without the class; every forget row carries the MIA AUC, and
    the report compares it with the retrained model's."""
    assert zoo.main(_args(tmp_path, "retrain", "dampen/codes")) == 0
    rows = _rows(tmp_path)
    retrain = [r for r in rows if r["setting"] == "retrain"]
    assert len(retrain) == 2 and all(0.0 <= r["mia_auc"] <= 1.0 for r in retrain)
    assert all(r["F"] <= 0.01 for r in retrain)  # the class never seen: its logit only ever pushed down
    assert all("flagged" not in r for r in retrain)
    assert all("mia_auc" in r for r in rows if r["setting"] == "dampen/codes")
    text = zoo.report(zoo.load_rows(tmp_path / "rows.jsonl"))
    assert "against the retrained model on 2 cases" in text
