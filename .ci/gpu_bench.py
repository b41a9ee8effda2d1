"""GPU timings of the CUDA ops and of a whole `forget`, as a Markdown table.

Each op against its pure-PyTorch twin (mnemo_fast.fast.ops.TWINS) on the same GPU, and
`forget` on the fast engine against the reference engine and one plain forward+backward over
the same codes. CUDA events, median of --repeats runs after a warm-up.
usage: python .ci/gpu_bench.py [--out FILE] [--repeats 10]
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
from mnemo_fast.fast import ops
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
    args = parser.parse_args()
    where = torch.cuda.get_device_name() if CUDA.type == "cuda" else "CPU dry run"
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
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
