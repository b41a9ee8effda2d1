"""The reference Fisher equals a brute-force batch-1 loop written here, independently."""

import pytest
import torch
import torch.nn.functional as F

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
