"""`make cuda-check`: compile every CUDA kernel for sm_80 and sm_90a on a machine with nvcc and no
GPU, and read what the hardware would run.

- nvcc -Xptxas -v per .cu file and architecture: fails on any compiler error;
- a table of registers, spills and stack per kernel, and the dynamic shared memory it launches with;
- fails on spills, stack or local memory in any kernel, forward or backward;
- the SASS (cuobjdump from Triton's package): HMMA tensor-core instructions, 16-byte cp.async
  loads (LDGSTS.E.BYPASS.128), and no local memory in the forward kernels;
- the torch glue (cuda_glue.cpp) passes a syntax check against this torch's headers.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARCHS = {"sm_80": "-gencode=arch=compute_80,code=sm_80", "sm_90a": "-gencode=arch=compute_90a,code=sm_90a"}
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-Xptxas", "-v", f"-I{HERE.parent}"]


SMEM_REPORT = r"""
#include <cstdio>
#include "flash_bwd.cuh"
using namespace fastattn::cuda;
template <int D> void report() {
  std::printf("flash_fwd_kernel %d %d\n", D, FwdTile<D>::smem_bytes(2));
  std::printf("bwd_dq_kernel %d %d\n", D, DqTile<D>::smem_bytes(2));
  std::printf("bwd_dkdv_kernel %d %d\n", D, DkvTile<D>::smem_bytes(2));
}
int main() { report<64>(); report<128>(); }
"""


def dynamic_smem(tmp: Path) -> dict[tuple[str, int], int]:
    """The bytes each kernel launches with, from the tile structs themselves (a host program)."""
    src, exe = Path(tmp) / "smem_report.cu", Path(tmp) / "smem_report"
    src.write_text(SMEM_REPORT)
    subprocess.run(["nvcc", "-std=c++17", f"-I{HERE}", f"-I{HERE.parent}", str(src), "-o", str(exe)], check=True,
                   capture_output=True, text=True)
    rows = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    return {(name, int(d)): int(b) for name, d, b in (r.split() for r in rows if r)}


def ptxas_report(text: str) -> list[dict]:
    rows, current = [], None
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line):
            current = dict(kernel=m.group(1), arch=m.group(2))
            rows.append(current)
        elif current and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current.update(stack=int(m.group(1)), spills=int(m.group(2)) + int(m.group(3)))
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            current["regs"] = int(m.group(1))
    return rows


def short(mangled: str) -> tuple[str, int, str]:
    name = re.search(r"(flash_fwd_kernel|bwd_dq_kernel|bwd_dkdv_kernel|bwd_prep_kernel)", mangled).group(1)
    d = re.search(r"ILi(\d+)E", mangled)
    dtype = "bf16" if "bfloat16" in mangled else "fp16"
    return name, int(d.group(1)) if d else 0, dtype


def cuobjdump() -> str | None:
    try:
        import triton.backends.nvidia as nv

        tool = Path(nv.__file__).parent / "bin" / "cuobjdump"
        return str(tool) if tool.exists() else shutil.which("cuobjdump")
    except ImportError:
        return shutil.which("cuobjdump")


def sass_by_kernel(obj: Path, tool: str) -> dict[str, str]:
    sass = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    parts = re.split(r"\n\s*Function : (\S+)\n", sass)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def cuda_home() -> Path:
    """The toolkit nvcc belongs to (nvcc may be a wrapper script on PATH): nvcc's own report."""
    out = subprocess.run(["nvcc", "--dryrun", "-c", "-x", "cu", "/dev/null"], capture_output=True, text=True).stderr
    top = re.search(r"TOP=(\S+)", out)
    return Path(top.group(1)) if top else Path(shutil.which("nvcc")).resolve().parent.parent


def glue_syntax_check() -> str | None:
    """Compile-checks the torch glue; the CPU wheel lacks one generated CUDA header, so a stub."""
    import sysconfig

    import torch.utils.cpp_extension as ext

    with tempfile.TemporaryDirectory() as stub:
        Path(stub, "c10/cuda/impl").mkdir(parents=True)
        Path(stub, "c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n")
        cuda_include = cuda_home() / "include"
        includes = [stub, *ext.include_paths(), sysconfig.get_paths()["include"], str(cuda_include)]
        cmd = ["g++", "-fsyntax-only", "-std=c++17", "-DFASTATTN_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
               *(f"-I{p}" for p in includes), str(HERE / "cuda_glue.cpp")]
        result = subprocess.run(cmd, capture_output=True, text=True)
    return None if result.returncode == 0 else result.stderr[-3000:]


def main() -> int:
    if shutil.which("nvcc") is None:
        print("cuda-check skipped: no nvcc on this machine")
        return 0
    failures, rows = [], []
    tool = cuobjdump()
    with tempfile.TemporaryDirectory() as tmp:
        smem = dynamic_smem(tmp)
        for source in sorted(HERE.glob("*.cu")):
            obj = Path(tmp) / (source.stem + ".o")
            cmd = ["nvcc", "-c", *NVCC_FLAGS, *ARCHS.values(), str(source), "-o", str(obj)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                failures.append(f"{source.name} does not compile:\n{result.stderr[-3000:]}")
                continue
            sass = sass_by_kernel(obj, tool) if tool else {}
            for row in ptxas_report(result.stderr):
                name, d, dtype = short(row["kernel"])
                code = sass.get(row["kernel"], "")
                row.update(name=name, d=d, dtype=dtype, smem=smem.get((name, d), 0), hmma=len(re.findall(r"\bHMMA\b", code)),
                           cp_async_128=len(re.findall(r"LDGSTS\.E\.BYPASS\.128|LDGSTS\.E\.BYPASS\.LTC128B\.128", code)),
                           local=len(re.findall(r"\b(?:LDL|STL)\b", code)))
                rows.append(row)
    print(f"{'kernel':<18} {'D':>4} {'dtype':>5} {'arch':>7} {'regs':>5} {'spills B':>8} {'stack B':>7} "
          f"{'smem KiB':>8} {'HMMA':>5} {'LDGSTS.128':>10} {'LDL/STL':>7}")
    seen = set()
    for r in sorted(rows, key=lambda r: (r["name"], r["d"], r["dtype"], r["arch"])):
        key = (r["name"], r["d"], r["dtype"], r["arch"])
        if key in seen:
            continue
        seen.add(key)
        print(f"{r['name']:<18} {r['d']:>4} {r['dtype']:>5} {r['arch']:>7} {r.get('regs', 0):>5} {r.get('spills', 0):>8} "
              f"{r.get('stack', 0):>7} {r['smem'] / 1024:>8.0f} {r['hmma']:>5} {r['cp_async_128']:>10} {r['local']:>7}")
        if r.get("spills", 0) or r.get("stack", 0) or r["local"]:
            failures.append(f"{r['name']} D={r['d']} {r['dtype']} {r['arch']}: spills to local memory")
        if tool and r["name"] != "bwd_prep_kernel" and not (r["hmma"] and r["cp_async_128"]):
            failures.append(f"{r['name']} D={r['d']} {r['dtype']} {r['arch']}: no HMMA or no 16-byte cp.async")
    if (error := glue_syntax_check()) is not None:
        failures.append(f"cuda_glue.cpp:\n{error}")
    for f in failures:
        print("FAIL:", f)
    print("cuda-check:", "FAILED" if failures else "ok", "(no cuobjdump: SASS not read)" if not tool else "")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
