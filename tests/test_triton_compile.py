"""The Triton kernels packed sequences launch compile for sm_90 through Triton's real compiler (no GPU
needed; the interpreter never type-checks, so only a compile sees a kernel Triton would reject). Every
Triton packed-sequence kernel once failed to: _seq_info returned 64-bit offsets in one branch and
32-bit ones in the other."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

COMPILE_PACKED = textwrap.dedent('''
    from fastattn.triton import attention as ta
    from fastattn.triton.report import ALL_MODS, NO_MODS, compile_kernel
    from fastattn.triton.tuning import CANDIDATES

    tiles = {"_fwd_kernel": CANDIDATES["fwd"][0], "_bwd_dkdv_kernel": CANDIDATES["dkdv"][0],
             "_bwd_dq_kernel": CANDIDATES["dq"][0]}
    for name, (m, n, w, s) in tiles.items():
        for mods in (NO_MODS, ALL_MODS):
            flags = dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s, HAS_KPM=False, MASK_KIND=0, VARLEN=True,
                         CAUSAL=True, DROPOUT=mods is ALL_MODS, PREC="tf32", D=64, BLOCK_D=64, **mods)
            compile_kernel(getattr(ta, name), "bf16", 90, flags)
    compile_kernel(ta._bwd_preprocess, "bf16", 90, dict(D=64, HAS_DLSE=True, VARLEN=True, BLOCK_D=64, BLOCK_M=64,
                                                        num_warps=4, num_stages=1))
    print("ok")
''')


def test_packed_sequence_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # a real compile, never a cached one
    script = tmp_path / "compile_packed.py"
    script.write_text(COMPILE_PACKED)
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr[-4000:]
