"""``torchrun -m mnemo_fast.distributed.launch`` on 2 CPU processes (gloo) equals one process, with and
without FSDP2 sharding: the launcher, the rendezvous and the gathered checkpoint end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import mnemo_fast as mf
from mnemo_fast.evaluation import models
from mnemo_fast.cli import DEFAULT_LAMBDAS
from rounding import float32_fisher_bound, float32_model_bound

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launch")
    torch.manual_seed(0)
    model = models.build("mlp", (1, 8, 8), 10)
    models.save_checkpoint(model, tmp / "model.safetensors", name="mlp", input_shape=(1, 8, 8), num_classes=10)
    mf.MnemonicCodes.generate(10, (1, 8, 8), per_class=3, seed=1).save(tmp / "codes.safetensors")
    return tmp


def _torchrun(saved, output, *extra, returncode: int = 0, accept: bool = True) -> str:
    """The torchrun job on the untrained model (its verdict is flagged: the comparisons accept it)."""
    extra = (*extra, "--accept-flagged") if accept else extra
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "mnemo_fast.distributed.launch", str(saved / "model.safetensors"), str(saved / "codes.safetensors"),
        "--forget", "0", "--lambda1", "0.1", "--output", str(output), *extra,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == returncode, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_a_flagged_torchrun_job_saves_nothing_and_fails(saved, tmp_path):
    """The untrained model's verdict is flagged: without --accept-flagged the job writes nothing
    and exits non-zero (torchrun reports rank 0's exit code 3)."""
    output = tmp_path / "out.safetensors"
    out = _torchrun(saved, output, returncode=1, accept=False)
    assert "verdict: flagged" in out and not output.exists()


@pytest.mark.parametrize("extra", [[], ["--fsdp", "--chunk-size", "4"], ["--engine", "reference"]],
                         ids=["replicated", "fsdp", "reference-engine"])
def test_torchrun_job_equals_one_process(saved, tmp_path, extra):
    out = _torchrun(saved, tmp_path / "forgotten.safetensors", *extra)
    assert "2 ranks" in out and "saved" in out
    if "--engine" in extra:  # the option reaches the ranks' engine
        assert "backend=reference" in out, out
    model, _ = models.load_checkpoint(saved / "model.safetensors")
    codes = mf.MnemonicCodes.load(saved / "codes.safetensors")
    single = mf.forget(model, codes, [0], lambda1=0.1, lambda2=DEFAULT_LAMBDAS["mlp"][1])
    got, _ = models.load_checkpoint(tmp_path / "forgotten.safetensors")
    expected, original = single.model.state_dict(), model.state_dict()
    assert any(not torch.equal(expected[n], original[n]) for n in expected), "nothing was forgotten"
    # two ranks sum the squares in another order: the float32 rounding that can give (tests/rounding.py)
    fisher_bound = float32_fisher_bound(codes.num_classes * codes.per_class, model)
    for name, value in got.state_dict().items():
        scale = expected[name].abs().max().clamp_min(1e-30)
        diff = ((value - expected[name]).abs().max() / scale).item()
        bound = float32_model_bound(fisher_bound, expected[name] - original[name], expected[name])
        assert diff <= bound, f"{name}: max relative difference {diff:.3g} from one process (bound {bound:.3g})"
