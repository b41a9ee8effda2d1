"""GPU timings of the CUDA ops and of a whole `forget`, as a Markdown table.

Each op against its pure-PyTorch twin (mnemo_fast.fast.ops.TWINS) on the same GPU, and
`forget` on the fast engine against the reference engine and one plain forward+backward over
the same codes. CUDA events, median of --repeats runs after a warm-up.

The Linear paths' crossover table (what mnemo_fast.fast.dispatch's CUDA thresholds wait for):
the fused kernel against chunked-bmm (per-sample gradients by a batched GEMM, the chunk the
rule gives from the free memory), run alternately on the same input, at T = 16, 64, 128, 197,
512, in float32 with TF32 off and on (torch.set_float32_matmul_precision "highest" / "high")
and in bf16; written into bench.md and, with --linear-out, a file of its own (gpu_check.sh
adds it to summary.md).
usage: python .ci/gpu_bench.py [--out FILE] [--repeats 10] [--linear-out FILE] [--only linear]
MNEMO_GPU_CHECK_DEVICE=cpu dry-runs it without a GPU (the CPU kernels; no TF32 there), e.g.
  MNEMO_GPU_CHECK_DEVICE=cpu python .ci/gpu_bench.py --only linear --linear-n 4 --linear-ts 2 5 --linear-widths 16x8
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F

import mnemo_fast as mf
import mnemo_fast.reference
from mnemo_fast.evaluation.compare import max_relative_error
from mnemo_fast.fast import _ext, dispatch, ops
from mnemo_fast.fast.ops import TWINS as ref
from mnemo_fast.reference.engine import REFERENCE

# MNEMO_GPU_CHECK_DEVICE=cpu dry-runs the script on a machine without a GPU.
CUDA = torch.device(os.environ.get("MNEMO_GPU_CHECK_DEVICE", "cuda"))


def timed(fn, repeats):
    fn()
    if CUDA.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def op_cases():
    r = lambda *s: torch.randn(*s, device=CUDA)  # noqa: E731
    g, x = r(256, 1, 1024), r(256, 1, 1024)
    yield "sum_sq_grad_linear T=1 256x1024x1024", lambda: ops.sum_sq_grad_linear(g, x), lambda: ref.sum_sq_grad_linear(g, x)
    g2, x2 = r(64, 197, 768), r(64, 197, 768)
    yield "sum_sq_grad_linear T=197 64x768x768", lambda: ops.sum_sq_grad_linear(g2, x2), lambda: ref.sum_sq_grad_linear(g2[:8], x2[:8])
    x4, g4 = r(64, 64, 32, 32), r(64, 64, 32, 32)
    args = ([3, 3], [1, 1], [1, 1], [1, 1], 1)
    yield "sum_sq_grad_conv2d 64x64x32x32 3x3", lambda: ops.sum_sq_grad_conv2d(g4, x4, *args), lambda: ref.sum_sq_grad_conv2d(g4[:8], x4[:8], *args)
    sizes = [1 << 20] * 11 + [512] * 100
    f = [torch.rand(n, device=CUDA) for n in sizes]
    rm = [torch.rand(n, device=CUDA) for n in sizes]
    p = [torch.zeros(n, device=CUDA) for n in sizes]
    m = ops.perturb_max_ratio(f, rm)
    yield "perturb_max_ratio 11M elements, 111 tensors", lambda: ops.perturb_max_ratio(f, rm), lambda: ref.perturb_max_ratio(f, rm)
    yield "perturb_shift_ 11M elements, 111 tensors", lambda: ops.perturb_shift_(p, f, rm, m, 1e-3, 10.0, 1.0), lambda: ref.perturb_shift_(p, f, rm, m, 1e-3, 10.0, 1.0)
    gen = torch.Generator(CUDA.type).manual_seed(0)
    yield "perturb_gaussian_ 11M elements, 111 tensors", lambda: ops.perturb_gaussian_(p, f, rm, m, 1e-3, 10.0, 1.0, gen), lambda: ref.perturb_gaussian_(p, f, rm, m, 1e-3, 10.0, 1.0, gen)


LINEAR_TS = (16, 64, 128, 197, 512)
LINEAR_WIDTHS = ((768, 768), (768, 3072))  # (d_in, d_out): a transformer's attention and MLP shapes
#: (label, operand dtype, float32 matmul precision or None: left as it is)
LINEAR_PRECISIONS = (("float32, TF32 off", torch.float32, "highest"),
                     ("float32, TF32 on", torch.float32, "high"),
                     ("bf16", torch.bfloat16, None))


def alternate(fns: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Median milliseconds of each function, run in turn (one warm-up each): both see the same
    clocks and the same state of the allocator."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times[name].append(start.elapsed_time(end))
            else:
                start = time.perf_counter()
                fn()
                times[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(v) for name, v in times.items()}


def linear_rows(device: torch.device, repeats: int, n: int = 64, widths=LINEAR_WIDTHS, ts=LINEAR_TS,
                precisions=LINEAR_PRECISIONS):
    """One row per (width, precision, T): fused and chunked-bmm times, the chunk, the rule's
    pick and how far the two paths' results are apart."""
    fused_here = _ext.available() and (device.type == "cpu" or _ext.has_cuda_kernels(device))
    before = torch.get_float32_matmul_precision()
    gen = torch.Generator(device.type).manual_seed(0)
    try:
        for d_in, d_out in widths:
            for label, dtype, precision in precisions:
                if precision is not None:
                    torch.set_float32_matmul_precision(precision)
                for t in ts:
                    g = torch.randn(n, t, d_out, device=device, generator=gen).to(dtype)
                    x = torch.randn(n, t, d_in, device=device, generator=gen).to(dtype)
                    chunk = dispatch.linear_chunk(n, t, d_in, d_out, dtype, device.type, ops.free_bytes(device))
                    fns = {"chunked-bmm": lambda g=g, x=x, c=chunk: ops.chunked_sum_sq_grad_linear(g, x, c)}
                    if fused_here:
                        fns["fused"] = lambda g=g, x=x: ops.sum_sq_grad_linear(g, x)
                    ms = alternate(fns, device, repeats)
                    results = [fn() for fn in fns.values()]
                    apart = max_relative_error({"w": results[0]}, {"w": results[-1]})
                    picks = ops.linear_path(g, x, compiled=True).path
                    yield dict(d_in=d_in, d_out=d_out, precision=label, t=t, chunk=chunk, rule=picks,
                               apart=apart, fused=ms.get("fused"), chunked=ms["chunked-bmm"])
                    del g, x, results
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        torch.set_float32_matmul_precision(before)


def linear_table(rows, n: int) -> list[str]:
    """The crossover table as Markdown lines, and per (width, precision) the measured crossover."""
    rows = list(rows)
    lines = [f"Linear Fisher paths, N = {n}: fused kernel vs chunked-bmm (alternating, median ms; "
             "`apart`: max relative difference of the two results).", "",
             "| d_in -> d_out | precision | T | fused (ms) | chunked-bmm (ms) | chunk | fused / chunked | "
             "rule picks now | apart |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fused = "n/a" if r["fused"] is None else f"{r['fused']:.3f}"
        ratio = "" if r["fused"] is None else f"{r['fused'] / r['chunked']:.2f}"
        lines.append(f"| {r['d_in']} -> {r['d_out']} | {r['precision']} | {r['t']} | {fused} | "
                     f"{r['chunked']:.3f} | {r['chunk']} | {ratio} | {r['rule']} | {r['apart']:.1e} |")
    lines += ["", "Crossover (smallest T from which chunked-bmm is faster at every larger T measured):", ""]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["d_in"], r["d_out"], r["precision"]), []).append(r)
    for (d_in, d_out, precision), group in groups.items():
        found = None
        for r in sorted(group, key=lambda r: r["t"], reverse=True):
            if r["fused"] is None or r["chunked"] >= r["fused"]:
                break
            found = r["t"]
        where = "no fused kernel here" if group[0]["fused"] is None else (
            f"T >= {found}" if found is not None else "none: fused at every T measured")
        lines.append(f"- {d_in} -> {d_out}, {precision}: {where}")
    lines += ["", f"The rule now: CUDA_BMM_MIN_T = {dispatch.CUDA_BMM_MIN_T}, CUDA_MIN_CHUNK = "
              f"{dispatch.CUDA_MIN_CHUNK}, CUDA_FREE_FRACTION = {dispatch.CUDA_FREE_FRACTION} "
              "(mnemo_fast/fast/dispatch.py); fit them on this table."]
    return lines


def cnn(classes):
    """A small VGG-style CNN (conv, norm, linear layers: every fused rule of a vision model)."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64 * 8 * 8, 256), torch.nn.ReLU(), torch.nn.Linear(256, classes),
    )


def forget_cases(repeats):
    shape = (3, 32, 32)
    for classes in (10, 100):
        torch.manual_seed(0)
        model = cnn(classes).to(CUDA).eval()
        name = "CNN 3x32x32"
        codes = mf.MnemonicCodes.generate(classes, shape, seed=0)
        x = codes.tensor.reshape(-1, *shape).to(CUDA)
        y = torch.arange(classes).repeat_interleave(codes.tensor.shape[1]).to(CUDA)

        def plain():
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()

        def run(engine):
            return lambda: mf.forget(copy.deepcopy(model), codes, [0], lambda1=1e-3, lambda2=10, engine=engine)

        yield (f"forget {name}, {classes} classes", timed(plain, repeats), timed(run(None), repeats),
               timed(run(REFERENCE), max(1, repeats // 3)))


def hf_cases(repeats, families, n, layers, width, heads, seq_len, image):
    """The Fisher diagonal of Hugging Face classifiers built from configs (random weights):
    plain fwd+bwd, mnemo_fast, the reference, the error, and the tensors on the generic path."""
    from mnemo_fast.evaluation.hf_models import build
    from mnemo_fast.fast.plan import make_plan
    from mnemo_fast.modeling import logits_of, trainable_parameters

    for family in families:
        try:
            hf = build(family, num_classes=10, layers=layers, width=width, heads=heads, seq_len=seq_len,
                       vocab=1000, image=image)
            model = hf.model.to(CUDA)
            gen = torch.Generator().manual_seed(0)
            x = hf.inputs(n, gen).to(CUDA)
            y = torch.randint(0, 10, (n,), generator=gen).to(CUDA)
            params = trainable_parameters(model)
            plan = make_plan(model, params, x[:1], y[:1], logits_of)

            def plain():
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x).logits, y, reduction="sum").backward()

            fast = lambda: mf.fisher_diagonal(model, x, y)  # noqa: E731
            reference = lambda: mf.reference.fisher_diagonal(model, x, y)  # noqa: E731
            error = max_relative_error(fast(), reference())
            yield (family, sum(p.numel() for p in params.values()), len(params), len(plan.generic), error,
                   timed(plain, repeats), timed(fast, repeats), timed(reference, max(1, repeats // 3)))
        except Exception as exc:  # noqa: BLE001 - one family failing must not hide the others
            yield (family, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--hf-families", nargs="*", default=["bert", "gpt2", "llama", "vit", "convnext"])
    parser.add_argument("--hf-n", type=int, default=64)
    parser.add_argument("--hf-layers", type=int, default=4)
    parser.add_argument("--hf-width", type=int, default=768)
    parser.add_argument("--hf-heads", type=int, default=12)
    parser.add_argument("--hf-seq-len", type=int, default=128)
    parser.add_argument("--hf-image", type=int, default=64)
    parser.add_argument("--only", choices=["linear"], default=None, help="only the Linear paths' crossover table")
    parser.add_argument("--linear-out", default=None, help="also write the crossover table to this file")
    parser.add_argument("--linear-n", type=int, default=64)
    parser.add_argument("--linear-ts", type=int, nargs="*", default=list(LINEAR_TS))
    parser.add_argument("--linear-widths", nargs="*", default=[f"{a}x{b}" for a, b in LINEAR_WIDTHS],
                        help="d_in x d_out, e.g. 768x3072")
    args = parser.parse_args()
    where = torch.cuda.get_device_name() if CUDA.type == "cuda" else "CPU dry run"
    widths = [tuple(int(v) for v in w.split("x")) for w in args.linear_widths]
    try:  # first, and never in the way of the other tables
        linear = linear_table(linear_rows(CUDA, args.repeats, args.linear_n, widths, args.linear_ts), args.linear_n)
    except Exception as exc:  # noqa: BLE001
        linear = [f"The Linear paths' table failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"]
    linear = [f"## Linear paths ({where}, torch {torch.__version__})", ""] + linear
    print("\n".join(linear), flush=True)
    if args.linear_out:
        with open(args.linear_out, "w") as f:
            f.write("\n".join(linear) + "\n")
    if args.only == "linear":
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(linear) + "\n")
        return
    lines = [f"# GPU benchmarks ({where}, torch {torch.__version__})", "",
             "| op | mnemo_fast (ms) | reference twin (ms) |", "|---|---|---|"]
    for name, fast, twin in op_cases():
        lines.append(f"| {name} | {timed(fast, args.repeats):.3f} | {timed(twin, max(1, args.repeats // 3)):.3f} |")
    lines += ["", "Twins of the T=197 Linear and of the conv run on 8 of the samples (all would not fit).", "",
              "| call | plain fwd+bwd (ms) | forget, fast (ms) | forget, reference (ms) |", "|---|---|---|---|"]
    for name, plain, fast, reference in forget_cases(args.repeats):
        lines.append(f"| {name} | {plain:.2f} | {fast:.2f} | {reference:.2f} |")
        print(lines[-1], flush=True)
    lines += ["", f"Fisher diagonal of `transformers` classifiers from configs (random weights, float32): "
              f"N = {args.hf_n}, {args.hf_layers} layers, width {args.hf_width}, {args.hf_heads} heads, "
              f"T = {args.hf_seq_len} tokens / {args.hf_image}x{args.hf_image} images.", "",
              "| model | parameters | tensors on the generic path | max rel. err | plain fwd+bwd (ms) | "
              "mnemo_fast (ms) | reference (ms) | fast / plain | reference / fast |", "|---|---|---|---|---|---|---|---|---|"]
    for row in hf_cases(args.repeats, args.hf_families, args.hf_n, args.hf_layers, args.hf_width,
                        args.hf_heads, args.hf_seq_len, args.hf_image):
        if len(row) == 2:
            lines.append(f"| {row[0]} | does not run: {row[1]} | | | | | | | |")
        else:
            family, numel, tensors, generic, error, plain, fast, reference = row
            lines.append(f"| {family} | {numel / 1e6:.1f}M | {generic} of {tensors} | {error:.1e} | {plain:.2f} | "
                         f"{fast:.2f} | {reference:.2f} | {fast / plain:.2f}x | {reference / fast:.2f}x |")
        print(lines[-1], flush=True)
    text = "\n".join(lines + [""] + linear) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
