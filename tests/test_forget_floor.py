"""benchmarks/forget_floor.py: its hand-written floor does the method's work (the same model as
``forget`` when the -1 candidate wins), and the script runs (seconds)."""

import sys
from pathlib import Path

import pytest
import torch

from mnemo_fast.fast import _ext

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import forget_floor  # noqa: E402

pytestmark = pytest.mark.skipif(not _ext.available(), reason="the floor uses the compiled kernels")


@pytest.mark.parametrize("classes", [3, 10])
def test_the_floor_computes_what_forget_computes(classes):
    model, runs = forget_floor.problem(classes)
    result = runs["forget"]()
    assert result.sign == -1, "the comparison below is for the -1 candidate"
    floor = runs["floor"]()
    for (name, p), q in zip(result.model.named_parameters(), floor):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-7, msg=name)
    before = [p.detach() for p in model.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(floor, before))   # both moved every tensor


def test_the_script_prints_the_three_rows(capsys):
    forget_floor.main(["--classes", "3", "--rounds", "2", "--order", "blocked"])
    out = capsys.readouterr().out
    assert "blocked" in out and all(f"| {name} |" in out for name in ("plain", "floor", "forget"))
