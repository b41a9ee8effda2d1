"""Parameters taken at the level of operations (mnemo_fast/fast/rules/operations.py): exact
per-sample squared gradients for parameters outside the modules the layer rules know, samples
folded into a leading dimension, and the generic path (with a reason) where nothing is proven."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mnemo_fast as mf
import mnemo_fast.reference as ref
from mnemo_fast.explain import GenericPathWarning
from mnemo_fast.fast import _ext
from mnemo_fast.fast.engine import EXTENSION, HOOKS_ATEN
from models_zoo import TextBlock, WindowBlock

#: the fast engine: compiled kernels, or their pure-PyTorch twins when the extension is off
FAST = EXTENSION if _ext.available() else HOOKS_ATEN


class MixesSamples(nn.Module):
    """A raw parameter applied after a batch-wide centring: no per-sample layout exists."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x)
        return self.head((h - h.mean(0, keepdim=True)) * self.scale)


def _problem(name, dtype, n=5, seed=0):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    if name == "text":
        model, x = TextBlock(), torch.randint(0, 20, (n, 6), generator=generator)
    elif name == "windows":
        model, x = WindowBlock(), torch.randn(n, 3, 4, 4, generator=generator, dtype=dtype)
    else:
        model, x = MixesSamples(), torch.randn(n, 4, generator=generator, dtype=dtype)
    y = torch.randint(0, 3 if name != "mixes" else 2, (n,), generator=generator)
    return model.to(dtype).eval(), x, y


def _assert_close(fast, exact, rtol):
    assert fast.keys() == exact.keys()
    for name, value in exact.items():
        scale = float(value.abs().max())
        assert torch.allclose(fast[name], value, rtol=rtol, atol=rtol * scale), name


@pytest.mark.parametrize("name", ["text", "windows"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_operation_level_fisher_equals_reference(name, dtype, rtol, chunk_size):
    model, x, y = _problem(name, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GenericPathWarning)  # nothing may go generic here
        fast = mf.fisher_diagonal(model, x, y, chunk_size=chunk_size, engine=FAST)
    _assert_close(fast, ref.fisher_diagonal(model, x, y), rtol)


def test_explain_names_the_operation_of_each_parameter():
    model, x, y = _problem("text", torch.float64)
    routes = {r.name: r for r in mf.explain(model, x, y, engine=FAST).routes}
    assert not [r for r in routes.values() if r.path == "generic"]
    assert routes["proj.weight"].path == "operation" and routes["proj.weight"].detail == "addmm"
    assert routes["norm.weight"].detail == "mul" and routes["gamma"].detail == "mul"
    assert routes["temperature"].detail in ("div", "__truediv__")
    assert routes["norm2.weight"].path == "operation"  # (1 + w) * x: through its chain
    assert routes["head.weight"].path == "rule"
    model, x, y = _problem("windows", torch.float64)
    routes = {r.name: r for r in mf.explain(model, x, y, engine=FAST).routes}
    assert routes["qkv.weight"].path == "operation"  # windows folded into the rows
    assert routes["table"].path == "operation" and routes["norm.weight"].detail == "layer_norm"


def test_mixed_samples_go_generic_with_a_reason_and_a_warning():
    model, x, y = _problem("mixes", torch.float64)
    explanation = mf.explain(model, x, y, engine=FAST)
    generic = {r.name: r.detail for r in explanation.generic}
    assert set(generic) == {"scale"} and "not grouped by sample" in generic["scale"]
    with pytest.warns(GenericPathWarning, match="scale"):
        fast = mf.fisher_diagonal(model, x, y, engine=FAST)
    # (only ``scale`` is compared: a forward that mixes samples has no per-sample layout, and
    # the reference's per-sample loss sees each sample alone)
    exact = ref.fisher_diagonal(model, x, y)
    assert torch.allclose(fast["scale"], exact["scale"], rtol=1e-10, atol=1e-300)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GenericPathWarning)  # once per model
        mf.fisher_diagonal(model, x, y, engine=FAST)


def test_reference_explain_lists_every_parameter_on_the_reference():
    model, x, y = _problem("text", torch.float64)
    explanation = ref.explain(model, x, y)
    assert explanation.backend == "reference"
    assert [r.name for r in explanation.routes] == [n for n, _ in model.named_parameters()]
    assert {r.path for r in explanation.routes} == {"reference"}


def test_forget_on_operation_level_model_matches_reference():
    from mnemo_fast.codes import MnemonicCodes

    model, _, _ = _problem("windows", torch.float64)
    codes = MnemonicCodes.generate(3, (3, 4, 4), per_class=2, seed=0).to(torch.float64)
    fast = mf.forget(model, codes, [1], lambda1=1e-2, lambda2=1.0)
    exact = ref.forget(model, codes, [1], lambda1=1e-2, lambda2=1.0)
    assert fast.sign == exact.sign
    for (name, a), b in zip(fast.model.named_parameters(), exact.model.parameters()):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), name


def _in_place_model():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.gain = nn.Parameter(1 + 0.1 * torch.randn(4))
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            h = self.lin(x)
            h.mul_(self.gain)  # in place on an activation (Linear's backward does not need it)
            return self.head(torch.tanh(h))

    torch.manual_seed(0)
    model = InPlace().double().eval()
    return model, torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1])


def test_in_place_use_goes_generic_and_stays_exact():
    model, x, y = _in_place_model()
    generic = {r.name: r.detail for r in mf.explain(model, x, y, engine=FAST).generic}
    assert set(generic) == {"gain"} and "in-place operation mul_" in generic["gain"]
    with pytest.warns(GenericPathWarning):
        _assert_close(mf.fisher_diagonal(model, x, y, engine=FAST), ref.fisher_diagonal(model, x, y), 1e-10)


def test_a_parameter_expanded_to_the_batch_before_its_use_is_refused_not_guessed():
    class ClassToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls = nn.Parameter(torch.randn(1, 1, 4))
            self.lin = nn.Linear(4, 2)

        def forward(self, x):  # x [N, T, 4]; the token scaled (no broadcast rule), expanded to N, concatenated
            tokens = torch.cat([(2.0 * self.cls).expand(x.shape[0], -1, -1), x], dim=1)
            return self.lin(tokens.tanh().mean(1))

    torch.manual_seed(0)
    model = ClassToken().double().eval()
    x, y = torch.randn(4, 3, 4, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    routes = {r.name: r for r in mf.explain(model, x, y, engine=FAST).routes}
    assert routes["cls"].path == "generic" and "changes shape with the batch" in routes["cls"].detail
    with pytest.warns(GenericPathWarning):
        _assert_close(mf.fisher_diagonal(model, x, y, engine=FAST), ref.fisher_diagonal(model, x, y), 1e-10)


class SharedPositions(nn.Module):
    """BERT-style: position ids [1, T] shared by the batch, looked up in an nn.Embedding and
    added to every sample (the Embedding's input never holds the samples)."""

    def __init__(self, vocab=12, t=5, d=6):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d)
        self.positions = nn.Embedding(t, d)
        self.register_buffer("ids", torch.arange(t)[None])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.tokens(x) + self.positions(self.ids)).mean(1))


@pytest.mark.parametrize("n", [1, 2, 5])
def test_an_embedding_of_ids_shared_by_the_batch_is_not_a_layer_rule(n):
    torch.manual_seed(0)
    model = SharedPositions().double().eval()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 12, (n, 5), generator=g), torch.randint(0, 3, (n,), generator=g)
    routes = {r.name: r for r in mf.explain(model, x, y, engine=FAST).routes}
    assert routes["tokens.weight"].path == "rule"
    assert routes["positions.weight"].path == "operation"  # a constant lookup, added to the samples
    with warnings.catch_warnings():
        warnings.simplefilter("error", GenericPathWarning)  # the pass must not fail over silently
        fast = mf.fisher_diagonal(model, x, y, engine=FAST)
    _assert_close(fast, ref.fisher_diagonal(model, x, y), 1e-10)


def test_a_batched_pass_that_contradicts_the_plan_warns(monkeypatch):
    """Whatever makes the batched pass fail over to the generic path says so, once."""
    from mnemo_fast.fast import capture

    torch.manual_seed(0)
    model = SharedPositions().double().eval()
    x, y = torch.randint(0, 12, (4, 5)), torch.tensor([0, 1, 2, 0])
    original = capture.Capture._hook

    def mismatch(self, *args):
        self.batch_mismatch = True
        return original(self, *args)

    monkeypatch.setattr(capture.Capture, "_hook", mismatch)
    with pytest.warns(GenericPathWarning, match="the batched pass failed"):
        fast = mf.fisher_diagonal(model, x, y, engine=FAST)
    _assert_close(fast, ref.fisher_diagonal(model, x, y), 1e-10)


@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_functional_embedding_with_and_without_frequency_scaling(scale_grad_by_freq):
    """F.embedding on a raw table: the unique-rows sum, or (frequency-scaled gradients, counted
    within each sample as the reference's per-sample loss counts them) the operation's vjp."""
    class Table(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(7, 3))
            self.head = nn.Linear(3, 2)

        def forward(self, ids):
            rows = F.embedding(ids, self.table, padding_idx=0, scale_grad_by_freq=scale_grad_by_freq)
            return self.head(torch.tanh(rows).mean(1))

    torch.manual_seed(0)
    model = Table().double().eval()
    x, y = torch.tensor([[1, 1, 2, 0], [3, 3, 3, 1], [0, 6, 6, 5]]), torch.tensor([0, 1, 1])
    assert {r.name: r.path for r in mf.explain(model, x, y, engine=FAST).routes}["table"] == "operation"
    _assert_close(mf.fisher_diagonal(model, x, y, engine=FAST), ref.fisher_diagonal(model, x, y), 1e-10)


def test_rule_parameters_join_the_generic_pass_when_one_pass_is_cheaper(monkeypatch):
    """One generic parameter costs a whole per-sample pass: the others join it (path
    "joined", exact) instead of adding a batched pass on top (never slower than the reference)."""
    model, x, y = _in_place_model()
    routes = {r.name: r for r in mf.explain(model, x, y, engine=FAST).routes}
    assert routes["gain"].path == "generic"
    assert {routes[n].path for n in ("lin.weight", "lin.bias", "head.weight", "head.bias")} == {"joined"}
    assert "per-sample pass of the 1 generic parameter" in routes["lin.weight"].detail

    def no_batched_pass(*args, **kwargs):
        raise AssertionError("the batched rule pass ran")

    monkeypatch.setattr(type(FAST), "_rule_pass", no_batched_pass)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GenericPathWarning)
        _assert_close(mf.fisher_diagonal(model, x, y, engine=FAST), ref.fisher_diagonal(model, x, y), 1e-10)


def test_rule_parameters_keep_the_batched_pass_when_the_generic_ones_fit_larger_chunks(monkeypatch):
    """When every parameter's per-sample gradients need more chunks than the generic
    parameters' alone, two passes cost less: the rules keep theirs."""
    from mnemo_fast.reference import fisher as ref_fisher

    model, x, y = _in_place_model()
    monkeypatch.setattr(ref_fisher, "_VMAP_BYTES", 4 * 4 * 5)  # gain [4] x 5 samples: one chunk
    routes = {r.name: r for r in mf.explain(model, x, y, engine=FAST).routes}
    assert routes["gain"].path == "generic" and routes["lin.weight"].path == "rule"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GenericPathWarning)
        _assert_close(mf.fisher_diagonal(model, x, y, engine=FAST), ref.fisher_diagonal(model, x, y), 1e-10)
    # a chunk size given by the caller is the same for both passes: one pass again
    engine_routes = FAST.routes(model, x, y)
    assert engine_routes["lin.weight"].path == "rule"


def _watch_vjp(monkeypatch) -> list[str]:
    """The names of the parameters whose per-sample gradients go through the vectorised vjp."""
    from mnemo_fast.fast.rules import operations

    calls = []
    real = operations._per_sample_vjp
    monkeypatch.setattr(operations, "_per_sample_vjp", lambda *a: calls.append(a[1].name) or real(*a))
    return calls


class Elementwise(nn.Module):
    """Parameters met by sums, differences and products in every operand position, with
    constants and sample-holding operands, read off the output gradient (no vjp)."""

    def __init__(self, d=6, classes=3):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.a = nn.Parameter(torch.randn(d))
        self.b = nn.Parameter(torch.randn(1, d))
        self.c = nn.Parameter(torch.randn(d))
        self.e = nn.Parameter(torch.randn(3, 1))
        self.f = nn.Parameter(torch.randn(d))
        self.register_buffer("const", torch.randn(3, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # x [N, 3, d]
        h = self.lin(x)
        h = self.a - h                      # parameter first in a difference
        h = torch.sub(h, self.b, alpha=0.5)  # second, with alpha
        h = h * self.c                      # product with a sample-holding operand
        h = torch.tanh(h) + self.e * self.const  # parameter-only product, then a sum (chain)
        h = self.f.__rmul__(h)              # reflected product
        return self.head(h.mean(1))


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_sums_and_products_are_read_off_the_output_gradient(dtype, rtol, monkeypatch):
    torch.manual_seed(0)
    model = Elementwise().to(dtype).eval()
    x = torch.randn(4, 3, 6, dtype=dtype)
    y = torch.tensor([0, 1, 2, 1])
    routes = {r.name: r.path for r in mf.explain(model, x, y, engine=FAST).routes}
    assert routes["c"] == routes["f"] == "operation", routes
    assert {routes["a"], routes["b"]} <= {"operation", "broadcast"}, routes  # the broadcast rule may take sums
    calls = _watch_vjp(monkeypatch)
    _assert_close(mf.fisher_diagonal(model, x, y, engine=FAST), ref.fisher_diagonal(model, x, y), rtol)
    assert not set(calls) & set("abcf"), calls  # e goes through its chain's sum: any path is fine


def test_conv1d_bias_is_read_off_the_output_gradient(monkeypatch):
    """GPT-2's addmm bias: the output gradient summed over rows, not a vjp that reruns the
    matrix product."""
    model, x, y = _problem("text", torch.float64)
    calls = _watch_vjp(monkeypatch)
    _assert_close(mf.fisher_diagonal(model, x, y, engine=FAST), ref.fisher_diagonal(model, x, y), 1e-10)
    assert "temperature" in calls  # the division still takes the vjp: the watch sees it
    assert not [name for name in calls if name.endswith(".bias")], calls
