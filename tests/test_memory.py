"""Peak memory of the fast path against its documented formula (docs/USAGE.md, "Large models"; docs/FAST_PATH.md, "Memory").

Allocations are read from the CPU allocator (:func:`mnemo_fast.evaluation.memory.peak_allocated_bytes`,
torch.profiler's memory events): the peak of the bytes the call itself held -- the caller's
model and inputs are not counted.

The formula for ``fisher_diagonal`` on the fast engine, ``chunk_size = c``:

    peak <= B_acc + B_max + 3 * A(c) + 1 MiB

B_acc: one accumulator per selected parameter (float32 for half types); B_max: the largest
layer's Fisher, transient; A(c): the activations of one plain forward+backward of c samples
(its peak less the parameter gradients), taken 3 times for the saved activations, the
captured output gradients and the convolution kernel's im2col block. N does not appear: the
codes go through in chunks. ``forget`` adds a copy of the model (unless ``inplace``), the
original values of the selected parameters (to undo a candidate) and f_F, f_R (2 * B_acc).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mnemo_fast as mf
from mnemo_fast.evaluation import models
from mnemo_fast.fast import _ext
from mnemo_fast.fast.engine import EXTENSION
from mnemo_fast.evaluation.memory import peak_allocated_bytes

pytestmark = pytest.mark.skipif(not _ext.available(), reason="the formula is the compiled fast path's")
MIB = 2**20


def peak_bytes(fn) -> int:
    return peak_allocated_bytes(fn)[1]


class Encoder(nn.Module):
    """Two nn.TransformerEncoderLayer blocks on [N, T, 64] token features, mean-pooled head."""

    def __init__(self, num_classes: int = 10, dim: int = 64, length: int = 16):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.randn(1, length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 128, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):  # x [N, 16, 8]
        return self.head(self.blocks(self.embed(x) + self.pos).mean(1))


CASES = {
    "mlp": (lambda: models.build("mlp", (1, 28, 28), 10), (1, 28, 28)),
    "cnn": (lambda: models.build("cnn", (1, 28, 28), 10), (1, 28, 28)),
    "encoder": (lambda: Encoder(), (16, 8)),
}


def _problem(case: str, n: int):
    torch.manual_seed(0)
    build, shape = CASES[case]
    model = build().eval()
    return model, torch.randn(n, *shape), torch.randint(0, 10, (n,))


def _formula(model, x, y, chunk: int) -> dict[str, int]:
    params = [p for p in model.parameters() if p.requires_grad]
    b_acc = sum(p.numel() * 4 for p in params)
    b_max = max(p.numel() * 4 for p in params)

    def plain():
        F.cross_entropy(model(x[:chunk]), y[:chunk]).backward()
        model.zero_grad(set_to_none=True)

    activations = max(peak_bytes(plain) - b_acc, 0)
    return {"b_acc": b_acc, "b_max": b_max, "activations": activations,
            "bound": b_acc + b_max + 3 * activations + MIB}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk", [1, 8, 32])
def test_fisher_peak_is_within_the_formula(case, chunk):
    model, x, y = _problem(case, 64)
    terms = _formula(model, x, y, chunk)
    peak = peak_bytes(lambda: mf.fisher_diagonal(model, x, y, chunk_size=chunk, engine=EXTENSION))
    assert peak <= terms["bound"], f"{case} chunk {chunk}: peak {peak / MIB:.2f} MiB over the formula {terms}"
    # ...and the formula is not vacuous: the accumulators alone are a floor.
    assert peak >= terms["b_acc"]


@pytest.mark.parametrize("case", list(CASES))
def test_fisher_peak_does_not_grow_with_the_number_of_codes(case):
    chunk = 8
    peaks = []
    for n in (2 * chunk, 8 * chunk, 32 * chunk):  # one chunk alone peaks lower (no second contribution)
        model, x, y = _problem(case, n)
        peaks.append(peak_bytes(lambda: mf.fisher_diagonal(model, x, y, chunk_size=chunk, engine=EXTENSION)))
    assert max(peaks) <= peaks[0] * 1.02 + 64 * 2**10, f"{case}: peaks {[p / MIB for p in peaks]} MiB for N = 16, 64, 256"


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("case", ["mlp", "encoder"])
def test_forget_peak_is_within_the_formula(case, inplace):
    model, _, _ = _problem(case, 1)
    shape = CASES[case][1]
    codes = mf.MnemonicCodes.generate(10, shape, per_class=4, seed=0)
    chunk = 8
    inputs, labels = codes.batch(range(10))
    terms = _formula(model, inputs, labels, chunk)
    b_model = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    bound = (0 if inplace else b_model) + terms["b_acc"] + 2 * terms["b_acc"] + terms["bound"]
    target = model if not inplace else _problem(case, 1)[0]
    peak = peak_bytes(lambda: mf.forget(target, codes, [0], lambda1=1e-3, lambda2=10,
                                        chunk_size=chunk, inplace=inplace, engine=EXTENSION))
    assert peak <= bound, f"{case} inplace={inplace}: peak {peak / MIB:.2f} MiB over {bound / MIB:.2f} MiB ({terms})"


def test_params_selection_shrinks_the_fisher_memory():
    """params= keeps only the selected parameters' accumulators (the MLP's last layer here)."""
    model, x, y = _problem("mlp", 64)
    everything = peak_bytes(lambda: mf.fisher_diagonal(model, x, y, chunk_size=8, engine=EXTENSION))
    last = peak_bytes(lambda: mf.fisher_diagonal(model, x, y, chunk_size=8, params="3.*", engine=EXTENSION))
    first_layer = sum(p.numel() * 4 for p in model[1].parameters())
    assert last <= everything - first_layer, f"{last / MIB:.2f} vs {everything / MIB:.2f} MiB"
