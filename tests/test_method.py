"""forget(): end to end on digits, the sign choice, in-place semantics, bad input."""

import copy
import math
import os
import warnings

import pytest
import torch

import mnemo_fast as mf
import mnemo_fast.reference as ref
from mnemo_fast import cli
from mnemo_fast.evaluation import models

DEMO_LAMBDAS = cli.DEFAULT_LAMBDAS["mlp"]


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, state):
    for k, v in model.state_dict().items():
        assert torch.equal(v.flatten().view(torch.uint8), state[k].flatten().view(torch.uint8)), k  # bitwise: NaN too


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forgets_class_0_on_digits_with_the_demo_defaults(digits_split, seed):
    """Forget accuracy <= 5% and retain accuracy within 5 points, for each of 3 seeds.

    Seen here (seeds 0-4): forget 96-100% -> 0%, retain drop 0.0-0.8 points.
    """
    train, test = digits_split
    torch.manual_seed(seed)
    codes = mf.MnemonicCodes.generate(10, (1, 8, 8), seed=seed)
    model = models.build("mlp", (1, 8, 8), 10)
    mf.train_with_codes(model, train, codes, 0.1, 40, seed=seed, progress=False)
    before = mf.evaluate(model, test, [0])
    state = state_of(model)
    result = mf.forget(model, codes, [0], lambda1=DEMO_LAMBDAS[0], lambda2=DEMO_LAMBDAS[1])
    after = mf.evaluate(result.model, test, [0])
    assert_unchanged(model, state)  # not in place: the input model is untouched
    assert before.forget_accuracy > 0.9
    assert after.forget_accuracy <= 0.05
    assert after.retain_accuracy >= before.retain_accuracy - 0.05
    assert result.code_accuracy_after.forget == 0.0
    assert result.seconds > 0 and result.sign in (1, -1)


def test_sign_is_the_better_scoring_candidate(trained_digits_mlp):
    model, codes = trained_digits_mlp
    result = ref.forget(model, codes, [3], lambda1=1e-3, lambda2=10)
    plus, minus = result.candidate_scores
    assert result.sign == (1 if plus > minus else -1)
    # the chosen candidate is exactly the formula applied with that sign
    f_forget, f_remain = ref.class_fishers(model, codes, [3])
    manual = ref.perturb_(copy.deepcopy(model), ref.perturbation(f_forget, f_remain, 1e-3, 10), result.sign)
    for a, b in zip(manual.parameters(), result.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert result.code_accuracy_after.score == max(plus, minus)


@pytest.mark.parametrize("api", [mf, ref], ids=["fast", "reference"])
@pytest.mark.parametrize("mode, kwargs", [
    ("shift", {}),
    ("gaussian", {"tau": 0.5, "draws": 3}),
])
def test_reported_code_accuracy_after_is_the_returned_models(trained_digits_mlp, api, mode, kwargs):
    """The last candidate stays applied when it wins (no re-scoring pass): whichever candidate
    wins, the reported accuracy must be the returned model's, measured afresh."""
    model, codes = trained_digits_mlp
    for classes in ([0], [3], [1, 7]):
        extra = dict(kwargs, generator=torch.Generator().manual_seed(5)) if mode == "gaussian" else {}
        result = api.forget(model, codes, classes, lambda1=1e-3, lambda2=10, mode=mode, **extra)
        assert result.code_accuracy_after == api.code_accuracy(result.model, codes, classes)
        assert result.code_accuracy_after.score == max(result.candidate_scores)


@pytest.mark.parametrize("api", [mf, ref], ids=["fast", "reference"])
def test_first_candidate_winning_is_reapplied_exactly(api):
    """Sign +1 (the first candidate, undone before -1 is tried) wins here: an untrained MLP
    read through negated logits. The result must be +1 applied once, on clean weights."""
    torch.manual_seed(0)
    codes = mf.MnemonicCodes.generate(10, (1, 8, 8), seed=0)
    model = models.build("mlp", (1, 8, 8), 10)
    negated = lambda logits: -logits  # noqa: E731
    result = api.forget(model, codes, [3], lambda1=1e-3, lambda2=10, output_fn=negated)
    assert result.sign == 1 and result.candidate_scores[0] > result.candidate_scores[1]
    assert result.code_accuracy_after == api.code_accuracy(result.model, codes, [3], output_fn=negated)
    f_forget, f_remain = ref.class_fishers(model, codes, [3], output_fn=negated)
    manual = ref.perturb_(copy.deepcopy(model), ref.perturbation(f_forget, f_remain, 1e-3, 10), 1)
    for a, b in zip(manual.parameters(), result.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_inplace_edits_the_given_model(trained_digits_mlp):
    model, codes = trained_digits_mlp
    model = copy.deepcopy(model)
    result = mf.forget(model, codes, [0], lambda1=1e-3, lambda2=10, inplace=True)
    assert result.model is model
    assert mf.code_accuracy(model, codes, [0]).forget == 0.0


def test_class_fishers_floor_and_averaging(trained_digits_mlp):
    model, codes = trained_digits_mlp
    f_forget, f_remain = ref.class_fishers(model, codes, [0, 1], eps=1e-16)
    x, y = codes.batch([0, 1])
    total = ref.fisher_diagonal(model, x, y, reduction="sum")
    for name in total:
        torch.testing.assert_close(f_forget[name], (1e-16 + total[name]) / 2)
    assert all((f >= 1e-16 / 8).all() for f in f_remain.values())


def test_several_codes_per_class_are_averaged():
    torch.manual_seed(0)
    model = models.MLP((4,), 3, hidden=5)
    codes = mf.MnemonicCodes.generate(3, (4,), per_class=2, seed=1)
    f_forget, _ = ref.class_fishers(model, codes, [1], eps=0.0)
    x, y = codes.batch([1])
    torch.testing.assert_close(f_forget["3.bias"], ref.fisher_diagonal(model, x, y)["3.bias"])


def test_gaussian_mode_is_seeded_and_masked(trained_digits_mlp):
    model, codes = trained_digits_mlp
    run = lambda seed: ref.forget(model, codes, [0], lambda1=1e-2, lambda2=10, mode="gaussian",
                                  tau=1.0, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.model.parameters(), c.model.parameters()))
    assert a.sign is None and len(a.candidate_scores) == 2
    # parameters whose ratio is <= tau do not move
    f_forget, f_remain = ref.class_fishers(model, codes, [0])
    from mnemo_fast.reference.perturb import ratio
    for (name, p0), p1 in zip(model.named_parameters(), a.model.parameters()):
        still = ratio(f_forget[name], f_remain[name]) <= 1.0
        assert torch.equal(p0[still], p1[still])
        assert not torch.equal(p0[~still], p1[~still]) or (~still).sum() == 0


def test_both_namespaces_export_the_same_api():
    assert sorted(mf.__all__) == sorted(ref.__all__)
    for name in mf.__all__:
        assert hasattr(mf, name) and hasattr(ref, name), name
    assert ref.backend() == "reference"
    assert mf.backend() in ("reference", "cpu-ext")


def test_the_public_api_is_derived_not_copied():
    """The two ``__all__`` lists come from one (mnemo_fast/public.py); what they must hold is
    derived here from the code: every public non-module name of ``mnemo_fast``, which is the method's engine
    functions (bound to the reference engine in ``mnemo_fast.reference``), and otherwise the
    very same objects in both namespaces."""
    import inspect

    from mnemo_fast import api

    public = {name for name, value in vars(mf).items() if not name.startswith("_") and not inspect.ismodule(value)}
    assert set(mf.__all__) == public and len(mf.__all__) == len(public)
    assert set(ref.__all__) == public and len(ref.__all__) == len(public)
    assert set(api.ENGINE_FUNCTIONS) <= public
    for name in public:
        fast, slow = getattr(mf, name), getattr(ref, name)
        if name in api.ENGINE_FUNCTIONS:  # per-call engine here, the reference engine there
            assert fast is api.engine_function(name) and slow is not fast and slow.__wrapped__ is fast, name
            with pytest.raises(TypeError, match="fixed engine"):
                slow(engine=None)
        elif name != "backend":
            assert slow is fast, name


def test_backend_is_the_one_this_build_gives():
    """Not "either answer": the extension's load state decides which one."""
    from mnemo_fast.fast import _ext

    assert mf.backend() == ("cpu-ext" if _ext.available() else "reference")
    assert mf.backend("cpu") == mf.backend(torch.device("cpu"))
    assert ref.backend() == "reference"
    if torch.cuda.is_available():
        assert ref.backend("cuda") == "reference"
    if os.environ.get("MNEMO_FAST_DISABLE_EXT") == "1":
        assert not _ext.available() and mf.backend() == "reference"


def test_backend_of_a_gpu_this_machine_lacks_says_so(monkeypatch):
    """Not the path a GPU would take: no tensor can be put there (issue 27)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for api in (mf, ref):
        assert api.backend("cuda") == api.backend(torch.device("cuda", 0)) == "no-gpu"
        assert api.backend("cpu") != "no-gpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU: cuda:1 is not there
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert mf.backend("cuda:1") == ref.backend("cuda:1") == "no-gpu"
    assert ref.backend("cuda:0") == "reference" and mf.backend("cuda:0") != "no-gpu"


# --- bad input: a clear error naming the problem, the model bit-identical afterwards ---

def _bad_cases(model, codes):
    nan_model = copy.deepcopy(model)
    with torch.no_grad():
        nan_model[1].weight[0, 0] = math.nan
    inf_model = copy.deepcopy(model)
    with torch.no_grad():
        inf_model[3].bias[0] = math.inf
    frozen = copy.deepcopy(model).requires_grad_(False)
    return {
        "unknown_class": (model, codes, [10], "unknown class"),
        "negative_class": (model, codes, [-1], "unknown class"),
        "empty": (model, codes, [], "empty"),
        "all_classes": (model, codes, list(range(10)), "all 10 classes"),
        "code_shape": (model, mf.MnemonicCodes.generate(10, (1, 9, 9)), [0], "does not fit"),
        "class_count": (model, mf.MnemonicCodes.generate(12, (1, 8, 8)), [0], "12 classes"),
        "no_trainable": (frozen, codes, [0], "no trainable parameters"),
        "nan": (nan_model, codes, [0], "NaN or inf"),
        "inf": (inf_model, codes, [0], "NaN or inf"),
    }


@pytest.mark.parametrize("case", ["unknown_class", "negative_class", "empty", "all_classes", "code_shape",
                                  "class_count", "no_trainable", "nan", "inf"])
@pytest.mark.parametrize("inplace", [False, True])
def test_bad_input_raises_and_leaves_model_untouched(trained_digits_mlp, case, inplace):
    model, codes = trained_digits_mlp
    model, codes, classes, message = _bad_cases(model, codes)[case]
    state = state_of(model)
    with pytest.raises(mf.UnlearningError, match=message):
        mf.forget(model, codes, classes, lambda1=1e-3, lambda2=10, inplace=inplace)
    assert_unchanged(model, state)


def test_failure_midway_restores_an_inplace_model(trained_digits_mlp, monkeypatch):
    model, codes = trained_digits_mlp
    model = copy.deepcopy(model)
    state = state_of(model)
    from mnemo_fast.session import CandidateSession
    calls = []
    real = CandidateSession.accuracy

    def flaky(self):
        calls.append(1)
        if len(calls) == 2:  # the first candidate was applied, scored and undone; the second is applied
            raise RuntimeError("interrupted")
        return real(self)

    monkeypatch.setattr(CandidateSession, "accuracy", flaky)
    with pytest.raises(RuntimeError, match="interrupted"):
        mf.forget(model, codes, [0], lambda1=1e-3, lambda2=10, inplace=True)
    assert_unchanged(model, state)


@pytest.mark.parametrize("bad", [dict(lambda1=0.0), dict(lambda2=-1.0), dict(mode="noise"), dict(mode="gaussian", draws=0)])
def test_bad_arguments(trained_digits_mlp, bad):
    model, codes = trained_digits_mlp
    args = dict(lambda1=1e-3, lambda2=10.0) | bad
    with pytest.raises(ValueError):
        mf.forget(model, codes, [0], **args)


def test_t_mix_out_of_range_in_training(digits_split):
    train, _ = digits_split
    codes = mf.MnemonicCodes.generate(10, (1, 8, 8))
    with pytest.raises(ValueError, match="t_mix"):
        mf.train_with_codes(models.build("mlp", (1, 8, 8), 10), train, codes, 1.2, 1)


def test_training_mode_is_restored(trained_digits_mlp):
    model, codes = trained_digits_mlp
    model = copy.deepcopy(model).train()
    result = mf.forget(model, codes, [0], lambda1=1e-3, lambda2=10)
    assert model.training and result.model.training


def test_params_selects_what_is_computed_and_perturbed(trained_digits_mlp):
    model, codes = trained_digits_mlp
    x, y = codes.batch(range(10))
    fisher = mf.fisher_diagonal(model, x, y, params="3.*")
    assert set(fisher) == {"3.weight", "3.bias"}
    torch.testing.assert_close(fisher["3.weight"], ref.fisher_diagonal(model, x, y)["3.weight"])
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    result = mf.forget(model, codes, [0], lambda1=1e-2, lambda2=10, params=["3.weight"])
    assert torch.equal(result.model[1].weight, model[1].weight) and torch.equal(result.model[3].bias, model[3].bias)
    assert not torch.equal(result.model[3].weight, model[3].weight)
    with pytest.raises(mf.UnlearningError, match="selects none"):
        mf.forget(model, codes, [0], lambda1=1e-2, lambda2=10, params=lambda name: False)


def test_output_fn_picks_logits_from_an_object(trained_digits_mlp):
    model, codes = trained_digits_mlp

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return {"logits": self.inner(x), "aux": 0}

    wrapped = Wrapped(copy.deepcopy(model))
    a = mf.forget(wrapped, codes, [0], lambda1=1e-3, lambda2=10)
    b = mf.forget(model, codes, [0], lambda1=1e-3, lambda2=10)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb)


def test_auto_lambda1_is_chosen_from_the_codes(trained_digits_mlp, digits_split):
    model, codes = trained_digits_mlp
    result = mf.forget(model, codes, [4], lambda1="auto", lambda2=10)
    assert result.calibration is not None and result.lambda1 == result.calibration.lambda1
    assert result.code_accuracy_after.forget == 0.0 and result.code_accuracy_after.retain == 1.0
    _, test = digits_split
    assert mf.evaluate(result.model, test, [4]).forget_accuracy <= 0.05
    with pytest.raises(ValueError, match="auto"):
        mf.forget(model, codes, [4], lambda1="best", lambda2=10)


def test_finite_check_is_not_fooled_by_an_overflowing_sum():
    """The fast check sums each tensor; a finite tensor whose sum overflows must still pass,
    and a NaN must still be named."""
    from mnemo_fast import validation

    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.fill_(3e38)  # finite, but the float32 sum is inf
    validation.trainable_model(model)
    with torch.no_grad():
        model.bias[1] = math.nan
    with pytest.raises(mf.UnlearningError, match="'bias' contains NaN or inf"):
        validation.trainable_model(model)


# --- issue 27: lambda2's default under "auto", and a forget that did nothing says so ---

@pytest.mark.parametrize("api", [mf, ref], ids=["fast", "reference"])
def test_auto_needs_no_lambda2(trained_digits_mlp, api):
    """The README's call: lambda2 defaults to the calibration's own (calibration.DEFAULT_LAMBDA2)."""
    from mnemo_fast.calibration import DEFAULT_LAMBDA2

    model, codes = trained_digits_mlp
    result = api.forget(model, codes, [3], lambda1="auto")
    given = api.forget(model, codes, [3], lambda1="auto", lambda2=DEFAULT_LAMBDA2)
    assert result.calibration is not None and result.code_accuracy_after.forget == 0.0
    assert (result.lambda1, result.lambda2) == (given.lambda1, given.lambda2)
    for a, b in zip(result.model.parameters(), given.model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match=r"fixed lambda1=0.001 needs lambda2"):  # fixed lambdas: both required
        api.forget(model, codes, [3], lambda1=1e-3)


def _forget_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [w for w in caught if issubclass(w.category, mf.ForgetWarning)]


@pytest.mark.parametrize("api", [mf, ref], ids=["fast", "reference"])
def test_a_forget_that_left_the_class_recognised_warns(trained_digits_mlp, api):
    """A step too small to move the codes: class 3's code is still right, and the warning says
    so at the caller's line, with the numbers and what to try."""
    model, codes = trained_digits_mlp
    result, said = _forget_warnings(lambda: api.forget(model, codes, [3, 5], lambda1=1e-9, lambda2=1e-9))
    assert result.code_accuracy_after.forget == 1.0
    [w] = said
    assert w.category is mf.ForgetWarning and w.filename == __file__
    message = str(w.message)
    assert "classes 3, 5 still recognised" in message and "class 3 100% -> 100%" in message, message
    assert "lambda1='auto' or a larger lambda1 than 1e-09" in message, message


def test_a_forget_that_lost_the_retained_codes_warns(trained_digits_mlp):
    model, codes = trained_digits_mlp
    result, said = _forget_warnings(lambda: mf.forget(model, codes, [3, 4], lambda1=10, lambda2=1e3))
    assert result.code_accuracy_after.retain <= 0.5 < result.code_accuracy_before.retain
    [w] = said
    assert w.filename == __file__
    assert "of the retained classes' codes classified correctly (before: 100%)" in str(w.message)
    assert "a smaller lambda1 than 10" in str(w.message)


def test_a_forget_that_worked_does_not_warn(trained_digits_mlp):
    model, codes = trained_digits_mlp
    for kwargs in (dict(lambda1=DEMO_LAMBDAS[0], lambda2=DEMO_LAMBDAS[1]), dict(lambda1="auto")):
        result, said = _forget_warnings(lambda: mf.forget(model, codes, [0], **kwargs))
        assert result.code_accuracy_after.forget == 0.0 and not said, [str(w.message) for w in said]


def test_auto_that_warned_already_does_not_warn_twice():
    """An untrained model: the calibration's CalibrationWarning (a ForgetWarning) is the one warning."""
    torch.manual_seed(0)
    model = models.build("mlp", (1, 8, 8), 10)
    codes = mf.MnemonicCodes.generate(10, (1, 8, 8), seed=0)
    with torch.no_grad():
        known = (model(codes.tensor[:, 0]).argmax(1) == torch.arange(10)).nonzero().view(-1).tolist()
    assert known, "seed 0 gives an untrained model that classifies some code right"
    result, said = _forget_warnings(lambda: mf.forget(model, codes, known[:1], lambda1="auto"))
    assert result.code_accuracy_after.forget == 1.0 and not result.calibration.feasible
    assert [w.category.__name__ for w in said] == ["CalibrationWarning"] and said[0].filename == __file__
