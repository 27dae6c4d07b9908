"""Decoding against a KV cache: one new query per sequence and step; per-step latency of
fastattn.attention_with_kvcache, of the unsplit fused forward (fastattn.attention, full run only)
and of SDPA on the same cache. "full": every row holds the whole cache; "ragged": a static cache
whose rows hold [N/2, N] keys, which SDPA can only mask. GB/s counts the valid keys and values
read."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..api import attention
from ..kvcache import attention_with_kvcache
from ..masks import sdpa_mask_from_padding
from ..reference import reference_attention
from .timing import compare_to, timed_rows


def decode_rows(device: str, quick: bool, min_run_time: float, shapes=None) -> list[dict]:
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
                calls = {"fastattn.attention_with_kvcache": lambda: attention_with_kvcache(q, k_cache, v_cache, lengths)}
                if not quick:
                    calls["fastattn.attention (unsplit)"] = lambda: attention(
                        q, k_cache, v_cache, key_padding_mask=None if mask is None else padding)
                calls["sdpa:default"] = lambda: F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask,
                                                                                enable_gqa=True)
                group = timed_rows(calls, case, device, min_run_time, batch=B, context=N)
            for r in group:
                if "ms" in r:
                    r["gb_per_s"] = gbytes / r["ms"] * 1e3
                r["max_err"] = err if r["backend"] == "fastattn.attention_with_kvcache" else None
            rows += compare_to(group, "sdpa:default")
            del padding, mask
    return rows
