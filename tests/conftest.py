import os
import random
import re
import zlib
from pathlib import Path

import pytest

# Kernel output buffers start as NaN, so an element a kernel forgets to write fails the test.
os.environ["FASTATTN_POISON"] = "1"
# One launch configuration per Triton kernel (the shipped defaults, else the first candidate):
# tests check results, and tuning is tested on its own (test_tuning, test_gpu).
os.environ.setdefault("FASTATTN_TUNE", "0")

# Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    torch = None

# Hypothesis outside the fuzzers' own profiles (tests/fuzz_strategies.py): the same examples in
# every run and every process (no example database, no wall-clock deadline, which a loaded
# machine or a busy xdist worker would trip). `make fuzz` (FASTATTN_FUZZ_EXAMPLES) keeps
# hypothesis's defaults, so its long profile draws fresh examples.
try:
    from hypothesis import settings as _hypothesis_settings

    if not int(os.environ.get("FASTATTN_FUZZ_EXAMPLES", "0") or 0):
        _hypothesis_settings.register_profile("fastattn-tests", derandomize=True, database=None, deadline=None)
        _hypothesis_settings.load_profile("fastattn-tests")
except ImportError:
    pass


# Tiers (markers, registered in pyproject.toml), assigned here by file and test rather than in each
# file. `make test` runs every tier: `-m "not serial"` under pytest-xdist, then `-m serial` alone;
# `make test-quick` runs `-m quick`.
FILE_TIERS = {
    "test_triton.py": ("triton",),
    "test_triton_tiles.py": ("triton",),
    "test_triton_launch.py": ("triton",),
    "test_triton_compile.py": ("triton",),
    "test_gluon.py": ("triton",),
    "test_tuning.py": ("triton",),
    "test_cuda.py": ("emulator",),
    "test_distributed.py": ("distributed",),
    "test_transformers.py": ("integration",),
    "test_transformers_sweep.py": ("integration",),
    "test_models.py": ("integration",),
    "test_train.py": ("integration",),
    "test_bench.py": ("integration",),
    "test_gpu_check_plan.py": ("integration",),
    "test_fuzz.py": ("fuzz",),
    "test_fuzz_bad_input.py": ("fuzz",),
    "test_gpu.py": ("gpu",),
    # The CPU kernels' ISA paths, determinism and random shapes with every intra-op thread (the
    # parallel tile loop: a race needs two threads), and their speed guards: alone, not beside
    # another xdist worker.
    "test_cpu_kernel.py": ("serial",),
}
# Single tests (file::function) beyond their file's tiers: speed guards (serial: timed alone), torchrun and
# multi-process tests (distributed).
TEST_TIERS = {
    "test_bench.py::test_no_row_passes_the_hardware_peak": ("serial",),
    "test_bench.py::test_small_calls_keep_up_with_torch": ("serial",),
    "test_train.py::test_ddp_two_processes_equal_one_process": ("distributed",),
    "test_train.py::test_context_parallel_two_processes_equal_one_process": ("distributed",),
}
# A skip whose reason says it needs a GPU (or a GPU's kernels) puts the test in the gpu tier.
GPU_REASON = re.compile(r"\bneeds\b.*\b(GPU|CUDA)\b|\bon a GPU\b|\bCUDA kernels' limits\b")
SLOW_TIERS = {"triton", "emulator", "distributed", "integration", "fuzz", "gpu", "serial"}
# Module-scoped fixtures too expensive to repeat on every xdist worker (--dist loadgroup keeps a
# group on one worker): the CUDA kernels' emulation is compiled once (minutes cold).
XDIST_GROUPS = {"test_cuda.py": "cuda-emulator"}


def _tiers(item) -> set[str]:
    file, name = Path(str(item.fspath)).name, getattr(item, "originalname", item.name)
    tiers = set(FILE_TIERS.get(file, ()))
    tiers.update(TEST_TIERS.get(f"{file}::{name}", ()))
    params = getattr(getattr(item, "callspec", None), "params", {})
    # Triton kernels (the interpreter without a GPU) through another file's backend parameter.
    if any(isinstance(v, str) and v == "triton" for v in params.values()) or re.search(r"(^|_)triton(_|$)", name):
        tiers.add("triton")
    if any(GPU_REASON.search(str(m.kwargs.get("reason", ""))) for m in item.iter_markers("skipif")):
        tiers.add("gpu")
    return tiers


def pytest_collection_modifyitems(config, items):
    for item in items:
        tiers = _tiers(item)
        for tier in sorted(tiers):
            item.add_marker(getattr(pytest.mark, tier))
        if not tiers & SLOW_TIERS:
            item.add_marker(pytest.mark.quick)
        group = XDIST_GROUPS.get(Path(str(item.fspath)).name)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


def pytest_configure(config):
    # pytest-xdist workers share the cores: one torch thread each where there are no more cores
    # than workers (two workers of two threads each on two cores oversubscribe them). The tests
    # that need every thread (the `serial` tier) run in their own pass, without xdist.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if torch is not None and workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // workers))


@pytest.fixture(autouse=True)
def _deterministic_process_state(request):
    """Each test starts from the same state whatever ran before it in this process (xdist hands a
    worker any subset of tests, in any order): the global RNGs seeded from the test's id (a test
    may seed its own), flush-to-zero off as in a fresh process (fastattn's benchmark turns it on)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    if torch is not None:
        torch.manual_seed(seed)
    yield
    if torch is not None:
        torch.set_flush_denormal(False)
