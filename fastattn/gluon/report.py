"""Compile the Gluon kernels' variants for sm_90a without a GPU and read what the H100/H200 would
run (part of `python -m fastattn report`): registers, spills, shared memory, and the SASS of the
design (HGMMA: wgmma; UTMALDG: TMA loads; USETMAXREG: the producer's and consumers' register
split). A variant fails the check when one is missing, when it spills, when its shared memory
passes sm_90's 227 KiB, or when ptxas serializes its wgmma (warnings C7510-C7515)."""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from ..triton.report import SMEM_LIMIT, cubin_stats
from .launch import MAXNREG, VARIANTS, launched

DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def compile_variant(variant, head_dim: int, causal: bool, padded: bool = False, dtype: str = "bf16"):
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    from .attention import fwd_kernel

    def descriptor(rows):  # the JIT's signature string of a host descriptor (CPU tensor: nothing runs)
        layout = gl.NVMMASharedLayout.get_default_for([rows, head_dim], getattr(gl, DTYPES[dtype]))
        t = torch.empty(4096, head_dim, dtype=getattr(torch, DTYPES[dtype]))
        return mangle_type(TensorDescriptor.from_tensor(t, [rows, head_dim], layout))

    signature = {"q_desc": descriptor(variant.block_m), "k_desc": descriptor(variant.block_n),
                 "v_desc": descriptor(variant.block_n), "O": f"*{dtype}", "LSE": "*fp32", "KV_RANGES": "*i32",
                 "KPM": "*u8", "qk_scale": "fp32"}
    constexprs = dict(CAUSAL=causal, HAS_KPM=padded, OVERLAP=variant.overlap, PINGPONG=variant.pingpong,
                      BLOCK_M=variant.block_m,
                      BLOCK_N=variant.block_n, D=head_dim, STAGES=variant.stages, num_warps=variant.warps)
    for name in fwd_kernel.arg_names:
        signature.setdefault(name, "constexpr" if name in constexprs else "i32")
    source = GluonASTSource(fwd_kernel, {n: signature[n] for n in fwd_kernel.arg_names}, constexprs, {})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=variant.warps, maxnreg=MAXNREG))


def serialized_wgmma(ptx: str) -> list[str]:
    """ptxas's warnings that it serialized wgmma (C7510-C7515), from re-assembling the PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        Path(d, "k.ptx").write_text(ptx)
        done = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", f"{d}/k.ptx", "-o", f"{d}/k.cubin"],
                              capture_output=True, text=True)
    return [line.strip() for line in done.stderr.splitlines() if any(f"C751{i}" in line for i in range(6))]


def report(head_dims=(64, 128)) -> list[str]:
    """Prints a line per variant, head dim and causality; returns the failures."""
    failures, limit = [], SMEM_LIMIT[90]
    print(f"\nGluon forward, sm_90a: {'variant':<10} {'D':>4} {'mask':>13} {'regs':>5} {'stack':>6} "
          f"{'smem KiB':>8} {'wgmma':>6} {'tma':>4} {'setmaxnreg':>10}")
    for variant in VARIANTS:
        for D in head_dims:
            for causal, padded in ((False, False), (True, False), (True, True)):
                if launched(variant, D, padded) != variant:
                    continue  # such calls run another variant, reported on its own line
                kernel = compile_variant(variant, D, causal, padded)
                mask = "+".join(n for n, on in (("causal", causal), ("padded", padded)) if on) or "dense"
                st, smem = cubin_stats(kernel.asm["cubin"]), kernel.metadata.shared
                warnings = serialized_wgmma(kernel.asm["ptx"])
                print(f"{'':21} {variant.name:<10} {D:>4} {mask:>13} {st['regs']:>5} {st['stack']:>6} "
                      f"{smem // 1024:>8} {st['wgmma']:>6} {st['tma loads']:>4} {st['setmaxnreg']:>10}", flush=True)
                what = [w for w, bad in (("no wgmma", not st["wgmma"]), ("no TMA", not st["tma loads"]),
                                         ("no setmaxnreg", not st["setmaxnreg"]),
                                         ("spills", st["stack"] or st["spill insts"]),
                                         (f"{smem} B of shared memory", smem > limit),
                                         ("wgmma serialized: " + "; ".join(warnings), warnings)) if bad]
                failures += [f"gluon {variant.name} D={D} {mask}: {w}" for w in what]
    return failures
