"""`python -m fastattn tune`: sweep the Triton kernels' launch configurations (fastattn.triton.tuning.
SWEEP) over the benchmark's shapes, check each winner against float64, and write the winners per
(kernel, dtype, head dim, mask kind, length bucket) as the defaults the kernels load
(fastattn/triton/tuned/sm<arch>.json), so that a first call compiles one configuration per kernel.

Compiling dominates a sweep: worker processes compile every configuration first (Triton's disk
cache keeps the binaries), then one process times them. Results are written after every case,
and a case is not started past --budget-s, so a sweep cut short still leaves its winners.
Without a GPU (TRITON_INTERPRET=1) it runs end to end on tiny shapes: that is how CI checks it.

A tool, not a kernel: it lives in the bench layer (it takes the benchmark's shapes from
fastattn.bench.cases), beside the dispatch sweep (`tune --dispatch`: fastattn.bench.dispatch_sweep);
the runtime tuner that reads what it writes is fastattn.triton.tuning.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import math
import multiprocessing
import os
import time
from dataclasses import astuple, dataclass
from pathlib import Path

import torch

GPU = not os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class SweepCase:
    head_dim: int
    kind: str  # dense, causal, padded, causal+padded
    seq: int
    tokens: int = 16384  # B·N, as the benchmark
    width: int = 2048  # H·D

    @property
    def causal(self) -> bool:
        return "causal" in self.kind


def sweep_cases(quick: bool) -> list[SweepCase]:
    """Most valuable first: N 4096, then 16k, then 1k; D 128 before 64; dense and causal before padded."""
    if not GPU:
        return [SweepCase(16, kind, 64, 128, 32) for kind in ("dense", "causal+padded")]
    kinds = ("dense", "causal", "padded", "causal+padded")
    return [SweepCase(D, kind, N) for N in ((4096,) if quick else (4096, 16384, 1024)) for D in (128, 64) for kind in kinds]


class SweepProblem:
    """A case's tensors and the launch of each kernel, bf16 (fp16 shares the configurations)."""

    def __init__(self, case: SweepCase, device: str, seed: int = 0):
        from ..call import Call
        from ..masks import key_ranges
        from ..triton import attention as ta
        from .cases import Case

        gen = torch.Generator(device=device).manual_seed(seed)
        D, N = case.head_dim, case.seq
        B, H = max(2 if "padded" in case.kind else 1, case.tokens // N), case.width // D
        rand = lambda *s: torch.randn(*s, generator=gen, device=device, dtype=torch.bfloat16)  # noqa: E731
        self.q, self.k, self.v, self.dout = (rand(B, N, H, D).transpose(1, 2) for _ in range(4))
        kpm = ranges = None
        if "padded" in case.kind:  # the benchmark's lengths: spread over [N/4, N]
            lengths = torch.tensor(Case("padded", "fwd", "bf16", B, H, H, N, D).lengths(), device=device)
            kpm = torch.arange(N, device=device)[None, :] >= lengths[:, None]
            ranges = key_ranges(kpm)
        self.call = Call(key_padding=kpm, key_ranges=ranges, causal=case.causal, scale=1 / math.sqrt(D))
        self.kpm, self.case, self.ta = kpm, case, ta
        self.out = torch.empty_like(self.q)
        self.dq, self.dk, self.dv = (torch.empty(t.shape, device=device, dtype=t.dtype) for t in (self.q, self.k, self.v))
        self.lse = torch.empty(B, H, N, device=device)

    def forward(self):
        self.ta.forward(self.q, self.k, self.v, self.out, self.lse, self.call)

    def backward(self):
        self.ta.backward(self.dout, None, self.q, self.k, self.v, self.out, self.lse, self.call, self.dq, self.dk,
                         self.dv)

    def run(self, kernel: str):
        (self.forward if kernel == "fwd" else self.backward)()


def _configs(kernel: str, D: int):
    from ..triton.tuning import INTERPRETER_CONFIG, SWEEP, fits

    return [c for c in SWEEP[kernel] if fits(c, D)] if GPU else [INTERPRETER_CONFIG, (16, 32, 4, 1)]


def _compile(case: SweepCase, kernel: str, configs) -> int:
    """Worker: compile (and run once) each configuration; Triton's disk cache keeps them."""
    from ..triton.tuning import TUNER

    problem, done = SweepProblem(case, "cuda"), 0
    problem.forward()  # the backward reads the forward's lse
    for config in configs:
        TUNER.force = {kernel: config}
        try:
            problem.run(kernel)
            done += 1
        except Exception:  # noqa: BLE001 - a configuration that fails to compile is skipped later too
            pass
    return done


def precompile(group: list[SweepCase], workers: int) -> int:
    """Compiles every configuration of every kernel for these cases in worker processes."""
    plan = [(case, kernel, _configs(kernel, case.head_dim)) for case in group for kernel in ("fwd", "dkdv", "dq")]
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        jobs = [pool.submit(_compile, case, kernel, configs[i::4]) for case, kernel, configs in plan for i in range(4)]
        return sum(job.result() for job in jobs)


def sweep_case(case: SweepCase, kernel: str, device: str, log) -> dict:
    """ms of every configuration of one kernel; the other kernels keep their current choice."""
    from ..triton.tuning import TUNER, time_ms

    problem, timings = SweepProblem(case, device), {}
    problem.forward()
    for config in _configs(kernel, case.head_dim):
        TUNER.force = {kernel: config}
        try:
            timings[config] = time_ms(lambda: problem.run(kernel)) if GPU else (problem.run(kernel) or 1.0)
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: not a candidate
            log(f"  {kernel} {config}: {type(e).__name__}")
    TUNER.force = {}
    return timings


def check(case: SweepCase, winners: dict, device: str) -> float:
    """Worst relative error of the winners against float64, on a small problem of the case's kind
    with lengths off the tile grid, over the bf16 bounds: out 1e-2, gradients 4e-2. <= 1 passes."""
    from ..reference import reference_attention
    from ..triton.tuning import TUNER

    small = SweepCase(case.head_dim, case.kind, 300 if GPU else 40, 600 if GPU else 80, 2 * case.head_dim)
    p = SweepProblem(small, device, seed=1)
    TUNER.force = dict(winners)
    p.forward()
    p.backward()
    TUNER.force = {}
    leaves = [t.detach().double().requires_grad_() for t in (p.q, p.k, p.v)]
    ref, _ = reference_attention(*leaves, key_padding_mask=p.kpm, causal=case.causal)
    ref.backward(p.dout.double())
    errors = [(got.double() - want).norm().item() / want.norm().item() / bound for got, want, bound
              in zip((p.out, p.dq, p.dk, p.dv), (ref, *(t.grad for t in leaves)), (1e-2, 4e-2, 4e-2, 4e-2))]
    return max(errors)


def main(argv=None) -> int:
    from ..triton import tuning

    parser = argparse.ArgumentParser(prog="python -m fastattn tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="where to write the winners (default: the package's defaults for this GPU)")
    parser.add_argument("--budget-s", type=float, default=420, help="start no case after this many seconds")
    parser.add_argument("--quick", action="store_true", help="N = 4096 only")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="compile processes")
    args = parser.parse_args(argv)
    os.environ["FASTATTN_TUNE"] = "0"  # kernels the sweep is not timing take a default, untuned
    start = time.time()
    log = lambda msg: print(f"[{time.time() - start:6.1f}s] {msg}", flush=True)  # noqa: E731
    device = "cuda" if GPU else "cpu"
    arch = tuning.gpu_arch() if GPU else "interpreter"
    path = Path(args.json or Path(tuning.__file__).parent / "tuned" / f"{arch}.json")
    record = {"device": torch.cuda.get_device_name() if GPU else "CPU (Triton interpreter)",
              "torch": torch.__version__, "configs": {}, "checks": {}, "timings": {}}
    compiled_seqs = set()
    for case in sweep_cases(args.quick):
        if time.time() - start > args.budget_s:
            log(f"budget spent: stopped before {case}")
            break
        if GPU and args.workers > 1 and case.seq not in compiled_seqs:  # one batch size: one compile
            compiled_seqs.add(case.seq)
            try:
                n = precompile([c for c in sweep_cases(args.quick) if c.seq == case.seq], args.workers)
                log(f"compiled {n} kernel configurations for N = {case.seq} in {args.workers} processes")
            except Exception as e:  # noqa: BLE001 - the sweep below compiles what it needs itself
                log(f"compiling in worker processes failed ({type(e).__name__}: {e}); compiling as it goes")
        winners, ms = {}, {}
        for kernel in ("fwd", "dkdv", "dq"):
            timings = sweep_case(case, kernel, device, log)
            if not timings:
                continue
            winners[kernel] = min(timings, key=timings.get)
            base = next((timings[c] for c in tuning.CANDIDATES[kernel] if c in timings), None)
            ms[kernel] = timings[winners[kernel]]
            log(f"{case.kind} D{case.head_dim} N{case.seq} {kernel}: {winners[kernel]} {ms[kernel]:.3f} ms"
                + (f" ({base / ms[kernel]:.2f}x the first candidate)" if base else ""))
            record["timings"][f"{kernel}|{'|'.join(map(str, astuple(case)))}"] = {
                ",".join(map(str, c)): t for c, t in timings.items()}
        error = check(case, winners, device)
        ok = error <= 1
        log(f"  check against float64: worst error {error:.2f} of its bound {'ok' if ok else 'FAILED: not written'}")
        for kernel, config in winners.items():
            key = tuning.make_key(kernel, "16bit", case.head_dim, "+".join(
                k for k in ("causal", "padded") if k in case.kind) or "dense", case.seq, case.seq)
            record["checks"][key] = error
            if ok:
                record["configs"][key] = list(config)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1, sort_keys=True))
    log(f"wrote {len(record['configs'])} defaults to {path}")
    return 0
