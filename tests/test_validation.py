"""What the method refuses, and how (docs/REFUSALS.md), on both namespaces.

Every case runs on ``mnemo_fast`` and on ``mnemo_fast.reference`` with a tiny MLP (6 inputs,
4 classes), so the whole file takes seconds: bad numbers, class lists, codes, buffers and
outputs raise before anything is touched; a result that would not be finite is rolled back.
"""

import threading

import numpy as np
import pytest
import torch

import mnemo_fast as mf
import mnemo_fast.reference as ref
from mnemo_fast.calibration import CalibrationWarning, calibrate
from mnemo_fast.evaluation import models
from mnemo_fast.reference.engine import REFERENCE

NAN, INF = float("nan"), float("inf")


@pytest.fixture(params=["fast", "reference"])
def api(request):
    return mf if request.param == "fast" else ref


@pytest.fixture
def setup():
    """(model [N, 6] -> [N, 4] logits, codes of 4 classes, one code each)."""
    torch.manual_seed(0)
    return models.MLP((6,), 4, hidden=8), mf.MnemonicCodes.generate(4, (6,), seed=0)


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, state):
    for k, v in model.state_dict().items():
        assert torch.equal(v.flatten().view(torch.uint8), state[k].flatten().view(torch.uint8)), k


def refuses(api, model, codes, classes, error, match, **kwargs):
    """forget raises ``error`` matching ``match``; the model (edited in place) is byte-identical."""
    state = state_of(model)
    kwargs = dict(lambda1=1e-3, lambda2=10.0) | kwargs
    with pytest.raises(error, match=match):
        api.forget(model, codes, classes, inplace=True, **kwargs)
    assert_unchanged(model, state)


# ---- 1. numbers -------------------------------------------------------------------------------

BAD_NUMBERS = [
    (dict(lambda1=NAN), mf.UnlearningError, "lambda1 must be a finite number > 0, got nan"),
    (dict(lambda1=INF), mf.UnlearningError, "lambda1 must be a finite number > 0, got inf"),
    (dict(lambda1=-1e-3), mf.UnlearningError, "lambda1 must be a finite number > 0"),
    (dict(lambda1=True), TypeError, "lambda1 must be a finite number > 0, got the bool True"),
    (dict(lambda1="0.001"), mf.UnlearningError, "lambda1 must be a finite number > 0 or 'auto'"),
    (dict(lambda1=torch.tensor([1e-3])), TypeError, "lambda1 .* tensor of shape \\(1,\\)"),
    (dict(lambda2=NAN), mf.UnlearningError, "lambda2 must be a finite number > 0, got nan"),
    (dict(lambda2=INF), mf.UnlearningError, "lambda2 .* got inf"),
    (dict(lambda2=np.float64(0)), mf.UnlearningError, "lambda2 must be a finite number > 0, got 0.0"),
    (dict(lambda2="10"), TypeError, "lambda2 must be a finite number > 0, got '10'"),
    (dict(lambda2=[1.0, 10.0]), TypeError, "a list of candidates only with lambda1='auto'"),
    (dict(lambda1=1e39), mf.UnlearningError, "lambda1=1e\\+39 is larger than the largest torch.float32"),
    (dict(lambda1="auto", lambda2=NAN), mf.UnlearningError, "lambda2 must be a finite number > 0, got nan"),
    (dict(lambda1="auto", lambda2=[1.0, NAN]), mf.UnlearningError, "lambda2\\[1\\] must be a finite"),
    (dict(lambda1="auto", lambda2=[]), mf.UnlearningError, "lambda2 is an empty list"),
    (dict(lambda1="auto", lambda2="10"), TypeError, "lambda2 must be .* got the string '10'"),
    (dict(lambda1="auto", lambda2=1e39), mf.UnlearningError, "lambda2=1e\\+39 is larger"),
    (dict(eps=NAN), mf.UnlearningError, "eps must be a finite number > 0, got nan"),
    (dict(eps=-1.0), mf.UnlearningError, "eps must be a finite number > 0, got -1.0"),
    (dict(eps=0.0), mf.UnlearningError, "eps must be a finite number > 0, got 0.0"),
    (dict(chunk_size=-1), mf.UnlearningError, "chunk_size must be an integer >= 1, got -1"),
    (dict(chunk_size=0), mf.UnlearningError, "chunk_size must be an integer >= 1, got 0"),
    (dict(chunk_size=2.0), TypeError, "chunk_size must be an integer >= 1, got 2.0"),
    (dict(chunk_size=True), TypeError, "chunk_size .* bool"),
    (dict(mode="gaussian", tau=NAN), mf.UnlearningError, "tau must be a finite number >= 0, got nan"),
    (dict(mode="gaussian", tau=-1.0), mf.UnlearningError, "tau must be a finite number >= 0"),
    (dict(mode="gaussian", draws=0), mf.UnlearningError, "draws must be an integer >= 1, got 0"),
    (dict(mode="gaussian", draws=1.5), TypeError, "draws must be an integer >= 1, got 1.5"),
    (dict(mode="gaussian", generator=0), TypeError, "generator must be a torch.Generator"),
    (dict(lambda1="auto", calibration={"depth": NAN}), mf.UnlearningError, "depth must be a finite number >= 0"),
    (dict(lambda1="auto", calibration={"max_forget_prob": 2.0}), mf.UnlearningError,
     "max_forget_prob must be a finite number in \\(0, 1\\], got 2.0"),
    (dict(lambda1="auto", calibration={"lambda1_range": (1.0, 0.1)}), mf.UnlearningError, "0 < lo < hi"),
    (dict(lambda1="auto", calibration={"lambda1_range": (0.0, 1.0)}), mf.UnlearningError,
     "lambda1_range\\[0\\] must be a finite number > 0"),
    (dict(lambda1="auto", calibration={"lambda1_range": "ab"}), TypeError, "lambda1_range must be a pair"),
    (dict(lambda1="auto", calibration={"steps": -1}), mf.UnlearningError, "steps must be an integer >= 0"),
    (dict(lambda1="auto", calibration={"step": 3}), TypeError, "calibration option 'step' is unknown"),
    (dict(calibration={"depth": 0.5}), mf.UnlearningError, "need lambda1='auto'"),
]


@pytest.mark.parametrize("bad, error, match", BAD_NUMBERS, ids=[str(c[0]) for c in BAD_NUMBERS])
def test_bad_numbers_are_refused_before_anything_runs(api, setup, bad, error, match):
    model, codes = setup
    refuses(api, model, codes, [0], error, match, **bad)


@pytest.mark.parametrize("good", [
    dict(lambda1=np.float32(1e-3), lambda2=np.int64(10)),
    dict(lambda1=torch.tensor(1e-3, dtype=torch.float64), lambda2=torch.tensor(10)),
    dict(lambda1=1e-3, lambda2=np.float32(10), chunk_size=np.int64(2)),
    dict(lambda1=1e-3, lambda2=10, chunk_size=torch.tensor(2)),
])
def test_numpy_scalars_and_0d_tensors_are_numbers(api, setup, good):
    model, codes = setup
    expected = api.forget(model, codes, [0], lambda1=float(np.float32(1e-3)) if isinstance(good["lambda1"], np.float32)
                          else 1e-3, lambda2=10.0)
    result = api.forget(model, codes, [0], **good)
    assert isinstance(result.lambda1, float) and result.lambda2 == 10.0
    for a, b in zip(result.model.parameters(), expected.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # chunks sum in another order


def test_gaussian_accepts_numpy_draws_and_zero_tau(api, setup):
    model, codes = setup
    run = lambda **kw: api.forget(model, codes, [0], lambda1=1e-2, lambda2=10, mode="gaussian",
                                  generator=torch.Generator().manual_seed(3), **kw)
    a, b = run(draws=np.int64(2), tau=np.float32(0)), run(draws=2, tau=0.0)
    assert len(a.candidate_scores) == 2
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


def test_a_shift_that_overflows_is_rolled_back_and_names_the_lambdas(api, setup):
    """float16 model, lambdas 1e6: the shift fits float32 but not float16 -> restored, raised."""
    model, codes = setup
    model = model.half()
    refuses(api, model, codes, [0], mf.UnlearningError,
            "lambda1=1e\\+06, lambda2=1e\\+06 makes parameter '1.weight' NaN or inf", lambda1=1e6, lambda2=1e6)
    with pytest.raises(mf.UnlearningError, match="lambda1=1e\\+06"):  # a copy: the same error
        api.forget(model, codes, [0], lambda1=1e6, lambda2=1e6)


# ---- 2. the class list ------------------------------------------------------------------------

@pytest.mark.parametrize("classes", [1, np.int64(1), torch.tensor(1), [np.int32(1)], torch.tensor([1]),
                                     np.array([1]), (1, 1)])
def test_class_lists_of_integers(api, setup, classes):
    model, codes = setup
    assert api.code_accuracy(model, codes, classes) == api.code_accuracy(model, codes, [1])
    f, r = api.class_fishers(model, codes, classes)
    f1, r1 = api.class_fishers(model, codes, [1])
    assert all(torch.equal(f[n], f1[n]) and torch.equal(r[n], r1[n]) for n in f)


@pytest.mark.parametrize("classes, match", [
    ("12", "got '12'"), ("1", "got '1'"), (3.0, "got 3.0 \\(float\\)"), ([3.7], "got 3.7 \\(float\\) in \\[3.7\\]"),
    ([1.0], "got 1.0"), (None, "got None"), (True, "got True"), ([True], "got True"),
    (torch.tensor([1.0]), "tensor\\(1.\\)"), (np.float64(2), "got np.float64\\(2.0\\)"),
])
def test_class_lists_that_are_not_integers(api, setup, classes, match):
    model, codes = setup
    refuses(api, model, codes, classes, TypeError, "forget_classes must be an int, .*" + match)
    with pytest.raises(TypeError, match="forget_classes"):
        api.code_accuracy(model, codes, classes)
    with pytest.raises(TypeError, match="forget_classes"):
        api.class_fishers(model, codes, classes)


@pytest.mark.parametrize("classes, match", [([], "empty"), ([4], "unknown class"), (range(4), "all 4 classes")])
def test_empty_unknown_and_all_classes_stay_errors(api, setup, classes, match):
    model, codes = setup
    refuses(api, model, codes, classes, mf.UnlearningError, match)


# ---- 3. codes ---------------------------------------------------------------------------------

def test_codes_with_nan_name_the_class(api, setup):
    model, codes = setup
    tensor = codes.tensor.clone()
    tensor[2, 0, 3] = NAN
    bad = mf.MnemonicCodes(tensor)
    refuses(api, model, bad, [0], mf.UnlearningError, "codes of class\\(es\\) \\[2\\] contain NaN or inf")
    with pytest.raises(mf.UnlearningError, match="\\[2\\]"):
        api.code_accuracy(model, bad, [0])
    with pytest.raises(mf.UnlearningError, match="\\[2\\]"):
        api.class_fishers(model, bad, [0])


def test_codes_on_the_meta_device_and_not_codes(api, setup):
    model, codes = setup
    refuses(api, model, codes.to("meta"), [0], mf.UnlearningError, "meta device")
    refuses(api, model, codes.tensor, [0], TypeError, "codes must be a MnemonicCodes")
    with pytest.raises(ValueError, match="floating point"):  # the constructor refuses integer codes
        mf.MnemonicCodes(torch.zeros(4, 1, 6, dtype=torch.int64))


def test_a_model_on_the_meta_device(api, setup):
    _, codes = setup
    with pytest.raises(mf.UnlearningError, match="parameter '1.weight' is on the meta device"):
        api.forget(models.MLP((6,), 4, hidden=8).to("meta"), codes, [0], lambda1=1e-3, lambda2=10)


# ---- 4. buffers -------------------------------------------------------------------------------

def bn_model(track=True):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5, track_running_stats=track),
                               torch.nn.Linear(5, 4))


@pytest.mark.parametrize("buffer, value", [("running_var", NAN), ("running_mean", INF)])
def test_non_finite_batchnorm_statistics_name_the_buffer(api, setup, buffer, value):
    _, codes = setup
    model = bn_model()
    getattr(model[1], buffer)[2] = value
    refuses(api, model, codes, [0], mf.UnlearningError, f"buffer '1.{buffer}' .* contains NaN or inf")


def test_nan_in_any_buffer_is_refused_but_an_infinite_mask_is_not(api, setup):
    model, codes = setup
    model.register_buffer("mask", torch.tensor([-INF, 0.0]))  # e.g. an attention mask: -inf on purpose
    result = api.forget(model, codes, [0], lambda1=1e-3, lambda2=10)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    model.mask[1] = NAN
    refuses(api, model, codes, [0], mf.UnlearningError, "buffer 'mask' contains NaN")


def test_batchnorm_without_running_statistics_gives_the_true_reason(api, setup):
    """track_running_stats=False: eval mode still normalizes with the batch's statistics, so a
    code's logits depend on the other codes (the one-code probe failed on it, blamed on the
    shape): refused for that reason, not the code shape."""
    _, codes = setup
    refuses(api, bn_model(track=False), codes, [0], mf.UnlearningError,
            "module '1' \\(BatchNorm1d\\) has track_running_stats=False: it normalizes with the statistics of each batch")


# ---- 5. the output ----------------------------------------------------------------------------

class Wrapped(torch.nn.Module):
    """The tiny MLP with a hook on its logits: ``how(x, logits)`` returns what forward returns."""

    def __init__(self, how, extra=False):
        super().__init__()
        torch.manual_seed(0)
        self.net = models.MLP((6,), 4, hidden=8)
        self.how = how
        if extra:
            self.unused = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.how(x, self.net(x))


def test_a_detached_output_is_refused(api, setup):
    _, codes = setup
    refuses(api, Wrapped(lambda x, out: out.detach()), codes, [0], mf.UnlearningError,
            "logits are not connected to the parameters to perturb")


def test_params_that_the_output_does_not_use_are_refused(api, setup):
    _, codes = setup
    refuses(api, Wrapped(lambda x, out: out, extra=True), codes, [0], mf.UnlearningError, "not connected",
            params="unused.*")


def test_non_finite_logits_on_one_class_name_it(api, setup):
    """NaN logits on class 2's code only (not the one the shape probe runs on)."""
    _, codes = setup
    target = codes.tensor[2, 0]
    how = lambda x, out: torch.where((x == target).all(-1, keepdim=True), torch.full_like(out, NAN), out)
    refuses(api, Wrapped(how), codes, [0], mf.UnlearningError, "logits on the codes of class\\(es\\) \\[2\\]")


def test_forget_classes_that_move_no_parameter_are_refused(api, setup):
    """The forget class's logits are connected (requires grad) but their gradient is zero."""
    _, codes = setup
    target = codes.tensor[0, 0]
    how = lambda x, out: torch.where((x == target).all(-1, keepdim=True), out * 0 + out.detach(), out)
    refuses(api, Wrapped(how), codes, [0], mf.UnlearningError, "zero gradient to every selected parameter")


# ---- 7. a model deepcopy cannot copy ---------------------------------------------------------

def test_a_model_that_cannot_be_copied_says_to_pass_inplace(api, setup):
    model, codes = setup
    model.lock = threading.Lock()
    state = state_of(model)
    with pytest.raises(mf.UnlearningError, match="copy.deepcopy failed .*pass inplace=True"):
        api.forget(model, codes, [0], lambda1=1e-3, lambda2=10)
    assert_unchanged(model, state)
    assert api.forget(model, codes, [0], lambda1=1e-3, lambda2=10, inplace=True).model is model


# ---- 8. an interrupted Gaussian forget gives the generator back ------------------------------

class Interrupt(torch.nn.Module):
    """The tiny MLP that raises ``error`` on its ``at``-th forward (0: never); counts forwards."""

    def __init__(self, error=None, at=0):
        super().__init__()
        torch.manual_seed(0)
        self.net, self.error, self.at, self.calls = models.MLP((6,), 4, hidden=8), error, at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at:
            raise self.error("interrupted")
        return self.net(x)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("default", [False, True])
def test_an_interrupted_gaussian_forget_leaves_the_generator_as_it_was(api, setup, error, default):
    _, codes = setup
    kwargs = dict(lambda1=1e-2, lambda2=10, mode="gaussian", draws=3, tau=0.0, inplace=True)
    counting = Interrupt()
    api.forget(counting, codes, [0], generator=torch.Generator().manual_seed(0), **kwargs)
    assert counting.calls >= 4  # the probe, the Fisher, 3 draws
    interrupted = 0
    for at in range(1, counting.calls + 1):
        model = Interrupt(error, at)
        generator = torch.default_generator if default else torch.Generator().manual_seed(5)
        state, weights = generator.get_state(), state_of(model)
        try:
            api.forget(model, codes, [0], generator=None if default else generator, **kwargs)
        except (error, mf.UnlearningError) as raised:  # the shape probe reports it as an UnlearningError
            assert "interrupted" in str(raised)
            assert torch.equal(generator.get_state(), state), at
            assert_unchanged(model, weights)
            interrupted += 1
    # a RuntimeError is absorbed where the engine has a documented fallback for it: the
    # reference's vmap forwards (forget, remain) fall back to a batch-1 loop; the fast planner's
    # probe of batch 2 sends what it cannot prove to the generic path (with a warning)
    on_reference = api is ref or mf.backend("cpu") == "reference"  # MNEMO_FAST_DISABLE_EXT=1: mf too
    absorbed = (2 if on_reference else 1) if error is RuntimeError else 0
    assert interrupted >= counting.calls - absorbed


# ---- 9. lambda1="auto" on a model never trained with codes -----------------------------------

def test_auto_on_a_model_not_trained_with_the_codes_warns(api, setup):
    model, codes = setup  # random weights: the forget side is reached, the retain side is not
    with pytest.warns(CalibrationWarning, match="may not have been trained with these codes"):
        result = api.forget(model, codes, [0], lambda1="auto", lambda2=10)
    assert result.calibration.forget_reached and not result.calibration.feasible


def test_auto_where_the_codes_admit_no_step_for_both_sides_says_so(trained_digits_mlp):
    """A model that knows its codes, under a retain criterion no step can meet (retained
    margins at 3x their value before): the balanced step, and a warning that says what the
    codes gave, not that the model was never trained with them."""
    model, codes = trained_digits_mlp
    assert mf.code_accuracy(model, codes, [0]) == mf.CodeAccuracy(1.0, 1.0)
    with pytest.warns(CalibrationWarning, match="the step applied balances the two sides") as record:
        result = mf.forget(model, codes, [0], lambda1="auto", lambda2=10.0, calibration={"min_retain_margin": 3.0})
    assert not any("may not have been trained" in str(w.message) for w in record)
    assert result.calibration.forget_reached and not result.calibration.feasible
    after = result.code_accuracy_after
    assert f"{after.forget:.0%} of the forget codes, {after.retain:.0%} of the others" in str(record[0].message)


# ---- 10. the lower-level functions ------------------------------------------------------------

@pytest.mark.parametrize("chunk", [-1, 0])
def test_fisher_diagonal_refuses_a_chunk_size_below_one(api, setup, chunk):
    model, codes = setup
    x, y = codes.batch(range(4))
    with pytest.raises(mf.UnlearningError, match=f"chunk_size must be an integer >= 1, got {chunk}"):
        api.fisher_diagonal(model, x, y, chunk_size=chunk)
    with pytest.raises(mf.UnlearningError, match="chunk_size"):
        api.class_fishers(model, codes, [0], chunk_size=chunk)
    with pytest.raises(mf.UnlearningError, match="chunk_size"):
        api.code_accuracy(model, codes, [0], chunk_size=chunk)
    with pytest.raises(TypeError, match="targets must be class indices"):
        api.fisher_diagonal(model, x, y.float())


def test_class_fishers_eps(api, setup):
    """eps = 0 is the plain Fisher average (allowed here); NaN, inf and negatives are refused."""
    model, codes = setup
    f, _ = api.class_fishers(model, codes, [0], eps=0)
    x, y = codes.batch([0])
    torch.testing.assert_close(f["3.bias"], api.fisher_diagonal(model, x, y)["3.bias"])
    for bad in (NAN, INF, -1e-16):
        with pytest.raises(mf.UnlearningError, match="eps must be a finite number >= 0"):
            api.class_fishers(model, codes, [0], eps=bad)


def test_perturbation_and_perturb_(api, setup):
    model, codes = setup
    f, r = api.class_fishers(model, codes, [0])
    with pytest.raises(mf.UnlearningError, match="lambda2 must be a finite number > 0, got nan"):
        api.perturbation(f, r, 1e-3, NAN)
    with pytest.raises(TypeError, match="lambda1"):
        api.perturbation(f, r, "1e-3", 10)
    with pytest.raises(mf.UnlearningError, match="larger than the largest"):
        api.perturbation(f, r, 1e39, 1e39)
    shifts = api.perturbation(f, r, 1e-3, 10)
    state = state_of(model)
    with pytest.raises(TypeError, match="sign must be \\+1 or -1, got the bool True"):
        mf.perturb_(model, shifts, True)
    bad = dict(shifts)
    bad["3.bias"] = bad["3.bias"].clone()
    bad["3.bias"][1] = INF
    with pytest.raises(mf.UnlearningError, match="perturb_ would make parameter '3.bias' NaN or inf"):
        mf.perturb_(model, bad, 1)
    assert_unchanged(model, state)  # nothing written: not even the parameters checked before it
    mf.perturb_(model, shifts, np.int64(-1))
    assert not torch.equal(model[3].bias, state["3.bias"])


def test_calibrate_checks_its_arguments(setup):
    model, codes = setup
    for kwargs, match in [(dict(lambda2=NAN), "lambda2 must be"), (dict(depth=INF), "depth"),
                          (dict(chunk_size=-1), "chunk_size"), (dict(eps=0.0), "eps"),
                          (dict(lambda1_range=(1.0, 1e-3)), "0 < lo < hi"), (dict(steps=2.5), "steps")]:
        with pytest.raises((mf.UnlearningError, TypeError), match=match):
            calibrate(model, codes, [0], engine=REFERENCE, **kwargs)
    with pytest.raises(TypeError, match="forget_classes"):
        calibrate(model, codes, "1", engine=REFERENCE)
