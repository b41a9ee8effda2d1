"""pytest-benchmark cases (small sizes) for the Fisher, the noise pass and ``forget``.

Not collected by the default ``pytest`` run (testpaths = ["tests"]). Run explicitly:
    python -m pytest benchmarks/test_benchmarks.py --benchmark-only
and compare groups, e.g. ``--benchmark-group-by=group``. Each case checks its result
against the reference before it is timed. benchmarks/run.py gives the full tables.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_models as bm  # noqa: E402

import mnemo_fast  # noqa: E402
from mnemo_fast.codes import MnemonicCodes  # noqa: E402
from mnemo_fast.fast.engine import EXTENSION, HOOKS_ATEN  # noqa: E402
from mnemo_fast.evaluation.models import MLP  # noqa: E402
from mnemo_fast.reference.engine import REFERENCE  # noqa: E402

ENGINES = {"reference": REFERENCE, "hooks-aten": HOOKS_ATEN, "extension": EXTENSION}
SIZES = {"mlp": 256, "cnn": 64, "resnet18": 4, "transformer": 8}
LAMBDA1, LAMBDA2 = 1e-3, 10.0


@pytest.fixture(scope="module", params=list(SIZES))
def problem(request):
    case = request.param
    model, x, y = bm.make(case, SIZES[case])
    expected = mnemo_fast.fisher_diagonal(model, x, y, reduction="sum", engine=REFERENCE)
    return case, model, x, y, expected


def test_plain_forward_backward(benchmark, problem):
    case, model, x, y, _ = problem
    benchmark.group = f"fisher-{case}"
    benchmark.pedantic(bm.plain_forward_backward, args=(model, x, y), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("engine", ["hooks-aten", "extension"])
def test_fisher(benchmark, problem, engine):
    case, model, x, y, expected = problem
    benchmark.group = f"fisher-{case}"
    run = lambda: mnemo_fast.fisher_diagonal(model, x, y, reduction="sum", engine=ENGINES[engine])  # noqa: E731
    result = run()
    for name, ref in expected.items():
        torch.testing.assert_close(result[name], ref, rtol=1e-3, atol=1e-5 * ref.abs().max().item())
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


@pytest.fixture(scope="module")
def noise_problem():
    gen = torch.Generator().manual_seed(0)
    shapes = [(512, 512, 3, 3), (512,), (256, 256, 3, 3), (10, 512)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    forget = [torch.rand(s, generator=gen) ** 4 * 1e-6 for s in shapes]
    remain = [torch.rand(s, generator=gen) ** 4 * 1e-6 for s in shapes]
    return params, forget, remain


@pytest.mark.parametrize("method", ["clone", "authors", "reference", "extension"])
def test_noise_pass(benchmark, noise_problem, method):
    params, forget, remain = noise_problem
    benchmark.group = "noise-pass"
    work = [p.clone() for p in params]
    if method == "clone":
        benchmark.pedantic(lambda: [p.clone() for p in work], rounds=5, warmup_rounds=1)
        return
    if method == "authors":
        run = lambda: bm.authors_noise_pass(work, forget, remain, LAMBDA1, LAMBDA2, -1.0)  # noqa: E731
    else:
        engine = ENGINES[method]
        run = lambda: engine.shift_(work, forget, remain, engine.max_ratio(forget, remain), LAMBDA1, LAMBDA2, -1.0)  # noqa: E731
    expected = [p.clone() for p in params]
    bm.authors_noise_pass(expected, forget, remain, LAMBDA1, LAMBDA2, -1.0)
    run()
    for w, e in zip(work, expected):
        torch.testing.assert_close(w, e, rtol=1e-5, atol=1e-7)
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("method", ["plain", "authors", "reference", "hooks-aten", "extension"])
def test_forget_mlp(benchmark, method):
    torch.manual_seed(0)
    classes = 100
    model = MLP((1, 28, 28), classes).eval()
    codes = MnemonicCodes.generate(classes, (1, 28, 28))
    benchmark.group = f"forget-mlp-{classes}"
    if method == "plain":
        x, y = codes.batch(range(classes))
        benchmark.pedantic(bm.plain_forward_backward, args=(model, x, y), rounds=3, warmup_rounds=1)
        return
    if method == "authors":
        benchmark.pedantic(bm.authors_forget, args=(model, codes, [0], LAMBDA1, LAMBDA2), rounds=3, warmup_rounds=1)
        return
    run = lambda: mnemo_fast.forget(model, codes, [0], lambda1=LAMBDA1, lambda2=LAMBDA2, engine=ENGINES[method])  # noqa: E731
    result = run()
    authors = dict(bm.authors_forget(model, codes, [0], LAMBDA1, LAMBDA2).named_parameters())
    for name, p in result.model.named_parameters():
        torch.testing.assert_close(p, authors[name], rtol=1e-4, atol=1e-6)
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
