# One command sets everything up and runs the main job (`make demo`), one runs the tests
# (`make test`). Set-up is idempotent: a venv in .venv, the pinned CPU build of torch, the
# package installed in editable mode with its C++ extension compiled against that torch.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: setup demo test test-reference fuzz bench cuda-check gpu-check clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "torch==2.13.0"
	$(BIN)/pip install -q --disable-pip-version-check setuptools wheel pybind11 ninja numpy
	$(BIN)/pip install -q --disable-pip-version-check --no-build-isolation -e ".[test]"
	@test -d /usr/share/datasets/fashion-mnist || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
		&& apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) \
		|| echo "note: Fashion-MNIST is optional; install the Debian package dataset-fashion-mnist for it"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/mnemo-fast demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

# The same suite with the compiled extension switched off (everything on the reference).
test-reference: $(STAMP)
	MNEMO_FAST_DISABLE_EXT=1 $(BIN)/python -m pytest -q $(ARGS)

# Small random whole models against a brute-force batch-1 loop (tests/test_generated_models.py),
# with a long budget: FUZZ_MODELS models (the suite runs 200); MNEMO_FAST_FUZZ_RANDOM=1 draws
# fresh random seeds instead of the fixed sequence (make fuzz MNEMO_FAST_FUZZ_RANDOM=1).
FUZZ_MODELS ?= 10000
fuzz: $(STAMP)
	MNEMO_FAST_MODELS=$(FUZZ_MODELS) $(BIN)/python -m pytest -q tests/test_generated_models.py $(ARGS)

# The side-by-side baselines, without letting them replace the pinned CPU torch: BackPACK's
# torchvision requirement would pull a CUDA torch, and it imports torchvision only in examples.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check opacus "torch==2.13.0"
	$(BIN)/pip install -q --disable-pip-version-check --no-deps backpack-for-pytorch einops unfoldNd packaging
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/run.py $(ARGS)

# Compile-checks csrc/cuda/*.cu (no GPU needed): CUDA_COMPILE_ARCHS="sm_80 sm_90" for both.
cuda-check:
	.ci/cuda_compile_check.sh

# On a machine with a GPU and a CUDA build of torch (PYTHON=...): builds the CUDA kernels in
# place if needed, runs tests/test_ops_cuda.py, compute-sanitizer (memcheck, racecheck,
# synccheck) on one small call of each op, and the GPU benchmarks; results in
# $(GPU_CHECK_OUT)/summary.md and one log per step (GPU_CHECK_OUT=$$OUT on a lent device).
GPU_CHECK_OUT ?= gpu-check
gpu-check:
	GPU_CHECK_OUT=$(GPU_CHECK_OUT) PYTHON=$${PYTHON:-python3} .ci/gpu_check.sh

clean:
	rm -rf build *.egg-info mnemo_fast/*.so $(VENV)
