"""In-place writes after a capture (issue 24): the fast path catches layer inputs, outputs and
output gradients during one pass; what runs after a layer may write into them. Each case here
must match the exact Fisher (the reference, or the reference on a twin model that computes
the same function without the in-place op, where the in-place model is one plain autograd
refuses), or go to the exact path with a warning that names the module.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mnemo_fast as mf
import mnemo_fast.reference as ref
from mnemo_fast.fast import _ext
from mnemo_fast.fast.engine import EXTENSION, HOOKS_ATEN, PLANS
from mnemo_fast.fast.plan import GenericPathWarning

ENGINES = [HOOKS_ATEN, EXTENSION] if _ext.available() else [HOOKS_ATEN]


def assert_fisher_matches(got: dict, exact: dict, rel: float) -> None:
    assert got.keys() == exact.keys()
    for name in exact:
        scale = exact[name].abs().max().item()
        err = (got[name] - exact[name]).abs().max().item()
        assert err <= rel * max(scale, 1e-30), f"{name}: {err:.3g} off, largest entry {scale:.3g}"


def tolerance(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


class IssueNet(nn.Module):
    """The issue's model: an in-place ReLU on a Linear's [N, T, 8] output (an autograd view),
    then a Linear and a LayerNorm, and a head tied to the embedding."""

    def __init__(self, norm: bool = True):
        super().__init__()
        self.emb, self.lin, self.lin2 = nn.Embedding(13, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8) if norm else nn.Identity()

    def forward(self, x):  # x: [N, T] token ids
        h = F.relu(self.lin(self.emb(x)), inplace=True)
        h = self.norm(self.lin2(h))
        return h.mean(1) @ self.emb.weight[:5].t()


def _tokens(n: int = 6, t: int = 9):
    return torch.randint(0, 13, (n, t)), torch.randint(0, 5, (n,))


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.name)
@pytest.mark.parametrize("norm", [True, False], ids=["layernorm", "no-norm"])
@pytest.mark.parametrize("chunk", [None, 2, 1])
def test_issue_example_matches_the_reference(engine, norm, chunk):
    torch.manual_seed(7)
    model = IssueNet(norm).eval()
    x, y = _tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GenericPathWarning)  # exact on the fast path, not by falling back
        got = mf.fisher_diagonal(model, x, y, chunk_size=chunk, engine=engine)
    assert_fisher_matches(got, ref.fisher_diagonal(model, x, y), tolerance(torch.float32))
    routes = {route.name: route for route in mf.explain(model, x, y, engine=engine).routes}
    assert "output copied" in routes["lin.weight"].detail  # the pass learned it, explain says so


class SavedInputWritten(nn.Module):
    """``y = l2(h); h.relu_()``: the input l2 was called with is written after the call (plain
    autograd refuses this model when l2's weight needs a gradient; the frozen pass does not)."""

    def __init__(self, in_place: bool = True):
        super().__init__()
        self.l1, self.l2, self.in_place = nn.Linear(6, 6), nn.Linear(6, 4), in_place

    def forward(self, x):
        h = self.l1(x)
        y = self.l2(h)
        h = h.relu_() if self.in_place else h.relu()
        return y + h[:, :4]


class OperandWritten(nn.Module):
    """A raw weight used by ``@`` (the operation level); its sample operand is written after."""

    def __init__(self, in_place: bool = True):
        super().__init__()
        self.w, self.l2, self.in_place = nn.Parameter(torch.randn(6, 6)), nn.Linear(6, 4), in_place

    def forward(self, x):
        h = torch.tanh(x)
        y = h @ self.w
        h = h.mul_(3) if self.in_place else h * 3
        return self.l2(y) + h[:, :4]


class UseOutputWritten(nn.Module):
    """``F.linear`` with a raw weight (the operation level); its output is written in place."""

    def __init__(self, in_place: bool = True):
        super().__init__()
        self.w, self.l2, self.in_place = nn.Parameter(torch.randn(6, 6)), nn.Linear(6, 4), in_place

    def forward(self, x):  # x: [N, T, 6] or [N, 6]
        y = F.linear(x, self.w)
        y = y.relu_() if self.in_place else y.relu()
        out = self.l2(y)
        return out.mean(1) if out.dim() == 3 else out


class ResidualInPlace(nn.Module):
    """ResNet's pattern: ``out += identity`` then an in-place ReLU on a BatchNorm's output."""

    def __init__(self, in_place: bool = True):
        super().__init__()
        self.conv, self.bn, self.head, self.in_place = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Linear(2, 4), in_place

    def forward(self, x):
        out = self.bn(self.conv(x))
        if self.in_place:
            out += x
            out.relu_()
        else:
            out = (out + x).relu()
        return self.head(out.mean((2, 3)))


TWINS = {
    "saved-input": (SavedInputWritten, (5, 6)),
    "operand": (OperandWritten, (5, 6)),
    "use-output-2d": (UseOutputWritten, (5, 6)),
    "use-output-3d": (UseOutputWritten, (5, 3, 6)),
    "residual": (ResidualInPlace, (5, 2, 4, 4)),
}


def _twins(case: str, dtype: torch.dtype):
    cls, shape = TWINS[case]
    torch.manual_seed(1)
    model = cls(True).eval().to(dtype)
    twin = cls(False).eval().to(dtype)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    twin.load_state_dict(model.state_dict())
    return model, twin, torch.randn(*shape, dtype=dtype), torch.randint(0, 4, (shape[0],))


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(TWINS))
def test_writes_after_a_capture_stay_exact(engine, dtype, case):
    model, twin, x, y = _twins(case, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GenericPathWarning)
        got = mf.fisher_diagonal(model, x, y, engine=engine)
    assert_fisher_matches(got, ref.fisher_diagonal(twin, x, y), tolerance(dtype))


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.name)
def test_no_copy_where_no_capture_is_written(engine):
    """A write into a layer output that is not a view (BatchNorm's, in ResNets) leaves the hook
    exact: nothing is copied, and each later call runs one forward per chunk."""
    model, _, x, y = _twins("residual", torch.float32)
    mf.fisher_diagonal(model, x, y, engine=engine)
    routes = mf.explain(model, x, y, engine=engine).routes
    assert routes and all(route.path == "rule" and "copied" not in route.detail for route in routes)


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.name)
def test_protection_is_learned_once_and_kept(engine):
    """The first pass that finds a write runs its chunk again with copies; the plan keeps that,
    so the next call on the same model runs one forward per chunk and no probe."""
    PLANS.clear()
    torch.manual_seed(7)
    model = IssueNet().eval()
    x, y = _tokens()
    forwards = []
    handle = model.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[0]))
    try:
        mf.fisher_diagonal(model, x, y, chunk_size=3, engine=engine)
        first = list(forwards)
        forwards.clear()
        mf.fisher_diagonal(model, x, y, chunk_size=3, engine=engine)
    finally:
        handle.remove()
    assert first.count(3) == 3  # chunk one twice (the write found, then copies), chunk two once
    assert forwards == [3, 3]


class GradientRewriter(nn.Module):
    """A user's tensor hook writes the output gradient in place (and restores its values): what
    the pass caught was written during the backward, which no copy taken in the forward fixes."""

    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.l2 = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x):
        h = self.l1(torch.tanh(self.l0(x)))
        if h.requires_grad:  # runs after the pass's own hook on l1's output
            h.register_hook(lambda g: g.mul_(2.0).div_(2.0))
        return self.l2(torch.tanh(h))


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.name)
def test_gradient_written_during_the_backward_goes_exact_with_a_warning(engine):
    torch.manual_seed(3)
    model = GradientRewriter().eval()
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    with pytest.warns(GenericPathWarning, match="l1"):
        got = mf.fisher_diagonal(model, x, y, engine=engine)
    assert_fisher_matches(got, ref.fisher_diagonal(model, x, y), tolerance(torch.float32))


def test_the_model_is_left_as_it_was():
    torch.manual_seed(7)
    model = IssueNet().eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    mf.fisher_diagonal(model, *_tokens())
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]) and p.requires_grad == flags[n], n
