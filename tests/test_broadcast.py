"""Raw parameters broadcast over the batch: the sample dimension is proven by two probes, never
read off a size that happens to equal N; add/sub's alpha is part of the gradient."""

import pytest
import torch
from torch import nn

import mnemo_fast as mf
import mnemo_fast.reference as ref
from mnemo_fast.fast import _ext
from mnemo_fast.fast.engine import EXTENSION, HOOKS_ATEN
from mnemo_fast.fast.plan import make_plan
from mnemo_fast.fast.rules.broadcast import BroadcastUse, per_sample
from mnemo_fast.modeling import eval_mode, logits_of, trainable_parameters

ENGINES = [pytest.param(HOOKS_ATEN, id="hooks-aten"),
           pytest.param(EXTENSION, id="ext", marks=pytest.mark.skipif(not _ext.available(), reason="extension not built"))]
T, D = 4, 5


class Biased(nn.Module):
    """x [N, T, D] -> a raw parameter ``b`` [D] combined with the activation as ``use`` says,
    then tanh, a Linear and a sum over positions: logits [N, 3]."""

    def __init__(self, use: str, alpha: float = 1.0):
        super().__init__()
        self.use, self.alpha = use, alpha
        self.b = nn.Parameter(torch.randn(D))
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        if self.use == "expand_positions":  # [T, D]: no sample dimension at all
            h = x + self.b.expand(T, -1)
        elif self.use == "positions_first":  # added on [T, N, D]: samples in dimension 1
            h = (x.transpose(0, 1) + self.b).transpose(0, 1)
        elif self.use == "add_alpha":
            h = torch.add(x, self.b, alpha=self.alpha)
        elif self.use == "sub_alpha":
            h = torch.sub(x, self.b, alpha=self.alpha)
        else:  # "sub_alpha_first": the parameter is ``self`` of the subtraction, alpha scales x
            h = torch.sub(self.b, x, alpha=self.alpha)
        return self.head(torch.tanh(h)).sum(1)


def fisher_pair(model, n, engine, chunk_size=None):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, T, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return (mf.fisher_diagonal(model, x, y, chunk_size=chunk_size, engine=engine),
            ref.fisher_diagonal(model, x, y))


def plan_of(model):
    x, y = torch.randn(1, T, D, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    with eval_mode(model):
        return make_plan(model, trainable_parameters(model), x, y, logits_of)


def assert_exact(got, expected):
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert value.abs().max() > 0, name
        torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-10 * value.abs().max().item(), msg=name)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("n", [T, T + 1, 1], ids=["N==T", "N!=T", "N==1"])
@pytest.mark.parametrize("use,alpha", [("expand_positions", 1.0), ("positions_first", 1.0), ("add_alpha", 3.0),
                                       ("sub_alpha", 0.5), ("sub_alpha_first", 2.0)])
def test_fisher_equals_reference_whatever_n(engine, use, alpha, n):
    torch.manual_seed(0)
    model = Biased(use, alpha).double()
    got, expected = fisher_pair(model, n, engine)
    assert_exact(got, expected)
    assert_exact(fisher_pair(model, n, engine, chunk_size=max(n - 1, 1))[0], expected)


def test_plan_proves_the_sample_dimension_or_says_why_not():
    plan = plan_of(Biased("expand_positions").double())
    # the broadcast node's output never shows the samples (the expand is over positions), so
    # the broadcast rule does not take it; the operation level proves the add's layout instead
    assert plan.generic == [] and plan.broadcast == [] and plan.operations.names == ["b"]
    assert [u.op for u in plan.operations.uses] == ["add"] and plan.operations.uses[0].output.dim == 0

    plan = plan_of(Biased("positions_first").double())
    assert plan.generic == [] and plan.broadcast == ["b"] and plan.reasons == {}
    assert plan.broadcast_uses["b"] == BroadcastUse(dim=1, shape=(T, 1, D))

    for use in ("add_alpha", "sub_alpha", "sub_alpha_first"):
        plan = plan_of(Biased(use, 3.0).double())
        assert plan.broadcast == ["b"] and plan.broadcast_uses["b"] == BroadcastUse(dim=0, shape=(1, T, D))


def test_every_generic_parameter_has_a_reason():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(D))  # multiplied: no rule
            self.twice = nn.Parameter(torch.zeros(D))  # used twice
            self.unused = nn.Parameter(torch.zeros(D))
            self.head = nn.Linear(D, 3)

        def forward(self, x):
            return self.head(x * self.gain + self.twice + self.twice).sum(1)

    plan = plan_of(Custom().double())
    # multiplied and used twice: taken at the operation level; unused: generic, with both reasons
    assert plan.generic == ["unused"] and set(plan.reasons) == {"unused"}
    assert set(plan.operations.names) == {"gain", "twice"}
    assert "used 0 times" in plan.reasons["unused"]
    assert "at the operation level: no operation combines it with the samples" in plan.reasons["unused"]


def test_per_sample_refuses_a_gradient_of_another_shape():
    use = BroadcastUse(dim=1, shape=(T, 1, D))
    grad = torch.arange(T * 3 * D, dtype=torch.float64).reshape(T, 3, D)
    samples = per_sample(grad, use, torch.Size([D]), 2.0, batch=3)
    torch.testing.assert_close(samples, 2.0 * grad.sum(0), rtol=0, atol=0)
    assert per_sample(grad, use, torch.Size([D]), 1.0, batch=T) is None  # planned N=3 is not here
    assert per_sample(grad.transpose(0, 1), use, torch.Size([D]), 1.0, batch=3) is None


def test_a_failing_second_probe_sends_the_parameter_generic():
    class BatchOfTwoFails(Biased):
        def forward(self, x):
            if x.shape[0] == 2:
                raise RuntimeError("this model refuses a batch of 2")
            return super().forward(x)

    plan = plan_of(BatchOfTwoFails("add_alpha", 3.0).double())
    # nothing is proven without a batch of 2: the Linear's inputs are not shown to grow either
    assert plan.broadcast == [] and plan.generic == ["b", "head.weight", "head.bias"]
    assert "is shown to index samples (size 1 at batch 1, 2 at batch 2)" in plan.reasons["head.weight"]
    assert plan.reasons["b"].startswith("a probe of batch 2 failed (RuntimeError)")
    assert "the operation-level probe failed" in plan.reasons["b"]  # it probes with two samples too
