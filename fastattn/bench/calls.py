"""Small calls, where the host path is the whole cost: per-call time of fastattn and of what a user
would call instead, in turns in one process, best of rounds of back-to-back calls.

CPU (one thread, inference_mode): attention (1, 1, 1, 64) and (1, 8, 16, 64) against SDPA, the
latter with a key padding mask and causal against SDPA given the equivalent bool mask;
MultiHeadAttention (B 1, L 8, E 64, eval, need_weights=False) against nn.MultiheadAttention;
attention_with_kvcache (B 1, 16 heads on 4, 256 cached keys, one query) against SDPA on the
valid keys. GPU (bf16, D 128, 32 heads on 8 for decoding): the same shapes forward, forward and
backward, and a decoding step, each timed three ways: back-to-back calls (what a loop of small
calls costs), the profiler's CPU time per call from Python in (the host path alone), and the same
call replayed from a CUDA graph (the GPU's floor).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..api import attention
from ..kvcache import attention_with_kvcache
from ..masks import sdpa_mask_from_padding
from ..nn import MultiHeadAttention
from .timing import error_text


def _best_us(fns: dict, rounds: int, calls: int, sync) -> dict:
    """name -> the best round's µs per call, rounds of `calls` back-to-back calls, in turns."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()
    sync()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            best[name] = min(best[name], (time.perf_counter() - start) / calls * 1e6)
    return best


def cases(device: str) -> dict:
    """case -> (fastattn's call, the peer's name, the peer's call)."""
    dtype, D = (torch.bfloat16, 128) if device == "cuda" else (torch.float32, 64)
    new = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    tiny, q, k, v = new(1, 1, 1, D), new(1, 8, 16, D), new(1, 8, 16, D), new(1, 8, 16, D)
    kpm = torch.arange(16, device=device)[None, :] >= 12
    mask = sdpa_mask_from_padding(kpm) & torch.ones(16, 16, dtype=torch.bool, device=device).tril()
    mha = torch.nn.MultiheadAttention(64, 4, batch_first=True, device=device, dtype=dtype).eval()
    ours = MultiHeadAttention.from_torch(mha)
    x = torch.randn(1, 8, 64, device=device, dtype=dtype)
    H, Hkv = (32, 8) if device == "cuda" else (16, 4)
    qd, kc, vc = new(1, H, 1, D), new(1, Hkv, 256, D), new(1, Hkv, 256, D)
    lens = torch.full((1,), 256, dtype=torch.int32, device=device)
    sdpa = F.scaled_dot_product_attention
    return {
        f"attention (1, 1, 1, {D})": (lambda: attention(tiny, tiny, tiny), "sdpa",
                                      lambda: sdpa(tiny, tiny, tiny)),
        f"attention (1, 8, 16, {D})": (lambda: attention(q, k, v), "sdpa", lambda: sdpa(q, k, v)),
        f"attention (1, 8, 16, {D}) + padding + causal": (
            lambda: attention(q, k, v, key_padding_mask=kpm, causal=True), "sdpa, the bool mask",
            lambda: sdpa(q, k, v, attn_mask=mask)),
        "MultiHeadAttention B1 L8 E64": (lambda: ours(x, x, x, need_weights=False), "nn.MultiheadAttention",
                                         lambda: mha(x, x, x, need_weights=False)),
        f"attention_with_kvcache B1 {H}/{Hkv}kv N256": (lambda: attention_with_kvcache(qd, kc, vc, lens), "sdpa",
                                                       lambda: sdpa(qd, kc, vc, enable_gqa=True)),
    }


def call_rows(device: str, quick: bool) -> list[dict]:
    """A row per case: fastattn's and the peer's µs per call, and their ratio (lower is better
    for fastattn: its goal is at most 2x on attention, 1.1x as a module, 1x decoding, on the
    CPU; at most 1.5x host time on a GPU)."""
    rounds, calls = (3, 200) if quick else (7, 400)
    rows = []
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # a small call gains nothing from a second thread but its wake-up
    try:
        with torch.inference_mode():
            for case, (ours, peer, theirs) in cases(device).items():
                rows.append(_row(case, ours, peer, theirs, device, rounds, calls, "fwd"))
        if device == "cuda":
            rows += _gpu_training_rows(rounds, calls)
    finally:
        torch.set_num_threads(threads)
    return rows


def _row(case, ours, peer, theirs, device, rounds, calls, mode) -> dict:
    row = dict(case=case, mode=mode, backend="fastattn", best_peer=peer)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    try:
        us = _best_us({"fastattn": ours, peer: theirs}, rounds, calls, sync)
        row.update(us=us["fastattn"], peer_us=us[peer], ratio=us["fastattn"] / us[peer])
        if device == "cuda":
            row.update(_host_and_graph_us(ours, theirs))
    except Exception as e:  # a failing case must not stop the rest
        row["error"] = error_text(e)
    return row


def _gpu_training_rows(rounds: int, calls: int) -> list[dict]:
    """Forward and backward of the small attention call, bf16 on a GPU."""
    q, k, v = (torch.randn(1, 8, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    step = lambda f: lambda: f(q, k, v).backward(dout)  # noqa: E731
    return [_row("attention (1, 8, 16, 128) fwd+bwd", step(attention), "sdpa",
                 step(F.scaled_dot_product_attention), "cuda", rounds, calls, "fwd+bwd")]


def _host_and_graph_us(ours, theirs) -> dict:
    """GPU: the profiler's CPU time per call, the whole call from Python in (the host path alone,
    whatever it launches), and each call replayed from a CUDA graph (what the GPU itself takes)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    out = {}
    for side, fn in (("", ours), ("peer_", theirs)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(50):
                with record_function("fastattn.bench.call"):
                    fn()
        call = next(e for e in prof.key_averages() if e.key == "fastattn.bench.call")
        out[f"{side}host_us"] = call.cpu_time_total / 50
        try:
            graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
            with torch.cuda.stream(stream):
                fn()  # warm up on a side stream, as capture requires
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(100):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            out[f"{side}graph_us"] = start.elapsed_time(end) * 10  # ms per 100 -> µs per call
        except Exception as e:
            out[f"{side}graph_error"] = error_text(e)
    return out
