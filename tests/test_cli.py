"""``mnemo-fast``: every user error is one line on stderr and exit code 2; bugs keep their traceback.

Most cases call :func:`mnemo_fast.cli.main` in-process (fast); two run the real entry point.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mnemo_fast as mf
from mnemo_fast import cli
from mnemo_fast.evaluation import models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An (untrained) digits MLP checkpoint and its codes, as `mnemo-fast demo` writes them."""
    tmp = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = models.build("mlp", (1, 8, 8), 10)
    models.save_checkpoint(model, tmp / "model.safetensors", name="mlp", input_shape=(1, 8, 8), num_classes=10)
    mf.MnemonicCodes.generate(10, (1, 8, 8), seed=0).save(tmp / "codes.safetensors")
    return tmp


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def user_error(result, *fragments) -> str:
    """Assert exit code 2 and exactly one stderr line holding every fragment; return that line."""
    code, _, err = result
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, f"exit {code}, stderr:\n{err}"
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in err and "_lambda1" not in err and "invalid" not in err.replace("invalid choice", "")
    return lines[0]


OPTION_ERRORS = {
    "lambda1 word": (["--lambda1", "x"], "--lambda1: expected a positive number or 'auto', got 'x'"),
    "lambda1 negative": (["--lambda1", "-1"], "--lambda1: expected a positive number or 'auto', got '-1'"),
    "lambda1 nan": (["--lambda1", "nan"], "--lambda1: expected a positive number or 'auto', got 'nan'"),
    "lambda2 zero": (["--lambda2", "0"], "--lambda2: expected a positive number, got '0'"),
    "lambda2 inf": (["--lambda2", "inf"], "--lambda2: expected a positive number, got 'inf'"),
    "lambda1 over float32": (["--lambda1", "1e39"], "--lambda1: 1e39 is too large: above float32's largest number"),
    "lambda2 over float32": (["--lambda2", "1e39"], "--lambda2: 1e39 is too large"),
    "class word": (["--forget", "a"], "--forget: expected a class index (an integer >= 0), got 'a'"),
    "class negative": (["--forget", "-1"], "--forget: expected a class index"),
    "class float": (["--forget", "3.7"], "--forget: expected a class index (an integer >= 0), got '3.7'"),
    "mode": (["--mode", "other"], "--mode: invalid choice: 'other'"),
}


@pytest.mark.parametrize("extra, message", OPTION_ERRORS.values(), ids=OPTION_ERRORS.keys())
def test_bad_forget_options_are_one_line(capsys, saved, tmp_path, extra, message):
    result = run(capsys, "forget", saved / "model.safetensors", saved / "codes.safetensors",
                 "--output", tmp_path / "out.safetensors", *extra)
    line = user_error(result, message)
    assert line.startswith("mnemo-fast forget: error: ")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "0"], "--epochs: expected a positive integer, got '0'"),
    (["--epochs", "-3"], "--epochs: expected a positive integer, got '-3'"),
    (["--epochs", "1.5"], "--epochs: expected a positive integer, got '1.5'"),
    (["--t-mix", "2"], "--t-mix: expected a number in [0, 1], got '2'"),
    (["--seed", "-1"], "--seed: expected an integer >= 0, got '-1'"),
    (["--data", "cifar"], "--data: invalid choice: 'cifar'"),
])
def test_bad_demo_options_are_one_line(capsys, extra, message):
    user_error(run(capsys, "demo", *extra), message)


def test_usage_errors_are_one_line(capsys, saved):
    user_error(run(capsys), "the following arguments are required: COMMAND")
    user_error(run(capsys, "train"), "COMMAND: invalid choice: 'train'")
    user_error(run(capsys, "forget", saved / "model.safetensors", saved / "codes.safetensors"),
               "the following arguments are required: --output")
    user_error(run(capsys, "evaluate", saved / "model.safetensors", "--forget", "x"), "--forget: expected a class index")
    user_error(run(capsys, "experiment", "--bogus"), "mnemo-fast experiment: error: unrecognized arguments: --bogus")
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "--debug" in out


def _garbage(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def test_bad_model_files_are_one_line(capsys, saved, tmp_path):
    codes = saved / "codes.safetensors"
    good = (saved / "model.safetensors").read_bytes()
    contradicting = tmp_path / "contradicting.safetensors"
    models.save_checkpoint(models.build("mlp", (1, 8, 8), 5), contradicting, name="mlp",
                           input_shape=(1, 8, 8), num_classes=10)  # weights for 5 classes, metadata says 10
    cases = [
        (tmp_path / "missing.safetensors", "no such model checkpoint"),
        (tmp_path, "is a directory, not a model checkpoint"),
        (_garbage(tmp_path / "garbage.safetensors", b"\x00garbage" * 50), "not a readable safetensors file"),
        (_garbage(tmp_path / "truncated.safetensors", good[: len(good) // 2]), "not a readable safetensors file"),
        (_garbage(tmp_path / "empty.safetensors", b""), "not a readable safetensors file"),
        (codes, "not a mnemo_fast checkpoint"),
        (contradicting, "the weights do not match the model its metadata describes (wrong shape: 3.weight"),
    ]
    for path, message in cases:
        user_error(run(capsys, "forget", path, codes, "--output", tmp_path / "out.safetensors"), str(path), message)
        user_error(run(capsys, "evaluate", path), str(path), message)
    assert not (tmp_path / "out.safetensors").exists()


def test_bad_codes_files_are_one_line(capsys, saved, tmp_path):
    model = saved / "model.safetensors"
    good = (saved / "codes.safetensors").read_bytes()
    other_shape = tmp_path / "other.safetensors"
    mf.MnemonicCodes.generate(10, (1, 28, 28)).save(other_shape)
    cases = [
        (tmp_path / "missing.safetensors", "no such codes file"),
        (tmp_path, "is a directory, not a codes file"),
        (_garbage(tmp_path / "garbage.safetensors", os.urandom(300)), "not a readable safetensors file"),
        (_garbage(tmp_path / "truncated.safetensors", good[:-10]), "not a readable safetensors file"),
        (model, "not a mnemo_fast codes file"),
        (other_shape, "does not fit"),
    ]
    for path, message in cases:
        user_error(run(capsys, "forget", model, path, "--output", tmp_path / "out.safetensors"), str(path), message)
    assert not (tmp_path / "out.safetensors").exists()


def test_outputs_that_cannot_be_written(capsys, saved, tmp_path):
    inputs = [saved / "model.safetensors", saved / "codes.safetensors"]
    user_error(run(capsys, "forget", *inputs, "--output", tmp_path / "no" / "such" / "out.safetensors"),
               "the directory", "does not exist (create it first)")
    user_error(run(capsys, "forget", *inputs, "--output", tmp_path), "is a directory; name a file")
    a_file = _garbage(tmp_path / "a_file", b"x")
    user_error(run(capsys, "forget", *inputs, "--output", a_file / "out.safetensors"), "is not a directory")
    code, out, err = run(capsys, "demo", "--out", a_file / "sub")
    user_error((code, out, err), f"--out {a_file / 'sub'}: cannot create the directory")
    assert out == "", "the demo must refuse before training"
    assert a_file.read_bytes() == b"x"


def test_evaluate_on_the_wrong_data_set(capsys, tmp_path):
    path = tmp_path / "fashion.safetensors"
    models.save_checkpoint(models.build("mlp", (1, 28, 28), 10), path, name="mlp", input_shape=(1, 28, 28), num_classes=10)
    user_error(run(capsys, "evaluate", path, "--data", "digits"),
               f"{path} is a model for inputs [1, 28, 28] and 10 classes; --data digits has inputs [1, 8, 8]")


def test_evaluate_prints_the_table_and_refuses_unknown_classes(capsys, saved):
    code, out, err = run(capsys, "evaluate", saved / "model.safetensors", "--forget", "3")
    assert code == 0 and err == ""
    assert "class   accuracy" in out and "(forget)" in out
    user_error(run(capsys, "evaluate", saved / "model.safetensors", "--forget", "12"),
               "--forget 12: the model has classes 0..9")


def test_the_method_refusals_are_one_line_and_save_nothing(capsys, saved, tmp_path):
    inputs = [saved / "model.safetensors", saved / "codes.safetensors"]
    output = tmp_path / "out.safetensors"
    user_error(run(capsys, "forget", *inputs, "--output", output, "--forget", *range(10)),
               "cannot forget: ", "all 10 classes")
    user_error(run(capsys, "forget", *inputs, "--output", output, "--forget", "12"), "cannot forget: ", "12")
    # finite lambdas whose shifts overflow float32: the model would become inf
    assert not output.exists() and not output.with_name(output.name + ".tmp").exists()


def test_a_non_finite_result_is_never_saved(capsys, saved, tmp_path, monkeypatch):
    """The CLI's own check, whatever the method lets through."""
    real = cli.forget

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        with torch.no_grad():
            result.model[1].bias[0] = float("nan")
        return result

    monkeypatch.setattr(cli, "forget", poisoned)
    output = tmp_path / "out.safetensors"
    user_error(run(capsys, "forget", saved / "model.safetensors", saved / "codes.safetensors", "--output", output),
               "made 1 tensor(s) NaN or inf (first: 1.bias); nothing saved")
    assert not output.exists()


def test_forget_writes_the_forgotten_model(capsys, saved, tmp_path):
    """An untrained model: the verdict flags it (its codes mean nothing), so it is written only
    with --accept-flagged (test_a_flagged_forget_saves_nothing_and_exits_3)."""
    output = tmp_path / "out.safetensors"
    code, out, err = run(capsys, "forget", saved / "model.safetensors", saved / "codes.safetensors",
                         "--output", output, "--forget", "3", "--engine", "reference", "--accept-flagged")
    assert code == 0, err
    assert "verdict: flagged" in out and "saved as --accept-flagged asks" in err
    assert "backend=reference" in out and f"saved {output}" in out
    model, meta = models.load_checkpoint(output)
    assert meta["forgotten"] == "3"
    original, _ = models.load_checkpoint(saved / "model.safetensors")
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))


def test_debug_shows_the_traceback_of_a_user_error(capsys, tmp_path):
    code, _, err = run(capsys, "evaluate", tmp_path / "missing.safetensors", "--debug")
    assert code == 2 and "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("mnemo-fast: error: ")


def test_a_flagged_forget_saves_nothing_and_exits_3(capsys, saved, tmp_path):
    """Issue 26: the command line exits non-zero on a flagged result unless --accept-flagged."""
    output = tmp_path / "out.safetensors"
    code, out, err = run(capsys, "forget", saved / "model.safetensors", saved / "codes.safetensors",
                         "--output", output, "--forget", "3")
    assert code == cli.FLAGGED == 3
    assert "verdict: flagged" in out and f"saved {output}" not in out
    last = err.strip().splitlines()[-1]
    assert last.startswith("mnemo-fast: flagged: codes: ") and "--accept-flagged saves it anyway" in last, err
    assert not output.exists() and not list(tmp_path.glob("*.tmp"))


def test_internal_errors_keep_their_traceback(saved, monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli.models, "save_checkpoint", broken)
    with pytest.raises(RuntimeError, match="a bug"):  # not caught: Python prints it, exit code 1
        cli.main(["forget", str(saved / "model.safetensors"), str(saved / "codes.safetensors"),
                  "--output", str(tmp_path / "out.safetensors"), "--accept-flagged"])


@pytest.mark.slow
def test_demo_one_epoch_writes_the_three_files(capsys, tmp_path):
    out_dir = tmp_path / "new" / "demo"  # created, parents too
    code, out, err = run(capsys, "demo", "--epochs", "1", "--out", out_dir, "--accept-flagged")  # 1 epoch: flagged
    assert code == 0, err
    assert "1 epochs" in out
    for name in ("model.safetensors", "codes.safetensors", "forgotten.safetensors"):
        assert (out_dir / name).is_file()
    assert not list(out_dir.glob("*.tmp"))
    mf.MnemonicCodes.load(out_dir / "codes.safetensors")


@pytest.mark.slow
def test_demo_keeps_the_trained_model_when_forgetting_fails(capsys, tmp_path, monkeypatch):
    # the forget classes are checked before training
    user_error(run(capsys, "demo", "--out", tmp_path, "--forget", "12"), "--forget 12: digits has classes 0..9")
    user_error(run(capsys, "demo", "--out", tmp_path, "--forget", *range(10)), "at least one must remain")
    # a refusal only known after training (stderr also holds the progress bar)
    def refusing(*args, **kwargs):
        raise mf.UnlearningError("a refusal after training")

    monkeypatch.setattr(cli, "forget", refusing)
    code, out, err = run(capsys, "demo", "--epochs", "1", "--out", tmp_path)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "mnemo-fast: error: cannot forget: a refusal after training", err
    monkeypatch.undo()
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "codes.safetensors").is_file()
    assert not (tmp_path / "forgotten.safetensors").exists()
    # the saved pair can be forgotten again from the command line
    code, out, err = run(capsys, "forget", tmp_path / "model.safetensors", tmp_path / "codes.safetensors",
                         "--forget", "2", "--output", tmp_path / "forgotten.safetensors", "--accept-flagged")
    assert code == 0, err


def _entry_point(*argv) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "mnemo_fast.cli", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=120)


def test_entry_point_prints_one_line_and_exits_2(saved, tmp_path):
    garbage = _garbage(tmp_path / "model.safetensors", b"not a model")
    done = _entry_point("forget", garbage, saved / "codes.safetensors", "--output", tmp_path / "out.safetensors")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mnemo-fast: error: {garbage}: not a readable safetensors file"), done.stderr


def test_python_dash_m_is_the_command_line(saved, tmp_path):
    """``python -m mnemo_fast`` runs ``mnemo-fast`` (issue 27)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "mnemo_fast", "--help"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "demo" in done.stdout and "forget" in done.stdout, done.stderr
    done = subprocess.run([sys.executable, "-m", "mnemo_fast", "evaluate", tmp_path / "missing.safetensors"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("mnemo-fast: error: "), done.stderr


def test_a_forget_that_did_nothing_says_so(capsys, trained_digits_mlp, tmp_path):
    """The library's ForgetWarning, as one line on stderr after the summary (issue 27)."""
    model, codes = trained_digits_mlp
    models.save_checkpoint(model, tmp_path / "model.safetensors", name="mlp", input_shape=(1, 8, 8), num_classes=10)
    codes.save(tmp_path / "codes.safetensors")
    inputs = [tmp_path / "model.safetensors", tmp_path / "codes.safetensors", "--output", tmp_path / "out.safetensors"]
    code, out, err = run(capsys, "forget", *inputs, "--forget", "3", "--lambda1", "1e-9", "--lambda2", "1e-9")
    assert code == cli.FLAGGED and "forget acc 1.00 -> 1.00" in out and "verdict: flagged" in out
    line, flagged = err.strip().splitlines()
    assert flagged.startswith("mnemo-fast: flagged: codes: 1 of 1 forget codes still classified as their class")
    assert line.startswith("mnemo-fast: warning: forget [3]: class 3 still recognised"), line
    assert "class 3 100% -> 100%" in line and "try --lambda1 auto or a larger lambda1 than 1e-09" in line, line
    code, out, err = run(capsys, "forget", *inputs, "--forget", "3", "--lambda1", "auto")  # no --lambda2 needed
    assert code == 0 and "forget acc 1.00 -> 0.00" in out and "verdict: clean" in out and not err.strip(), err


def test_forget_in_dampen_mode_defaults_to_the_auto_threshold(capsys, saved, tmp_path):
    """--mode dampen: lambda1 defaults to 'auto' (the threshold scan), lambda2 to lam = 1, not to
    the shift's per-model lambdas."""
    output = tmp_path / "out.safetensors"
    code, out, err = run(capsys, "forget", saved / "model.safetensors", saved / "codes.safetensors",
                         "--output", output, "--forget", "3", "--mode", "dampen", "--accept-flagged")
    assert code == 0, err
    assert f"saved {output}" in out
    args = cli.build_parser().parse_args(["forget", "m", "c", "--output", "o", "--forget", "3", "--mode", "dampen"])
    assert cli.forget_lambdas(args, "mlp") == ("auto", 1.0)
    fixed = cli.build_parser().parse_args(["forget", "m", "c", "--output", "o", "--forget", "3", "--mode", "dampen", "--lambda1", "30"])
    assert cli.forget_lambdas(fixed, "mlp") == (30.0, 1.0)
