"""Compile the Triton kernels for a GPU without one, and read what the hardware would run:
registers, spills, shared memory and (on sm_90) whether the dots became wgmma.

    python -m fastattn report [--arch 90] [--dtypes bf16,fp32] [--check]

--check exits 1 if, for some kernel, dtype and head dim, every candidate spills registers to
local memory (fp32: exceeds shared memory), or if on sm_90 a 16-bit kernel does not use wgmma.
Run it without TRITON_INTERPRET (the interpreter replaces the kernels).
"""
from __future__ import annotations

import argparse
import collections
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

NO_MODS = dict(WINDOW=False, SOFTCAP=False, HAS_ALIBI=False, HAS_SINKS=False, BOTTOM_RIGHT=False)
ALL_MODS = dict.fromkeys(NO_MODS, True)  # "+mods": window, softcap, ALiBi, sinks, bottom-right at once


def example_args(name: str, dtype: str, flags: dict) -> tuple:
    """The runtime arguments (groups and all) the glue passes kernel `name` at these flags, built by
    the glue itself from CPU tensors: 16-byte aligned pointers, 16-divisible strides, unit head-dim
    strides (the decode kernel's caches), a 64-bit seed, as on a GPU (B = 2, H = 4, 256 queries and
    keys; decoding: 1 query against a 256-key cache)."""
    import torch

    from fastattn.call import Call
    from fastattn.triton import attention as ta, decode as triton_decode

    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype.split("-")[0], torch.float32)
    B, H, N, D = 2, 4, 256, flags["D"]
    q, k, v, out, dout = (torch.empty(B, H, N, D, dtype=tdtype) for _ in range(5))
    lse = torch.empty(B, H, N)
    kpm = torch.zeros(B, N, dtype=torch.bool) if flags.get("HAS_KPM") else None
    masks = ta.CallGroups(q, k, Call(
        key_padding=kpm, key_ranges=None if kpm is None else torch.zeros(3, B, dtype=torch.int32),
        window_left=64 if flags.get("WINDOW") else -1, window_right=0 if flags.get("WINDOW") else -1,
        softcap=30.0 if flags.get("SOFTCAP") else 0.0, alibi_slopes=torch.empty(H) if flags.get("HAS_ALIBI") else None,
        sinks=torch.empty(H) if flags.get("HAS_SINKS") else None, bottom_right=flags.get("BOTTOM_RIGHT", False)))
    seed = 2**40
    if name == "_fwd_kernel":
        return ta._fwd_args(q, k, v, out, lse, masks, B, N, N, 0.125, 0.0, seed)
    if name == "_bwd_dkdv_kernel":
        return ta._bwd_args((torch.empty_like(k), torch.empty_like(v)), q, k, v, dout, lse, torch.empty_like(lse),
                            masks, B, N, N, 0.125, 0.0, seed)
    if name == "_bwd_dq_kernel":
        return ta._bwd_args((torch.empty_like(q),), q, k, v, dout, lse, torch.empty_like(lse), masks, B, N, N, 0.125,
                            0.0, seed)
    if name == "_decode_split_kernel":
        splits = 4
        parts = torch.empty(B, H, 1, splits, D), torch.empty(B, H, 1, splits)
        return triton_decode._split_args(q[:, :, :1], k, v, parts, torch.full((B,), N, dtype=torch.int32), masks,
                                         0.125, N // splits, splits)
    raise ValueError(f"no example arguments for {name}")


def compile_kernel(fn, dtype: str, arch: int, constexprs: dict):
    """triton.compile for GPUTarget("cuda", arch, 32), with the specialisations a real launch
    gets: Triton's own binder on the arguments the glue passes (example_args)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    consts = dict(constexprs)
    options = dict(num_warps=consts.pop("num_warps"), num_stages=consts.pop("num_stages"))
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, _ = binder(*example_args(fn.fn.__name__, dtype, consts), **consts)
    _, signature, constants, attrs = fn._pack_args(backend, dict(options), bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                          options=options)


def cubin_stats(cubin: bytes) -> dict:
    """Registers and local memory from `cuobjdump -res-usage`, instruction counts from the SASS."""
    import triton.backends.nvidia as nv

    tool = str(Path(nv.__file__).parent / "bin" / "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    field = lambda key: int(re.search(key + r":(\d+)", usage).group(1))  # noqa: E731
    return {"regs": field("REG"), "local": field("LOCAL"), "stack": field("STACK"),
            "wgmma": len(re.findall(r"\bHGMMA", sass)), "mma.sync": len(re.findall(r"\bHMMA", sass)),
            "spill insts": len(re.findall(r"\b(?:LDL|STL)\b", sass)), "tma loads": len(re.findall(r"\bUTMALDG\b", sass)),
            "setmaxnreg": len(re.findall(r"\bUSETMAXREG\b", sass))}


def _items(kernels: dict, dtypes, head_dims):
    """(kernel, dtype, D, config, mods, flags) of each attention kernel the report compiles: causal
    with key padding, without and with every score modifier, each config at each head dim it fits."""
    from fastattn.triton.tuning import fits

    for name, table in kernels.items():
        for dtype, D in itertools.product(dtypes, head_dims):
            for (m, n, w, s), mods in itertools.product(table, (False, True)):
                if fits((m, n, w, s), D):  # else never launched at this head dim
                    yield name, dtype, D, (m, n, w, s), mods, dict(
                        BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s, HAS_KPM=True, MASK_KIND=0, VARLEN=False,
                        CAUSAL=True, DROPOUT=False, PREC=FP32_PRECISION.get(dtype, "tf32"), D=D, BLOCK_D=D,
                        **(ALL_MODS if mods else NO_MODS))


def _decode_items(dtypes, head_dims):
    """(dtype, D, BLOCK_M, mods, flags) of the decode split kernel: mma.sync tiles of 16 or 64 rows."""
    for dtype, D, m, mods in itertools.product(dtypes, head_dims, (16, 64), (False, True)):
        yield dtype, D, m, mods, dict(BLOCK_M=m, BLOCK_N=64, num_warps=4, num_stages=2, CAUSAL=True,
                                      PREC=FP32_PRECISION.get(dtype, "tf32"), D=D, BLOCK_D=D, WINDOW=mods,
                                      SOFTCAP=mods, HAS_ALIBI=mods)


def _compile_by_name(name: str, dtype: str, arch: int, flags: dict) -> None:
    from fastattn.triton import attention as ta, decode as triton_decode

    compile_kernel(getattr(ta, name, None) or getattr(triton_decode, name), dtype, arch, flags)


def _warm(jobs: list) -> None:
    """Compiles the jobs side by side, one process a core, into Triton's disk cache, from which
    the report then reads each kernel (a compile is single-threaded)."""
    cores = len(os.sched_getaffinity(0))  # os.cpu_count() is the host's in a container
    if cores < 2:
        return
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        pool.starmap(_compile_by_name, jobs, chunksize=1)


FP32_PRECISION = {"fp32": "tf32x3", "fp32-ieee": "ieee"}  # the --dtypes names of fp32's dot precisions
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes a block may use, per arch


def main(argv=None, more=()) -> int:
    """more: reports of other kernels (on sm_90: the Gluon ones), each head_dims -> failures."""
    parser = argparse.ArgumentParser(prog="python -m fastattn report")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--dtypes", default="bf16", help="e.g. bf16,fp32 (fp32: 3xTF32 dots, the default; fp32-ieee: IEEE dots, minutes to compile)")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    from fastattn.triton import attention as ta, decode as triton_decode
    from fastattn.triton.tuning import CANDIDATES

    kernels = {"_fwd_kernel": CANDIDATES["fwd"], "_bwd_dkdv_kernel": CANDIDATES["dkdv"],
               "_bwd_dq_kernel": CANDIDATES["dq"]}
    limit = SMEM_LIMIT.get(args.arch, 101376)
    failures = []
    print(f"sm_{args.arch}, causal, key padding; local = spilled bytes (stack), spill insts = LDL/STL; "
          f"a config over {limit // 1024} KiB of shared memory cannot launch (the launch takes the next)")
    print(f"{'kernel':<24} {'dtype':>5} {'D':>4} {'BM,BN,warps,stages':>18} {'regs':>5} {'stack':>6} "
          f"{'spill insts':>11} {'smem KiB':>8} {'wgmma':>6} {'mma.sync':>8}")
    dtypes, head_dims = args.dtypes.split(","), [int(d) for d in args.head_dims.split(",")]
    items = list(_items(kernels, dtypes, head_dims))
    decode_items = list(_decode_items(dtypes, head_dims))
    _warm([(name, dtype, args.arch, flags) for name, dtype, _, _, _, flags in items]
          + [("_decode_split_kernel", dtype, args.arch, flags) for dtype, _, _, _, flags in decode_items])
    clean = collections.Counter()  # (kernel, dtype, D, mods) -> configs that neither spill nor overflow
    for name, dtype, D, (m, n, w, s), mods, flags in items:
        kernel = compile_kernel(getattr(ta, name), dtype, args.arch, flags)  # from the warm-up's disk cache
        st = cubin_stats(kernel.asm["cubin"])
        smem = kernel.metadata.shared
        # fp32's dots (IEEE on the FMA units, or three TF32 products) spill at every tile size: there only
        # the fit in shared memory is required
        spills = not dtype.startswith("fp32") and (st["stack"] or st["spill insts"])
        clean[name, dtype, D, mods] += not spills and smem <= limit
        label = name + (" +mods" if mods else "")
        print(f"{label:<24} {dtype:>5} {D:>4} {f'{m},{n},{w},{s}':>18} {st['regs']:>5} {st['stack']:>6} "
              f"{st['spill insts']:>11} {smem // 1024:>8}{'!' if smem > limit else ' '}"
              f"{st['wgmma']:>5} {st['mma.sync']:>8}", flush=True)
        if args.arch == 90 and not dtype.startswith("fp32") and not st["wgmma"]:
            failures.append(f"{label} {dtype} D={D} {m},{n}: no wgmma")
    for name, dtype, D, mods in dict.fromkeys((i[0], i[1], i[2], i[4]) for i in items):
        if not clean[name, dtype, D, mods]:
            failures.append(f"{name}{' +mods' if mods else ''} {dtype} D={D}: every config spills or "
                            f"exceeds shared memory")
    for dtype, D, m, mods, flags in decode_items:  # the decode split kernel: mma.sync tiles of 16 or 64 rows
        st = cubin_stats(compile_kernel(triton_decode._decode_split_kernel, dtype, args.arch, flags).asm["cubin"])
        label = "_decode_split_kernel" + (" +mods" if mods else "")
        print(f"{label:<24} {dtype:>5} {D:>4} {f'{m},64,4,2':>18} {st['regs']:>5} "
              f"{st['stack']:>6} {st['spill insts']:>11} {'':>8} {st['wgmma']:>5} {st['mma.sync']:>8}")
        if not dtype.startswith("fp32") and (st["stack"] or st["spill insts"]):
            failures.append(f"{label} {dtype} D={D} BLOCK_M={m}: spills")
    if args.arch == 90:
        for other in more:
            failures += other(tuple(map(int, args.head_dims.split(","))))
    for f in failures:
        print("FAIL:", f)
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
