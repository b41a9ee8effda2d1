"""The Fisher pair on one plan: ``sum_squared_grads_groups`` of the fast engines equals, bit for
bit, one ``sum_squared_grads`` per block of rows (and the reference's sums), plans once per call,
and keeps the last plan only while nothing it reads changes (a changed model or input shape is
planned afresh: fast/engine.py, PlanCache)."""

import copy

import pytest
import torch
from torch import nn

import mnemo_fast as mf
from mnemo_fast.fast import engine as fast_engine
from mnemo_fast.fast.engine import HOOKS_ATEN
from mnemo_fast.reference.engine import REFERENCE
from mnemo_fast.modeling import eval_mode
from mnemo_fast.codes import MnemonicCodes
from test_fast_engine import ENGINES, MODELS, assert_fisher_close, problem


def expected_blocks(model, x, y, sizes):
    """The reference's sums, one call per block of consecutive rows."""
    out, start = [], 0
    for size in sizes:
        out.append(REFERENCE.sum_squared_grads(model, x[start : start + size], y[start : start + size]))
        start += size
    return out


def count_plans(monkeypatch):
    calls = []
    real = fast_engine.make_plan
    monkeypatch.setattr(fast_engine, "make_plan", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    return calls


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("sizes, chunk", [([1, 6], None), ([3, 4], None), ([2, 5], 3), ([5, 2], 2), ([2, 2, 3], 4)])
def test_groups_equal_the_reference_per_block(engine, name, sizes, chunk):
    """Every model of the zoo (linear, conv, embedding, norms, broadcast raw parameters,
    attention, tied and custom parameters), blocks split inside and across chunks."""
    model, x, y = problem(name, n=sum(sizes))
    with eval_mode(model):
        expected = expected_blocks(model, x, y, sizes)
        got = engine.sum_squared_grads_groups(model, x, y, sizes, chunk)
    assert len(got) == len(sizes)
    for g, e in zip(got, expected):
        assert_fisher_close(g, e, rtol=1e-10)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("chunk", [None, 2])
def test_groups_are_bitwise_the_calls_per_block(engine, name, chunk):
    """The shared plan changes no result: float32, each block's sums equal a call on it alone."""
    model, x, y = problem(name, dtype=torch.float32, n=7)
    with eval_mode(model):
        got = engine.sum_squared_grads_groups(model, x, y, [3, 4], chunk)
        alone = [engine.sum_squared_grads(model, x[:3], y[:3], chunk), engine.sum_squared_grads(model, x[3:], y[3:], chunk)]
    for g, a in zip(got, alone):
        assert list(g) == list(a)
        for key in a:
            assert torch.equal(g[key], a[key]), key


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_one_group_is_sum_squared_grads(engine, name):
    model, x, y = problem(name, dtype=torch.float32, n=5)
    with eval_mode(model):
        (got,) = engine.sum_squared_grads_groups(model, x, y, [5], 2)
        assert_fisher_close(got, engine.sum_squared_grads(model, x, y, 2), rtol=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_sizes_and_an_empty_block(engine):
    model, x, y = problem("mlp", n=4)
    with eval_mode(model):
        with pytest.raises(ValueError, match="do not add up"):
            engine.sum_squared_grads_groups(model, x, y, [1, 2])
        empty, whole = engine.sum_squared_grads_groups(model, x, y, [0, 4])
        assert_fisher_close(whole, REFERENCE.sum_squared_grads(model, x, y), rtol=1e-10)
        for name, value in empty.items():
            assert not value.any(), name


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["mlp", "transformer", "vit", "tied_shared_custom"])
def test_plans_once_per_call(engine, name, monkeypatch):
    """One plan for the pair, whatever the rules (attention, broadcast, tied and custom)."""
    plans = count_plans(monkeypatch)
    model, x, y = problem(name, n=6)
    with eval_mode(model):
        engine.sum_squared_grads_groups(model, x, y, [2, 4])
    assert len(plans) == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_forget_plans_once(engine, monkeypatch):
    """The whole forget (the Fisher of the forget and of the retained codes) plans once."""
    plans = count_plans(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))
    codes = MnemonicCodes.generate(5, (1, 4, 4), per_class=2)
    mf.forget(model, codes, [1, 3], lambda1=1e-3, lambda2=10.0, engine=engine)
    assert len(plans) == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_a_changed_model_is_planned_again(engine, monkeypatch):
    """No plan outlives a change: after a layer is swapped for one no rule takes, the next call
    plans the model as it is now and still equals the reference."""
    plans = count_plans(monkeypatch)
    model, x, y = problem("mlp", n=6)
    with eval_mode(model):
        first = engine.sum_squared_grads_groups(model, x, y, [2, 4])
        for g, e in zip(first, expected_blocks(model, x, y, [2, 4])):
            assert_fisher_close(g, e, rtol=1e-10)
        linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
        parent = next(p for p in model.modules() if linear in p.children())
        key = next(k for k, m in parent.named_children() if m is linear)

        class Custom(nn.Linear):  # overrides forward: no rule may take it
            def forward(self, inp):
                return nn.functional.linear(inp, self.weight * 1.5, self.bias)

        swapped = Custom(linear.in_features, linear.out_features).to(linear.weight.dtype)
        setattr(parent, key, swapped)
        second = engine.sum_squared_grads_groups(model, x, y, [2, 4])
        for g, e in zip(second, expected_blocks(model, x, y, [2, 4])):
            assert_fisher_close(g, e, rtol=1e-10)
    assert len(plans) == 2


@pytest.mark.parametrize("engine", ENGINES)
def test_different_input_shapes_are_planned_again(engine, monkeypatch):
    """A model that takes sequences of any length: each call plans on its own inputs."""
    plans = count_plans(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)).double()
    model(torch.zeros(1, 5, 3, dtype=torch.float64))  # materialise for length 5
    short = torch.randn(4, 5, 3, dtype=torch.float64)
    model_long = copy.deepcopy(model)
    model_long[3] = nn.Linear(4 * 7, 2).double()
    long = torch.randn(4, 7, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    with eval_mode(model), eval_mode(model_long):
        for m, inp in ((model, short), (model_long, long), (model, short)):
            got = engine.sum_squared_grads_groups(m, inp, y, [1, 3])
            for g, e in zip(got, expected_blocks(m, inp, y, [1, 3])):
                assert_fisher_close(g, e, rtol=1e-10)
    assert len(plans) == 3
    assert plans[1] is model_long


def test_session_hands_the_pair_at_once(monkeypatch):
    """The session hands both code sets to the engine at once (forget codes first) and still
    gets the codes' logits before forgetting from the Fisher's own forwards."""
    seen = []
    real = HOOKS_ATEN.sum_squared_grads_groups
    monkeypatch.setattr(HOOKS_ATEN, "sum_squared_grads_groups",
                        lambda model, x, y, sizes, *a: seen.append((y.tolist(), list(sizes))) or real(model, x, y, sizes, *a))
    monkeypatch.setattr(HOOKS_ATEN, "sum_squared_grads", lambda *a, **k: pytest.fail("two calls for the pair"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    codes = MnemonicCodes.generate(4, (1, 4, 4))
    from mnemo_fast.session import CandidateSession, code_logits

    session = CandidateSession(model, codes, [2], engine=HOOKS_ATEN)
    assert seen == [([2, 0, 1, 3], [1, 3])]
    assert session.logits_before is not None
    torch.testing.assert_close(session.logits_before, code_logits(model, session.inputs))


# ---- the plan cache: kept while nothing the plan reads changes -------------------------------

def fresh_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5)).double()


def mlp_data(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("engine", ENGINES)
def test_repeated_forget_plans_once(engine, monkeypatch):
    """forget on the same model again (a new copy each call, inplace=False) reuses the plan;
    the results are the same as with the plan made afresh."""
    plans = count_plans(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))
    codes = MnemonicCodes.generate(5, (1, 4, 4), per_class=2)
    first = mf.forget(model, codes, [1, 3], lambda1=1e-3, lambda2=10.0, engine=engine)
    second = mf.forget(model, codes, [1, 3], lambda1=1e-3, lambda2=10.0, engine=engine)
    assert len(plans) == 1
    fast_engine.PLANS.clear()
    third = mf.forget(model, codes, [1, 3], lambda1=1e-3, lambda2=10.0, engine=engine)
    assert len(plans) == 2
    for name, p in first.model.named_parameters():
        assert torch.equal(p, dict(second.model.named_parameters())[name]), name
        assert torch.equal(p, dict(third.model.named_parameters())[name]), name
    assert first.sign == second.sign == third.sign


def _hook_scaling_output(module, args, output):
    return output * 2.0


CHANGES = {
    "forward hook": lambda m: m[2].register_forward_hook(_hook_scaling_output),
    "forward pre-hook": lambda m: m[3].register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,)),
    "global forward hook": lambda m: torch.nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: out if mod is not m[3] else out + 1.0),
    "module swapped": lambda m: m.__setitem__(2, nn.Sigmoid()),
    "parameter replaced": lambda m: setattr(m[3], "bias", nn.Parameter(torch.ones(5, dtype=torch.float64))),
    "weight tied": lambda m: setattr(m[3], "weight", nn.Parameter(m[1].weight[:5, :12].clone())),
    "requires_grad off": lambda m: m[1].bias.requires_grad_(False),
    "plain attribute": lambda m: setattr(m[0], "start_dim", 1) or setattr(m[0], "end_dim", 2),
    "instance forward": lambda m: setattr(m[2], "forward", lambda x: torch.tanh(x) * 3.0),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_model_is_planned_again_with_the_cache(engine, change, monkeypatch):
    """The same call twice plans once; after a change the plan depends on (hooks, modules,
    parameters, requires_grad, a module's attributes or forward), the next call plans afresh
    and equals the reference on the model as it is now."""
    plans = count_plans(monkeypatch)
    model, (x, y) = fresh_mlp(), mlp_data()
    handles = []
    try:
        with eval_mode(model):
            engine.sum_squared_grads_groups(model, x, y, [2, 4])
            engine.sum_squared_grads_groups(model, x, y, [3, 3])  # other block sizes: the same plan
            assert len(plans) == 1
            handle = CHANGES[change](model)
            handles.append(handle)
            if change == "plain attribute":  # Flatten(1, 2) leaves [N, 4, 4]: Linear(16) no longer fits it
                model[0].end_dim = -1
                model[0].start_dim = 1
                model[0].extra = 3  # a new plain attribute alone changes the signature
            got = engine.sum_squared_grads_groups(model, x, y, [2, 4])
            assert len(plans) == 2
            for g, e in zip(got, expected_blocks(model, x, y, [2, 4])):
                assert_fisher_close(g, e, rtol=1e-10)
            engine.sum_squared_grads_groups(model, x, y, [2, 4])
            assert len(plans) == 2  # and that plan is kept in turn
    finally:
        for handle in handles:
            if hasattr(handle, "remove"):
                handle.remove()


@pytest.mark.parametrize("engine", ENGINES)
def test_other_inputs_output_fn_or_batch_of_one_are_planned_again(engine, monkeypatch):
    plans = count_plans(monkeypatch)
    model, (x, y) = fresh_mlp(), mlp_data()
    with eval_mode(model):
        engine.sum_squared_grads(model, x, y)
        engine.sum_squared_grads(model, x[:4], y[:4])  # another N >= 2: the same plan
        assert len(plans) == 1
        engine.sum_squared_grads(model, x[:1], y[:1])  # N = 1: its probe differs
        assert len(plans) == 2
        engine.sum_squared_grads(model, x.reshape(6, 16), y)  # another per-sample shape
        assert len(plans) == 3
        got = engine.sum_squared_grads(model, x, y, output_fn=lambda out: out * 1.0)
        assert len(plans) == 4
        assert_fisher_close(got, REFERENCE.sum_squared_grads(model, x, y), rtol=1e-10)


@pytest.mark.parametrize("engine", ENGINES)
def test_the_cache_holds_its_model_weakly(engine):
    """The entry goes with its model; a model that is itself a layer with a rule is not kept
    (its plan would keep it alive)."""
    import gc
    import weakref

    model, (x, y) = fresh_mlp(), mlp_data()
    with eval_mode(model):
        engine.sum_squared_grads(model, x, y)
    assert fast_engine.PLANS._entry is not None
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None and fast_engine.PLANS._entry is None
    layer = nn.Linear(3, 2).double()
    with eval_mode(layer):
        engine.sum_squared_grads(layer, torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0]))
    assert fast_engine.PLANS._entry is None


@pytest.mark.parametrize("engine", ENGINES)
def test_a_pass_that_contradicts_its_plan_drops_it(engine, monkeypatch):
    """A cached plan whose pass fails its checks is not used again: the next call plans afresh."""
    plans = count_plans(monkeypatch)
    model, (x, y) = fresh_mlp(), mlp_data()
    with eval_mode(model):
        engine.sum_squared_grads(model, x, y)
        monkeypatch.setattr(engine, "_rule_pass", lambda *a, **k: "forced contradiction")
        with pytest.warns(mf.GenericPathWarning if hasattr(mf, "GenericPathWarning") else UserWarning):
            got = engine.sum_squared_grads(model, x, y)
        assert fast_engine.PLANS._entry is None
        assert_fisher_close(got, REFERENCE.sum_squared_grads(model, x, y), rtol=1e-10)
        monkeypatch.undo()
        plans = count_plans(monkeypatch)
        engine.sum_squared_grads(model, x, y)
        assert len(plans) == 1


# ---- one_pass=True: one forward+backward per chunk for all blocks (forget's Fisher pair) -------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("sizes, chunk", [([1, 6], None), ([2, 5], 7), ([0, 4, 3], None)])
def test_one_pass_groups_equal_the_reference_per_block(engine, name, sizes, chunk):
    """One pass for all blocks (cut by rows; an empty block gives zeros) where all codes fit
    one chunk; models whose captures cannot be cut by rows run one pass per block."""
    model, x, y = problem(name, n=sum(sizes))
    with eval_mode(model):
        expected = expected_blocks(model, x, y, sizes)
        got = engine.sum_squared_grads_groups(model, x, y, sizes, chunk, one_pass=True)
    assert len(got) == len(sizes)
    for g, e in zip(got, expected):
        assert list(g) == list(e)
        assert_fisher_close(g, e, rtol=1e-10)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("chunk, passes", [(None, 1), (7, 1), (2, 4)])
def test_one_pass_groups_run_one_forward_per_chunk(engine, chunk, passes):
    """float32 MLP: one forward for the pair when all codes fit one chunk (not one per block),
    the blocks' own chunks (2 + 2 here) when they do not; the sums agree with the blocks' own
    passes up to float32 rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Sigmoid(), nn.Linear(12, 5))
    x, y = torch.rand(7, 1, 4, 4), torch.arange(7) % 5
    forwards = []
    handle = model.register_forward_hook(lambda m, a, o: forwards.append(a[0].shape[0]))
    with eval_mode(model):
        alone = engine.sum_squared_grads_groups(model, x, y, [3, 4], chunk)
        forwards.clear()
        got = engine.sum_squared_grads_groups(model, x, y, [3, 4], chunk, one_pass=True)
    handle.remove()
    assert len(forwards) == passes and sum(forwards) == 7
    for g, a in zip(got, alone):
        assert list(g) == list(a)
        for key in a:
            torch.testing.assert_close(g[key], a[key], rtol=1e-6, atol=0)
