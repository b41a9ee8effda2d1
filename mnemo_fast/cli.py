"""``mnemo-fast``: train with codes and forget (demo), forget a saved model, evaluate one."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch

from .evaluation import data, models
from .calibration import DEFAULT_LAMBDA2
from .calibration.dampen import DEFAULT_LAM
from .codes import MnemonicCodes
from .engines import backend
from .evaluation import Evaluation, evaluate
from .method import ForgetResult, forget
from .reference.engine import REFERENCE
from .training.train import train_with_codes
from .validation import ForgetWarning

#: lambda1, lambda2 that forget class 0 on the demo's models (see benchmarks/UNLEARNING.md).
DEFAULT_LAMBDAS = {"mlp": (1e-3, 10.0), "cnn": (1e-2, 10.0), "resnet18": (1e-2, 10.0)}


class UserError(Exception):
    """A mistake in what the user asked for (an option, a file, a data set): one line on stderr, exit 2."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block), exit code 2."""

    def error(self, message: str):
        message = message[len("argument "):] if message.startswith("argument ") else message
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


#: The largest lambda: the models are float32, and a larger gain is inf there.
LAMBDA_MAX = float(torch.finfo(torch.float32).max)


def _lambda(text: str, expected: str) -> float:
    value = _number(text)
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    if value > LAMBDA_MAX:
        raise argparse.ArgumentTypeError(
            f"{text} is too large: above float32's largest number ({LAMBDA_MAX:.3g}) the shifts overflow to inf"
        )
    return value


def positive_number(text: str) -> float:
    """A lambda2: a number in (0, float32 max]."""
    return _lambda(text, "a positive number")


def lambda1_value(text: str) -> float | str:
    """A lambda1: a number in (0, float32 max], or "auto"."""
    return text if text == "auto" else _lambda(text, "a positive number or 'auto'")


def fraction(text: str) -> float:
    """A number in [0, 1] (t_mix)."""
    value = _number(text)
    if value is None or not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _integer(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (epochs)."""
    return _integer(text, 1, "a positive integer")


def seed_value(text: str) -> int:
    """An integer in [0, 2**63) (seeds of torch and numpy)."""
    value = _integer(text, 0, "an integer >= 0")
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer below 2**63, got {text!r}")
    return value


def class_index(text: str) -> int:
    """A class index: an integer >= 0."""
    return _integer(text, 0, "a class index (an integer >= 0)")


def add_forget_options(parser: argparse.ArgumentParser) -> None:
    """The options of a forget (classes, lambdas, mode, engine): demo, forget and the torchrun job."""
    parser.add_argument("--forget", type=class_index, nargs="+", default=[0], metavar="CLASS",
                        help="classes to forget")
    parser.add_argument("--lambda1", type=lambda1_value, metavar="L1",
                        help="gain, or 'auto' to choose it from the codes (default: per model)")
    parser.add_argument("--lambda2", type=positive_number, metavar="L2", help="cap of each tensor's largest shift")
    parser.add_argument("--mode", choices=("shift", "gaussian", "dampen"), default="shift",
                        help="dampen: scale the class's weights down (lambda1 the threshold, default auto; "
                             "lambda2 SSD's lam, default 1)")
    parser.add_argument("--engine", choices=("auto", "reference"), default="auto",
                        help="auto: fused kernels where available; reference: pure PyTorch")
    parser.add_argument("--accept-flagged", action="store_true",
                        help=f"save the forgotten model even when the verdict flags it (else: nothing saved, "
                             f"exit code {FLAGGED})")


#: The exit code of a forget whose verdict flags the result (mnemo_fast/verdict.py), unless
#: --accept-flagged: nothing of the forgotten model is saved.
FLAGGED = 3


def refuse_flagged(result: ForgetResult, args) -> int | None:
    """``FLAGGED`` (after one line on stderr) when the verdict flags ``result`` and the command
    line did not accept it; None when the forgotten model may be saved."""
    if not result.flagged:
        return None
    if args.accept_flagged:
        print(f"mnemo-fast: note: the result is flagged ({'; '.join(result.verdict.reasons)}); saved as "
              f"--accept-flagged asks", file=sys.stderr)
        return None
    print(f"mnemo-fast: flagged: {'; '.join(result.verdict.reasons)}; the forgotten model is not saved "
          f"(--accept-flagged saves it anyway; lambda1 'auto' or other lambdas may do better)", file=sys.stderr)
    return FLAGGED


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="mnemo-fast", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (accepted anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="train with codes, forget, print before/after")
    demo.add_argument("--data", choices=data.DATASETS, default="digits")
    demo.add_argument("--model", choices=models.MODELS, default="mlp")
    demo.add_argument("--epochs", type=positive_int, metavar="N", help="default: 40 (digits), 5 (fashion-mnist)")
    demo.add_argument("--t-mix", type=fraction, default=0.1, metavar="P")
    demo.add_argument("--seed", type=seed_value, default=0)
    demo.add_argument("--out", type=Path, default=Path("runs/demo"),
                      help="directory (created if missing) for the trained model, its codes and the forgotten model")
    add_forget_options(demo)

    fg = sub.add_parser("forget", help="forget classes of a saved model (from its codes only)")
    fg.add_argument("checkpoint", type=Path)
    fg.add_argument("codes", type=Path)
    fg.add_argument("--output", type=Path, required=True,
                    help="file to write; its directory must exist")
    add_forget_options(fg)

    ev = sub.add_parser("evaluate", help="per-class accuracy of a saved model")
    ev.add_argument("checkpoint", type=Path)
    ev.add_argument("--data", choices=data.DATASETS, default="digits")
    ev.add_argument("--forget", type=class_index, nargs="*", default=[], metavar="CLASS")
    sub.add_parser("experiment", add_help=False,
                   help="baselines vs the method on real data (see `mnemo-fast experiment --help`)")
    return parser


def format_table(before: Evaluation, after: Evaluation | None, forget_classes: list[int]) -> str:
    """A per-class before/after accuracy table (percent)."""
    lines = ["class   before   after" if after else "class   accuracy"]
    for c, acc in sorted(before.per_class.items()):
        mark = "  (forget)" if c in forget_classes else ""
        row = f"{c:>5}   {100 * acc:6.1f}"
        if after:
            row += f"   {100 * after.per_class.get(c, float('nan')):5.1f}"
        lines.append(row + mark)
    for label, attr in (("forget", "forget_accuracy"), ("retain", "retain_accuracy")):
        row = f"{label:>6}  {100 * getattr(before, attr):6.1f}"
        if after:
            row += f"   {100 * getattr(after, attr):5.1f}"
        lines.append(row)
    return "\n".join(lines)


def forget_lambdas(args, model_name: str) -> tuple[float | str, float]:
    """(lambda1, lambda2) from the command line, each defaulting to the model's; with
    ``--lambda1 auto``, lambda2 defaults to the calibration's own (``forget``'s default); with
    ``--mode dampen``, lambda1 defaults to auto and lambda2 to the dampening's lam."""
    if getattr(args, "mode", "shift") == "dampen":
        return (("auto" if args.lambda1 is None else args.lambda1),
                (DEFAULT_LAM if args.lambda2 is None else args.lambda2))
    lambda1, lambda2 = DEFAULT_LAMBDAS.get(model_name, DEFAULT_LAMBDAS["mlp"])
    lambda1 = lambda1 if args.lambda1 is None else args.lambda1
    if args.lambda2 is None and lambda1 == "auto":
        lambda2 = DEFAULT_LAMBDA2
    return lambda1, lambda2 if args.lambda2 is None else args.lambda2


def _run_forget(model, codes, args, model_name: str) -> tuple[ForgetResult, list[str]]:
    """The method on ``model`` and what it warned (a :class:`ForgetWarning`: the codes say it
    may not have worked); its refusals (and a non-finite result) become a UserError."""
    lambda1, lambda2 = forget_lambdas(args, model_name)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ForgetWarning)
            result = forget(
                model, codes, args.forget, lambda1=lambda1, lambda2=lambda2,
                mode=args.mode,
                engine=REFERENCE if args.engine == "reference" else None,
            )
    except (ValueError, TypeError) as error:  # UnlearningError is a ValueError
        raise UserError(f"cannot forget: {error}") from error
    for other in caught:  # anything else is shown as Python would have shown it
        if not issubclass(other.category, ForgetWarning):
            warnings.showwarning(other.message, other.category, other.filename, other.lineno)
    said = [str(w.message) for w in caught if issubclass(w.category, ForgetWarning)]
    bad = [name for name, t in result.model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise UserError(
            f"forgetting with lambda1={lambda1}, lambda2={lambda2} made {len(bad)} tensor(s) NaN or inf "
            f"(first: {bad[0]}); nothing saved: try smaller lambdas"
        )
    return result, said


def _say(warned: list[str]) -> None:
    """forget's warnings, one line each on stderr after the summary (``--lambda1 auto`` spelled as here)."""
    sys.stdout.flush()
    for message in warned:
        message = message.replace("lambda1='auto'", "--lambda1 auto")
        print(f"mnemo-fast: warning: {message}", file=sys.stderr)
    sys.stderr.flush()


def _load_model(path: Path):
    """(model, metadata, input shape, number of classes) of a checkpoint, or a UserError."""
    try:
        model, meta = models.load_checkpoint(path)
    except (ValueError, OSError) as error:  # CheckpointError, FileNotFoundError, PermissionError
        raise UserError(str(error)) from error
    return model, meta, tuple(json.loads(meta["input_shape"])), int(meta["num_classes"])


def _load_codes(path: Path) -> MnemonicCodes:
    try:
        return MnemonicCodes.load(path)
    except (ValueError, OSError) as error:  # CodesFileError, FileNotFoundError, PermissionError
        raise UserError(str(error)) from error


def _load_data(name: str):
    try:
        return data.load(name)
    except (ValueError, OSError) as error:  # Fashion-MNIST not installed, or not IDX files
        raise UserError(str(error)) from error


def _check_output(option: str, path: Path) -> None:
    """Refuse an output file that cannot be written, before any work: its directory must exist."""
    if path.is_dir():
        raise UserError(f"{option} {path}: is a directory; name a file")
    parent = path.parent
    if not parent.exists():
        raise UserError(f"{option} {path}: the directory {parent} does not exist (create it first)")
    if not parent.is_dir():
        raise UserError(f"{option} {path}: {parent} is not a directory")


def _make_out_dir(path: Path) -> None:
    """Create the demo's output directory (and its parents) before any work."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file in the way, no permission
        raise UserError(f"--out {path}: cannot create the directory ({error.strerror or error})") from error


def _save(what, path: Path, **meta) -> None:
    """Write a model checkpoint or codes through a temporary file: no half-written file on failure."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        if isinstance(what, MnemonicCodes):
            what.save(tmp)
        else:
            models.save_checkpoint(what, tmp, **meta)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path} ({error.strerror or error})") from error


def describe_result(result: ForgetResult) -> str:
    """One line on a forget: the sign or draw, the lambdas, the backend, the time, the code
    accuracies, the verdict."""
    sign = f"sign {result.sign:+d}" if result.sign is not None else "gaussian draw"
    verdict = "" if result.verdict is None else f"; verdict: {'flagged' if result.flagged else 'clean'}"
    return (
        f"forgot with {sign} (lambda1={result.lambda1:g}, lambda2={result.lambda2:g}, "
        f"backend={result.backend}) in {result.seconds:.3f} s; codes: forget acc "
        f"{result.code_accuracy_before.forget:.2f} -> {result.code_accuracy_after.forget:.2f}, "
        f"retain acc {result.code_accuracy_before.retain:.2f} -> {result.code_accuracy_after.retain:.2f}{verdict}"
    )


def demo(args) -> int:
    _make_out_dir(args.out)
    torch.manual_seed(args.seed)
    train, test = _load_data(args.data)
    input_shape, num_classes = tuple(train.tensors[0].shape[1:]), data.num_classes(train)
    epochs = args.epochs if args.epochs is not None else (40 if args.data == "digits" else 5)
    unknown = sorted(set(c for c in args.forget if c >= num_classes))
    if unknown or len(set(args.forget)) == num_classes:  # known before training: refuse now
        raise UserError(f"--forget {' '.join(map(str, unknown or sorted(set(args.forget))))}: "
                        f"{args.data} has classes 0..{num_classes - 1}, and at least one must remain")
    codes = MnemonicCodes.generate(num_classes, input_shape, seed=args.seed)
    model = models.build(args.model, input_shape, num_classes)
    print(f"training {args.model} on {args.data} ({len(train)} samples) with codes, "
          f"t_mix={args.t_mix}, {epochs} epochs; backend: {backend()}")
    train_with_codes(model, train, codes, args.t_mix, epochs, seed=args.seed)
    meta = dict(name=args.model, input_shape=input_shape, num_classes=num_classes, data=args.data)
    _save(model, args.out / "model.safetensors", **meta)  # kept even if forgetting fails:
    _save(codes, args.out / "codes.safetensors")          # `mnemo-fast forget` can retry
    before = evaluate(model, test, args.forget)
    result, warned = _run_forget(model, codes, args, args.model)
    after = evaluate(result.model, test, args.forget)
    print(f"test accuracy on {args.data}, forgetting classes {args.forget}:")
    print(format_table(before, after, args.forget))
    print(describe_result(result))
    _say(warned)
    refused = refuse_flagged(result, args)
    if refused is not None:
        print(f"saved model.safetensors and codes.safetensors in {args.out}")
        return refused
    _save(result.model, args.out / "forgotten.safetensors", **meta)
    print(f"saved model.safetensors, codes.safetensors and forgotten.safetensors in {args.out}")
    return 0


def forget_command(args) -> int:
    _check_output("--output", args.output)
    model, meta, input_shape, num_classes = _load_model(args.checkpoint)
    codes = _load_codes(args.codes)
    if codes.shape != input_shape or codes.num_classes != num_classes:
        raise UserError(
            f"{args.codes} does not fit {args.checkpoint}: codes of shape {list(codes.shape)} for "
            f"{codes.num_classes} classes, a model for inputs {list(input_shape)} and {num_classes} classes"
        )
    result, warned = _run_forget(model, codes, args, meta["model"])
    print(describe_result(result))
    _say(warned)
    refused = refuse_flagged(result, args)
    if refused is not None:
        return refused
    _save(result.model, args.output, name=meta["model"], input_shape=input_shape,
          num_classes=num_classes, forgotten=" ".join(map(str, args.forget)))
    print(f"saved {args.output}")
    return 0


def evaluate_command(args) -> int:
    model, _, input_shape, num_classes = _load_model(args.checkpoint)
    _, test = _load_data(args.data)
    data_shape, data_classes = tuple(test.tensors[0].shape[1:]), data.num_classes(test)
    if data_shape != input_shape or data_classes > num_classes:
        raise UserError(
            f"{args.checkpoint} is a model for inputs {list(input_shape)} and {num_classes} classes; "
            f"--data {args.data} has inputs {list(data_shape)} and {data_classes} classes"
        )
    unknown = sorted(set(c for c in args.forget if c >= num_classes))
    if unknown:
        raise UserError(f"--forget {' '.join(map(str, unknown))}: the model has classes 0..{num_classes - 1}")
    print(format_table(evaluate(model, test, args.forget), None, args.forget))
    return 0


COMMANDS = {"demo": demo, "forget": forget_command, "evaluate": evaluate_command}


def _one_line(error: BaseException) -> str:
    """An error's message on one line (torch appends C++ stack traces to some messages)."""
    lines = []
    for line in str(error).splitlines():
        if line.startswith("Exception raised from"):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code.

    A user error (bad option, bad file, data that do not fit the model, the method's refusal)
    prints one line ``mnemo-fast: error: ...`` on stderr and returns 2; ``--debug`` (anywhere
    on the line) adds the traceback. Anything else is a bug: its traceback shows, exit code 1.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        if argv[:1] == ["experiment"]:  # the experiment runner has its own options
            from .evaluation.experiment import main as experiment_main

            try:
                return experiment_main(argv[1:], parser_class=OneLineParser)
            except FileNotFoundError as error:  # Fashion-MNIST not installed
                raise UserError(str(error)) from error
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UserError as error:
        if debug:
            traceback.print_exc()
        print(f"mnemo-fast: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # argparse: --help (0) or a bad option (2, one line already printed)
        return 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 2


if __name__ == "__main__":
    sys.exit(main())
