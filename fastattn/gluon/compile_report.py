"""Compile the Gluon kernels' variants (the forward, the backward's dK/dV and dQ) for sm_90a
without a GPU and read what the H100/H200 would run (part of `python -m fastattn report`):
registers, spills, shared memory, and the SASS of the design (HGMMA: wgmma; UTMALDG: TMA loads;
USETMAXREG: the producer's and consumers' register split). A variant fails the check when one is missing, when it spills, when its shared memory
passes sm_90's 227 KiB, or when ptxas serializes its wgmma (warnings C7510-C7515)."""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from ..triton.compile_report import SMEM_LIMIT, cubin_stats
from .launch import BWD_VARIANTS, MAXNREG, VARIANTS, launched

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16"}  # short name -> gl and torch attribute


def compile_kernel(kernel, descriptors: dict, constexprs: dict, num_warps: int, head_dim: int, dtype: str = "bf16",
                   pointers: dict | None = None):
    """Compiles a Gluon kernel for sm_90a: descriptors {argument: block rows} (block columns
    head_dim), pointers {argument: type} beyond the default i32 scalars."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    def descriptor(rows):  # the JIT's signature string of a host descriptor (CPU tensor: nothing runs)
        layout = gl.NVMMASharedLayout.get_default_for([rows, head_dim], getattr(gl, DTYPE_NAMES[dtype]))
        t = torch.empty(4096, head_dim, dtype=getattr(torch, DTYPE_NAMES[dtype]))
        return mangle_type(TensorDescriptor.from_tensor(t, [rows, head_dim], layout))

    signature = {**{n: descriptor(r) for n, r in descriptors.items()}, **(pointers or {})}
    for name in kernel.arg_names:
        signature.setdefault(name, "constexpr" if name in constexprs else "i32")
    source = GluonASTSource(kernel, {n: signature[n] for n in kernel.arg_names}, constexprs, {})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, maxnreg=MAXNREG))


def compile_variant(variant, head_dim: int, causal: bool, padded: bool = False, dtype: str = "bf16"):
    """The forward of a Variant."""
    from .attention import fwd_kernel

    constexprs = dict(CAUSAL=causal, HAS_KPM=padded, PERSISTENT=variant.persistent, OVERLAP=variant.overlap, PINGPONG=variant.pingpong,
                      BLOCK_M=variant.block_m, BLOCK_N=variant.block_n, D=head_dim, STAGES=variant.stages,
                      num_warps=variant.warps)
    pointers = {"O": f"*{dtype}", "LSE": "*fp32", "KV_RANGES": "*i32", "KPM": "*u8", "qk_scale": "fp32"}
    descriptors = {"q_desc": variant.block_m, "k_desc": variant.block_n, "v_desc": variant.block_n}
    return compile_kernel(fwd_kernel, descriptors, constexprs, variant.warps, head_dim, dtype, pointers)


def compile_backward(variant, head_dim: int, causal: bool, padded: bool = False, dtype: str = "bf16") -> dict:
    """{"dkdv": kernel, "dq": kernel} of a BwdVariant."""
    from .backward import dkdv_kernel, dq_kernel

    rows = 16 * variant.warps
    pointers = {"DK": f"*{dtype}", "DV": f"*{dtype}", "DQ": f"*{dtype}", "LSE": "*fp32", "DELTA": "*fp32",
                "KV_RANGES": "*i32", "KPM": "*u8", "qk_scale": "fp32", "sm_scale": "fp32"}
    flags = dict(CAUSAL=causal, HAS_KPM=padded, D=head_dim, STAGES=variant.stages, num_warps=variant.warps)
    shapes = {"dkdv": (dkdv_kernel, variant.q_step, rows), "dq": (dq_kernel, rows, variant.k_step)}
    kernels = {}
    for name, (kernel, block_m, block_n) in shapes.items():
        descriptors = {"q_desc": block_m, "do_desc": block_m, "k_desc": block_n, "v_desc": block_n}
        kernels[name] = compile_kernel(kernel, descriptors, dict(flags, BLOCK_M=block_m, BLOCK_N=block_n),
                                       variant.warps, head_dim, dtype,
                                       {n: t for n, t in pointers.items() if n in kernel.arg_names})
    return kernels


def serialized_wgmma(ptx: str) -> list[str]:
    """ptxas's warnings that it serialized wgmma (C7510-C7515), from re-assembling the PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        Path(d, "k.ptx").write_text(ptx)
        done = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", f"{d}/k.ptx", "-o", f"{d}/k.cubin"],
                              capture_output=True, text=True)
    return [line.strip() for line in done.stderr.splitlines() if any(f"C751{i}" in line for i in range(6))]


def _check(kernel, label: str, failures: list, limit: int) -> dict:
    """The kernel's figures; appends to failures what fails the check."""
    st, smem = cubin_stats(kernel.asm["cubin"]), kernel.metadata.shared
    warnings = serialized_wgmma(kernel.asm["ptx"])
    what = [w for w, bad in (("no wgmma", not st["wgmma"]), ("no TMA", not st["tma loads"]),
                             ("no setmaxnreg", not st["setmaxnreg"]), ("spills", st["stack"] or st["spill insts"]),
                             (f"{smem} B of shared memory", smem > limit),
                             ("wgmma serialized: " + "; ".join(warnings), warnings)) if bad]
    failures += [f"gluon {label}: {w}" for w in what]
    return dict(st, smem=smem // 1024)


def _compile_and_check(job) -> list[tuple]:
    """(kernel, variant, D, mask, figures, failures) of each kernel of a job (run in a worker)."""
    backward, variant, D, causal, padded = job
    mask = "+".join(n for n, on in (("causal", causal), ("padded", padded)) if on) or "dense"
    kernels = compile_backward(variant, D, causal, padded) if backward else {"fwd": compile_variant(variant, D, causal,
                                                                                                    padded)}
    lines = []
    for name, kernel in kernels.items():
        failures = []
        figures = _check(kernel, f"{name} {variant.name} D={D} {mask}", failures, SMEM_LIMIT[90])
        lines.append((name, variant, D, mask, figures, failures))
    return lines


def report(head_dims=(64, 128)) -> list[str]:
    """Prints a line per kernel, variant, head dim and mask; returns the failures. The compiles
    run on every CPU (a minute each of them takes about 3 s)."""
    masks = ((False, False), (True, False), (True, True))
    # a call that runs another variant (launched) has no line of its own
    jobs = [(False, v, D, c, p) for D in head_dims for c, p in masks for v in VARIANTS if launched(v, p) == v]
    jobs += [(True, v, D, c, p) for D in head_dims for c, p in masks for v in BWD_VARIANTS]
    print(f"\nGluon, sm_90a:        {'kernel':<6} {'variant':<21} {'D':>4} {'mask':>13} {'regs':>5} {'stack':>6} "
          f"{'smem KiB':>8} {'wgmma':>6} {'tma':>4} {'setmaxnreg':>10}")
    failures = []
    with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=multiprocessing.get_context("spawn")) as pool:
        for lines in pool.map(_compile_and_check, jobs):
            for name, variant, D, mask, st, failed in lines:
                print(f"{'':21} {name:<6} {variant.name:<21} {D:>4} {mask:>13} {st['regs']:>5} {st['stack']:>6} "
                      f"{st['smem']:>8} {st['wgmma']:>6} {st['tma loads']:>4} {st['setmaxnreg']:>10}", flush=True)
                failures += failed
    return failures
