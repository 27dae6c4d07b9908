"""The CPU kernel against torch SDPA at the same ISA level, for every ISA table this CPU runs.

torch picks its vector code once, at start-up (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS,
ONEDNN_MAX_CPU_ISA), so
each ISA is timed in a fresh process: fastattn on that table (FASTATTN_CPU_ISA), SDPA held to the
same level, the two called in turn so that a shared machine's drifting load hits both alike.
fp32, B=4, H=8, D=64: dense, causal, padded (lengths N, 3N/4, N/2, N/4) and causal+padded
forward, and dense forward+backward; bf16 dense and padded forward and dense forward+backward,
also against converting the inputs to fp32 and running the fp32 kernel (what a bf16 table must
beat); and the table's GEMM micro-kernel (the score tile's shape, in cache, one thread) against
the FMA peak a micro-benchmark measures in the same process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

# fastattn table -> (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA) of the same
# level. oneDNN too: torch's bf16 SDPA runs on its AMX kernels unless capped.
TORCH_LEVEL = {"amx_bf16": ("avx512", "AVX512_E4", "AVX512_CORE_AMX"),
               "avx512_bf16": ("avx512", "AVX512_E3", "AVX512_CORE_BF16"),
               "avx512": ("avx512", "AVX512", "AVX512_CORE"),
               "avx2": ("avx2", "AVX2", "AVX2"),
               "generic": ("default", "SSE4_2", "SSE41")}


CASES = ("dense", "causal", "padded", "causal+padded", "dense fwd+bwd", "dense bf16", "padded bf16",
         "dense fwd+bwd bf16")


def measure(n: int, min_run_time: float, cases=CASES) -> dict:
    """In this process: ms of fastattn and SDPA for each case (forward unless named fwd+bwd; fp32
    unless named bf16), and the GEMM's share of the FMA peak."""
    import torch
    import torch.nn.functional as F

    from fastattn import _C
    from fastattn.api import attention
    from fastattn.bench.cases import Case
    from fastattn.bench.timing import paired_ms

    torch.manual_seed(0)
    q, k, v = (torch.randn(4, n, 8, 64).transpose(1, 2).requires_grad_() for _ in range(3))
    lengths = torch.tensor(Case("padded", "fwd", "fp32", 4, 8, 8, n, 64).lengths())  # N, 3N/4, N/2, N/4
    kpm = torch.arange(n)[None] >= lengths[:, None]
    allowed = ~kpm[:, None, None, :] & torch.ones(n, n, dtype=torch.bool).tril()

    def step(fn, backward):
        def run():
            with torch.set_grad_enabled(backward):
                out = fn()
                if backward:
                    out.backward(torch.ones_like(out))
        return run

    out = {}
    for case in cases:
        causal, pad, backward = "causal" in case, kpm if "padded" in case else None, "bwd" in case
        mask = None if pad is None else (allowed if causal else ~pad[:, None, None, :])
        x = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)] if "bf16" in case else (q, k, v)
        fns = [lambda: F.scaled_dot_product_attention(*x, attn_mask=mask, is_causal=causal and mask is None),
               lambda: attention(*x, key_padding_mask=pad, causal=causal, backend="cpu")]
        if "bf16" in case:  # the alternative a bf16 table must beat: fp32 inputs on the fp32 kernel
            fns.append(lambda: attention(*(t.float() for t in x), key_padding_mask=pad, causal=causal,
                                                  backend="cpu"))
        runs = [step(fn, backward) for fn in fns]
        try:
            runs[0]()
        except RuntimeError as e:  # torch 2.13's bf16 SDPA on an AMX CPU held to AVX2: "pack_vnni2 is only
            out[case] = {"sdpa_error": str(e).splitlines()[0]}  # supported when avx512 is supported"
            runs[0] = runs[1]
        sdpa, ours, *via_fp32 = paired_ms(runs, min_run_time)
        out[case] = {"fastattn_ms": ours, **(out.get(case) or {"sdpa_ms": sdpa, "ratio": sdpa / ours})}
        if via_fp32:
            out[case].update(via_fp32_ms=via_fp32[0], ratio_vs_fp32=via_fp32[0] / ours)
    gemm, peak = _C.cpu_micro_gflops(seconds=min_run_time)
    return {"cases": out, "gemm_gflops": gemm, "fma_peak_gflops": peak}


def isa_rows(n: int = 1024, min_run_time: float = 0.3, cases=CASES) -> list[dict]:
    """One row per (ISA, case): fastattn ÷ SDPA at that ISA level, each ISA in its own process."""
    from .. import _C

    rows = []
    for isa in _C.cpu_isas():
        aten, mkl, onednn = TORCH_LEVEL[isa]
        env = dict(os.environ, FASTATTN_CPU_ISA=isa, ATEN_CPU_CAPABILITY=aten, MKL_ENABLE_INSTRUCTIONS=mkl,
                   ONEDNN_MAX_CPU_ISA=onednn)
        code = f"import json, fastattn.bench.isa as b; print(json.dumps(b.measure({n}, {min_run_time}, {tuple(cases)!r})))"
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the {isa} measurement failed:\n{done.stderr[-2000:]}")
        result = json.loads(done.stdout.splitlines()[-1])
        gemm = {k: result[k] for k in ("gemm_gflops", "fma_peak_gflops")}
        for case, r in result["cases"].items():
            label = case if "bf16" in case else f"{case} fp32"
            rows.append(dict(isa=isa, torch_level=f"{aten}/{mkl}/{onednn}", case=f"{label} N{n}", **r, **gemm))
    return rows
