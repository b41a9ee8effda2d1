"""Whole random models (tests/generated_models.py) against a brute-force batch-1 loop.

The per-layer property tests check each rule alone; bugs live where rules meet (an in-place
op after a hooked layer, a tensor captured by one rule and changed by the next op, a module
called twice, a parameter used both by a rule and functionally). Each example composes a
stem, a few blocks and a pooled head, and asks for ``mnemo_fast.fisher_diagonal`` (sums).

Pass rule, per model: every parameter's Fisher equals the brute-force loop's (float64, on the
model's out-of-place twin) within ``|fast - exact| <= 1e-4 * max|exact|``, or a warning during
the call names the parameter or its module (it was sent to the exact path and said so). A
silent mismatch fails; so does an exception on a model PyTorch runs. PyTorch refuses some
generated models (an in-place write to a tensor autograd saved): the fast path may refuse them
too, but a result it returns must be the twin's. The call must leave the model (parameters,
buffers, requires_grad flags, modes) and its inputs as they were. On every fourth example the
reference (``mnemo_fast.reference.fisher_diagonal``) must match the loop as well, and the
generator checks itself (where PyTorch runs the model as written, its own loop equals the
out-of-place twin's).

``MNEMO_FAST_MODELS`` sets the number of models (default 200); ``MNEMO_FAST_FUZZ_RANDOM=1``
draws fresh random seeds instead of the fixed derandomized sequence (``make fuzz`` runs
10000); 200 models take about 5 s on one intra-op thread (what the property runs on). No
Hypothesis example database is written (``database=None``; Hypothesis still keeps its own
git-ignored ``.hypothesis/constants`` cache).

The named tests below the property are the distinct failures the generator found, each
shrunk to a minimal model (no Hypothesis).
"""

from __future__ import annotations

import contextlib
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, note, settings  # noqa: E402

import mnemo_fast as mf  # noqa: E402
import mnemo_fast.reference as ref  # noqa: E402
from generated_models import (  # noqa: E402
    CustomRMSNorm, build, check_fisher, describe, exact_fisher, fast_call, init_weights, model_specs,
)

MODELS = settings(
    max_examples=int(os.environ.get("MNEMO_FAST_MODELS", "200")),
    derandomize=os.environ.get("MNEMO_FAST_FUZZ_RANDOM", "") != "1",
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TOL = 1e-4


def fast_sums(model, x, y):
    return mf.fisher_diagonal(model, x, y, reduction="sum")


def reference_sums(model, x, y):
    return ref.fisher_diagonal(model, x, y, reduction="sum")


def assert_passes(model, x, y, fisher=fast_sums, exact=None) -> None:
    verdict = check_fisher(model, x, y, fisher, TOL, exact)
    assert not verdict.bad and not verdict.error, describe(verdict)


@contextlib.contextmanager
def one_thread():
    """Tiny models run on one intra-op thread: on a shared machine two spinning OpenMP threads
    per op made 200 models take 90 s instead of 5 (the kernels' thread splits have their own
    tests in test_properties.py)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@MODELS
@given(spec=model_specs())
def test_generated_model_matches_the_batch1_loop(spec):
    note(f"spec = {spec!r}")
    with one_thread():
        check_generated(spec)


def check_generated(spec: dict) -> None:
    model, x, y = build(spec)
    subset = spec["seed"] % 4 == 0
    exact = exact_fisher(model, x, y, check_twin=subset)  # the generator's own check, on a subset
    assert_passes(model, x, y, fast_call(spec), exact)
    if subset:
        assert_passes(model, x, y, reference_sums, exact)


def test_the_pass_rule_catches_a_wrong_result_and_accepts_a_warned_one():
    """The judge itself: a plain model passes on the fast path and on the reference; a Fisher
    off by a factor fails as a silent mismatch, unless a warning names the parameter."""
    spec = {"d": 4, "stem": {"stem": "linear", "F": 3, "T": 2, "bias": True, "op": "none"},
            "blocks": [{"kind": "norm", "norm": "layernorm", "affine": True, "op": "gelu", "prenorm": True}],
            "head": {"classes": 3, "pool": "mean", "head": "linear", "bias": True, "out": "dict"},
            "N": 4, "seed": 1, "freeze_seed": None, "chunk": None, "engine": "default"}
    model, x, y = build(spec)
    exact = exact_fisher(model, x, y, check_twin=True)
    assert_passes(model, x, y, fast_call(spec), exact)
    assert_passes(model, x, y, reference_sums, exact)

    def doubled(m, a, b):
        return {name: 2 * s for name, s in fast_sums(m, a, b).items()}

    verdict = check_fisher(model, x, y, doubled, TOL, exact)
    assert set(verdict.bad) == set(exact.fisher) and not verdict.warned

    def warned(m, a, b):
        sums = doubled(m, a, b)
        warnings.warn("head.lin.weight went elsewhere; so did blocks.0.norm.weight, blocks.0.norm.bias, "
                      "blocks.0.lin.weight, blocks.0.lin.bias, stem.lin.weight, stem.lin.bias, head.lin.bias")
        return sums

    verdict = check_fisher(model, x, y, warned, TOL, exact)
    assert not verdict.bad and set(verdict.warned) == set(exact.fisher)


# ---- the distinct failures found, each shrunk to a minimal model -----------------------------
#
# Each model has an ``inplace`` flag: False gives the same function without in-place writes,
# the out-of-place twin the exact Fisher is computed on (generated_models.exact_fisher).

D, T, C = 4, 3, 3


def _inputs(n: int = 3, shape=(T, D), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, C, (n,), generator=g)


def _ids(n: int = 3, vocab: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, T), generator=g), torch.randint(0, C, (n,), generator=g)


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    init_weights(model, seed)
    return model.eval()


def _inplace(t, op: str, inplace: bool):
    if op == "F.relu(inplace=True)":
        return F.relu(t, inplace=inplace)
    if op == "relu_":
        return t.relu_() if inplace else t.relu()
    if op == "mul_":
        return t.mul_(1.5) if inplace else t * 1.5
    if op == "+=":
        if inplace:
            t += 0.25
            return t
        return t + 0.25
    raise ValueError(op)


class _InplaceAfterLinear(nn.Module):
    """Linear -> Linear on [N, T, d] (or a 4-D view [N, T, 2, d/2]) -> in-place op -> head."""

    def __init__(self, op: str, rank: str):
        super().__init__()
        self.inplace, self.op, self.rank = True, op, rank
        self.first = nn.Linear(D, D)
        self.lin = nn.Linear(D // 2, D // 2) if rank == "4d" else nn.Linear(D, D)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        h = self.first(x)
        n, t, d = h.shape
        y = self.lin(h.view(n, t, 2, d // 2)).view(n, t, d) if self.rank == "4d" else self.lin(h)
        return self.head(_inplace(y, self.op, self.inplace).mean(1))


@pytest.mark.parametrize("rank", ["3d", "4d"])
@pytest.mark.parametrize("op", ["F.relu(inplace=True)", "relu_", "mul_", "+="])
def test_inplace_relu_on_linear_3d_output(op, rank):
    """An in-place op on the 3-D (or 4-D) output of a Linear whose input requires grad (not
    the first layer): the output is an autograd view, the in-place op rebases it and the
    output-gradient hook never fires, so lin.weight and lin.bias come out 0 (rel. error 1.0),
    silently. (A 2-D output, or the first layer, whose output the capture replaces, is right.)
    The hand-written attention's output projection fails the same way."""
    x, y = _inputs()
    assert_passes(_seeded(_InplaceAfterLinear(op, rank)), x, y)


class _InplaceAfterAttention(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.inplace, self.batch_first = True, batch_first
        self.first = nn.Linear(D, D)
        self.mha = nn.MultiheadAttention(D, 2, batch_first=batch_first)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        h = self.first(x)
        q = h if self.batch_first else h.transpose(0, 1)
        a, _ = self.mha(q, q, q, need_weights=False)
        a = a.add_(0.25) if self.inplace else a + 0.25
        return self.head((a if self.batch_first else a.transpose(0, 1)).mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_inplace_op_on_multihead_attention_output(batch_first):
    """``a, _ = mha(h, h, h); a.add_(0.25)``: every nn.MultiheadAttention parameter
    (in_proj_weight/bias, out_proj.weight/bias) comes out 0 (rel. error 1.0), silently; the
    output is a view (transpose / view of the out projection), as for the Linear."""
    x, y = _inputs()
    assert_passes(_seeded(_InplaceAfterAttention(batch_first)), x, y)


class _SharedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.inplace = True
        self.first = nn.Linear(D, D)
        self.lin = nn.Linear(D, D)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        h = self.first(x)
        return self.head(self.lin(F.leaky_relu(self.lin(h), 0.1, inplace=self.inplace)).mean(1))


def test_inplace_op_between_two_calls_of_one_linear():
    """One Linear called twice, ``lin(leaky_relu_(lin(h)))``: the first call's output gradient
    is lost to the in-place op, so the per-sample sum over the calls misses one term;
    lin.weight and lin.bias are off by a rel. error of about 0.6-0.8, silently."""
    x, y = _inputs()
    assert_passes(_seeded(_SharedLinear()), x, y)


class _InplaceAfterOperation(nn.Module):
    """A raw parameter used by an operation on a tensor that does not require grad (the
    input, or a detached hidden state), then an in-place op on the result."""

    def __init__(self, kind: str):
        super().__init__()
        self.inplace, self.kind = True, kind
        if kind == "folded_linear":
            self.first, self.lin = nn.Linear(D, D), nn.Linear(D, D)
        elif kind == "rmsnorm":
            self.norm = CustomRMSNorm(D)
        else:  # (no unused module: its parameters would send the whole model to the generic path)
            self.weight = nn.Parameter(torch.zeros(D, D))
        self.head = nn.Linear(D, C)

    def forward(self, x):
        if self.kind == "matmul":
            y = x @ self.weight
        elif self.kind == "scale":
            y = x * self.weight[0]
        elif self.kind == "rmsnorm":  # weight * x * rsqrt(mean(x^2) + eps)
            y = self.norm(x)
        else:  # rows folded [N*T, d] (the operation level takes it), on a detached input
            h = self.first(x).detach()
            n, t, d = h.shape
            y = self.lin(h.reshape(n * t, d)).view(n, t, d)
        y = y.relu_() if self.inplace else y.relu()
        return self.head(y.mean(1))


@pytest.mark.parametrize("kind", ["matmul", "scale", "rmsnorm", "folded_linear"])
def test_inplace_op_on_operation_level_output(kind):
    """The operation-level capture: ``y = x @ w`` (or ``x * w[0]``, a hand-written RMSNorm's
    ``weight * x_hat``, a Linear on folded rows ``[N*T, d]`` of a detached input) then
    ``y.relu_()``: the hook on the use's output never fires, so w (norm.weight, lin.weight/bias)
    comes out 0 (rel. error 1.0), silently. Needs no sample operand to require grad (the first
    layer, after a frozen layer, or after ``detach``); the generator also found it with
    ``y[..., 0] = 0`` after the RMSNorm."""
    x, y = _inputs()
    assert_passes(_seeded(_InplaceAfterOperation(kind)), x, y)


class _TiedDetached(nn.Module):
    """A weight used by its module, whose output is then detached, and once more elsewhere."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "embedding":
            self.emb = nn.Embedding(5, D)
            self.lin = nn.Linear(D, D)
        else:
            self.first = nn.Linear(D, D)
            self.lin = nn.Linear(D, D)
            self.head = nn.Linear(D, C)

    def forward(self, x):
        if self.kind == "embedding":  # h @ emb.weight[:C].t(): the head tied to the Embedding
            return self.lin(self.emb(x).detach()).mean(1) @ self.emb.weight[:C].t()
        h = self.first(x)
        h = self.lin(h).detach() + h
        return self.head(F.linear(h, self.lin.weight).mean(1))


@pytest.mark.parametrize("kind", ["embedding", "linear"])
def test_tied_weight_whose_module_output_is_detached(kind):
    """A weight tied between its module and a second use, the module's output detached
    (``lin(emb(ids).detach())`` with a head ``@ emb.weight[:C].t()``; or ``lin(h).detach()``
    and ``F.linear(h, lin.weight)``): the planner counts uses in the autograd graph, where the
    detached call leaves no edge, so it sees one use per module call and gives the weight to
    the module's rule, which sums only the (zero) module call: emb.weight / lin.weight come
    out 0 (rel. error 1.0), silently."""
    x, y = _ids() if kind == "embedding" else _inputs()
    assert_passes(_seeded(_TiedDetached(kind)), x, y)


class _IdsChangedAfterLookup(nn.Module):
    def __init__(self):
        super().__init__()
        self.inplace = True
        self.emb, self.emb2 = nn.Embedding(5, D), nn.Embedding(5, D)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        ids = x.clone()
        h = self.emb(ids)
        ids = ids.add_(1).remainder_(5) if self.inplace else (ids + 1).remainder(5)
        return self.head((h + self.emb2(ids)).mean(1))


def test_inplace_on_embedding_ids_after_lookup():
    """``h = emb(ids); ids.add_(1)`` before a second lookup: PyTorch refuses the backward (the
    ids were saved), the fast path silently returns emb.weight's Fisher of the *changed* ids
    (the Embedding rule reads its saved input after the forward): rel. error ~1.0. The fast
    path must raise as PyTorch does, or give the exact value (of the out-of-place twin)."""
    x, y = _ids()
    assert_passes(_seeded(_IdsChangedAfterLookup()), x, y)


class _InputChangedAfterLayer(nn.Module):
    """``y = layer(h); h.mul_(k); h + y``, the layer a Linear or a raw F.linear weight
    (taken at the operation level; its operand not contiguous, as after a permute)."""

    def __init__(self, kind: str):
        super().__init__()
        self.inplace, self.kind = True, kind
        self.first = nn.Linear(D, D)
        if kind == "linear":
            self.lin = nn.Linear(D, D)
        else:
            self.weight = nn.Parameter(torch.zeros(D, D))
        self.head = nn.Linear(D, C)

    def forward(self, x):
        h = self.first(x)
        if self.kind == "linear":
            y = self.lin(h)
        else:
            h = h.transpose(1, 2).contiguous().transpose(1, 2)
            y = F.linear(h, self.weight)
        h = h.mul_(1.5) if self.inplace else h * 1.5
        return self.head((h + y).mean(1))


@pytest.mark.parametrize("kind", ["linear", "operation"])
def test_inplace_on_layer_input_after_the_layer_read_it(kind):
    """``y = lin(h); h.mul_(1.5)`` then both used: PyTorch refuses the backward (h was saved
    for the weight's gradient), the fast path (parameters frozen, so nothing saved) silently
    computes the weight's Fisher from the changed h: rel. error 1.25 (= 1.5^2 - 1) on
    lin.weight (bias right); the same with a raw weight in ``F.linear`` at the operation
    level. The fast path must raise as PyTorch does, or give the exact (twin's) value."""
    x, y = _inputs()
    assert_passes(_seeded(_InputChangedAfterLayer(kind)), x, y)


class _InputViewChangedAfterLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.inplace = True
        self.first = nn.Linear(D, D)
        self.lin = nn.Linear(D // 2, D // 2)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        h = self.first(x).transpose(1, 2).contiguous().transpose(1, 2)  # [N, T, d], not contiguous
        n, t, d = h.shape
        y = self.lin(h.view(n, t, 2, d // 2)).reshape(n, t, d)
        h = h.mul_(1.5) if self.inplace else h * 1.5
        return self.head((h + y).mean(1))


def test_inplace_on_linear_input_view_after_the_linear_read_it():
    """A model PyTorch runs: ``y = lin(h.view(N, T, 2, d/2))`` on a non-contiguous h (as after
    a conv stem's ``flatten(2).transpose(1, 2)``), then ``h.mul_(1.5)``. Autograd saved its own
    contiguous copy of the input, so the backward is legal; the Linear rule keeps the input
    view, reads it after the forward, and silently gets lin.weight's Fisher of the changed
    values: rel. error 1.25 (= 1.5^2 - 1; 0.3 with ``relu_``). Found from a conv2d stem
    followed by a 4-D Linear on a detached input and ``h.relu_()``."""
    x, y = _inputs()
    assert_passes(_seeded(_InputViewChangedAfterLinear()), x, y)


class _OperationOutputChangedAfterLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.inplace = True
        self.scale = nn.Parameter(torch.ones(D))
        self.lin = nn.Linear(D, D)
        self.lin.weight.requires_grad_(False)  # (a trainable weight would make PyTorch refuse the model)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        h = x * self.scale  # an operation-level use, on the input
        y = self.lin(h)
        h = h.tanh_() if self.inplace else h.tanh()
        return self.head((h + y).mean(1))


def test_inplace_on_operation_level_output_after_a_linear_read_it():
    """A model PyTorch runs: ``h = x * scale; y = lin(h); h.tanh_(); h + y`` (lin.weight
    frozen). The backward is asked for the gradient of the operation's output tensor, which
    after ``tanh_`` is the gradient of the *new* version: the branch through lin (which read
    the old version) is pruned, so lin's output hook never fires. lin.bias and scale both
    come out 0 (rel. error 1.0), silently. Found with a tied Embedding (taken at the operation
    level) followed by a Linear and ``h.tanh_()``."""
    x, y = _inputs()
    assert_passes(_seeded(_OperationOutputChangedAfterLinear()), x, y)


def test_inplace_op_on_attention_taken_at_the_operation_level():
    """Found by ``make fuzz`` (model 2,925 of the fixed sequence): an nn.MultiheadAttention
    called twice is taken at the operation level, where its use returns a tuple; an in-place
    ReLU then writes its output. The copy that must flow on was returned only when the output
    was the whole result, not inside the tuple, so the write still reached the hooked tensor
    and both attention weights came out 0 (rel. error 1.0), silently."""
    spec = {"d": 4, "stem": {"stem": "linear", "F": 1, "T": 1, "bias": False, "op": "none"},
            "blocks": [{"kind": "shared", "module": "mha", "bias": False, "op": "relu", "residual": False},
                       {"kind": "linear", "rank": "3d", "bias": False, "op": "none", "input_op": "relu",
                        "residual": False, "detach": "input"}],
            "head": {"classes": 2, "pool": "mean", "head": "linear", "bias": False, "out": "tensor"},
            "N": 1, "seed": 0, "freeze_seed": None, "chunk": None, "engine": "default"}
    model, x, y = build(spec)
    assert_passes(model, x, y)
