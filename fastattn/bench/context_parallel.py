"""Context parallelism on the CPU: ring attention over 2 gloo processes (a thread each) against one
process (both threads) on the whole sequence, a causal training step (forward and backward). On a
shared 2-core machine ~1x is expected: the row shows the ring costs little, and how much of its
communication the blocks' compute hides (the ring's transfers timed alone, against the time the
ranks waited on them)."""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..api import attention
from .timing import compare_to

B, H, D, WORLD = 1, 8, 64, 2


def _inputs(N: int):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, N, D, generator=gen).to(torch.bfloat16) for _ in range(3)]


def _rank(rank: int, init: str, N: int, reps: int, out: str) -> None:
    from .. import distributed as fd
    from ..distributed import ring

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    q, k, v = (fd.shard(t, 2).requires_grad_() for t in _inputs(N))
    dout = torch.randn_like(q)

    def step():
        dist.barrier()
        began = time.perf_counter()
        fd.ring_attention(q, k, v, causal=True).backward(dout)
        return time.perf_counter() - began

    step()
    ring.WAITS.seconds = 0.0
    times = [step() for _ in range(reps)]
    exposed = ring.WAITS.seconds / reps
    # The same transfers alone: k, v around the ring twice (forward, backward), dK, dV (float32) W hops.
    hops = ring.Ring(None, rank, WORLD)
    grads = [torch.zeros(t.shape, dtype=torch.float32) for t in (k, v)]
    dist.barrier()
    began = time.perf_counter()
    for _ in range(reps):
        for tensors, count in (([k, v], WORLD - 1), ([k, v], WORLD - 1), (grads, WORLD)):
            for _ in range(count):
                requests, _ = hops.start([t.detach() for t in tensors])
                ring.WAITS.wait(requests)
    alone = (time.perf_counter() - began) / reps
    if rank == 0:
        Path(out).write_text(json.dumps(dict(ms=statistics.median(times) * 1e3, comm_ms=alone * 1e3,
                                             exposed_comm_ms=exposed * 1e3)))
    dist.destroy_process_group()


def context_parallel_rows(device: str, quick: bool, min_run_time: float, seq: int | None = None) -> list[dict]:
    """CPU only (one GPU holds no ring): N 16k (quick: 2k; seq: another), B1 H8 D64 bf16, causal,
    zigzag; three timed steps after a first."""
    if device != "cpu":
        return []
    N, reps = seq or (2048 if quick else 16384), 3
    case = f"context parallel causal fwd+bwd B{B} H{H} N{N} D{D} bf16"
    flops = 4.0 * B * H * D * N * N / 2 * 2.5
    q, k, v = (t.requires_grad_() for t in _inputs(N))
    dout = torch.randn_like(q)
    attention(q, k, v, causal=True).backward(dout)
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        attention(q, k, v, causal=True).backward(dout)
        times.append(time.perf_counter() - began)
    one = statistics.median(times) * 1e3
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/rank0.json"
        mp.spawn(_rank, args=(f"file://{tmp}/rendezvous", N, reps, out), nprocs=WORLD)
        ring = json.loads(Path(out).read_text())
    rows = [dict(backend=f"fastattn ring ({WORLD} gloo processes x 1 thread)", case=case, mode="fwd+bwd",
                 dtype="bf16", ms=ring["ms"], tflops=flops / ring["ms"] / 1e9, comm_ms=ring["comm_ms"],
                 exposed_comm_ms=ring["exposed_comm_ms"],
                 hidden_comm_share=max(0.0, 1 - ring["exposed_comm_ms"] / ring["comm_ms"])),
            dict(backend=f"fastattn (1 process x {torch.get_num_threads()} threads)", case=case, mode="fwd+bwd",
                 dtype="bf16", ms=one, tflops=flops / one / 1e9)]
    return compare_to(rows, rows[1]["backend"])
