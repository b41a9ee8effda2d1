"""The Linear Fisher's paths on the CPU, timed side by side: what mnemo_fast.fast.dispatch's
CPU crossover (CPU_BMM_MIN_T) is fitted on. Writes benchmarks/LINEAR-PATHS.md.

For each shape (N samples, T positions, d_in -> d_out) the paths run alternately on the same
input (fused: the compiled CPU kernel sum_sq_grad_linear; chunked-bmm: per-sample gradients of
a chunk by torch.bmm, the chunk from the rule's CPU budget; squares-gemm at T = 1), after one
warm-up each; the table gives the median of --repeats runs. A second table times chunked-bmm
at a few chunk sizes on one shape (what the CPU budget CPU_CHUNK_BYTES rests on).

usage: python benchmarks/bench_linear_paths.py [--threads 1] [--repeats 5] [--out benchmarks/LINEAR-PATHS.md]
       [--quick]   (a few small shapes, a smoke run of a few seconds; writes no file)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mnemo_fast.fast import _ext, dispatch, ops  # noqa: E402

TS = (1, 16, 64, 128, 197, 512)
WIDTHS = ((256, 256), (768, 768), (768, 3072))  # (d_in, d_out)
N = 64


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_chunk(n, t, d_in, d_out, dtype) -> int:
    """The chunk the rule gives the chunked path on the CPU (at T = 1 too, where it picks squares-gemm)."""
    return dispatch.linear_chunk(n, t, d_in, d_out, dtype, "cpu")


def paths(t, chunk):
    out = {}
    if t == 1:
        out["squares-gemm"] = lambda g, x: ops.squares_gemm_sum_sq_grad_linear(g, x)
    out["fused"] = lambda g, x: ops.sum_sq_grad_linear(g, x)
    out["chunked-bmm"] = lambda g, x: ops.chunked_sum_sq_grad_linear(g, x, chunk)
    return out


def alternate(fns: dict, args, repeats: int) -> dict[str, float]:
    """Median milliseconds of each function, run in turn on the same ``args``."""
    for fn in fns.values():
        fn(*args)  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(*args)
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(v) for name, v in times.items()}


def check(fns: dict, args) -> float:
    """Largest relative difference of the paths' results (they must agree)."""
    results = [fn(*args) for fn in fns.values()]
    scale = results[0].abs().max().clamp_min(1e-30)
    return max(float((r - results[0]).abs().max() / scale) for r in results[1:])


def crossover(rows, d_in, d_out) -> int | None:
    """Smallest measured T > 1 from which chunked-bmm beats fused at every larger T measured."""
    ts = sorted((t, r) for (di, do, t), r in rows.items() if (di, do) == (d_in, d_out) and t > 1)
    found = None
    for t, r in reversed(ts):
        if r["chunked-bmm"] < r["fused"]:
            found = t
        else:
            break
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "LINEAR-PATHS.md"))
    parser.add_argument("--quick", action="store_true", help="small shapes only (smoke run, writes no file)")
    args = parser.parse_args()
    if not _ext.available():
        sys.exit(f"bench_linear_paths: the compiled extension is needed ({_ext.load_error()})")
    torch.set_num_threads(args.threads)
    ts, widths, n = TS, WIDTHS, N
    if args.quick:
        ts, widths, n, args.repeats = (1, 16, 64), ((64, 64),), 8, 2
    dtype = torch.float32
    gen = torch.Generator().manual_seed(0)
    rows = {}
    started = time.perf_counter()
    for d_in, d_out in widths:
        for t in ts:
            g = torch.randn(n, t, d_out, generator=gen, dtype=dtype)
            x = torch.randn(n, t, d_in, generator=gen, dtype=dtype)
            chunk = cpu_chunk(n, t, d_in, d_out, dtype)
            fns = paths(t, chunk)
            error = check(fns, (g, x))
            ms = alternate(fns, (g, x), args.repeats)
            rule = dispatch.decide_linear(n, t, d_in, d_out, dtype, "cpu", fused=True).path
            rows[(d_in, d_out, t)] = dict(ms, chunk=chunk, error=error, rule=rule)
            print(f"{n}x{t}x{d_in}->{d_out}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
                  + f" (chunk {chunk}, agree to {error:.1e}, rule: {rule})", flush=True)

    # chunk sizes of the chunked path on one shape: what the fixed CPU budget rests on
    bd_in, bd_out = widths[-2] if len(widths) > 1 else widths[0]
    bt = 197 if not args.quick else ts[-1]
    g = torch.randn(n, bt, bd_out, generator=gen)
    x = torch.randn(n, bt, bd_in, generator=gen)
    chunks = sorted({min(c, n) for c in (1, 2, 4, 8, 16, cpu_chunk(n, bt, bd_in, bd_out, dtype), n)})
    budget = alternate({c: (lambda g, x, c=c: ops.chunked_sum_sq_grad_linear(g, x, c)) for c in chunks},
                       (g, x), args.repeats)
    seconds = time.perf_counter() - started

    lines = [
        "# The Linear Fisher's paths on the CPU: the measurements behind the dispatch rule",
        "",
        "`benchmarks/bench_linear_paths.py` (this file is its output). `sum_n (g_n^T x_n)^2` over T",
        "positions by each path on the same input, run alternately, one warm-up each, median of",
        f"{args.repeats} runs; float32, N = {n}.",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores; {platform.system()} {platform.release()}",
        f"- torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s) "
        f"(`torch.set_num_threads({args.threads})`), BLAS: MKL {torch.backends.mkl.is_available()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; the whole run took {seconds:.0f} s",
        "- **timed on a shared machine**: two other engineers were using its 2 cores, so single times",
        "  carry load noise (the paths alternate so both see the same load; the medians are what count,",
        "  and ratios near 1 are ties).",
        "",
        "fused: the compiled CPU kernel (`sum_sq_grad_linear`, tiles of G_n in a cache-sized workspace);",
        "chunked-bmm: `torch.bmm` on a chunk of samples (the chunk from the rule's CPU budget,",
        f"{dispatch.CPU_CHUNK_BYTES // 2**20} MiB of per-sample gradients), squared and summed; squares-gemm: T = 1 only.",
        "",
        "| d_in -> d_out | T | squares-gemm (ms) | fused (ms) | chunked-bmm (ms) | chunk | fused / chunked | rule picks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (di, do, t), r in rows.items():
        sq = f"{r['squares-gemm']:.2f}" if "squares-gemm" in r else ""
        lines.append(f"| {di} -> {do} | {t} | {sq} | {r['fused']:.2f} | {r['chunked-bmm']:.2f} | {r['chunk']} | "
                     f"{r['fused'] / r['chunked-bmm']:.2f} | {r['rule']} |")
    lines += ["", "Measured crossover (smallest T > 1 from which chunked-bmm is faster at every larger T measured):", ""]
    for di, do in widths:
        c = crossover(rows, di, do)
        lines.append(f"- {di} -> {do}: " + (f"T >= {c}" if c is not None else "none (fused at every T measured)"))
    lines += [
        "",
        f"The rule (`mnemo_fast/fast/dispatch.py`) uses `CPU_BMM_MIN_T = {dispatch.CPU_BMM_MIN_T}`: with the",
        "compiled kernel, the fused CPU kernel below that T, chunked-bmm from it on (T = 1: squares-gemm).",
        "",
        f"Chunk sizes of chunked-bmm at N = {n}, T = {bt}, {bd_in} -> {bd_out} "
        f"({dispatch.linear_sample_bytes(bt, bd_in, bd_out, dtype) / 2**20:.2f} MiB per sample):",
        "",
        "| chunk (samples) | MiB of per-sample gradients | ms |",
        "|---|---|---|",
    ]
    for c, ms in budget.items():
        lines.append(f"| {c} | {c * dispatch.linear_sample_bytes(bt, bd_in, bd_out, dtype) / 2**20:.1f} | {ms:.2f} |")
    lines += ["", "The two tables ran minutes apart under the other engineers' varying load: compare times within",
              "a row or within a table, not across tables."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out and not args.quick:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
