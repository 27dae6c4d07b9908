"""Every launch the Triton glue makes compiles for sm_90 through Triton's real JIT, no GPU needed
(tests/triton_compile_matrix.py): the interpreter never type-checks, so only a compile sees a kernel
Triton would reject. Every Triton packed-sequence kernel once failed to compile: _seq_info returned
64-bit offsets in one branch and 32-bit ones in the other. CI runs this on the newest Triton
(`make test`) and on the GPU image's (`make triton-oldest`)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

# The old _seq_info, swapped in before the matrix's workers fork.
OLD_SEQ_INFO = textwrap.dedent('''
    import sys
    import triton
    import triton.language as tl

    import triton_compile_matrix
    from fastattn.triton import attention


    @triton.jit
    def _seq_info(CU_Q, CU_K, b, Nq, Nk, VARLEN: tl.constexpr):
        if VARLEN:
            q_off, k_off = tl.load(CU_Q + b), tl.load(CU_K + b)
            q_len, k_len = tl.load(CU_Q + b + 1) - q_off, tl.load(CU_K + b + 1) - k_off
            return q_off.to(tl.int64), q_len, k_off.to(tl.int64), k_len
        return 0, Nq, 0, Nk


    attention._seq_info = _seq_info
    sys.exit(triton_compile_matrix.main(sys.argv[1:]))
''')


def run_matrix(*args, script=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT), env.get("PYTHONPATH", "")])
    # Triton's disk cache as it stands: its key holds the source of every kernel and function a
    # kernel calls, the options and the Triton version, so a hit is a compile that succeeded
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # as on the GPU (benchmarks/gpu_check.sh)
    command = [sys.executable, str(script or ROOT / "tests" / "triton_compile_matrix.py"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)


def test_every_launch_compiles_for_sm90():
    result = run_matrix()
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.startswith("FAIL")]
    assert sum(line.startswith("ok ") for line in lines) >= 35, result.stdout


def test_the_matrix_fails_on_the_old_seq_info(tmp_path):
    script = tmp_path / "old_seq_info.py"
    script.write_text(OLD_SEQ_INFO)
    result = run_matrix("--only", "mask=packed", script=script)
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-4000:]
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert failed and all("mask=packed" in line for line in failed)
    assert "return type" in result.stdout.lower(), result.stdout[-4000:]  # 3.6: "Inconsistent return types"
