"""Timing: medians after warm-up (CUDA events on a GPU, providers in turns on a CPU), the
hardware's peaks, and peak memory."""
from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

import torch

from .cases import DTYPES


def measure_ms(fn, device: str, min_run_time: float) -> float:
    """Median milliseconds after warm-up: CUDA events via triton.testing.do_bench (which also
    flushes L2 between runs) on a GPU, torch.utils.benchmark on the CPU."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    from torch.utils import benchmark

    fn()
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def paired_ms(fns, min_run_time: float, min_reps: int = 5, warm: bool = False) -> list[float]:
    """CPU: median ms of each fn after a warm-up call (none if warm), the fns called in turn (a,
    b, a, b, ...): a shared machine's load drifts over seconds, and taking turns exposes every fn
    to it alike."""
    for fn in () if warm else fns:
        fn()
    times = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < min_reps or time.perf_counter() - start < min_run_time * len(fns):
        for fn, t in zip(fns, times):
            began = time.perf_counter()
            fn()
            t.append(time.perf_counter() - began)
    return [statistics.median(t) * 1e3 for t in times]


def time_providers(fns: dict, device: str, min_run_time: float, warm: bool = False) -> dict:
    """name -> ms, or the text of the error a fn raised. GPU: each alone (CUDA events). CPU: in
    turns, after a first call of each (none if warm: the caller has called them) that leaves a
    failing one out; if one fails later, each is timed alone."""
    results, live = {}, {}
    for name, fn in fns.items():
        try:
            if device == "cuda":
                results[name] = measure_ms(fn, device, min_run_time)
                continue
            if not warm:
                fn()
            live[name] = fn
        except Exception as e:  # a failing provider must not stop the rest
            results[name] = error_text(e)
    try:
        if live:
            results.update(zip(live, paired_ms(list(live.values()), min_run_time, warm=True)))
    except Exception:
        for name, fn in live.items():
            try:
                results[name] = measure_ms(fn, device, min_run_time)
            except Exception as e:
                results[name] = error_text(e)
    return {name: results[name] for name in fns}


def peaks(device: str, dtypes: list[str], before: dict | None = None) -> dict:
    """The hardware's measured peaks: "tflops" per dtype of `dtypes`, and a large copy's GB/s;
    with `before` (an earlier measurement in the same run), the higher of the two per dtype.
    GPU: the best of large matmuls (8192 and 16384) in each dtype. CPU: one thread's best on the
    FMA-peak micro-benchmark times the threads torch uses (torch's own matmul is not the limit:
    on AMD it ran at a third of it), and for bf16 the best of that and of the bf16 dot products
    (AMX tiles, vdpbf16ps) of the tables this CPU runs. Per thread, so a phase in which the
    machine shares one core between two threads can only lower the rows, never the peak."""
    if device == "cuda":
        tflops = {}
        for name in dtypes:
            for n in (8192, 16384):
                a, b = (torch.randn(n, n, device=device, dtype=DTYPES[name]) for _ in range(2))
                tflops[name] = max(tflops.get(name, 0.0), 2 * n**3 / measure_ms(lambda: a @ b, device, 0.5) / 1e9)
                del a, b
        per_thread, source = None, "the best of matmuls of 8192 and 16384"
    else:
        from .. import _C

        threads = torch.get_num_threads()
        fp32, bf16 = (max(rates) for rates in zip(*(_C.cpu_peak_gflops(isa) for isa in _C.cpu_isas())))
        per_thread = {"fp32": fp32, "bf16": max(fp32, bf16)}
        if before:
            per_thread = {d: max(g, before["per_thread_gflops"][d]) for d, g in per_thread.items()}
        tflops = {d: g * threads / 1e3 for d, g in per_thread.items() if d in dtypes}
        source = (f"FMA micro-benchmark: {per_thread['fp32']:.0f} GFLOPS per thread fp32, {per_thread['bf16']:.0f} "
                  f"bf16, x {threads} threads")
    if before and device == "cuda":
        tflops = {d: max(t, before["tflops"][d]) for d, t in tflops.items()}
    x = torch.empty(256 * 2**20 // 4 if device == "cuda" else 64 * 2**20 // 4, device=device)
    y = torch.empty_like(x)
    copy_gbps = 2 * x.numel() * 4 / measure_ms(lambda: y.copy_(x), device, 0.3) / 1e6
    if before:
        copy_gbps = max(copy_gbps, before["copy_gbps"])
    return {"tflops": tflops, "per_thread_gflops": per_thread, "source": source, "copy_gbps": copy_gbps}


def add_peak_shares(rows: list[dict], peak: dict) -> None:
    """pct_of_peak on each row with TFLOPS, against the peak of its dtype (none without one)."""
    for r in rows:
        if r.get("tflops") is not None and r.get("dtype") in peak["tflops"]:
            r["pct_of_peak"] = 100 * r["tflops"] / peak["tflops"][r["dtype"]]


def compare_to(rows: list[dict], peer: str) -> list[dict]:
    """best_peer and speedup_vs_best_peer of each row, against the row of `peer`."""
    base = next((r["ms"] for r in rows if r["backend"] == peer and "ms" in r), None)
    for r in rows:
        r.update(best_peer=peer, best_peer_ms=base,
                 speedup_vs_best_peer=base / r["ms"] if base and "ms" in r else None)
    return rows


def timed_rows(calls: dict, case: str, device: str, min_run_time: float, **extra) -> list[dict]:
    """A row per provider of `calls` (name -> fn) on `case`, with its ms or its error."""
    rows = []
    for name, ms in time_providers(calls, device, min_run_time).items():
        rows.append(dict(backend=name, case=case, **extra, **{"ms" if isinstance(ms, float) else "error": ms}))
    return rows


def error_text(e: Exception) -> str:
    """A failed provider's row: the exception's type and first line."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def peak_memory_mb(fn, device: str) -> float | None:
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not Path("/proc/self/clear_refs").exists():
        return None
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current size
    status = lambda key: int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1))  # noqa: E731
    before = status("VmRSS")
    fn()
    return (status("VmHWM") - before) / 1024


def median_of(fn, reps: int) -> float:
    """Median wall time (s) of reps calls after one warm-up (for calls of a second or more)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():  # a no-op wait on the CPU
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
