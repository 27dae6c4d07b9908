"""Packed (varlen) batches: B 8 sequences of lengths spread over [N/4, N], packed
(fastattn.attention_varlen) against the same batch padded (fastattn.attention with its padding
mask, SDPA with a mask), forward and forward+backward; TFLOPS count valid tokens only."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..api import attention
from ..masks import sdpa_mask_from_padding
from ..varlen import attention_varlen, unpad
from .timing import compare_to, timed_rows


def varlen_rows(device: str, quick: bool, min_run_time: float, seqs=None) -> list[dict]:
    """For N in seqs (by default GPU 4k and 16k, CPU 1k and 2k), forward and forward+backward,
    causal or not; quick: N 4k on a GPU, 512 on the CPU, the forward and the causal
    forward+backward."""
    dtype, H, D = (torch.bfloat16, 16, 128) if device == "cuda" else (torch.float32, 8, 64)
    if seqs is None:
        seqs = ([4096] if quick else [4096, 16384]) if device == "cuda" else ([512] if quick else [1024, 2048])
    groups = [("fwd", False), ("fwd+bwd", True)] if quick else \
        [(mode, causal) for mode in ("fwd", "fwd+bwd") for causal in (False, True)]
    rows = []
    for N in seqs:
        for mode, causal in groups:
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
                "fastattn.attention (padded)": lambda: attention(qp, kp, vp, key_padding_mask=padding, causal=causal),
                "sdpa:default (padded)": lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=sdpa_mask),
            }
            if grad:
                calls = {name: (lambda fn=fn: fn().sum().backward()) for name, fn in calls.items()}
            flops = 4.0 * H * D * float((lengths.double() ** 2).sum()) / (2 if causal else 1) * (2.5 if grad else 1)
            case = f"{'causal ' if causal else ''}{mode} B{B} N{N} H{H} D{D} {str(dtype).removeprefix('torch.')}"
            group = timed_rows(calls, case, device, min_run_time, mode=mode,
                               dtype={torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype])
            for r in group:
                if "ms" in r:
                    r["tflops"] = flops / r["ms"] / 1e9
            rows += compare_to(group, "sdpa:default (padded)")
    return rows
