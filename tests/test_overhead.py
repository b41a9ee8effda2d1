"""The per-call shortcuts of ``forget``: each gives what the long way gives.

``validation.plain_copy`` (the model copy of ``inplace=False``) equals ``copy.deepcopy`` or
declines; docs/METHOD.md, "Inputs that are refused", is unchanged by it.
"""

import copy

import pytest
import torch
from torch import nn

from mnemo_fast import validation
from mnemo_fast.evaluation.models import MLP, SmallCNN
from test_fast_engine import MODELS


def assert_same_copy(got: nn.Module, original: nn.Module) -> None:
    """``got`` is what ``copy.deepcopy(original)`` would be: the same module tree, attributes,
    parameters (values, flags, ties) and buffers, sharing no tensor, dict or module with it."""
    want = copy.deepcopy(original)
    pairs = list(zip(got.modules(), want.modules(), original.modules()))
    assert len(pairs) == len(list(want.modules()))
    for g, w, o in pairs:
        assert type(g) is type(w) and g is not o
        assert vars(g).keys() == vars(w).keys()
        for key, value in vars(g).items():
            if key not in ("_parameters", "_buffers", "_modules"):
                assert value == vars(w)[key], key
                if isinstance(value, (dict, list, set)):
                    assert value is not vars(o)[key], key
    named = dict(got.named_parameters(remove_duplicate=False))
    for name, p in want.named_parameters(remove_duplicate=False):
        assert type(named[name]) is type(p) and named[name].requires_grad == p.requires_grad
        assert torch.equal(named[name], p) and named[name].dtype == p.dtype
        assert named[name].untyped_storage().data_ptr() != dict(original.named_parameters(remove_duplicate=False))[name].untyped_storage().data_ptr()
    assert len(list(got.parameters())) == len(list(want.parameters()))  # ties kept
    buffers = dict(got.named_buffers())
    assert buffers.keys() == dict(want.named_buffers()).keys()
    for name, b in want.named_buffers():
        assert torch.equal(buffers[name], b) and buffers[name].stride() == b.stride()


@pytest.mark.parametrize("name", list(MODELS))
def test_copy_of_is_deepcopy_on_the_zoo(name):
    """Whether plain_copy takes the model or declines (copy_of then deepcopies), the copy is
    deepcopy's."""
    model, _ = MODELS[name]()
    assert_same_copy(validation.copy_of(model), model)


@pytest.mark.parametrize("make", [lambda: MLP((1, 28, 28), 10), lambda: SmallCNN((1, 8, 8), 3),
                                  lambda: nn.TransformerEncoderLayer(16, 2, batch_first=True),
                                  lambda: nn.MultiheadAttention(8, 2)])
def test_plain_copy_takes_torch_layers(make):
    model = make()
    got = validation.plain_copy(model)
    assert got is not None
    assert_same_copy(got, model)
    with torch.no_grad():
        next(got.parameters()).add_(1.0)  # the copy owns its tensors
    assert not torch.equal(next(got.parameters()), next(model.parameters()))


class _OwnDeepcopy(nn.Linear):
    def __deepcopy__(self, memo):
        return nn.Linear(self.in_features, self.out_features)


class _Holder(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.value = value


class _SharedBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        flat = torch.zeros(6)
        self.register_buffer("a", flat[:3])
        self.register_buffer("b", flat[3:])


class _MyParameter(nn.Parameter):
    pass


def _hooked():
    model = nn.Sequential(nn.Linear(3, 2))
    model[0].register_forward_hook(lambda *a: None)
    return model


def _custom_parameter():
    model = nn.Linear(3, 2)
    model.weight = _MyParameter(torch.ones(2, 3))
    return model


@pytest.mark.parametrize("make", [
    _hooked,
    lambda: nn.Sequential(_OwnDeepcopy(3, 2)),
    lambda: _Holder([torch.ones(2)]),          # a list of tensors: deepcopy copies them
    lambda: _Holder(object()),                 # an object deepcopy would copy
    _SharedBuffers,
    _custom_parameter,
], ids=["hook", "own-deepcopy", "tensor-list", "object", "shared-buffers", "parameter-subclass"])
def test_plain_copy_declines_what_it_cannot_prove(make):
    model = make()
    assert validation.plain_copy(model) is None
    copied = validation.copy_of(model)  # deepcopy's answer
    assert type(copied) is type(model)


def test_plain_copy_keeps_ties_and_shared_modules():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    head = nn.Linear(4, 4)
    model.append(head)
    head.weight = shared.weight  # a tied parameter
    got = validation.plain_copy(model)
    assert got is not None
    assert got[0] is got[2] and got[3].weight is got[0].weight
    assert_same_copy(got, model)
