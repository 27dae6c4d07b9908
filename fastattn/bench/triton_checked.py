"""The launch configurations a GPU has checked: the manifest the tuner takes its choices from.

Run on a GPU (benchmarks/gpu_check.sh does), it checks every launch configuration the kernels may
take there (each tuning candidate, each shipped default, each fallback) against float64: forward
(out, lse) and every gradient, causal with key padding and then with every score modifier, at
each head-dim block the config fits (bf16; the fallbacks also fp32 at D = 256, the largest block
they serve),
and writes what passed and what failed, after each check:

    python -m fastattn.bench.triton_checked OUT.json [--jobs N]

The manifest ships as fastattn/triton/tuned/checked-<arch>.json, which fastattn.triton.tuning
reads (load_checked). It holds for the Triton minor version it was checked with: a newer Triton
compiles the kernels anew, so its configs count as unchecked until a GPU checks them (the tuner
then takes the first candidate, untimed).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from concurrent import futures
from pathlib import Path

KERNELS = ("fwd", "dkdv", "dq")
BOUND = {"bfloat16": 1e-2, "float16": 3e-3, "float32": 2e-6}  # relative error, as tests/helpers.TOL


def items(arch: str) -> list[tuple[str, tuple, int, str]]:
    """(kernel, config, head dim, dtype) for each check: every config at each block it fits."""
    from ..triton import tuning

    shipped = tuning.load_configs(tuning.SHIPPED_DIR / f"{arch}.json")
    out = []
    for kernel in KERNELS:
        configs = [*tuning.CANDIDATES[kernel], *(c for k, c in sorted(shipped.items()) if k.startswith(kernel + "|")),
                   tuning.FALLBACK[kernel]]
        for config in dict.fromkeys(configs):
            out += [(kernel, config, D, "bfloat16") for D in (64, 128, 256) if tuning.fits(config, D)]
        out.append((kernel, tuning.FALLBACK[kernel], 256, "float32"))
    return out


def check(kernel: str, config: tuple, D: int, dtype: str, device: str = "cuda", lengths=(200, 300)) -> float:
    """The worst relative error over its bound (< 1 passes) of fastattn.attention with `config`
    forced for `kernel`: forward and gradients against float64, causal with key padding, then
    windowed with softcap, ALiBi and sinks. Lengths that are no multiple of any tile."""
    import torch

    from ..triton import tuning

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    (B, H, Hkv), (Nq, Nk) = (2, 4, 2), lengths
    q = torch.randn(B, H, Nq, D, device=device, dtype=dt)
    k, v = (torch.randn(B, Hkv, Nk, D, device=device, dtype=dt) for _ in range(2))
    padding = torch.arange(Nk, device=device) >= torch.tensor([[Nk], [Nk // 4 * 3]], device=device)
    mods = dict(window_size=(60, 20), softcap=20.0, alibi_slopes=torch.rand(H, device=device),
                sinks=torch.randn(H, device=device))
    worst = 0.0
    force = {k: tuning.FALLBACK[k] for k in KERNELS} if dtype == "float32" else {}  # fp32: the rest fit only so
    previous, tuning.TUNER.force = tuning.TUNER.force, {**force, kernel: config}
    try:
        for kwargs in (dict(causal=True), mods):
            worst = max(worst, _error(q, k, v, padding, kwargs, BOUND[dtype]))
    finally:
        tuning.TUNER.force = previous
    return worst


def _error(q, k, v, padding, kwargs, bound) -> float:
    import torch

    from ..api import attention

    def run(backend, *tensors):
        leaves = [t.detach().requires_grad_() for t in tensors]
        out, lse = attention(*leaves, key_padding_mask=padding, return_lse=True, backend=backend, **kwargs)
        return out, lse, leaves

    out, lse, leaves = run("triton", q, k, v)
    ref, ref_lse, ref_leaves = run("reference", q.double(), k.double(), v.double())
    dout = torch.randn_like(ref)
    torch.autograd.backward([out, lse], [dout.to(out.dtype), torch.ones_like(lse)])
    torch.autograd.backward([ref, ref_lse], [dout, torch.ones_like(ref_lse)])

    def rel(a, b, floor=0.0):
        return ((a.double() - b).norm() / max(b.norm().item(), floor, 1e-30)).item()

    finite = torch.isfinite(ref_lse)
    if not torch.equal(finite, torch.isfinite(lse)):
        return float("inf")
    errors = [rel(out, ref) / bound, rel(lse[finite], ref_lse[finite], finite.sum().item() ** 0.5) / max(bound, 1e-5)]
    errors += [rel(a.grad, b.grad, 0.1 * dout.norm().item()) / (4 * bound) for a, b in zip(leaves, ref_leaves)]
    return max(errors) if all(e == e for e in errors) else float("inf")  # NaN fails


def _worker_setup(cache_dir: str) -> None:
    """Each worker: the kernels not forced take the first candidate untimed (no tuning side by
    side on one GPU), and nothing lands in the user's tuning cache."""
    os.environ["FASTATTN_TUNE"] = "0"
    os.environ["FASTATTN_CACHE_DIR"] = cache_dir


def _check_item(item) -> tuple[tuple, float | str | None]:
    """(item, its error over the bound, or why it failed; None: over this GPU's shared memory,
    so never launched here: the launch takes the next config)."""
    from triton.runtime.errors import OutOfResources

    try:
        return item, check(*item)
    except OutOfResources:
        return item, None
    except Exception as e:  # noqa: BLE001 - a config that fails to launch is a failed check
        return item, f"{type(e).__name__}: {e}"[:300]


def _write(path: Path, manifest: dict) -> None:
    """Atomically: a run cut short leaves the manifest of the checks done so far."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn.bench.triton_checked")
    parser.add_argument("out", type=Path)
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes compiling and checking side by side")
    parser.add_argument("--commit", default="")
    args = parser.parse_args(argv)
    import torch
    import triton

    from ..triton.tuning import gpu_arch

    arch, start = gpu_arch(), time.time()
    manifest = {"arch": arch, "device": torch.cuda.get_device_name(), "triton": triton.__version__,
                "torch": torch.__version__, "commit": args.commit, "date": time.strftime("%Y-%m-%d"),
                "checked": "forward and gradients against float64: causal + key padding, then window + softcap "
                           "+ ALiBi + sinks; B 2, H 4, Hkv 2, Nq 200, Nk 300; bf16 at each head-dim block "
                           "64/128/256 the config fits, the fallbacks also fp32 at D 256; a config over shared "
                           "memory somewhere counts where it launches",
                "configs": {}, "failed": []}
    results: dict[tuple, float | str | None] = {}
    with tempfile.TemporaryDirectory() as cache, futures.ProcessPoolExecutor(
            args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_setup,
            initargs=(cache,)) as pool:
        for item, result in pool.map(_check_item, items(arch)):
            results[item] = result
            verdict = ("over shared memory: not launched here" if result is None
                       else f"{result:.2f} of its bound" if isinstance(result, float) else result)
            print(f"{item[0]:<5} {','.join(map(str, item[1])):<12} D={item[2]:<4} {item[3]:<9} {verdict}", flush=True)
            failed = {i for i, r in results.items() if r is not None and not (isinstance(r, float) and r < 1)}
            manifest["configs"] = {k: [list(c) for c in sorted({c for kk, c, _, _ in results if kk == k}
                                                               - {c for kk, c, _, _ in failed if kk == k})]
                                   for k in KERNELS}
            manifest["failed"] = [[k, list(c), D, dt, results[(k, c, D, dt)]] for k, c, D, dt in sorted(failed)]
            _write(args.out, manifest)
    print(f"{len(results) - len(failed)} of {len(results)} checks passed in {time.time() - start:.0f} s -> {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
