"""Forget one class of a ViT-B/16-sized model on the CPU: wall time and peak memory.

The model (~86M parameters) is built here: patch embedding Conv2d 16x16/16 -> 196 tokens, a
cls token and a position embedding (raw ``nn.Parameter``s), 12 pre-norm blocks of width 768
with 12 heads (one qkv ``nn.Linear`` + ``F.scaled_dot_product_attention`` + proj), MLP 3072
with GELU, head to 100 classes. 100 codes (one per class) of shape (3, 224, 224); class 0
is forgotten with ``mnemo_fast.forget(model, codes, [0], lambda1=1e-4, lambda2=1)``.

Each measurement runs in a fresh subprocess so that ``ru_maxrss`` is that run's peak.

    python benchmarks/bench_vit.py --chunks 8 --fisher-chunks 4 16 --fisher-codes 16 \
        --loop-codes 10 --breakdown 8 --profile 8 --codes 16

writes one JSON line per run to stdout (and ``--out FILE``); VIT.md has the results.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import mnemo_fast as mf
from mnemo_fast.modeling import logits_of, trainable_parameters
from mnemo_fast.reference import fisher as ref_fisher
from mnemo_fast.reference.engine import ReferenceEngine

NUM_CLASSES = 100
IMAGE = (3, 224, 224)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp)
        self.fc2 = nn.Linear(mlp, width)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """ViT-B/16 by default (patch 16, width 768, depth 12, 12 heads, MLP 3072)."""

    def __init__(self, image=IMAGE, patch=16, width=768, depth=12, heads=12, mlp=3072, classes=NUM_CLASSES):
        super().__init__()
        tokens = (image[1] // patch) * (image[2] // patch)
        self.patch = nn.Conv2d(image[0], width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
        self.blocks = nn.Sequential(*[Block(width, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def _engine(name: str):
    if name == "default":
        return None
    if name == "loop":  # the authors' algorithm: one batch-1 backward per code
        return LoopEngine()
    from mnemo_fast.fast import engine as fast_engine

    return {"extension": fast_engine.EXTENSION, "hooks-aten": fast_engine.HOOKS_ATEN}[name]


class LoopEngine(ReferenceEngine):
    """The authors' Fisher: a batch-1 forward/backward per code (``method="loop"``)."""

    name = "loop"

    def sum_squared_grads(self, model, inputs, targets, chunk_size=None, output_fn=logits_of):
        return ref_fisher.sum_squared_grads(model, inputs, targets, method="loop", output_fn=output_fn)


class TimedEngine:
    """Forwards to ``inner`` and adds up the seconds spent in the Fisher."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.fisher_seconds = 0.0

    def sum_squared_grads(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.inner.sum_squared_grads(*args, **kwargs)
        finally:
            self.fisher_seconds += time.perf_counter() - start

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _setup(seed: int = 0):
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    model = ViT().eval()
    codes = mf.MnemonicCodes.generate(NUM_CLASSES, IMAGE, seed=seed)
    return model, codes


def _code_batch(codes, num_codes: int):
    """The first ``num_codes`` codes (a fraction of them gives an extrapolated timing)."""
    inputs, labels = codes.batch(range(codes.num_classes))
    return inputs[:num_codes], labels[:num_codes]


def run_forget(engine_name: str, chunk: int | None) -> dict:
    from mnemo_fast import engines

    model, codes = _setup()
    timed = TimedEngine(engines.resolve(_engine(engine_name)))
    start = time.perf_counter()
    result = mf.forget(model, codes, [0], lambda1=1e-4, lambda2=1, chunk_size=chunk, engine=timed)
    seconds = time.perf_counter() - start
    return {
        "kind": "forget", "engine": engine_name, "backend": result.backend, "chunk_size": chunk,
        "codes": codes.num_classes, "seconds": round(seconds, 2),
        "fisher_seconds": round(timed.fisher_seconds, 2),
        "params_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "sign": result.sign, "scores": result.candidate_scores,
    }


def run_fisher(engine_name: str, chunk: int | None, num_codes: int) -> dict:
    """Only the Fisher (``sum_squared_grads``) of the first ``num_codes`` codes."""
    from mnemo_fast import engines

    model, codes = _setup()
    inputs, labels = _code_batch(codes, num_codes)
    engine = engines.resolve(_engine(engine_name))
    start = time.perf_counter()
    engine.sum_squared_grads(model, inputs, labels, chunk, logits_of)
    seconds = time.perf_counter() - start
    return {"kind": "fisher", "engine": engine_name, "chunk_size": chunk, "codes": num_codes,
            "seconds": round(seconds, 2), "seconds_per_code": round(seconds / num_codes, 3)}


def run_breakdown(chunk: int, num_codes: int) -> dict:
    """Fisher of the first ``num_codes`` codes split into plan / layer-rule pass / generic (vmap) pass."""
    from mnemo_fast.fast.engine import EXTENSION
    from mnemo_fast.fast.plan import make_plan

    model, codes = _setup()
    inputs, labels = _code_batch(codes, num_codes)
    params = trainable_parameters(model)
    out = {"kind": "breakdown", "chunk_size": chunk, "codes": num_codes}
    with torch.no_grad():
        start = time.perf_counter()
        model(inputs[:chunk])
        out["forward_chunk_seconds"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    plan = make_plan(model, params, inputs[:1], labels[:1], logits_of)
    out["plan_seconds"] = round(time.perf_counter() - start, 2)
    out["generic"] = plan.generic
    start = time.perf_counter()
    EXTENSION._rule_pass(model, plan, params, inputs, labels, chunk, logits_of)
    out["rule_pass_seconds"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    ref_fisher.sum_squared_grads(model, inputs, labels, plan.generic, chunk_size=chunk)
    out["generic_pass_seconds"] = round(time.perf_counter() - start, 2)
    # What the raw cls/pos parameters cost when they go to the generic (vmap) path, as they
    # did before the planner learned broadcast parameters.
    start = time.perf_counter()
    ref_fisher.sum_squared_grads(model, inputs, labels, ["cls_token", "pos_embed"], chunk_size=chunk)
    out["raw_params_on_generic_path_seconds"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    with torch.no_grad():
        for s in range(0, inputs.shape[0], 50):
            model(inputs[s : s + 50])
    out["one_scoring_pass_seconds"] = round(time.perf_counter() - start, 2)
    return out


def run_profile(chunk: int, num_codes: int) -> dict:
    """torch.profiler over one Fisher of the first ``num_codes`` codes (default engine); top ops."""
    from mnemo_fast import engines

    model, codes = _setup()
    inputs, labels = _code_batch(codes, num_codes)
    engine = engines.default_engine()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        engine.sum_squared_grads(model, inputs, labels, chunk, logits_of)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return {"kind": "profile", "chunk_size": chunk, "codes": num_codes, "table": table}


def check_correctness() -> dict:
    """Fast engine against the reference on a tiny ViT (float64) before any timing."""
    from mnemo_fast import engines

    torch.manual_seed(0)
    model = ViT(image=(3, 32, 32), patch=8, width=32, depth=2, heads=4, mlp=64, classes=5).double().eval()
    codes = mf.MnemonicCodes.generate(5, (3, 32, 32), per_class=2, seed=1).to(torch.float64)
    inputs, labels = codes.batch(range(5))
    from mnemo_fast import reference

    ref = reference.fisher_diagonal(model, inputs, labels)
    fast = mf.fisher_diagonal(model, inputs, labels, chunk_size=3, engine=engines.default_engine())
    worst = max(((fast[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-300)).item() for n in ref)
    if worst > 1e-9:
        raise AssertionError(f"fast Fisher differs from the reference on the tiny ViT: {worst:.3g}")
    return {"kind": "check", "max_relative_error": worst}


def _child(args) -> None:
    if args.child == "forget":
        out = run_forget(args.engine, args.chunk)
    elif args.child == "fisher":
        out = run_fisher(args.engine, args.chunk, args.codes)
    elif args.child == "breakdown":
        out = run_breakdown(args.chunk, args.codes)
    elif args.child == "profile":
        out = run_profile(args.chunk, args.codes)
    else:
        out = check_correctness()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["peak_rss_gib"] = round(usage.ru_maxrss / 2**20, 2)
    out["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 1)  # contention shows as wall >> cpu/2
    out["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out), flush=True)


def _spawn(*extra: str) -> dict:
    cmd = [sys.executable, __file__, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"command": " ".join(extra), "error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, nargs="*", default=[8], help="full forget runs (100 codes)")
    parser.add_argument("--engine", default="default", choices=["default", "extension", "hooks-aten", "loop"])
    parser.add_argument("--fisher-chunks", type=int, nargs="*", default=[], help="Fisher-only runs on --fisher-codes codes")
    parser.add_argument("--fisher-codes", type=int, default=16)
    parser.add_argument("--loop-codes", type=int, default=0, help="Fisher of the authors' batch-1 loop on this many codes (0: skip)")
    parser.add_argument("--breakdown", type=int, default=0, help="chunk size for a Fisher time breakdown (0: skip)")
    parser.add_argument("--profile", type=int, default=0, help="chunk size for a torch.profiler run (0: skip)")
    parser.add_argument("--codes", type=int, default=NUM_CLASSES, help="codes for --breakdown/--profile")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)

    jobs = [] if args.no_check else [("--child", "check")]
    jobs += [("--child", "forget", "--engine", args.engine, "--chunk", str(c)) for c in args.chunks]
    jobs += [("--child", "fisher", "--engine", args.engine, "--chunk", str(c), "--codes", str(args.fisher_codes))
             for c in args.fisher_chunks]
    if args.loop_codes:
        jobs.append(("--child", "fisher", "--engine", "loop", "--codes", str(args.loop_codes)))
    if args.breakdown:
        jobs.append(("--child", "breakdown", "--chunk", str(args.breakdown), "--codes", str(args.codes)))
    if args.profile:
        jobs.append(("--child", "profile", "--chunk", str(args.profile), "--codes", str(args.codes)))
    for job in jobs:
        result = _spawn(*job)
        line = json.dumps(result)
        print(line if result.get("kind") != "profile" else result["table"] + "\n" + line, flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(line + "\n")


if __name__ == "__main__":
    main()
