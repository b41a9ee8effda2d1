"""mode="dampen": SSD-style dampening from the codes' Fisher (issue 26, item 4;
mnemo_fast/calibration/dampen.py, docs/METHOD.md "Dampening")."""

from __future__ import annotations

import warnings

import pytest
import torch

import mnemo_fast as mf
import mnemo_fast.reference as ref
from mnemo_fast import verdict as verdicts
from mnemo_fast.calibration import dampen as dampening
from mnemo_fast.evaluation import data
from mnemo_fast.fast.engine import EXTENSION, HOOKS_ATEN
from mnemo_fast.reference import perturb
from mnemo_fast.reference.engine import REFERENCE

INF, NAN = float("inf"), float("nan")


def test_the_factor_follows_the_formula_on_special_values():
    # eta:          0     NaN(0/0)  below   at      above   far above  inf (1/0)  inf (inf/1)
    forget = torch.tensor([0.0, 0.0, 1.0, 2.0, 4.0, 1e6, 1.0, INF])
    remain = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    factor = perturb.dampening(forget, remain, threshold=2.0, lam=1.0)
    want = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.25, 1e-6, 0.0, 0.0])
    torch.testing.assert_close(factor, want, rtol=1e-6, atol=0.0)
    # lam > eta caps the factor at 1: a selected element is never scaled up
    assert perturb.dampening(torch.tensor([3.0]), torch.tensor([1.0]), 2.0, 10.0).item() == 1.0


@pytest.mark.parametrize("engine", [REFERENCE, HOOKS_ATEN, EXTENSION], ids=lambda e: e.name)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_every_engine_dampens_like_the_formula(engine, param_dtype):
    if engine is EXTENSION and not mf.fast._ext.available():
        pytest.skip("the compiled extension is not built")
    gen = torch.Generator().manual_seed(0)
    shapes = [(1,), (7, 5), (4097,)]  # one element; a small tensor; past the kernels' chunk
    forget = [torch.rand(s, generator=gen) * 8 for s in shapes]
    remain = [torch.rand(s, generator=gen) + 0.01 for s in shapes]
    forget[1].view(-1)[:3] = torch.tensor([0.0, INF, 5.0])
    remain[1].view(-1)[:3] = torch.tensor([0.0, 1.0, 0.0])
    params = [torch.randn(s, generator=gen).to(param_dtype) for s in shapes]
    want = [(p.float() * perturb.dampening(f, r, 3.0, 0.5)).to(param_dtype) for p, f, r in zip(params, forget, remain)]
    got = [p.clone() for p in params]
    engine.dampen_(got, forget, remain, 3.0, 0.5)
    for g, w in zip(got, want):
        assert g.dtype == param_dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=2 * torch.finfo(param_dtype).eps + 1e-5, atol=0.0)


def test_an_empty_list_is_a_no_op():
    for engine in (REFERENCE, HOOKS_ATEN):
        engine.dampen_([], [], [], 1.0, 1.0)


@pytest.fixture(scope="module")
def digits_val():
    """A validation sample of every class: the test split's first 256 images (a stand-in for a
    user's held-out split)."""
    _, test = data.digits()
    x, y = test.tensors
    return x[:256], y[:256]


def _forget(namespace, model, codes, c, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mf.ForgetWarning)
        return namespace.forget(model, codes, [c], mode="dampen", **kw)


@pytest.mark.parametrize("c, clean", [(1, True), (5, False)])
def test_auto_dampening_forgets_a_class_of_the_demo_model(trained_digits_mlp, digits_split, digits_val, c, clean):
    """On the demo's model the scan finds a threshold that forgets the class on the test split
    with the retained accuracy within 2 points, fast and reference alike. Class 1 is called
    clean; class 5 is a false alarm of the confirmation: its codes end misclassified, but not
    as deeply as the codes' own criterion asks at any threshold the sample's retained rows allow,
    and the verdict says so rather than trust 26 forget-class rows."""
    model, codes = trained_digits_mlp
    _, test = digits_split
    x, y = test.tensors
    before = model(x).argmax(-1) == y
    for namespace in (mf, ref):
        result = _forget(namespace, model, codes, c, lambda1="auto", retain=digits_val)
        hit = result.model(x).argmax(-1) == y
        assert hit[y == c].float().mean() <= 0.01
        assert hit[y != c].float().mean() >= before[y != c].float().mean() - 0.02
        assert result.mode == "dampen" and result.sign is None and result.lambda2 == dampening.DEFAULT_LAM
        assert result.lambda1 in dampening.THRESHOLDS and result.calibration.search == "dampen"
        assert result.calibration.forget_reached and result.flagged is not clean
        if not clean:
            assert any("not deeply" in reason for reason in result.verdict.reasons)
            assert result.verdict.sample.forget_after == 0.0  # what the sample alone would have passed
        trials = result.calibration.diagnostics["trials"]
        assert [t["threshold"] for t in trials] == list(dampening.THRESHOLDS[:len(trials)])
        scan = [t for t in trials if not t.get("confirming")]
        confirming = trials[len(scan):]  # the confirmation's trials come after the scan's, if any
        assert all(t.get("confirming") for t in confirming)
        first = len(scan) - 1 - dampening.MARGIN_NOTCHES  # the first trial meeting the forget side
        assert scan[first]["forget_met"] and not any(t["forget_met"] for t in scan[:first])
        applied = trials[-1] if not result.flagged else scan[-1]  # a failed confirmation: the margin's step
        assert result.lambda1 == applied["threshold"] and scan[-1]["forget_met"]
        # clean with a validation split: the codes' own forget side holds too
        assert result.calibration.diagnostics["verdict_criterion"] == dampening.DEFAULT_CRITERION
        assert result.verdict.codes_forget_ok is clean
        deep = result.verdict.details["forget_max_prob"] <= dampening.DEFAULT_CRITERION.max_forget_prob
        assert deep or not clean


def test_fast_and_reference_choose_the_same_threshold(trained_digits_mlp):
    model, codes = trained_digits_mlp
    for c in (0, 3, 8):
        fast, slow = (_forget(ns, model, codes, c, lambda1="auto") for ns in (mf, ref))
        assert fast.lambda1 == slow.lambda1 and fast.flagged == slow.flagged
        for (name, p), q in zip(fast.model.named_parameters(), slow.model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


def test_a_fixed_threshold_scales_exactly_the_selected_elements(trained_digits_mlp):
    model, codes = trained_digits_mlp
    forget_f, remain_f = ref.class_fishers(model, codes, [2])
    result = _forget(mf, model, codes, 2, lambda1=100.0, lambda2=0.5)
    assert result.calibration is None and result.lambda1 == 100.0 and result.lambda2 == 0.5
    for (name, new), old in zip(result.model.named_parameters(), model.parameters()):
        factor = perturb.dampening(forget_f[name], remain_f[name], 100.0, 0.5)
        torch.testing.assert_close(new, old * factor, rtol=1e-5, atol=1e-8, msg=name)
        assert bool(((new == old) | (factor < 1)).all())


def test_the_verdict_judges_the_dampened_model(trained_digits_mlp, digits_val):
    """With a sample holding forget-class rows, the scan stops where the codes end misclassified
    and the rows end forgotten; the verdict also asks the codes' own forget side, so a step that
    only the rows call forgotten is flagged with the codes' reason."""
    model, codes = trained_digits_mlp
    result = _forget(mf, model, codes, 4, lambda1="auto", retain=digits_val)
    diagnostics = result.calibration.diagnostics
    assert diagnostics["criterion"] == dampening.MISCLASSIFIED
    assert diagnostics["verdict_criterion"] == dampening.DEFAULT_CRITERION
    assert result.verdict.sample is not None and result.verdict.sample.forget_rows > 0
    assert result.verdict.sample.forget_after <= 0.01 and result.verdict.retain_ok
    deep = dampening.DEFAULT_CRITERION
    codes_deep = (result.verdict.details["forget_depth"] >= deep.depth
                  and result.verdict.details["forget_max_prob"] <= deep.max_forget_prob)
    assert result.verdict.codes_forget_ok == codes_deep == dampening.forget_met(result.verdict) == (not result.flagged)
    if result.flagged:
        assert all(reason.startswith("codes: the forget codes are misclassified, but not deeply")
                   for reason in result.verdict.reasons)
    plain = _forget(mf, model, codes, 4, lambda1="auto")
    assert plain.calibration.diagnostics["criterion"] == dampening.DEFAULT_CRITERION
    only_retained = _forget(mf, model, codes, 4, lambda1="auto", retain=(digits_val[0][digits_val[1] != 4],
                                                                         digits_val[1][digits_val[1] != 4]))
    assert only_retained.calibration.diagnostics["criterion"] == dampening.DEFAULT_CRITERION
    custom = _forget(mf, model, codes, 4, lambda1="auto", calibration={"depth": 2.0, "max_forget_prob": 1e-4})
    assert custom.calibration.diagnostics["criterion"].depth == 2.0


class _ScriptedSession:
    """A stand-in for CandidateSession in the scan: the verdict of each threshold is scripted by
    ``forget`` (threshold -> (forget side by the scan's criterion, by the confirmation's)) and
    ``retain`` (threshold -> retain side); ``writes`` records every dampening written."""

    def __init__(self, forget, retain):
        self.forget, self.retain, self.writes, self.current = forget, retain, [], None

    def dampen(self, threshold, lam):
        self.writes.append(threshold)
        self.current = threshold

    def verdict(self, criterion, classes):
        loose, strict = self.forget.get(self.current, (False, False))
        forget_ok = strict if criterion is dampening.DEFAULT_CRITERION else loose
        retain_ok = self.retain.get(self.current, True)
        return verdicts.Verdict(not (forget_ok and retain_ok), () if forget_ok and retain_ok else ("scripted",),
                                "codes", forget_ok, retain_ok, forget_ok=forget_ok, retain_ok=retain_ok)

    def verdicts(self, criteria, classes):
        return tuple(self.verdict(criterion, classes) for criterion in criteria)


def _scan(forget, retain):
    session = _ScriptedSession(forget, retain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mf.ForgetWarning)
        calibration = dampening.calibrate_dampening(session, 1.0, dampening.MISCLASSIFIED, [0],
                                                    thresholds=(8.0, 4.0, 2.0, 1.0), confirm=dampening.DEFAULT_CRITERION)
    return session, calibration


def test_the_confirmation_goes_on_down_to_the_first_threshold_the_codes_confirm():
    # the scan's criterion is met from 8 on (margin: 4); the codes' own forget side from 2 on
    session, cal = _scan({8.0: (True, False), 4.0: (True, False), 2.0: (True, True), 1.0: (True, True)}, {})
    assert cal.lambda1 == 2.0 and session.current == 2.0 and cal.feasible and not cal.diagnostics["verdict"].flagged
    assert [t.get("confirming", False) for t in cal.diagnostics["trials"]] == [False, False, True]


def test_the_confirmation_stops_where_the_retain_side_is_lost_and_reapplies_the_margins_step():
    session, cal = _scan({8.0: (True, False), 4.0: (True, False), 2.0: (True, False), 1.0: (True, True)},
                         {2.0: False, 1.0: False})
    assert cal.lambda1 == 4.0 and session.current == 4.0 and session.writes == [8.0, 4.0, 2.0, 4.0]
    assert cal.diagnostics["verdict"].flagged and not cal.feasible and cal.forget_reached


def test_the_confirmation_with_no_threshold_left_keeps_the_margins_step_flagged():
    session, cal = _scan({2.0: (True, False), 1.0: (True, False)}, {})
    assert cal.lambda1 == 1.0 and session.writes == [8.0, 4.0, 2.0, 1.0]  # the margin's is the last threshold
    assert cal.diagnostics["verdict"].flagged and cal.forget_reached


def test_a_step_the_codes_confirm_at_once_needs_no_confirming_trial():
    session, cal = _scan({8.0: (True, True), 4.0: (True, True)}, {})
    assert cal.lambda1 == 4.0 and session.writes == [8.0, 4.0] and not cal.diagnostics["verdict"].flagged


def test_no_threshold_meeting_the_forget_side_warns_and_applies_the_most_dampening(trained_digits_mlp):
    model, codes = trained_digits_mlp
    with pytest.warns(mf.ForgetWarning, match="no threshold down to 1 met the forget side"):
        result = mf.forget(model, codes, [6], mode="dampen", lambda1="auto",
                           calibration={"depth": 1e6, "max_forget_prob": 1e-30})
    assert not result.calibration.forget_reached and not result.calibration.feasible and result.flagged
    assert result.lambda1 == dampening.THRESHOLDS[-1]
    assert len(result.calibration.diagnostics["trials"]) == len(dampening.THRESHOLDS)


def _unchanged(model, state):
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lambda1="auto", lambda2=[1.0, 2.0]), TypeError, "takes one lambda2"),
    (dict(lambda1="auto", calibration={"blocks": "layer"}), mf.UnlearningError, "not one of mode='dampen'"),
    (dict(lambda1="auto", calibration={"steps": 3}), mf.UnlearningError, "not one of mode='dampen'"),
    (dict(lambda1=10.0, calibration={"depth": 1.0}), mf.UnlearningError, "need lambda1='auto'"),
    (dict(lambda1=-1.0), mf.UnlearningError, "lambda1"),
    (dict(lambda1=10.0, lambda2=0.0), mf.UnlearningError, "lambda2"),
])
def test_bad_arguments_are_refused_before_the_model_is_touched(trained_digits_mlp, kwargs, error, match):
    model, codes = trained_digits_mlp
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        mf.forget(model, codes, [3], mode="dampen", inplace=True, **kwargs)
    assert _unchanged(model, state)


def test_in_place_dampening_edits_the_callers_model_completely(digits_mlp_with_codes):
    model, codes = digits_mlp_with_codes(0.1, 5)
    copy = _forget(mf, model, codes, 7, lambda1="auto")
    result = _forget(mf, model, codes, 7, lambda1="auto", inplace=True)
    assert result.model is model
    for p, q in zip(model.parameters(), copy.model.parameters()):
        assert torch.equal(p, q)


def test_a_failure_midway_leaves_the_model_as_it_was(trained_digits_mlp, monkeypatch):
    """A scan that fails after some trials were written restores every parameter."""
    model, codes = trained_digits_mlp
    import copy as copying
    model = copying.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}
    real = verdicts.judge

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(verdicts, "judge", failing)
    with pytest.raises(RuntimeError, match="boom"):
        mf.forget(model, codes, [3], mode="dampen", lambda1="auto", inplace=True)
    assert calls["n"] == 3 and _unchanged(model, state)


def test_params_restricts_the_dampening(trained_digits_mlp):
    model, codes = trained_digits_mlp
    last = [name for name, _ in model.named_parameters()][-1]
    result = _forget(mf, model, codes, 2, lambda1=1.0, params=[last])
    for (name, new), old in zip(result.model.named_parameters(), model.parameters()):
        if name != last:
            assert torch.equal(new, old), name
    assert not torch.equal(dict(result.model.named_parameters())[last], dict(model.named_parameters())[last])


class _Embedded(torch.nn.Module):
    """Token ids -> embedding -> LayerNorm -> Linear -> a custom RMSNorm-like module -> head."""

    class RMSNormish(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.body = torch.nn.Linear(8, 8)
        self.rms = self.RMSNormish(8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.rms(torch.relu(self.body(self.norm(self.embed(ids))))).mean(1))


def test_by_default_norms_and_embeddings_are_left_alone():
    torch.manual_seed(0)
    model = _Embedded()
    keep = dampening.default_params(model)
    chosen = [name for name, _ in model.named_parameters() if keep(name)]
    assert chosen == ["body.weight", "body.bias", "head.weight", "head.bias"]
    codes = mf.MnemonicCodes.generate_tokens(3, 6, 16, seed=0, low=1)
    result = _forget(mf, model, codes, 1, lambda1=1.0)
    for (name, new), old in zip(result.model.named_parameters(), model.parameters()):
        if name not in chosen:
            assert torch.equal(new, old), name
    assert any(not torch.equal(new, old) for (name, new), old in zip(result.model.named_parameters(), model.parameters()))
    everything = _forget(mf, model, codes, 1, lambda1=1.0, params="*")  # every parameter, on request
    assert not torch.equal(everything.model.norm.weight, model.norm.weight)


def test_a_model_of_norms_only_is_dampened_whole():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LayerNorm(4))  # its only parameters: a norm's
    keep = dampening.default_params(model)
    assert not any(keep(name) for name, _ in model.named_parameters())
    codes = mf.MnemonicCodes.generate(4, (4,), seed=0)
    result = _forget(mf, model, codes, 0, lambda1=1.0)
    assert result.model is not model
