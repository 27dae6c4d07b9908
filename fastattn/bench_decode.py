"""Benchmarks of decoding against a KV cache and of packed (varlen) batches, side by side with
what a user would call instead, in one process (part of `python -m fastattn bench`).

Decode: one new query per sequence and step against a cache; per-step latency of
fastattn.attention_with_kvcache, of the unsplit fused forward (fastattn.attention) and of SDPA
on the same cache. "full": every row holds the whole cache; "ragged": a static cache whose rows
hold [N/2, N] keys, which SDPA can only mask. GB/s counts the valid keys and values read.
Varlen: a batch of lengths spread over [N/4, N], packed (attention_varlen) against the same
batch padded (fastattn.attention with its padding mask, SDPA with a mask); TFLOPS count valid
tokens only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import attention, attention_varlen, attention_with_kvcache, unpad
from .masks import sdpa_mask_from_padding
from .reference import reference_attention


def _compare(rows: list[dict], peer: str) -> list[dict]:
    base = next((r["ms"] for r in rows if r["backend"] == peer and "ms" in r), None)
    for r in rows:
        r.update(best_peer=peer, best_peer_ms=base,
                 speedup_vs_best_peer=base / r["ms"] if base and "ms" in r else None)
    return rows


def _timed(name: str, case: str, fn, measure, **extra) -> dict:
    row = dict(backend=name, case=case, **extra)
    try:
        row["ms"] = measure(fn)
    except Exception as e:  # a failing provider must not stop the rest
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return row


def decode_rows(device: str, quick: bool, measure, shapes=None) -> list[dict]:
    """GPU: bf16, 32 query heads on 8 kv heads, D 128. CPU: fp32, 16 on 4, D 64. shapes:
    (batch, context) pairs, by default B 1, 8, 32 and context 1k-32k (quick: 8 at 8k)."""
    dtype, H, Hkv, D = (torch.bfloat16, 32, 8, 128) if device == "cuda" else (torch.float32, 16, 4, 64)
    shapes = shapes or ([(8, 8192)] if quick else [(B, n) for B in (1, 8, 32) for n in (1024, 8192, 32768)])
    if device == "cpu":
        shapes = [(B, n) for B, n in shapes if B * n <= 8 * 32768]  # seconds per SDPA call beyond
    rows = []
    for B, N in shapes:
        k_cache, v_cache = (torch.randn(B, Hkv, N, D, device=device, dtype=dtype) for _ in range(2))
        q = torch.randn(B, H, 1, D, device=device, dtype=dtype)
        for layout in ("full", "ragged"):
            lengths = torch.full((B,), N) if layout == "full" else torch.linspace(N // 2, N, B).round()
            lengths = lengths.to(device=device, dtype=torch.int32)
            padding = torch.arange(N, device=device)[None, :] >= lengths[:, None]
            mask = None if layout == "full" else sdpa_mask_from_padding(padding)
            case = f"{layout} B{B} N{N} H{H}/{Hkv}kv D{D} {str(dtype).removeprefix('torch.')}"
            gbytes = 2 * int(lengths.sum()) * Hkv * D * q.element_size() / 1e9
            with torch.inference_mode():
                ref, _ = reference_attention(q[:1].double(), k_cache[:1].double(), v_cache[:1].double(),
                                             key_padding_mask=padding[:1])
                err = (attention_with_kvcache(q, k_cache, v_cache, lengths)[:1].double() - ref).abs().max().item()
                calls = {
                    "fastattn.attention_with_kvcache": lambda: attention_with_kvcache(q, k_cache, v_cache, lengths),
                    "fastattn.attention (unsplit)": lambda: attention(q, k_cache, v_cache,
                                                                      key_padding_mask=None if mask is None else padding),
                    "sdpa:default": lambda: F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask,
                                                                           enable_gqa=True),
                }
                group = [_timed(name, case, fn, measure, batch=B, context=N) for name, fn in calls.items()]
            for r in group:
                if "ms" in r:
                    r["gb_per_s"] = gbytes / r["ms"] * 1e3
                r["max_err"] = err if r["backend"] == "fastattn.attention_with_kvcache" else None
            rows += _compare(group, "sdpa:default")
            del padding, mask
    return rows


def varlen_rows(device: str, quick: bool, measure, seqs=None) -> list[dict]:
    """B 8 sequences of lengths spread over [N/4, N], forward and forward+backward, for N in
    seqs (by default GPU 4k and 16k, CPU 1k and 2k; quick: the first)."""
    dtype, H, D = (torch.bfloat16, 16, 128) if device == "cuda" else (torch.float32, 8, 64)
    if seqs is None:
        seqs = [4096] if device == "cuda" else [1024]
        if not quick:
            seqs += [16384] if device == "cuda" else [2048]
    rows = []
    for N in seqs:
        for mode in ("fwd", "fwd+bwd"):
            for causal in (False, True):
                B = 8
                lengths = torch.linspace(N, N // 4, B).round().long()
                padding = torch.arange(N)[None, :] >= lengths[:, None]
                x = torch.randn(B, N, 3, H, D, device=device, dtype=dtype)
                packed, cu, _, longest = unpad(x, padding.to(device))
                padding = padding.to(device)
                grad = mode == "fwd+bwd"
                q, k, v = (t.requires_grad_(grad) for t in packed.unbind(1))
                qp, kp, vp = (t.transpose(1, 2).requires_grad_(grad) for t in x.unbind(2))  # (B, H, N, D) views
                sdpa_mask = sdpa_mask_from_padding(padding)
                if causal:
                    sdpa_mask = sdpa_mask & torch.ones(N, N, dtype=torch.bool, device=device).tril()
                calls = {
                    "fastattn.attention_varlen (packed)": lambda: attention_varlen(q, k, v, cu, cu, longest, longest,
                                                                                   causal=causal),
                    "fastattn.attention (padded)": lambda: attention(qp, kp, vp, key_padding_mask=padding,
                                                                     causal=causal),
                    "sdpa:default (padded)": lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=sdpa_mask),
                }
                flops = 4.0 * H * D * float((lengths.double() ** 2).sum()) / (2 if causal else 1) * (2.5 if grad else 1)
                case = f"{'causal ' if causal else ''}{mode} B{B} N{N} H{H} D{D} {str(dtype).removeprefix('torch.')}"
                group = []
                for name, fn in calls.items():
                    step = fn if not grad else (lambda fn=fn: fn().sum().backward())
                    r = _timed(name, case, step, measure, mode=mode)
                    if "ms" in r:
                        r["tflops"] = flops / r["ms"] / 1e9
                    group.append(r)
                rows += _compare(group, "sdpa:default (padded)")
    return rows


def print_tables(record: dict, console) -> None:
    from rich.table import Table

    for key, title, extra in (
            ("decode", "decoding: one new query per row against a KV cache, per step", ("GB/s", "gb_per_s")),
            ("varlen", "packed (varlen) batch against the same batch padded (TFLOPS: valid tokens)",
             ("TFLOPS", "tflops"))):
        if not record.get(key):
            continue
        table = Table(title=title)
        for col in ("case", "provider", "ms", extra[0], "vs " + record[key][0]["best_peer"]):
            table.add_column(col, justify="left" if col in ("case", "provider") else "right")
        last = None
        for r in record[key]:
            if last is not None and r["case"] != last:
                table.add_section()
            last = r["case"]
            if "ms" not in r:
                table.add_row(r["case"], r["backend"], "—", "", r.get("error", ""), style="dim")
                continue
            speed = f"{r['speedup_vs_best_peer']:.2f}×" if r["speedup_vs_best_peer"] else ""
            table.add_row(r["case"], r["backend"], f"{r['ms']:.3f}", f"{r[extra[1]]:.2f}", speed,
                          style="bold" if r["backend"].startswith("fastattn") else None)
        console.print(table)
