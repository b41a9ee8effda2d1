"""The one training loop (mnemo_fast.training.train.fit) and its small helpers."""

from __future__ import annotations

import pytest
import torch

from mnemo_fast.training.train import cross_entropy, fit, make_optimizer, to_model


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g)
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 3)), x, y


def test_fit_is_the_plain_loop():
    """Same weights as the loop written out by hand; on_step sees every step; eval mode after."""
    model, x, y = _problem()
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)] * 2
    twin = _problem()[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(batches))
    seen = []
    torch.manual_seed(1)
    fit(model, opt, iter(batches), cross_entropy, schedule=sched, on_step=lambda i, loss: seen.append(i))

    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    twin_sched = torch.optim.lr_scheduler.CosineAnnealingLR(twin_opt, T_max=len(batches))
    torch.manual_seed(1)
    twin.train()
    for xb, yb in batches:
        loss = torch.nn.functional.cross_entropy(twin(xb), yb)
        twin_opt.zero_grad()
        loss.backward()
        twin_opt.step()
        twin_sched.step()

    assert seen == list(range(len(batches)))
    assert not model.training
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sched.last_epoch == len(batches)


def test_fit_runs_epoch_bookkeeping_after_each_epoch():
    model, x, y = _problem()
    log = []

    def epochs():
        for epoch in range(3):
            log.append(("start", epoch))
            yield from [(x, y), (x, y)]
            log.append(("end", epoch))

    fit(model, make_optimizer("adam", model.parameters(), lr=1e-3), epochs(), cross_entropy,
        on_step=lambda i, loss: log.append(i))
    assert log == [("start", 0), 0, 1, ("end", 0), ("start", 1), 2, 3, ("end", 1), ("start", 2), 4, 5, ("end", 2)]


def test_helpers():
    model = torch.nn.Linear(2, 2).double()
    xf, yf = to_model(model, torch.ones(1, 2), [1])
    xi, _ = to_model(model, torch.ones(1, 2, dtype=torch.long), [1])
    assert xf.dtype == torch.float64 and yf.dtype == torch.long and xi.dtype == torch.long
    assert isinstance(make_optimizer("sgd", model.parameters(), lr=0.1), torch.optim.SGD)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer("rmsprop", model.parameters(), lr=0.1)
