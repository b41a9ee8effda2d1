"""Whole-model equality, fast engines vs the reference: the Fisher and the forgotten model."""


import pytest
import torch

import mnemo_fast as mf
import mnemo_fast.reference as ref
from mnemo_fast.fast import _ext
from mnemo_fast.fast.engine import EXTENSION, HOOKS_ATEN
from mnemo_fast.fast.plan import make_plan
from mnemo_fast.modeling import eval_mode, logits_of, trainable_parameters
import models_zoo as zoo

ENGINES = [pytest.param(HOOKS_ATEN, id="hooks-aten"),
           pytest.param(EXTENSION, id="ext", marks=pytest.mark.skipif(not _ext.available(), reason="extension disabled or not built"))]
MODELS = {
    "mlp": zoo.mlp, "cnn": zoo.cnn, "resnet": zoo.resnet, "transformer": zoo.transformer,
    "transformer_seq_first_masked": zoo.masked_transformer, "vit": zoo.vit,
    "embedding": zoo.embedding_bag, "norms": zoo.norm_net, "tied_shared_custom": zoo.tied_and_shared,
    "depthwise": zoo.depthwise,
}


def problem(name, dtype=torch.float64, n=6, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model, shape = MODELS[name]()
    model = model.to(dtype)
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model.train()
        with torch.no_grad():  # non-trivial running statistics
            model(zoo.make_inputs(shape, 8, g).to(dtype))
    x = zoo.make_inputs(shape, n, g)
    x = x.to(dtype) if x.is_floating_point() else x
    classes = list(model.parameters())[-1].shape[0]
    return model, x, torch.randint(0, classes, (n,), generator=g)


def assert_fisher_close(got, expected, rtol):
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=rtol * expected[name].abs().max().item(), msg=name)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_fisher_equals_reference(engine, name, dtype):
    model, x, y = problem(name, dtype)
    expected = ref.fisher_diagonal(model, x, y)
    got = mf.fisher_diagonal(model, x, y, engine=engine)
    assert_fisher_close(got, expected, rtol=1e-10 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_single_sample_and_chunks(engine, name):
    model, x, y = problem(name, n=5)
    assert_fisher_close(mf.fisher_diagonal(model, x[:1], y[:1], engine=engine),
                        ref.fisher_diagonal(model, x[:1], y[:1]), 1e-10)
    assert_fisher_close(mf.fisher_diagonal(model, x, y, chunk_size=2, engine=engine),
                        ref.fisher_diagonal(model, x, y), 1e-10)


def test_plan_routes_what_no_rule_can_take():
    model, x, y = problem("transformer")
    with eval_mode(model):
        plan = make_plan(model, trainable_parameters(model), x[:1], y[:1], logits_of)
    assert plan.generic == [] and plan.broadcast == ["position"]  # added to every sample
    taken = {full for _, names in plan.rule_modules.values() for full in names.values()}
    assert {"embed.weight", "layer.self_attn.in_proj_weight", "layer.self_attn.out_proj.weight",
            "layer.linear1.weight", "layer.norm1.weight", "head.weight"} <= taken

    model, x, y = problem("tied_shared_custom")
    with eval_mode(model):
        plan = make_plan(model, trainable_parameters(model), x[:1], y[:1], logits_of)
    # tied weight and a multiplied raw parameter: no layer rule, taken at the operation level
    # (two linear uses summed per sample; a mul); Linear called twice and circular Conv1d:
    # rules; an added raw parameter: broadcast
    assert plan.generic == [] and plan.broadcast == ["scale.offset"]
    assert set(plan.operations.names) == {"first.weight", "scale.gain"}
    assert sorted(u.op for u in plan.operations.uses if u.name == "first.weight") == ["linear", "linear"]
    taken = {full for _, names in plan.rule_modules.values() for full in names.values()}
    assert {"shared.weight", "shared.bias", "conv.weight", "second.bias"} <= taken


@pytest.mark.parametrize("engine", ENGINES)
def test_batchnorm_in_train_mode_and_input_requiring_grad(engine):
    model, x, y = problem("resnet")
    model.train()
    expected = ref.fisher_diagonal(model, x, y)
    got = mf.fisher_diagonal(model, x.clone().requires_grad_(), y, engine=engine)
    assert model.training and all(m.training for m in model.modules())
    assert_fisher_close(got, expected, 1e-10)
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("engine", ENGINES)
def test_frozen_layers_are_skipped(engine):
    model, x, y = problem("cnn")
    model[0].requires_grad_(False)
    got = mf.fisher_diagonal(model, x, y, engine=engine)
    assert "0.weight" not in got
    assert_fisher_close(got, ref.fisher_diagonal(model, x, y), 1e-10)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["shift", "gaussian"])
@pytest.mark.parametrize("name,classes", [("mlp", [0]), ("resnet", [1, 3]), ("norms", [2]), ("tied_shared_custom", [0, 1])])
def test_forgotten_model_equals_reference(engine, name, classes, mode):
    model, x, _ = problem(name)
    codes = mf.MnemonicCodes.generate(list(model.parameters())[-1].shape[0], x.shape[1:], seed=3)
    kwargs = dict(lambda1=1e-2, lambda2=10.0, mode=mode)
    a = ref.forget(model, codes, classes, generator=torch.Generator().manual_seed(0), **kwargs)
    b = mf.forget(model, codes, classes, engine=engine, generator=torch.Generator().manual_seed(0), **kwargs)
    assert a.sign == b.sign and a.candidate_scores == b.candidate_scores
    for (n, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-9, atol=1e-12, msg=n)


def test_forget_leaves_a_train_mode_batchnorm_model_untouched():
    model, _, _ = problem("resnet")
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    codes = mf.MnemonicCodes.generate(4, (3, 8, 8), seed=3)
    mf.forget(model, codes, [1], lambda1=1e-3, lambda2=10.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # running statistics included


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet", "transformer", "transformer_seq_first_masked", "vit", "embedding", "norms",
                                  "depthwise"])
def test_models_made_of_supported_layers_never_take_the_generic_path(engine, name, monkeypatch):
    model, x, y = problem(name)
    expected = ref.fisher_diagonal(model, x, y)

    def forbidden(*args, **kwargs):
        raise AssertionError("the generic per-sample path ran")

    monkeypatch.setattr("mnemo_fast.fast.engine.ref_fisher.sum_squared_grads", forbidden)
    assert_fisher_close(mf.fisher_diagonal(model, x, y, engine=engine), expected, 1e-10)


class _WeightStandardisedConv(torch.nn.Conv2d):
    """Keeps Conv2d.forward but changes what it computes: must not take the conv rule."""

    def _conv_forward(self, input, weight, bias):
        weight = (weight - weight.mean((1, 2, 3), keepdim=True)) / (weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return super()._conv_forward(input, weight, bias)


class _Wrapped(torch.nn.Linear):
    """Like FSDP2's FSDPLinear: a subclass that only changes construction and ``_apply``."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def _apply(self, *args, **kwargs):
        return super()._apply(*args, **kwargs)


def test_subclasses_take_a_rule_only_when_they_compute_the_base_forward():
    from mnemo_fast.fast.rules import rule_for

    assert rule_for(_Wrapped(3, 2)) is rule_for(torch.nn.Linear(3, 2)) is not None
    assert rule_for(_WeightStandardisedConv(2, 3, 3)) is None
    model = torch.nn.Sequential(_WeightStandardisedConv(1, 3, 3), torch.nn.Flatten(), torch.nn.Linear(3 * 36, 4))
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 4, (5,))
    fast, exact = mf.fisher_diagonal(model, x, y), ref.fisher_diagonal(model, x, y)
    for name in exact:
        torch.testing.assert_close(fast[name], exact[name], rtol=1e-5, atol=1e-7)


def test_rule_registry_maps_each_layer_class_to_its_rule():
    from mnemo_fast.fast.rules import RULES, Rule, rule_for
    from mnemo_fast.fast.rules.attention import MultiheadAttentionRule
    from mnemo_fast.fast.rules.conv import ConvRule
    from mnemo_fast.fast.rules.embedding import EmbeddingRule
    from mnemo_fast.fast.rules.linear import LinearRule
    from mnemo_fast.fast.rules.norm import NormRule

    nn = torch.nn
    expected = {nn.Linear: LinearRule, nn.Conv1d: ConvRule, nn.Conv2d: ConvRule, nn.Embedding: EmbeddingRule,
                nn.LayerNorm: NormRule, nn.GroupNorm: NormRule, nn.BatchNorm2d: NormRule,
                nn.MultiheadAttention: MultiheadAttentionRule}
    for cls, rule_cls in expected.items():
        assert isinstance(RULES[cls], rule_cls) and isinstance(RULES[cls], Rule)
    assert isinstance(rule_for(nn.MultiheadAttention(4, 2)), MultiheadAttentionRule)
    assert rule_for(nn.MultiheadAttention(4, 2, add_bias_kv=True)) is None  # not supported: generic
    assert rule_for(nn.ReLU()) is None and rule_for(nn.ConvTranspose2d(2, 2, 3)) is None


# The modules a cycle went through (rules <-> attention), each imported first.
FAST_MODULES = ["mnemo_fast.fast.rules", "mnemo_fast.fast.rules.attention", "mnemo_fast.fast.ops",
                "mnemo_fast.fast.plan", "mnemo_fast.fast.engine"]


def test_fast_path_modules_import_alone():
    """Each module imports first in a fresh interpreter (no import cycle), without loading _C."""
    import subprocess
    import sys

    code = "import importlib, sys; importlib.import_module(sys.argv[1]); print('mnemo_fast._C' in sys.modules)"
    runs = {m: subprocess.Popen([sys.executable, "-c", code, m], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for m in FAST_MODULES}
    for module, run in runs.items():
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, (module, err[-2000:])
        assert out.strip() == "False", module


@pytest.mark.parametrize("engine", ENGINES)
def test_a_callers_hook_that_replaces_a_layers_output_keeps_the_fisher_exact(engine):
    """The rules need the gradient of the layer's own output: the capture's hook runs before
    any hook of the caller's, which may replace that output (here 2 * out + 1)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    model[0].register_forward_hook(lambda module, args, out: out * 2 + 1)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    assert_fisher_close(mf.fisher_diagonal(model, x, y, engine=engine), ref.fisher_diagonal(model, x, y), 1e-10)
