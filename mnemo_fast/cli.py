"""``mnemo-fast``: train with codes and forget (demo), forget a saved model, evaluate one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .evaluation import data, models
from .codes import MnemonicCodes
from .engines import backend
from .evaluation import Evaluation, evaluate
from .method import ForgetResult, forget
from .reference.engine import REFERENCE
from .train import train_with_codes

#: lambda1, lambda2 that forget class 0 on the demo's models (see benchmarks/UNLEARNING.md).
DEFAULT_LAMBDAS = {"mlp": (1e-3, 10.0), "cnn": (1e-2, 10.0), "resnet18": (1e-2, 10.0)}


def _lambda1(text: str) -> float | str:
    return text if text == "auto" else float(text)


def _add_forget_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--forget", type=int, nargs="+", default=[0], help="classes to forget")
    parser.add_argument("--lambda1", type=_lambda1, help="gain, or 'auto' to choose it from the codes (default: per model)")
    parser.add_argument("--lambda2", type=float, help="cap of each tensor's largest shift")
    parser.add_argument("--mode", choices=("shift", "gaussian"), default="shift")
    parser.add_argument("--engine", choices=("auto", "reference"), default="auto",
                        help="auto: fused kernels where available; reference: pure PyTorch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnemo-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train with codes, forget, print before/after")
    demo.add_argument("--data", choices=data.DATASETS, default="digits")
    demo.add_argument("--model", choices=models.MODELS, default="mlp")
    demo.add_argument("--epochs", type=int, help="default: 40 (digits), 5 (fashion-mnist)")
    demo.add_argument("--t-mix", type=float, default=0.1)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", type=Path, default=Path("runs/demo"),
                      help="where the trained model, its codes and the forgotten model go")
    _add_forget_options(demo)

    fg = sub.add_parser("forget", help="forget classes of a saved model (from its codes only)")
    fg.add_argument("checkpoint", type=Path)
    fg.add_argument("codes", type=Path)
    fg.add_argument("--output", type=Path, required=True)
    _add_forget_options(fg)

    ev = sub.add_parser("evaluate", help="per-class accuracy of a saved model")
    ev.add_argument("checkpoint", type=Path)
    ev.add_argument("--data", choices=data.DATASETS, default="digits")
    ev.add_argument("--forget", type=int, nargs="*", default=[])
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
    """(lambda1, lambda2) from the command line, each defaulting to the model's."""
    lambda1, lambda2 = DEFAULT_LAMBDAS.get(model_name, DEFAULT_LAMBDAS["mlp"])
    return (lambda1 if args.lambda1 is None else args.lambda1,
            lambda2 if args.lambda2 is None else args.lambda2)


def _run_forget(model, codes, args, model_name: str) -> ForgetResult:
    lambda1, lambda2 = forget_lambdas(args, model_name)
    return forget(
        model, codes, args.forget, lambda1=lambda1, lambda2=lambda2,
        mode=args.mode,
        engine=REFERENCE if args.engine == "reference" else None,
    )


def _describe(result: ForgetResult) -> str:
    sign = f"sign {result.sign:+d}" if result.sign is not None else "gaussian draw"
    return (
        f"forgot with {sign} (lambda1={result.lambda1:g}, lambda2={result.lambda2:g}, "
        f"backend={result.backend}) in {result.seconds:.3f} s; codes: forget acc "
        f"{result.code_accuracy_before.forget:.2f} -> {result.code_accuracy_after.forget:.2f}, "
        f"retain acc {result.code_accuracy_before.retain:.2f} -> {result.code_accuracy_after.retain:.2f}"
    )


def demo(args) -> int:
    torch.manual_seed(args.seed)
    train, test = data.load(args.data)
    input_shape, num_classes = tuple(train.tensors[0].shape[1:]), data.num_classes(train)
    epochs = args.epochs or (40 if args.data == "digits" else 5)
    codes = MnemonicCodes.generate(num_classes, input_shape, seed=args.seed)
    model = models.build(args.model, input_shape, num_classes)
    print(f"training {args.model} on {args.data} ({len(train)} samples) with codes, "
          f"t_mix={args.t_mix}, {epochs} epochs; backend: {backend()}")
    train_with_codes(model, train, codes, args.t_mix, epochs, seed=args.seed)
    before = evaluate(model, test, args.forget)
    result = _run_forget(model, codes, args, args.model)
    after = evaluate(result.model, test, args.forget)
    print(f"test accuracy on {args.data}, forgetting classes {args.forget}:")
    print(format_table(before, after, args.forget))
    print(_describe(result))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(name=args.model, input_shape=input_shape, num_classes=num_classes, data=args.data)
    models.save_checkpoint(model, args.out / "model.safetensors", **meta)
    models.save_checkpoint(result.model, args.out / "forgotten.safetensors", **meta)
    codes.save(args.out / "codes.safetensors")
    print(f"saved model.safetensors, codes.safetensors and forgotten.safetensors in {args.out}")
    return 0


def forget_command(args) -> int:
    model, meta = models.load_checkpoint(args.checkpoint)
    codes = MnemonicCodes.load(args.codes)
    result = _run_forget(model, codes, args, meta["model"])
    models.save_checkpoint(result.model, args.output, **{
        "name": meta["model"], "input_shape": tuple(codes.shape),
        "num_classes": codes.num_classes, "forgotten": " ".join(map(str, args.forget)),
    })
    print(_describe(result))
    print(f"saved {args.output}")
    return 0


def evaluate_command(args) -> int:
    model, _ = models.load_checkpoint(args.checkpoint)
    _, test = data.load(args.data)
    print(format_table(evaluate(model, test, args.forget), None, args.forget))
    return 0


COMMANDS = {"demo": demo, "forget": forget_command, "evaluate": evaluate_command}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["experiment"]:  # the experiment runner has its own options
        from .evaluation.experiment import main as experiment_main

        return experiment_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        print(f"mnemo-fast: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
