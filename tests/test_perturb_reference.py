"""The paper's formula on hand-made tensors: ratio, NaN/inf handling, lambda caps, sign."""

import math
import subprocess
import sys

import pytest
import torch

import mnemo_fast.reference as ref
from mnemo_fast.reference import perturb

inf, nan = math.inf, math.nan


def test_shift_is_alpha_times_ratio_capped_by_lambda2():
    f_forget = torch.tensor([4.0, 1.0, 2.0])
    f_remain = torch.tensor([1.0, 1.0, 4.0])
    eta = torch.tensor([4.0, 1.0, 0.5])
    # lambda2 / max eta = 0.5 < lambda1: the cap applies
    got = ref.perturbation({"w": f_forget}, {"w": f_remain}, lambda1=1.0, lambda2=2.0)["w"]
    torch.testing.assert_close(got, 0.5 * eta)
    # lambda1 smaller than lambda2 / max eta: lambda1 applies
    got = ref.perturbation({"w": f_forget}, {"w": f_remain}, lambda1=0.1, lambda2=2.0)["w"]
    torch.testing.assert_close(got, 0.1 * eta)


def test_each_tensor_has_its_own_alpha():
    forget = {"a": torch.tensor([10.0, 1.0]), "b": torch.tensor([1.0])}
    remain = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([1.0])}
    got = ref.perturbation(forget, remain, lambda1=1.0, lambda2=5.0)
    torch.testing.assert_close(got["a"], torch.tensor([5.0, 0.5]))
    torch.testing.assert_close(got["b"], torch.tensor([1.0]))


def test_nan_becomes_zero_and_inf_becomes_largest_finite():
    f_forget = torch.tensor([0.0, 3.0, inf, 2.0, 0.0])
    f_remain = torch.tensor([0.0, 0.0, inf, 1.0, 5.0])
    # ratios: 0/0 -> nan -> 0; 3/0 -> inf -> largest finite (2); inf/inf -> nan -> 0; 2; 0
    eta = perturb.ratio(f_forget, f_remain)
    torch.testing.assert_close(eta, torch.tensor([0.0, 2.0, 0.0, 2.0, 0.0]))
    got = ref.perturbation({"w": f_forget}, {"w": f_remain}, lambda1=10.0, lambda2=1.0)["w"]
    torch.testing.assert_close(got, 0.5 * eta)


def test_no_finite_ratio_and_all_zero_ratio():
    only_inf = perturb.ratio(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(only_inf, torch.zeros(2))
    # max eta = 0: alpha = lambda1, shift 0
    got = ref.perturbation({"w": torch.zeros(3)}, {"w": torch.ones(3)}, 1e-3, 10.0)["w"]
    assert torch.equal(got, torch.zeros(3))


def test_ratio_uses_log_space_like_the_authors():
    a, b = torch.tensor([3.0e-30]), torch.tensor([7.0e-31])
    assert perturb.ratio(a, b).item() == torch.exp(torch.log(a) - torch.log(b)).item()


def test_perturb_applies_sign_and_checks_names():
    model = torch.nn.Linear(2, 1)
    before = model.weight.detach().clone()
    shifts = {"weight": torch.tensor([[1.0, 2.0]])}
    ref.perturb_(model, shifts, -1)
    torch.testing.assert_close(model.weight.detach(), before - shifts["weight"])
    with pytest.raises(ValueError, match="sign"):
        ref.perturb_(model, shifts, 0)
    with pytest.raises(ValueError, match="does not have"):
        ref.perturb_(model, {"nope": torch.zeros(1)}, 1)
    with pytest.raises(ValueError, match="same parameter names"):
        ref.perturbation({"a": torch.ones(1)}, {"b": torch.ones(1)}, 1.0, 1.0)


def test_float16_fisher_is_computed_in_float32():
    got = ref.perturbation({"w": torch.tensor([4.0], dtype=torch.float16)},
                           {"w": torch.tensor([1.0], dtype=torch.float16)}, 1.0, 100.0)["w"]
    assert got.dtype == torch.float32 and got.item() == 4.0


def test_the_table_never_loads_the_extension():
    """Importing the table and running every twin (the reference engine's perturbation) leaves
    mnemo_fast._C unloaded."""
    code = (
        "import sys, torch\n"
        "from mnemo_fast.fast import ops\n"
        "from mnemo_fast.reference.engine import REFERENCE\n"
        "g, x = torch.randn(3, 2, 4), torch.randn(3, 2, 5)\n"
        "ops.TWINS.sum_sq_grad_linear(g, x)\n"
        "ops.TWINS.sum_sq_grad_conv1d(torch.randn(2, 3, 4), torch.randn(2, 2, 6), 3)\n"
        "f, r, p = [torch.rand(7)], [torch.rand(7)], [torch.zeros(7)]\n"
        "m = REFERENCE.max_ratio(f, r)\n"
        "REFERENCE.shift_(p, f, r, m, 0.1, 1.0, 1.0)\n"
        "REFERENCE.gaussian_(p, f, r, m, 0.1, 1.0, 0.0, None)\n"
        "assert p[0].abs().sum() > 0\n"
        "print('mnemo_fast._C' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_one_accumulation_dtype_rule():
    """float64 stays float64, everything else accumulates in float32; written once
    (mnemo_fast/dtypes.py), the other modules import it."""
    from pathlib import Path

    import mnemo_fast
    from mnemo_fast.dtypes import accumulation_dtype

    assert accumulation_dtype(torch.float64) == torch.float64
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert accumulation_dtype(dtype) == torch.float32
    package = Path(mnemo_fast.__file__).parent
    copies = [str(path.relative_to(package)) for path in package.rglob("*.py")
              if "float64 else torch.float32" in path.read_text()]
    assert copies == ["dtypes.py"]


OP_NAMES = ("sum_sq_grad_linear", "sum_sq_grad_conv2d", "sum_sq_grad_conv1d", "perturb_max_ratio",
            "perturb_shift_", "perturb_gaussian_", "perturb_dampen_")


def test_the_op_table_holds_the_ops_named_here():
    from mnemo_fast.fast import ops

    assert set(OP_NAMES) <= set(ops.OPS)


@pytest.mark.parametrize("name", OP_NAMES)
def test_every_op_and_its_twin_have_one_signature(name):
    """The op table's promise (mnemo_fast/fast/ops.py): a compiled op and its twin take the same
    parameters, in the same order, with the same defaults, so either can stand for the other.
    Their signatures are written twice on purpose (docs/LAYOUT.md, "Repeats kept on purpose");
    this test holds them together."""
    import inspect

    from mnemo_fast.fast import ops

    op = ops.OPS[name]
    compiled, twin = inspect.signature(op.compiled), inspect.signature(op.twin)
    assert [(p.name, p.kind, p.default) for p in compiled.parameters.values()] == \
        [(p.name, p.kind, p.default) for p in twin.parameters.values()]
