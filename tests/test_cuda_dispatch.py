"""The CPU-testable half of the CUDA path: which GPU and generator a tensor means, the
per-device grouping of the fused perturbation, the kernel-image check with its fallback, the
note for a GPU machine whose build has no CUDA kernels (GPUs faked with mocks), and where the
extension's warnings point (the caller's line)."""

from __future__ import annotations

import importlib
import sys
import types
import warnings

import pytest
import torch

from mnemo_fast.fast import _ext, devices
from mnemo_fast.fast import engine as engine_mod
from mnemo_fast.fast.engine import FastEngine


# --- which GPU, which generator ------------------------------------------------------------

def test_cuda_index_keeps_index_zero():
    current = lambda: 1  # noqa: E731  (another GPU is current)
    assert devices.cuda_index(torch.device("cuda", 0), current) == 0
    assert devices.cuda_index(torch.device("cuda", 2), current) == 2
    assert devices.cuda_index(torch.device("cuda"), current) == 1


def test_default_generator_of_cuda_zero_while_another_is_current(monkeypatch):
    gens = ("gen0", "gen1")
    monkeypatch.setattr(torch.cuda, "default_generators", gens)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert devices.default_generator(torch.device("cuda", 0)) == "gen0"
    assert devices.default_generator(torch.device("cuda")) == "gen1"
    assert devices.default_generator(torch.device("cpu")) is torch.default_generator
    from mnemo_fast import method

    assert method.default_generator is devices.default_generator  # what forget's Gaussian mode uses
    assert method.default_generator(torch.device("cuda", 0)) == "gen0"


def test_generator_fits():
    cuda, cuda0, cuda1 = torch.device("cuda"), torch.device("cuda", 0), torch.device("cuda", 1)
    assert devices.generator_fits(cuda, cuda0) and devices.generator_fits(cuda, cuda1)  # Generator("cuda")
    assert devices.generator_fits(cuda0, cuda0) and not devices.generator_fits(cuda0, cuda1)
    assert not devices.generator_fits(torch.device("cpu"), cuda0)
    assert devices.generator_fits(torch.Generator().device, torch.device("cpu"))


def test_group_by_device_keeps_order():
    a, b = torch.zeros(2), torch.zeros(3, device="meta")
    assert devices.group_by_device([a, b, a, b, b]) == [
        (torch.device("cpu"), [0, 2]), (torch.device("meta"), [1, 3, 4])
    ]
    assert devices.group_by_device([]) == []


# --- one fused call per device ----------------------------------------------------------------

class RecordingKernels:
    """Stands in for mnemo_fast.fast.ops: records each call's devices and sizes."""

    def __init__(self):
        self.calls = []

    def perturb_max_ratio(self, forget, remain):
        self.calls.append(("max_ratio", {t.device for t in forget + remain}, [t.numel() for t in forget]))
        return torch.tensor([float(t.numel()) for t in forget])  # on the CPU, like a fake GPU result

    def perturb_shift_(self, params, forget, remain, max_ratio, lambda1, lambda2, sign):
        self.calls.append(("shift", {t.device for t in params + forget + remain}, [t.numel() for t in params],
                           max_ratio.device, tuple(max_ratio.shape)))

    def perturb_gaussian_(self, params, forget, remain, max_ratio, lambda1, lambda2, tau, generator):
        self.calls.append(("gaussian", {t.device for t in params}, [t.numel() for t in params], generator))


@pytest.fixture
def spread():
    """Parameters of a model split over two devices ("cpu" and "meta" stand for two GPUs)."""
    kernels = RecordingKernels()
    engine = FastEngine(kernels, "ext", fused_perturbation=True)
    engine.runs_on = lambda device: True  # both "GPUs" have kernels
    devs = ["cpu", "meta", "cpu", "meta"]
    sizes = [2, 3, 4, 5]
    params = [torch.zeros(n, device=d) for n, d in zip(sizes, devs)]
    fishers = [torch.ones(n, device=d) for n, d in zip(sizes, devs)]
    return engine, kernels, params, fishers


def test_max_ratio_one_call_per_device(spread):
    engine, kernels, params, fishers = spread
    out = engine.max_ratio(fishers, fishers)
    assert [c[:3] for c in kernels.calls] == [
        ("max_ratio", {torch.device("cpu")}, [2, 4]), ("max_ratio", {torch.device("meta")}, [3, 5])
    ]
    assert out.device == fishers[0].device and out.tolist() == [2.0, 3.0, 4.0, 5.0]  # list order kept


def test_shift_one_call_per_device_with_its_max_ratio(spread):
    engine, kernels, params, fishers = spread
    engine.shift_(params, fishers, fishers, torch.arange(4.0), 1e-3, 10.0, 1.0)
    assert kernels.calls == [
        ("shift", {torch.device("cpu")}, [2, 4], torch.device("cpu"), (2,)),
        ("shift", {torch.device("meta")}, [3, 5], torch.device("meta"), (2,)),
    ]


def test_single_device_is_one_unchanged_call():
    kernels = RecordingKernels()
    engine = FastEngine(kernels, "ext", fused_perturbation=True)
    engine.runs_on = lambda device: True
    params = [torch.zeros(2), torch.zeros(3)]
    ratio = torch.ones(2)
    engine.shift_(params, params, params, ratio, 1e-3, 10.0, 1.0)
    assert kernels.calls == [("shift", {torch.device("cpu")}, [2, 3], torch.device("cpu"), (2,))]


def test_gaussian_generator_goes_to_its_own_device(spread, monkeypatch):
    engine, kernels, params, fishers = spread
    drawn = []
    monkeypatch.setattr(engine_mod.REFERENCE, "gaussian_",
                        lambda p, *args: drawn.append(({t.device for t in p}, [t.numel() for t in p])))
    gen = torch.Generator()  # a "cuda:0" generator: fits the first device only
    engine.gaussian_(params, fishers, fishers, torch.ones(4), 1e-3, 10.0, 1.0, gen)
    assert kernels.calls == [("gaussian", {torch.device("cpu")}, [2, 4], gen)]
    assert drawn == [({torch.device("meta")}, [3, 5])]  # drawn from gen, as torch.randn would
    kernels.calls.clear()
    engine.gaussian_(params, fishers, fishers, torch.ones(4), 1e-3, 10.0, 1.0, None)  # each device's default
    assert [c[1] for c in kernels.calls] == [{torch.device("cpu")}, {torch.device("meta")}]


# --- the kernel image of a GPU, and the note for a build without CUDA kernels -------------------

@pytest.fixture
def fresh_ext(monkeypatch):
    """_ext's caches emptied (and restored) so each test sees a first use."""
    monkeypatch.setattr(_ext, "_images", {})
    monkeypatch.setattr(_ext, "_noted", set())
    return _ext


def test_no_kernel_image_falls_back_with_one_warning(fresh_ext, monkeypatch):
    monkeypatch.setattr(fresh_ext, "_cuda_registered", lambda: True)
    probes = []
    monkeypatch.setattr(fresh_ext, "_probe", lambda index: probes.append(index) or index == 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (12, 0))
    assert fresh_ext.has_cuda_kernels(torch.device("cuda", 0))
    with pytest.warns(RuntimeWarning, match=r"no image for GPU 1 \(sm_120\).*TORCH_CUDA_ARCH_LIST"):
        assert not fresh_ext.has_cuda_kernels(torch.device("cuda", 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second use neither probes nor warns again
        assert not fresh_ext.has_cuda_kernels(torch.device("cuda", 1))
    assert probes == [0, 1]
    assert fresh_ext.has_cuda_kernels()  # no device: only "are they registered"
    engine = FastEngine(RecordingKernels(), "ext", fused_perturbation=True, compiled=True)
    assert engine.runs_on(torch.device("cuda", 0)) and not engine.runs_on(torch.device("cuda", 1))


def test_build_without_probe_is_trusted(fresh_ext, monkeypatch):
    # a CPU-only build (or an older one) has no cuda_kernel_image: nothing to ask
    monkeypatch.setattr(fresh_ext.importlib, "import_module", lambda name: types.SimpleNamespace())
    assert fresh_ext._probe(0) is True


def test_probe_of_a_cuda_build_reports_errors_as_python_exceptions():
    if not _ext.available():
        pytest.skip("mnemo_fast._C unavailable")
    probe = getattr(importlib.import_module("mnemo_fast._C"), "cuda_kernel_image", None)
    if probe is None or torch.cuda.is_available():
        pytest.skip("needs the CUDA build on a machine without a usable GPU")
    with pytest.raises(RuntimeError, match="CUDA"):  # no driver: an exception, not a crash
        probe(0)


def test_note_on_a_gpu_machine_without_cuda_kernels(fresh_ext, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fresh_ext, "available", lambda: True)
    monkeypatch.setattr(fresh_ext, "_cuda_registered", lambda: False)
    message = fresh_ext.missing_cuda_message()
    assert "\n" not in message and "without CUDA kernels" in message and "FORCE_CUDA=1" in message
    with pytest.warns(RuntimeWarning, match="built without CUDA kernels"):
        fresh_ext.note_missing_cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh_ext.note_missing_cuda()  # once per process


def test_no_note_where_it_does_not_apply(fresh_ext, monkeypatch):
    monkeypatch.setattr(fresh_ext, "available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine
    assert fresh_ext.missing_cuda_message() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fresh_ext, "_cuda_registered", lambda: True)  # GPU and CUDA kernels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh_ext.note_missing_cuda()
    assert fresh_ext.missing_cuda_message() is None


def test_backend_says_the_gpu_path_is_not_the_extension(fresh_ext, monkeypatch):
    import mnemo_fast

    if not fresh_ext.available():
        pytest.skip("mnemo_fast._C unavailable")
    monkeypatch.setattr(fresh_ext, "_cuda_registered", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine (faked)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert mnemo_fast.backend("cuda") == "hooks-aten"  # its tensors run the pure-PyTorch hooks
    assert mnemo_fast.backend("cpu") == "cpu-ext"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no GPU: no path, said plainly
    assert mnemo_fast.backend("cuda") == "no-gpu"


# --- the fallback warning points at the caller's line ---------------------------------------

def test_missing_extension_warning_names_the_callers_line(monkeypatch):
    """However deep in the package the first use is (backend(), a forget through the public
    wrapper), the warning names this file's line, not engines.py (issue 27)."""
    import mnemo_fast

    def missing(name):
        raise ImportError(f"no module named {name}")

    monkeypatch.delenv(_ext._DISABLE_VAR, raising=False)  # `make test-reference` sets it: then no warning
    monkeypatch.setattr(_ext, "importlib", types.SimpleNamespace(import_module=missing))
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    calls = {"backend": lambda: mnemo_fast.backend(), "fisher": lambda: mnemo_fast.fisher_diagonal(model, x, y)}
    for name, call in calls.items():
        monkeypatch.setattr(_ext, "_state", {})  # a first use, restored after the test
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        [w] = [w for w in caught if "could not be loaded" in str(w.message)]
        assert w.filename == __file__, (name, w.filename, w.lineno)
        assert _ext.available() is False and "no module named mnemo_fast._C" in _ext.load_error()


def test_user_stacklevel_skips_the_package_frames():
    from pathlib import Path

    import mnemo_fast
    from mnemo_fast.stack import user_stacklevel

    assert user_stacklevel() == 1  # called from outside the package: this very line
    inside = str(Path(mnemo_fast.__file__).parent / "made_up.py")  # functions "in" the package
    scope = {"user_stacklevel": user_stacklevel, "warnings": warnings}
    exec(compile("def warn():\n    warnings.warn('w', UserWarning, stacklevel=user_stacklevel())\n"
                 "def deeper():\n    warn()\n", inside, "exec"), scope)
    for call in (scope["warn"], scope["deeper"]):  # one and two package frames above this one
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        assert [(w.filename, w.lineno) for w in caught] == [(__file__, sys._getframe().f_lineno - 1)]


# --- one decision per call: engines.decide ---------------------------------------------------

def test_decide_is_what_backend_and_explain_answer(fresh_ext, monkeypatch):
    """backend(), explain and the engines' methods read one decision (issue 23)."""
    import mnemo_fast
    from mnemo_fast import engines

    cpu = engines.decide(device=torch.device("cpu"))
    assert cpu.fisher == mnemo_fast.backend("cpu") and "\n" not in cpu.why
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    explanation = mnemo_fast.explain(model, x, y)
    assert explanation.backend == cpu.fisher and explanation.decision == str(cpu)
    assert str(explanation).splitlines()[1] == f"  path: {cpu}"
    if not fresh_ext.available():
        assert cpu.fisher == "reference" and "extension is unavailable" in cpu.why
        return
    assert (cpu.fisher, cpu.perturbation) == ("cpu-ext", "fused")
    monkeypatch.setattr(fresh_ext, "_cuda_registered", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine (faked), no CUDA kernels
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    gpu = engines.decide(device=torch.device("cuda"))
    assert (gpu.fisher, gpu.perturbation) == ("hooks-aten", "reference") and "do not run on cuda" in gpu.why
    assert gpu.engine is engine_mod.HOOKS_ATEN and mnemo_fast.backend("cuda") == gpu.fisher
    assert engine_mod.EXTENSION.backend_for(torch.device("cuda")) == gpu.fisher


def test_decide_sends_a_generator_of_another_device_to_the_reference(spread):
    from mnemo_fast import engines

    engine = spread[0]
    meta, cpu = torch.device("meta"), torch.device("cpu")
    assert engines.decide(engine, meta).perturbation == "fused"
    other = engines.decide(engine, meta, generator=torch.Generator())
    assert other.perturbation == "reference" and "generator serves cpu" in other.why
    assert engines.decide(engine, cpu, generator=torch.Generator()).perturbation == "fused"
