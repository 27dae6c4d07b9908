"""The score modifiers against what a user would call instead: a Mistral-style sliding window
(fastattn's tile range against SDPA with the window as a mask and FlexAttention's sliding-window
BlockMask, and against fastattn's own full causal call: the skip), softcapping (against
FlexAttention's score_mod and the eager formula), and a gpt-oss-shaped training step with sinks
(against the eager formula transformers runs). TFLOPS count the pairs each query sees."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..api import attention
from .timing import compare_to, timed_rows


def window_pairs(N: int, window: int) -> int:
    """(query, key) pairs a causal window of `window` keys (the query's own included) leaves."""
    return sum(min(i + 1, window) for i in range(N))


def _flex(mask_mod=None, score_mod=None, B=1, N=1, device="cpu"):
    """FlexAttention compiled with a BlockMask from mask_mod (and score_mod), or None without it."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    block_mask = create_block_mask(mask_mod, B, None, N, N, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)


def eager_attention(q, k, v, scale, causal=True, window=None, softcap=0.0, sinks=None):
    """The formula transformers' eager attention runs (Gemma 2's softcap, gpt-oss's sinks): every
    score materialised, in the inputs' dtype, softmax in float32."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    s = q @ k.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    N, M = s.shape[-2:]
    i, j = torch.arange(N, device=q.device)[:, None], torch.arange(M, device=q.device)[None, :]
    hidden = (j > i) if causal else torch.zeros(N, M, dtype=torch.bool, device=q.device)
    if window is not None:
        hidden = hidden | (j <= i - window)
    s = s.masked_fill(hidden, float("-inf"))
    if sinks is not None:  # one more column, dropped after the softmax
        s = torch.cat([s, sinks.to(s.dtype).view(1, -1, 1, 1).expand(*s.shape[:-1], 1)], dim=-1)
    p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    return p[..., :M] @ v


def _rows(calls: dict, case: str, device: str, min_run_time: float, peers: tuple, flops: float, mode: str, dtype,
          own_flops: dict | None = None):
    """Timed rows of calls, compared to the fastest of peers (what a user would call instead);
    own_flops: providers that solve another problem (the full causal call beside a window) and its FLOPs."""
    if mode == "fwd+bwd":
        calls = {name: (lambda fn=fn: fn().sum().backward()) for name, fn in calls.items()}
    rows = timed_rows(calls, case, device, min_run_time, mode=mode,
                      dtype={torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype])
    for r in rows:
        if "ms" in r:
            r["tflops"] = (own_flops or {}).get(r["backend"], flops) * (2.5 if mode == "fwd+bwd" else 1) / r["ms"] / 1e9
    timed = {r["backend"]: r["ms"] for r in rows if "ms" in r and r["backend"] in peers}
    return compare_to(rows, min(timed, key=timed.get) if timed else peers[0])


def window_rows(device: str, quick: bool, min_run_time: float, seq: int | None = None) -> list[dict]:
    """A causal window over a long sequence: GPU 4k over 16k (bf16, H16 D128), CPU 256 over 8k
    (fp32 and bf16, H8 D64; quick: 256 over 2k, fp32), beside full causal calls: the fastest
    (whichever backend fastattn picks) and the window's own backend's (the skip). seq: another
    length, a window of a quarter."""
    if device == "cuda":
        N, window, H, D, dtypes, modes = 16384, 4096, 16, 128, [torch.bfloat16], ["fwd", "fwd+bwd"]
    else:
        N, window, H, D = (2048, 256, 8, 64) if quick else (8192, 256, 8, 64)
        dtypes, modes = ([torch.float32] if quick else [torch.float32, torch.bfloat16]), ["fwd"]
    if seq is not None:
        N, window = seq, seq // 4
    rows = []
    for dtype in dtypes:
        for mode in modes:
            grad = mode == "fwd+bwd"
            q, k, v = (torch.randn(1, N, H, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_(grad)
                       for _ in range(3))
            i, j = torch.arange(N, device=device)[:, None], torch.arange(N, device=device)[None, :]
            allowed = (j <= i) & (j > i - window)
            own = "triton" if device == "cuda" else "cpu"  # the backend that runs windows: its skip
            calls = {
                f"fastattn (window {window})": lambda: attention(q, k, v, causal=True, window_size=(window - 1, 0)),
                "fastattn (full causal)": lambda: attention(q, k, v, causal=True),
                f"fastattn {own} (full causal)": lambda: attention(q, k, v, causal=True, backend=own),
                "sdpa:default (window as a mask)": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed),
            }
            if not quick:
                flex = _flex(lambda b, h, qi, ki: (ki <= qi) & (ki > qi - window), N=N, device=device)
                if flex is not None:
                    calls["flex (sliding-window BlockMask)"] = lambda: flex(q, k, v)
            flops = 4.0 * H * D * window_pairs(N, window)
            case = f"causal window {window} {mode} B1 H{H} N{N} D{D} {str(dtype).removeprefix('torch.')}"
            rows += _rows(calls, case, device, min_run_time,
                          ("sdpa:default (window as a mask)", "flex (sliding-window BlockMask)"), flops, mode, dtype,
                          dict.fromkeys(["fastattn (full causal)", f"fastattn {own} (full causal)"],
                                        4.0 * H * D * N * (N + 1) / 2))
    return rows


def softcap_rows(device: str, quick: bool, min_run_time: float, seq: int | None = None) -> list[dict]:
    """Gemma 2's softcap of 50 on causal attention: GPU B4 N4k H16 D128 bf16, CPU B1 N2k H8 D64 fp32;
    none when quick (FlexAttention compiles for tens of seconds)."""
    if quick:
        return []
    B, N, H, D, dtype = (4, 4096, 16, 128, torch.bfloat16) if device == "cuda" else (1, 2048, 8, 64, torch.float32)
    N = seq or N
    cap, scale = 50.0, D ** -0.5
    q, k, v = (torch.randn(B, N, H, D, device=device, dtype=dtype).transpose(1, 2) for _ in range(3))
    calls = {"fastattn (softcap)": lambda: attention(q, k, v, causal=True, softcap=cap),
             "fastattn (no softcap)": lambda: attention(q, k, v, causal=True),
             "eager (softcap)": lambda: eager_attention(q, k, v, scale, softcap=cap)}
    flex = _flex(lambda b, h, qi, ki: ki <= qi, lambda s, b, h, qi, ki: cap * torch.tanh(s / cap), B, N, device)
    if flex is not None:
        calls["flex (score_mod)"] = lambda: flex(q, k, v)
    flops = 4.0 * B * H * D * N * N / 2
    case = f"causal softcap {cap:g} fwd B{B} H{H} N{N} D{D} {str(dtype).removeprefix('torch.')}"
    return _rows(calls, case, device, min_run_time, ("flex (score_mod)", "eager (softcap)"), flops, "fwd", dtype)


def sinks_rows(device: str, quick: bool, min_run_time: float, seq: int | None = None) -> list[dict]:
    """gpt-oss's attention, a training step (forward and backward, the sinks' gradient included):
    64 query heads on 8 kv heads, D 64, learnable sinks, on its sliding (128) and full layers.
    GPU B2 N4k bf16, CPU B1 N1k fp32 (quick: N 512, the sliding layer)."""
    B, N, dtype = (2, 4096, torch.bfloat16) if device == "cuda" else (1, 512 if quick else 1024, torch.float32)
    N = seq or N
    H, Hkv, D, scale = 64, 8, 64, 64 ** -0.5
    q = torch.randn(B, N, H, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(B, N, Hkv, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_() for _ in range(2))
    sinks = torch.randn(H, device=device, requires_grad=True)
    rows = []
    for window in ([128] if quick else [128, None]):
        calls = {"fastattn (sinks)": lambda w=window: attention(
                     q, k, v, causal=True, sinks=sinks, window_size=(-1, -1) if w is None else (w - 1, 0)),
                 "eager (sinks)": lambda w=window: eager_attention(q, k, v, scale, window=w, sinks=sinks)}
        pairs = window_pairs(N, window) if window else N * (N + 1) // 2
        layer = f"sliding {window}" if window else "full"
        case = f"gpt-oss {layer} + sinks fwd+bwd B{B} H{H}/{Hkv}kv N{N} D{D} {str(dtype).removeprefix('torch.')}"
        rows += _rows(calls, case, device, min_run_time, ("eager (sinks)",), 4.0 * B * H * D * pairs, "fwd+bwd", dtype)
    return rows


def score_mod_rows(device: str, quick: bool, min_run_time: float, seq: int | None = None) -> list[dict]:
    """Every row above; seq: one sequence length for all (tests)."""
    return window_rows(device, quick, min_run_time, seq) + softcap_rows(device, quick, min_run_time, seq) + \
        sinks_rows(device, quick, min_run_time, seq)
