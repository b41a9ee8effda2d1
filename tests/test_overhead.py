"""The per-call shortcuts of ``forget``: each gives what the long way gives.

``validation.plain_copy`` (the model copy of ``inplace=False``) equals ``copy.deepcopy`` or
declines; ``CandidateSession.trial_logits`` (a calibration trial) equals ``set_shift`` then
``logits`` up to float rounding, and bit for bit where no input layer qualifies.
"""

import copy

import pytest
import torch
from torch import nn

import mnemo_fast as mf
from mnemo_fast import session as session_module
from mnemo_fast import validation
from mnemo_fast.calibration import calibrate
from mnemo_fast.codes import MnemonicCodes
from mnemo_fast.evaluation.models import MLP, SmallCNN
from mnemo_fast.fast.engine import HOOKS_ATEN
from mnemo_fast.reference.engine import REFERENCE
from mnemo_fast.session import CandidateSession
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


# ---- a calibration trial: trial_logits ---------------------------------------------------------

class _Doubled(nn.Module):
    """The codes go through an op first: its Linear is not fed the codes themselves."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(16, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(2 * x.flatten(1))))


class _Twice(nn.Module):
    """One Linear called twice per forward (once on the codes): not an input layer."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.tanh(self.lin(x.flatten(1)))
        return self.head(torch.tanh(self.lin(h)))


def _frozen_bias():
    model = MLP((1, 4, 4), 4, hidden=6)
    model[1].bias.requires_grad_(False)
    return model


def _no_bias():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 6, bias=False), nn.Sigmoid(), nn.Linear(6, 4))


SHORTCUT = {"mlp": lambda: MLP((1, 4, 4), 4, hidden=6), "frozen-bias": _frozen_bias, "no-bias": _no_bias}
NO_SHORTCUT = {"cnn": lambda: SmallCNN((1, 4, 4), 4), "doubled": _Doubled, "twice": _Twice}


def _session(make, engine=REFERENCE, dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    model = make().to(dtype).eval()
    codes = MnemonicCodes.generate(4, (1, 4, 4), per_class=2, seed=0)
    return model, CandidateSession(model, codes, [1], engine=engine, **kwargs)


@pytest.mark.parametrize("engine", [REFERENCE, HOOKS_ATEN], ids=["reference", "hooks-aten"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(SHORTCUT) + list(NO_SHORTCUT))
def test_trial_logits_are_set_shift_then_logits(name, dtype, engine):
    model, session = _session({**SHORTCUT, **NO_SHORTCUT}[name], engine, dtype)
    shortcut = name in SHORTCUT
    start = session.logits()
    assert (session._input_layers() is not None) == shortcut
    for lambda1, lambda2, sign in ((1e-3, 10.0, 1), (1e-1, 1e3, -1), (3.0, 3e4, 1)):
        got = session.trial_logits(lambda1, lambda2, sign)
        assert torch.equal(session.logits(), got)  # until the next write: the trial's logits
        assert all("forward" not in vars(m) for m in model.modules())  # no layer left replaced
        session.set_shift(lambda1, lambda2, sign)
        want = session.logits()
        if shortcut:
            torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
        else:
            assert torch.equal(got, want)
    session.restore()
    for p, original in zip(session.live, session.originals):
        assert torch.equal(p, original)
    assert torch.equal(session.logits(), start)


def test_trial_logits_write_the_other_parameters():
    """Between a trial and the next write, every parameter but the input layer's holds the
    candidate; the input layer's keeps its original value; restore brings all back."""
    model, session = _session(SHORTCUT["mlp"])
    session.trial_logits(1e-2, 100.0, -1)
    trial = [p.clone() for p in session.live]
    session.set_shift(1e-2, 100.0, -1)
    layers = session._input_layers()
    for k, (p, t, original) in enumerate(zip(session.live, trial, session.originals)):
        assert torch.equal(t, original if k in layers.positions else p), session.names[k]


def test_no_shortcut_in_chunks_or_on_other_inputs():
    """chunk_size below the number of codes, or inputs swapped after the session was made (the
    held-out sweep): the layers are found again for those inputs or not used."""
    _, chunked = _session(SHORTCUT["mlp"], chunk_size=3)
    assert chunked._input_layers() is None
    model, session = _session(SHORTCUT["mlp"])
    assert session._input_layers() is not None
    session.inputs = session.inputs.flip(0)  # a new tensor: found again, on it
    got = session.trial_logits(1e-2, 100.0, 1)
    session.set_shift(1e-2, 100.0, 1)
    torch.testing.assert_close(got, session.logits(), rtol=1e-5, atol=0)


def test_a_hooked_input_layer_is_not_replaced():
    model, session = _session(SHORTCUT["mlp"])
    calls = []
    handle = model[1].register_forward_hook(lambda *a: calls.append(1))
    session._layers_key = None
    assert session._input_layers() is None
    session.trial_logits(1e-3, 10.0, 1)
    assert calls
    handle.remove()


def test_calibration_chooses_the_same_with_and_without_the_shortcut(monkeypatch):
    """The trials' verdicts, lambda1 and the sign do not depend on the shortcut (here)."""
    torch.manual_seed(0)
    model = MLP((1, 4, 4), 4, hidden=6)
    codes = MnemonicCodes.generate(4, (1, 4, 4), per_class=2, seed=0)
    fast = calibrate(model, codes, [1], engine=REFERENCE)
    monkeypatch.setattr(session_module._InputLayers, "find", staticmethod(lambda session: None))
    slow = calibrate(model, codes, [1], engine=REFERENCE)
    assert (fast.lambda1, fast.lambda2, fast.sign, fast.feasible) == (slow.lambda1, slow.lambda2, slow.sign, slow.feasible)
    assert [(t.lambda1, t.sign, t.forget_ok, t.retain_ok) for t in fast.trials] == \
        [(t.lambda1, t.sign, t.forget_ok, t.retain_ok) for t in slow.trials]
    for a, b in zip(fast.trials, slow.trials):
        assert a.forget_max_margin == pytest.approx(b.forget_max_margin, rel=1e-4, abs=1e-5)
        assert a.retain_margin_ratio == pytest.approx(b.retain_margin_ratio, rel=1e-4, abs=1e-5)
    result = mf.forget(model, codes, [1], lambda1="auto", lambda2=10.0)
    assert (result.lambda1, result.sign) == (fast.lambda1, fast.sign)
