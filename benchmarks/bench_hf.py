"""The Fisher diagonal on Hugging Face ``transformers`` classifiers: fast path vs reference vs floor.

Run: python benchmarks/bench_hf.py [--layers 4 --width 256 --seq-len 128 --n 32] [--out benchmarks/HF.md]
Each family is built from a config (:mod:`mnemo_fast.evaluation.hf_models`, random weights,
no download). Per family, one run, the same inputs for every method: a plain batched
forward+backward (the floor), ``mnemo_fast.fisher_diagonal`` and
``mnemo_fast.reference.fisher_diagonal``; the fast result is checked against the reference
before anything is timed; how many parameters the fast path sends to the generic per-sample
path (and which); the peak CPU memory of the fast Fisher at N and 2N (a Fisher whose memory does
not depend on N holds the same peak at both).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import mnemo_fast
import mnemo_fast.reference
from mnemo_fast.evaluation.hf_models import FAMILIES, build
from mnemo_fast.evaluation.memory import peak_allocated_bytes
from mnemo_fast.fast.plan import make_plan
from mnemo_fast.reference import fisher as ref_fisher


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plain_step(model, x, y):
    def run():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).logits, y, reduction="sum").backward()
    return run


def max_relative_error(fast: dict, ref: dict) -> float:
    """Largest per-tensor max |fast - ref| / max |ref|, with max |ref| floored at 1e-6 of the
    model's largest entry: a tensor whose true Fisher is zero (attention key biases: the
    softmax ignores them) holds rounding noise in both, and compares as zero."""
    scale = max(float(v.abs().max()) for v in ref.values())
    return max(float((fast[k] - ref[k]).abs().max()) / max(float(ref[k].abs().max()), 1e-6 * scale) for k in ref)


def bench_family(family: str, args) -> dict:
    hf = build(family, layers=args.layers, width=args.width, heads=args.heads, seq_len=args.seq_len,
               vocab=args.vocab, image=args.image, num_classes=10)
    generator = torch.Generator().manual_seed(0)
    x = hf.inputs(args.n, generator)
    y = torch.randint(0, hf.num_classes, (args.n,), generator=generator)
    model = hf.model
    params = ref_fisher.trainable_parameters(model)
    plan = make_plan(model, params, x[:1], y[:1], ref_fisher.logits_of)
    fast = lambda: mnemo_fast.fisher_diagonal(model, x, y)  # noqa: E731
    ref = lambda: mnemo_fast.reference.fisher_diagonal(model, x, y)  # noqa: E731
    error = max_relative_error(fast(), ref())
    row = {
        "family": family,
        "params": sum(p.numel() for p in params.values()),
        "tensors": len(params),
        "generic": list(plan.generic),
        "error": error,
        "plain": median_seconds(plain_step(model, x, y), args.repeats),
        "fast": median_seconds(fast, args.repeats),
        "reference": median_seconds(ref, max(1, args.repeats // 2)),
    }
    model.zero_grad(set_to_none=True)
    x2 = hf.inputs(2 * args.n, generator)
    y2 = torch.randint(0, hf.num_classes, (2 * args.n,), generator=generator)
    row["peak_n"] = peak_allocated_bytes(fast)[1]
    row["peak_2n"] = peak_allocated_bytes(lambda: mnemo_fast.fisher_diagonal(model, x2, y2))[1]
    return row


def table(rows: list[dict], args) -> list[str]:
    lines = [
        f"N = {args.n} codes, {args.layers} layers, width {args.width}, heads {args.heads}, "
        f"T = {args.seq_len} tokens (text) / {args.image}x{args.image} images, float32, median of "
        f"{args.repeats} (reference: {max(1, args.repeats // 2)}) after one warm-up.",
        "",
        "| model | parameters | plain fwd+bwd | mnemo_fast | reference | fast / plain | reference / fast | "
        "generic tensors | max rel. err (a) | fast peak MiB at N / 2N (b) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['params'] / 1e6:.2f}M | {r['plain'] * 1e3:.1f} ms | {r['fast'] * 1e3:.1f} ms | "
            f"{r['reference'] * 1e3:.1f} ms | {r['fast'] / r['plain']:.2f}x | {r['reference'] / r['fast']:.2f}x | "
            f"{len(r['generic'])} of {r['tensors']} | {r['error']:.1e} | "
            f"{r['peak_n'] / 2**20:.1f} / {r['peak_2n'] / 2**20:.1f} |"
        )
    lines += ["", "(a) per tensor, relative to its largest entry floored at 1e-6 of the model's largest "
              "(a tensor whose true Fisher is zero, like attention key biases, holds rounding noise only).",
              "(b) peak CPU allocation of the whole call without `chunk_size`: the batched pass's activations "
              "grow with N, as a plain forward+backward's do; `chunk_size` bounds them (README, Large models)."]
    generic = [r for r in rows if r["generic"]]
    if generic:
        lines += ["", "Parameters on the generic per-sample path:", ""]
        for r in generic:
            shown = ", ".join(f"`{name}`" for name in r["generic"][:6])
            more = f" and {len(r['generic']) - 6} more" if len(r["generic"]) > 6 else ""
            lines.append(f"- {r['family']}: {shown}{more}")
    return lines


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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    rows = []
    for family in args.families:
        print(f"{family}...", file=sys.stderr, flush=True)
        rows.append(bench_family(family, args))
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
