"""The reference Fisher equals a brute-force batch-1 loop written here, independently."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mnemo_fast.reference as ref
from mnemo_fast.reference.fisher import sum_squared_grads
import models_zoo as zoo

MODELS = {"mlp": zoo.mlp, "cnn_batchnorm": zoo.cnn, "embedding": zoo.embedding_bag, "layernorm": zoo.norm_net}


def brute_force_fisher(model, inputs, targets):
    """sum_n (dL_n/dw)^2 by one ordinary backward per sample, model in eval mode."""
    model.eval()
    sums = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in zip(inputs, targets):
        model.zero_grad()
        F.cross_entropy(model(x.unsqueeze(0)), y.unsqueeze(0)).backward()
        for n, p in model.named_parameters():
            sums[n] += p.grad.square()
    return sums


def setup(name, dtype, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model, shape = MODELS[name]()
    model = model.to(dtype)
    inputs = zoo.make_inputs(shape, n, g)
    if inputs.is_floating_point():
        inputs = inputs.to(dtype)
    num_classes = list(model.parameters())[-1].shape[0]
    targets = torch.randint(0, num_classes, (n,), generator=g)
    if name == "cnn_batchnorm":  # non-trivial running statistics
        model.train()
        with torch.no_grad():
            model(zoo.make_inputs(shape, 16, g).to(dtype))
    return model, inputs, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(MODELS))
def test_reference_equals_batch1_loop(name, dtype):
    model, inputs, targets = setup(name, dtype)
    model.train()  # the reference must switch to eval itself and restore this
    got = ref.fisher_diagonal(model, inputs, targets, reduction="sum")
    assert model.training and all(m.training for m in model.modules())
    expected = brute_force_fisher(model, inputs, targets)
    assert got.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-7 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("name", list(MODELS))
def test_mean_is_sum_over_n_and_chunks_agree(name):
    model, inputs, targets = setup(name, torch.float64, n=5)
    total = ref.fisher_diagonal(model, inputs, targets, reduction="sum")
    mean = ref.fisher_diagonal(model, inputs, targets, chunk_size=2)
    for n in total:
        torch.testing.assert_close(mean[n] * 5, total[n])


@pytest.mark.parametrize("name", ["mlp", "embedding"])
def test_vmap_and_loop_paths_agree(name):
    model, inputs, targets = setup(name, torch.float64)
    a = sum_squared_grads(model.eval(), inputs, targets, method="vmap")
    b = sum_squared_grads(model, inputs, targets, method="loop")
    for n in a:
        torch.testing.assert_close(a[n], b[n])


def test_is_not_the_squared_batch_gradient():
    model, inputs, targets = setup("mlp", torch.float64)
    per_sample = ref.fisher_diagonal(model, inputs, targets, reduction="sum")
    model.zero_grad()
    F.cross_entropy(model(inputs), targets, reduction="sum").backward()
    w = next(model.parameters())
    assert not torch.allclose(per_sample["1.weight"], w.grad.square())


def test_frozen_parameters_are_left_out():
    model, inputs, targets = setup("mlp", torch.float64)
    model[1].weight.requires_grad_(False)
    got = ref.fisher_diagonal(model, inputs, targets)
    assert set(got) == {"1.bias", "3.weight", "3.bias"}


def test_single_sample_and_bad_shapes():
    model, inputs, targets = setup("mlp", torch.float64, n=1)
    got = ref.fisher_diagonal(model, inputs, targets)
    expected = brute_force_fisher(model, inputs, targets)
    torch.testing.assert_close(got["3.bias"], expected["3.bias"])
    with pytest.raises(ValueError, match="reduction"):
        ref.fisher_diagonal(model, inputs, targets, reduction="max")
    with pytest.raises(ValueError, match="targets"):
        ref.fisher_diagonal(model, inputs, targets[:0])


@pytest.mark.parametrize("chunk", [None, 2])
def test_a_module_registered_twice_is_left_as_it_was(chunk):
    """torch.func.functional_call on a module registered twice (nn.Sequential(lin, act, lin))
    leaves torch 2.13's swapped-in wrapper in the module: the caller's model lost its
    Parameters (and copy.deepcopy failed on it, so forget(inplace=False) refused it). The
    reference puts back what each module held, and its sum still equals the batch-1 loop."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(3, 4))
    held = {name: p for name, p in model.named_parameters(remove_duplicate=False)}
    x, y = torch.randn(5, 3), torch.randint(0, 4, (5,))
    got = sum_squared_grads(model, x, y, chunk_size=chunk)
    after = dict(model.named_parameters(remove_duplicate=False))
    assert after.keys() == held.keys() and all(after[n] is held[n] for n in held)
    copy.deepcopy(model)
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for xi, yi in zip(x, y):
        loss = F.cross_entropy(model(xi[None]), yi[None], reduction="sum")
        for (name, p), g in zip(model.named_parameters(), torch.autograd.grad(loss, list(model.parameters()))):
            expected[name] += g.square()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)
