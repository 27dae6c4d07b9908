# Quickstart on a fresh clone: `make run` (set-up, then the benchmark) and `make test`
# (set-up, then the tests). Set-up uses the active virtualenv/conda env if there is one,
# else creates .venv; it installs torch only when none is importable, never replacing one.
# `make run` installs requirements.txt only; `make test` and the checks add requirements-dev.txt.
TORCH_SPEC ?= torch==2.13.0
SYSTEM_PYTHON ?= python3

ifneq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
PY := python
VENV :=
else
PY := .venv/bin/python
VENV := .venv/bin/python
endif
CSRC := $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh')

.PHONY: setup run test test-quick fuzz info cuda-check aarch64-check transformers-oldest triton-oldest clean

setup: .stamps/build

.venv/bin/python:
	$(SYSTEM_PYTHON) -m venv .venv

.stamps/deps: requirements.txt $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -r requirements.txt
	@mkdir -p .stamps && touch $@

.stamps/dev-deps: requirements-dev.txt .stamps/deps
	$(PY) -m pip install -r requirements-dev.txt
	@touch $@

.stamps/build: .stamps/deps setup.py $(CSRC)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	@touch $@

run: setup
	$(PY) -m fastattn bench --quick

# Every test in tests/ (the tiers: pyproject.toml's markers, assigned in tests/conftest.py): all but the
# `serial` tier under pytest-xdist (TEST_WORKERS processes, --dist loadgroup), then the `serial` tier
# alone with every CPU thread (the CPU kernels' parallel paths, the speed guards). Both passes run;
# either failing fails. `make test-quick`: the `quick` tier (the edit-test loop, under 2 minutes on 2 cores).
TEST_WORKERS ?= auto
XDIST := -p xdist -n $(TEST_WORKERS) --dist loadgroup
test: setup .stamps/dev-deps
	$(PY) -m pytest -q $(XDIST) -m "not serial" tests; parallel=$$?; \
	$(PY) -m pytest -q -m serial tests; serial=$$?; \
	test $$parallel -eq 0 && test $$serial -eq 0

test-quick: setup .stamps/dev-deps
	$(PY) -m pytest -q $(XDIST) -m quick tests

# The fuzzers (tests/test_fuzz.py, tests/test_fuzz_bad_input.py) with many more examples than `make
# test`'s bounded, derandomized run: FUZZ_EXAMPLES per fast test (fewer for Triton's interpreter),
# fresh random ones each run; prints how many cases each test ran.
FUZZ_EXAMPLES ?= 2000
fuzz: setup .stamps/dev-deps
	FASTATTN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -s --hypothesis-show-statistics --durations=0 \
		tests/test_fuzz.py tests/test_fuzz_bad_input.py

info: setup
	$(PY) -m fastattn info

# The transformers integration's tests and its every-family sweep on the oldest transformers fastattn
# supports (setup.py's extra; `make test` runs the newest): that release and what it needs beyond the
# newest's dependencies, in build/ on the path.
TRANSFORMERS_OLDEST ?= 5.17.0
transformers-oldest: .stamps/dev-deps
	$(PY) -m pip install -q --no-deps --upgrade --target build/transformers-$(TRANSFORMERS_OLDEST) \
		transformers==$(TRANSFORMERS_OLDEST) "huggingface-hub>=1.5,<2" httpx httpcore certifi
	PYTHONPATH=build/transformers-$(TRANSFORMERS_OLDEST) $(PY) -m pytest -q tests/test_transformers.py tests/test_transformers_sweep.py

# The Triton kernels on the GPU image's Triton (`make test` runs the newest): every launch the glue
# makes compiled for sm_90, the cached launch checked against the JIT's, and the kernels at the GPU's
# tile shapes under the interpreter. That release in build/ on the path, with a numpy before 2.3
# (its interpreter turns one-element arrays into ints, which numpy 2.3 refuses).
TRITON_OLDEST ?= 3.6.0
triton-oldest: .stamps/dev-deps
	$(PY) -m pip install -q --no-deps --upgrade --target build/triton-$(TRITON_OLDEST) triton==$(TRITON_OLDEST) \
		"numpy<2.3"
	PYTHONPATH=build/triton-$(TRITON_OLDEST) $(PY) -m pytest -q -W ignore::DeprecationWarning tests/test_triton_compile.py \
		tests/test_triton_launch.py tests/test_triton_tiles.py

# Compiles every CUDA kernel for sm_80 and sm_90a with nvcc (no GPU needed) and reads the result.
cuda-check: .stamps/dev-deps
	$(PY) csrc/cuda/cuda_check.py

# The CPU micro-kernels' own test (no torch), cross-compiled for aarch64 and run under qemu-user:
# correctness of the generic table as NEON. Needs g++-aarch64-linux-gnu and qemu-user (apt).
aarch64-check:
	@mkdir -p build
	aarch64-linux-gnu-g++ -O2 -std=c++17 -static tests/cpp/micro_kernels_test.cpp csrc/cpu/micro_kernels.cpp \
		-o build/micro_kernels_test_aarch64
	qemu-aarch64 build/micro_kernels_test_aarch64

clean:
	rm -rf .stamps build fastattn/_C*.so *.egg-info
