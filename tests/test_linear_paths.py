"""The Linear Fisher's dispatch rule (mnemo_fast.fast.dispatch.decide_linear, a pure function:
its choices are tested here without a GPU), the chunked-bmm and squares-gemm paths against a
float64 reference, linear_fisher running the path the rule picks, the layer rules wired to it,
what explain says, and .ci/gpu_bench.py's crossover table in its CPU dry run."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

import mnemo_fast as mf
import mnemo_fast.reference
from mnemo_fast.fast import _ext, dispatch, ops
from mnemo_fast.fast.dispatch import LINEAR_PATHS, LinearPath, decide_linear, linear_sample_bytes
from mnemo_fast.fast.engine import EXTENSION, HOOKS_ATEN

needs_ext = pytest.mark.skipif(not _ext.available(), reason="mnemo_fast._C unavailable")
#: the fast engines (named: with MNEMO_FAST_DISABLE_EXT=1 the default engine is the reference)
ENGINES = [HOOKS_ATEN, EXTENSION] if _ext.available() else [HOOKS_ATEN]
MIB = 2**20


def reference(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_n (g_n^T x_n)^2 in float64, written literally."""
    return torch.einsum("nto,nti->noi", g.double(), x.double()).square().sum(0)


def operands(n, t, d_out, d_in, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, t, d_out, generator=gen, dtype=torch.float64).to(dtype)
    x = torch.randn(n, t, d_in, generator=gen, dtype=torch.float64).to(dtype)
    return g, x


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * float(want.abs().max()))


# ---- the rule: a pure function of the sizes ---------------------------------------------------

@pytest.mark.parametrize("device_type", ["cpu", "cuda", "mps"])
@pytest.mark.parametrize("fused", [False, True])
def test_one_position_is_the_gemm_of_squares_everywhere(device_type, fused):
    path = decide_linear(64, 1, 768, 768, torch.float32, device_type, free_bytes=2**34, fused=fused)
    assert path.path == "squares-gemm" and path.chunk == 64 and "T = 1" in path.reason


def test_a_decision_is_frozen_named_and_one_line():
    path = decide_linear(8, 5, 16, 32, torch.float32, "cpu")
    assert isinstance(path, LinearPath) and path.path in LINEAR_PATHS
    with pytest.raises(dataclasses.FrozenInstanceError):
        path.path = "fused"
    assert "\n" not in path.reason and str(path).startswith("chunked-bmm (chunk 8): ")


def test_sample_bytes_count_the_gradient_and_the_casts_of_narrow_operands():
    assert linear_sample_bytes(7, 16, 32, torch.float32) == 4 * 16 * 32
    assert linear_sample_bytes(7, 16, 32, torch.float64) == 8 * 16 * 32
    for low in (torch.bfloat16, torch.float16):  # cast to float32 one chunk at a time
        assert linear_sample_bytes(7, 16, 32, low) == 4 * (16 * 32 + 7 * (16 + 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n,t,d_in,d_out", [(64, 197, 768, 768), (1, 3, 5, 7), (1000, 2, 64, 64),
                                           (64, 512, 4096, 4096), (3, 10, 2048, 8192)])
@pytest.mark.parametrize("device_type,free", [("cpu", None), ("cuda", 80 * 2**30), ("cuda", 3 * MIB), ("cuda", None)])
def test_the_chunk_never_exceeds_the_budget_nor_the_samples_and_is_at_least_one(dtype, n, t, d_in, d_out,
                                                                              device_type, free):
    budget, _ = dispatch.linear_budget(device_type, free)
    per_sample = linear_sample_bytes(t, d_in, d_out, dtype)
    for fused in (False, True):
        path = decide_linear(n, t, d_in, d_out, dtype, device_type, free_bytes=free, fused=fused)
        if path.path != "chunked-bmm":
            continue
        assert 1 <= path.chunk <= n
        assert path.chunk * per_sample <= budget or path.chunk == 1  # one sample over the budget: one at a time
        assert path.chunk == min(n, budget // per_sample) or budget < per_sample


def test_cpu_with_the_kernel_follows_the_measured_crossover():
    below, at = dispatch.CPU_BMM_MIN_T - 1, dispatch.CPU_BMM_MIN_T
    assert below >= 2, "the crossover must leave the fused kernel some T > 1"
    small = decide_linear(64, below, 768, 768, torch.float32, "cpu", fused=True)
    large = decide_linear(64, at, 768, 768, torch.float32, "cpu", fused=True)
    assert small.path == "fused" and small.chunk == 64
    assert large.path == "chunked-bmm"
    assert large.chunk == dispatch.CPU_CHUNK_BYTES // (4 * 768 * 768)
    assert large.chunk * 4 * 768 * 768 <= dispatch.CPU_CHUNK_BYTES


def test_cpu_without_the_kernel_takes_chunked_bmm_at_any_t():
    for t in (2, 16, 197, 4096):
        path = decide_linear(64, t, 768, 768, torch.float32, "cpu", fused=False)
        assert path.path == "chunked-bmm" and "no compiled kernel" in path.reason


def test_a_budget_smaller_than_one_sample():
    # 4096 x 8192 float32: 128 MiB per sample, over the CPU budget
    alone = decide_linear(4, 300, 4096, 8192, torch.float32, "cpu", fused=False)
    assert alone.path == "chunked-bmm" and alone.chunk == 1 and "over" in alone.reason
    with_kernel = decide_linear(4, 300, 4096, 8192, torch.float32, "cpu", fused=True)
    assert with_kernel.path == "fused" and "holds none" in with_kernel.reason
    # on a GPU with little free memory: the fused kernel, which holds no per-sample gradient
    tight = decide_linear(64, 197, 768, 768, torch.float32, "cuda", free_bytes=4 * MIB, fused=True)
    assert tight.path == "fused"
    assert decide_linear(64, 197, 768, 768, torch.float32, "cuda", free_bytes=4 * MIB).chunk == 1


def test_cuda_prefers_the_batched_gemm_for_every_t_above_one_until_a_gpu_measures_otherwise():
    assert dispatch.CUDA_BMM_MIN_T == 2 and dispatch.CUDA_MIN_CHUNK == 1
    free = 60 * 2**30
    for t in (2, 16, 64, 128, 197, 512):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            path = decide_linear(64, t, 768, 768, dtype, "cuda", free_bytes=free, fused=True)
            assert path.path == "chunked-bmm", (t, dtype)
            assert path.chunk == min(64, int(dispatch.CUDA_FREE_FRACTION * free) // linear_sample_bytes(t, 768, 768, dtype))
    # the chunk follows the free memory: a quarter of 100 MiB holds 11 samples of 768 x 768 float32
    assert decide_linear(64, 197, 768, 768, torch.float32, "cuda", free_bytes=100 * MIB, fused=True).chunk == 11
    # free memory unknown: the fixed CPU budget
    assert (decide_linear(64, 197, 768, 768, torch.float32, "cuda", fused=True).chunk
            == dispatch.CPU_CHUNK_BYTES // (4 * 768 * 768))


def test_the_cuda_thresholds_are_constants_the_rule_reads(monkeypatch):
    monkeypatch.setattr(dispatch, "CUDA_BMM_MIN_T", 200)
    assert decide_linear(64, 197, 768, 768, torch.float32, "cuda", free_bytes=2**34, fused=True).path == "fused"
    assert decide_linear(64, 200, 768, 768, torch.float32, "cuda", free_bytes=2**34, fused=True).path == "chunked-bmm"
    monkeypatch.setattr(dispatch, "CUDA_MIN_CHUNK", 16)
    assert decide_linear(64, 300, 768, 768, torch.float32, "cuda", free_bytes=100 * MIB, fused=True).path == "fused"
    assert decide_linear(8, 300, 768, 768, torch.float32, "cuda", free_bytes=100 * MIB, fused=True).path == "chunked-bmm"


# ---- the paths against the reference -----------------------------------------------------------

CHUNKED = [  # (N, T, d_out, d_in, chunk)
    (1, 1, 3, 5, 1),          # one sample, T = 1
    (9, 1, 17, 33, 4),        # T = 1 through the batched GEMM too
    (1, 7, 5, 4, 1),          # one sample, T prime
    (13, 6, 70, 300, 1),      # a chunk of 1
    (13, 13, 65, 31, 5),      # chunk not dividing N, T not a multiple of anything
    (40, 3, 130, 257, 64),    # chunk larger than N
    (3, 197, 1, 600, 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,t,d_out,d_in,chunk", CHUNKED)
def test_chunked_bmm_matches_the_reference(n, t, d_out, d_in, chunk, dtype):
    g, x = operands(n, t, d_out, d_in, dtype)
    close(ops.chunked_sum_sq_grad_linear(g, x, chunk), reference(g, x), dtype)  # low precision: fp32 sums of the same values


def test_chunked_bmm_takes_strided_operands_and_no_samples():
    g, x = operands(6, 5, 12, 9)
    gs, xs = g.transpose(0, 1).contiguous().transpose(0, 1), torch.cat([x, x], 2)[:, :, ::2]
    assert not gs.is_contiguous() and not xs.is_contiguous()
    close(ops.chunked_sum_sq_grad_linear(gs, xs, 4), reference(gs, xs), torch.float32)
    empty = ops.chunked_sum_sq_grad_linear(g[:0], x[:0], 3)
    assert empty.shape == (12, 9) and not empty.any()
    with pytest.raises(ValueError, match="chunk"):
        ops.chunked_sum_sq_grad_linear(g, x, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_squares_gemm_is_exact_for_one_position_and_refuses_more(dtype):
    g, x = operands(11, 1, 7, 13, dtype)
    close(ops.squares_gemm_sum_sq_grad_linear(g, x), reference(g, x), dtype)
    with pytest.raises(ValueError, match="T = 1"):
        ops.squares_gemm_sum_sq_grad_linear(*operands(2, 3, 4, 5))


def test_linear_fisher_runs_the_path_the_rule_picks(monkeypatch):
    called = []
    fused = lambda g, x: called.append("fused") or reference(g, x).float()  # noqa: E731
    real_chunked = ops.chunked_sum_sq_grad_linear
    monkeypatch.setattr(ops, "chunked_sum_sq_grad_linear",
                        lambda g, x, chunk: called.append(("chunked", chunk)) or real_chunked(g, x, chunk))
    g, x = operands(10, 9, 24, 16)
    want = reference(g, x)
    monkeypatch.setattr(dispatch, "CPU_BMM_MIN_T", 5)
    close(ops.linear_fisher(g, x, fused), want, torch.float32)                 # T = 9 >= 5: chunked
    monkeypatch.setattr(dispatch, "CPU_BMM_MIN_T", 50)
    close(ops.linear_fisher(g, x, fused), want, torch.float32)                 # T = 9 < 50: fused
    close(ops.linear_fisher(g, x, None), want, torch.float32)                  # no kernel: chunked
    monkeypatch.setattr(dispatch, "CPU_CHUNK_BYTES", 24 * 16 * 4 * 3)          # three samples a chunk
    close(ops.linear_fisher(g, x, None), want, torch.float32)
    monkeypatch.setattr(dispatch, "CPU_CHUNK_BYTES", 100)                       # under one sample's gradient
    close(ops.linear_fisher(g, x, None), want, torch.float32)                  # one at a time
    close(ops.linear_fisher(g, x, fused), want, torch.float32)                 # or the fused kernel
    close(ops.linear_fisher(g[:, :1], x[:, :1], fused), reference(g[:, :1], x[:, :1]), torch.float32)  # squares-gemm
    assert called == [("chunked", 10), "fused", ("chunked", 10), ("chunked", 3), ("chunked", 1), "fused"]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_every_path_of_the_compiled_table_agrees_with_the_reference(monkeypatch, dtype):
    g, x = operands(7, 23, 40, 33, dtype)
    want = reference(g, x)
    for threshold in (2, 10**6):  # chunked-bmm, then the fused CPU kernel
        monkeypatch.setattr(dispatch, "CPU_BMM_MIN_T", threshold)
        assert ops.linear_path(g, x, compiled=True).path == ("chunked-bmm" if threshold == 2 else "fused")
        close(ops.COMPILED.linear_fisher(g, x), want, dtype)
    close(ops.TWINS.linear_fisher(g, x), want, dtype)
    assert ops.linear_path(g, x, compiled=False).path == "chunked-bmm"


# ---- the rules ask the rule; explain says it --------------------------------------------------------

class Tokens(torch.nn.Module):
    """A Linear on [N, T, d] and an nn.MultiheadAttention (cross attention: S != L)."""

    def __init__(self, d=16, classes=3):
        super().__init__()
        self.proj = torch.nn.Linear(d, d)
        self.att = torch.nn.MultiheadAttention(d, 2, batch_first=True)
        self.memory = torch.nn.Parameter(torch.randn(1, 5, d), requires_grad=False)
        self.head = torch.nn.Linear(d, classes)

    def forward(self, x):
        h = torch.tanh(self.proj(x))
        memory = self.memory.expand(x.shape[0], -1, -1)
        a, _ = self.att(h, key=memory, value=memory)
        return self.head(a.mean(1))


def tokens_problem(t=11):
    torch.manual_seed(0)
    return Tokens().eval(), torch.randn(6, t, 16), torch.randint(0, 3, (6,))


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.name)
@pytest.mark.parametrize("threshold", [2, 10**6])
def test_the_fast_fisher_matches_the_reference_on_each_path(monkeypatch, threshold, engine):
    monkeypatch.setattr(dispatch, "CPU_BMM_MIN_T", threshold)
    monkeypatch.setattr(dispatch, "CPU_CHUNK_BYTES", 16 * 16 * 4 * 2)  # two samples a chunk
    model, x, y = tokens_problem()
    taken = []
    real = ops.linear_path_for
    monkeypatch.setattr(ops, "linear_path_for", lambda *a: taken.append(real(*a).path) or real(*a))
    fast = mf.fisher_diagonal(model, x, y, engine=engine)
    want = mnemo_fast.reference.fisher_diagonal(model, x, y)
    for name in want:
        torch.testing.assert_close(fast[name], want[name], rtol=1e-4, atol=1e-6 * float(want[name].abs().max()))
    # proj, q and out_proj at T = 11, k and v at S = 5, the head at T = 1: all asked the rule
    assert len(taken) == 6 and taken.count("squares-gemm") == 1
    expected = "chunked-bmm" if threshold == 2 or engine is HOOKS_ATEN else "fused"
    assert set(taken) == {expected, "squares-gemm"}


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.name)
def test_explain_names_each_linear_path_and_why(monkeypatch, engine):
    model, x, y = tokens_problem(t=197)
    explanation = mf.explain(model, x, y, engine=engine)
    routes = {r.name: r for r in explanation.routes}
    assert routes["proj.weight"].linear == ((197, 16, 16, torch.float32),)
    assert routes["att.in_proj_weight"].linear == ((197, 16, 16, torch.float32), (5, 16, 16, torch.float32),
                                                   (5, 16, 16, torch.float32))
    assert routes["head.weight"].linear == ((1, 16, 3, torch.float32),)
    assert "proj.bias" not in explanation.linear and routes["proj.bias"].linear == ()
    head = explanation.linear["head.weight"]
    assert [p.path for p in head] == ["squares-gemm"] and "linear path squares-gemm: T = 1" in routes["head.weight"].detail
    compiled = engine is EXTENSION
    want = ops.linear_path_for(6, 197, 16, 16, torch.float32, x.device, compiled)
    assert explanation.linear["proj.weight"] == (want,)
    assert f"linear path {want}" in str(explanation)
    monkeypatch.setattr(dispatch, "CPU_BMM_MIN_T", 100)  # q (T = 197) and k, v (S = 5) then differ
    in_proj = {r.name: r for r in mf.explain(model, x, y, engine=engine).routes}["att.in_proj_weight"].detail
    if compiled:
        assert "1: chunked-bmm (chunk 6)" in in_proj and "2: fused" in in_proj and "3: fused" in in_proj
    else:
        assert "linear path chunked-bmm (chunk 6): no compiled kernel" in in_proj


def test_the_reference_engine_has_no_linear_paths():
    model, x, y = tokens_problem()
    explanation = mnemo_fast.reference.explain(model, x, y)
    assert explanation.linear == {} and all(r.path == "reference" for r in explanation.routes)


# ---- .ci/gpu_bench.py: its crossover table, dry-run on the CPU ------------------------------------------

def test_the_gpu_benchmarks_crossover_table_runs_on_the_cpu():
    path = Path(__file__).resolve().parent.parent / ".ci" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    before = torch.get_float32_matmul_precision()
    rows = list(bench.linear_rows(torch.device("cpu"), repeats=1, n=3, widths=((8, 6),), ts=(2, 5)))
    assert [(r["precision"], r["t"]) for r in rows] == [(p, t) for p, _, _ in bench.LINEAR_PRECISIONS for t in (2, 5)]
    assert all(r["chunk"] == 3 and r["apart"] < 1e-5 for r in rows)
    lines = bench.linear_table(rows, 3)
    text = "\n".join(lines)
    assert "| 8 -> 6 | float32, TF32 off | 2 |" in text and "Crossover" in text and "CUDA_BMM_MIN_T" in text
    assert torch.get_float32_matmul_precision() == before  # left as it was
