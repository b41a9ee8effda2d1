"""The Fisher diagonal on Hugging Face ``transformers`` classifiers: fast path vs reference vs floor.

Run: python benchmarks/bench_hf.py [--layers 4 --width 256 --seq-len 128 --n 32 --threads 1] [--out benchmarks/HF.md]
Each family is built from a config (:mod:`mnemo_fast.evaluation.hf_models`, random weights,
no download). Per family, one run, the same inputs for every method: a plain batched
forward+backward (the floor), ``mnemo_fast.fisher_diagonal``, ``mnemo_fast.reference.fisher_diagonal``
and, where installed (``make bench``) and where they run, Opacus (``GradSampleModule``,
per-sample gradients squared and summed) and BackPACK (``SumGradSquared``). Every result is
checked against the reference before anything is timed; the methods are timed in interleaved
rounds (plain, fast, reference, ... then again), so load on a shared machine hits them alike.
Also: how many parameters the fast path sends to the generic per-sample path (and which); the
peak CPU memory of the fast Fisher at N and 2N (a Fisher whose memory does not depend on N
holds the same peak at both) and of the reference and Opacus at N.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

import bench_models as bm
import mnemo_fast
import mnemo_fast.reference
from mnemo_fast.evaluation.compare import max_relative_error
from mnemo_fast.evaluation.hf_models import FAMILIES, build
from mnemo_fast.evaluation.memory import peak_allocated_bytes
from mnemo_fast.fast.plan import make_plan
from mnemo_fast.modeling import logits_of, trainable_parameters


def interleaved_medians(fns: dict, rounds: int) -> dict:
    """name -> median seconds over ``rounds`` rounds, each round timing every fn once in turn
    (after one warm-up call each): shared-machine load falls on all of them alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def plain_step(model, x, y):
    def run():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).logits, y, reduction="sum").backward()
    return run


def as_mean(sums_fn, n: int):
    """A callable returning ``sums_fn()`` divided by ``n``: the mean, as ``fisher_diagonal``."""
    return lambda: {name: value / n for name, value in sums_fn().items()}


def _first_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return text[:90] + ("..." if len(text) > 90 else "")


def bench_family(family: str, args) -> dict:
    hf = build(family, layers=args.layers, width=args.width, heads=args.heads, seq_len=args.seq_len,
               vocab=args.vocab, image=args.image, num_classes=10)
    generator = torch.Generator().manual_seed(0)
    x = hf.inputs(args.n, generator)
    y = torch.randint(0, hf.num_classes, (args.n,), generator=generator)
    model = hf.model
    params = trainable_parameters(model)
    plan = make_plan(model, params, x[:1], y[:1], logits_of)
    fast = lambda: mnemo_fast.fisher_diagonal(model, x, y)  # noqa: E731
    ref = lambda: mnemo_fast.reference.fisher_diagonal(model, x, y)  # noqa: E731
    expected = ref()
    error = max_relative_error(fast(), expected)
    fns = {"plain": plain_step(model, x, y), "fast": fast, "reference": ref}
    others, worst = {}, {}
    for label, build_fn in (("opacus", bm.opacus_sums), ("backpack", bm.backpack_sums)):
        try:
            run = as_mean(build_fn(model, x, y, logits_of), len(x))
            got = run()
            others[label] = max_relative_error(got, expected)
            worst[label] = max(expected, key=lambda k: max_relative_error({k: got[k]}, {k: expected[k]}))
            fns[label] = run
        except ImportError:
            others[label] = "not installed"
        except Exception as exc:  # noqa: BLE001 - reported as "does not run: why"
            others[label] = _first_line(exc)
    times = interleaved_medians(fns, args.repeats)
    row = {
        "family": family,
        "params": sum(p.numel() for p in params.values()),
        "tensors": len(params),
        "generic": list(plan.generic),
        "error": error,
        **times,
        "others": others,
        "worst": worst,
    }
    model.zero_grad(set_to_none=True)
    x2 = hf.inputs(2 * args.n, generator)
    y2 = torch.randint(0, hf.num_classes, (2 * args.n,), generator=generator)
    row["peak_n"] = peak_allocated_bytes(fast)[1]
    row["peak_2n"] = peak_allocated_bytes(lambda: mnemo_fast.fisher_diagonal(model, x2, y2))[1]
    row["peak_ref"] = peak_allocated_bytes(ref)[1]
    row["peak_opacus"] = peak_allocated_bytes(fns["opacus"])[1] if "opacus" in fns else None
    return row


def _other(r: dict, label: str) -> str:
    value = r["others"][label]
    if isinstance(value, str):
        return f"does not run ({value})" if value != "not installed" else "not installed"
    if value > 1e-3:  # not rounding: a wrong Fisher
        return f"WRONG: error {value:.1e} (worst `{r['worst'][label]}`), {r[label] * 1e3:.1f} ms"
    return f"{r[label] * 1e3:.1f} ms ({r[label] / r['fast']:.2f}x fast; err {value:.0e})"


def table(rows: list[dict], args) -> list[str]:
    lines = [
        f"N = {args.n} codes, {args.layers} layers, width {args.width}, heads {args.heads}, "
        f"T = {args.seq_len} tokens (text) / {args.image}x{args.image} images, float32; medians of "
        f"{args.repeats} interleaved rounds after one warm-up call each.",
        "",
        "| model | parameters | plain fwd+bwd | mnemo_fast | reference | fast / plain | reference / fast | "
        "generic tensors | max rel. err (a) | peak MiB: fast at N / 2N, reference, Opacus (b) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        opacus = f"{r['peak_opacus'] / 2**20:.0f}" if r["peak_opacus"] is not None else "-"
        lines.append(
            f"| {r['family']} | {r['params'] / 1e6:.2f}M | {r['plain'] * 1e3:.1f} ms | {r['fast'] * 1e3:.1f} ms | "
            f"{r['reference'] * 1e3:.1f} ms | {r['fast'] / r['plain']:.2f}x | {r['reference'] / r['fast']:.2f}x | "
            f"{len(r['generic'])} of {r['tensors']} | {r['error']:.1e} | "
            f"{r['peak_n'] / 2**20:.0f} / {r['peak_2n'] / 2**20:.0f}, {r['peak_ref'] / 2**20:.0f}, {opacus} |"
        )
    lines += ["", "(a) per tensor, relative to its largest entry floored at 1e-6 of the model's largest "
              "(a tensor whose true Fisher is zero, like attention key biases, holds rounding noise only).",
              "(b) peak CPU allocation of the whole call without `chunk_size`: the batched pass's activations "
              "grow with N, as a plain forward+backward's do; `chunk_size` bounds them "
              "(docs/USAGE.md, \"Large models\").",
              "", "Side by side (same inputs, same rounds; error relative to the reference as in (a)):", "",
              "| model | Opacus | BackPACK |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {_other(r, 'opacus')} | {_other(r, 'backpack')} |")
    generic = [r for r in rows if r["generic"]]
    if generic:
        lines += ["", "Parameters on the generic per-sample path:", ""]
        for r in generic:
            shown = ", ".join(f"`{name}`" for name in r["generic"][:6])
            more = f" and {len(r['generic']) - 6} more" if len(r["generic"]) > 6 else ""
            lines.append(f"- {r['family']}: {shown}{more}")
    return lines


def _child_argv(args) -> list[str]:
    """The sizes and settings of this run, for a per-family child process."""
    out = []
    for name in ("layers", "width", "heads", "seq_len", "image", "vocab", "n", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=None, help="write the markdown table here")
    parser.add_argument("--row-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.row_json:  # one family in this process (see below), its row to a file
        (family,) = args.families
        with open(args.row_json, "w") as handle:
            json.dump(bench_family(family, args), handle)
        return
    rows = []
    for family in args.families:
        # One process per family: what a family's run leaves behind (Opacus's hooks and
        # per-sample gradients, allocator caches) does not add up over eleven models.
        print(f"{family}...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "row.json")
            command = [sys.executable, __file__, *_child_argv(args), "--families", family, "--row-json", out]
            subprocess.run(command, check=True)
            with open(out) as handle:
                rows.append(json.load(handle))
    import transformers

    header = [
        f"# Fisher diagonal on `transformers` classifiers ({datetime.date.today()}, benchmarks/bench_hf.py)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}, transformers {transformers.__version__}; backend "
        f"{mnemo_fast.backend()}. One run: ratios are within this run.",
        "",
    ]
    text = "\n".join(header + table(rows, args)) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
