"""The CPU kernel against torch SDPA at the same ISA level, for every ISA table this CPU runs.

torch picks its vector code once, at start-up (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS), so
each ISA is timed in a fresh process: fastattn on that table (FASTATTN_CPU_ISA), SDPA held to the
same level. fp32, B=4, H=8, D=64: dense, causal, padded (lengths N, 3N/4, N/2, N/4) and
causal+padded forward, and dense forward+backward; and the table's GEMM micro-kernel (the score
tile's shape, in cache, one thread) against the FMA peak a micro-benchmark measures in the same
process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

# fastattn table -> (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS) of the same level
TORCH_LEVEL = {"avx512_bf16": ("avx512", "AVX512"), "avx512": ("avx512", "AVX512"),
               "avx2": ("avx2", "AVX2"), "generic": ("default", "SSE4_2")}


CASES = ("dense", "causal", "padded", "causal+padded", "dense fwd+bwd")


def measure(n: int, min_run_time: float, cases=CASES) -> dict:
    """In this process: ms of fastattn and SDPA for each case (forward unless named fwd+bwd), and
    the GEMM's share of the FMA peak."""
    import torch
    import torch.nn.functional as F

    import fastattn
    from fastattn import _C
    from fastattn.bench import Case, measure_ms

    torch.manual_seed(0)
    q, k, v = (torch.randn(4, n, 8, 64).transpose(1, 2).requires_grad_() for _ in range(3))
    lengths = torch.tensor(Case("padded", "fwd", "fp32", 4, 8, 8, n, 64).lengths())  # N, 3N/4, N/2, N/4
    kpm = torch.arange(n)[None] >= lengths[:, None]
    allowed = ~kpm[:, None, None, :] & torch.ones(n, n, dtype=torch.bool).tril()

    def ms(fn, backward):
        def step():
            out = fn()
            if backward:
                out.backward(torch.ones_like(out))
        with torch.set_grad_enabled(backward):
            return measure_ms(step, "cpu", min_run_time)

    out = {}
    for case in cases:
        causal, pad, backward = "causal" in case, kpm if "padded" in case else None, "bwd" in case
        mask = None if pad is None else (allowed if causal else ~pad[:, None, None, :])
        sdpa = ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None),
                  backward)
        ours = ms(lambda: fastattn.attention(q, k, v, key_padding_mask=pad, causal=causal, backend="cpu"), backward)
        out[case] = {"fastattn_ms": ours, "sdpa_ms": sdpa, "ratio": sdpa / ours}
    gemm, peak = _C.cpu_micro_gflops(seconds=min_run_time)
    return {"cases": out, "gemm_gflops": gemm, "fma_peak_gflops": peak}


def isa_rows(n: int = 1024, min_run_time: float = 0.3, cases=CASES) -> list[dict]:
    """One row per (ISA, case): fastattn ÷ SDPA at that ISA level, each ISA in its own process."""
    from . import _C

    rows = []
    for isa in _C.cpu_isas():
        aten, mkl = TORCH_LEVEL[isa]
        env = dict(os.environ, FASTATTN_CPU_ISA=isa, ATEN_CPU_CAPABILITY=aten, MKL_ENABLE_INSTRUCTIONS=mkl)
        code = f"import json, fastattn.bench_isa as b; print(json.dumps(b.measure({n}, {min_run_time}, {tuple(cases)!r})))"
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.splitlines()[-1])
        gemm = {k: result[k] for k in ("gemm_gflops", "fma_peak_gflops")}
        for case, r in result["cases"].items():
            rows.append(dict(isa=isa, torch_level=f"{aten}/{mkl}", case=f"{case} fp32 N{n}", **r, **gemm))
    return rows
