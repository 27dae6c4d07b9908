"""fastattn.attention: check the tensors, describe the call once (fastattn.front_door), dispatch, call the op."""
from __future__ import annotations

from torch import Tensor

from . import ops
from .backends import select_backend
from .backends import explain as explain_selection
from .front_door import SUPPORTED_DTYPES, check_tensors, describe


def _same_device(a: Tensor, b: Tensor, c: Tensor) -> bool:
    """a.device == b.device == c.device for CPU and CUDA tensors, without making torch.device
    objects (~0.8 us each); False for other devices, which take the full checks."""
    if a.is_cpu:
        return b.is_cpu and c.is_cpu
    return a.is_cuda and b.is_cuda and c.is_cuda and a.get_device() == b.get_device() == c.get_device()


def check_qkv(query, key, value) -> None:
    """query (B, H, Nq, D), key and value (B, Hkv, Nk, D) with H % Hkv == 0."""
    # The common case in a few comparisons; anything else goes through every check, which names it.
    if (isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)
            and query.dtype in SUPPORTED_DTYPES and query.dtype == key.dtype == value.dtype and _same_device(query, key, value)):
        qs, ks = query.shape, key.shape
        if (len(qs) == 4 and len(ks) == 4 and ks == value.shape and ks[0] == qs[0] and ks[3] == qs[3]
                and ks[1] and qs[1] % ks[1] == 0):
            return
    check_tensors([("query", query), ("key", key), ("value", value)], "(B, H, N, D)")
    B, H, _, D = query.shape
    if key.shape[0] != B or value.shape[0] != B:
        raise ValueError(f"key/value: expected batch {B} (query's), got {key.shape[0]} and {value.shape[0]}")
    if key.shape[3] != D or value.shape[3] != D:
        raise ValueError(f"key/value: expected head dim {D} (query's), got {key.shape[3]} and {value.shape[3]}")
    if key.shape[1] != value.shape[1]:
        raise ValueError(f"value: expected {key.shape[1]} heads (key's), got {value.shape[1]}")
    if key.shape[2] != value.shape[2]:
        raise ValueError(f"value: expected length {key.shape[2]} (key's), got {value.shape[2]}")
    Hkv = key.shape[1]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"key: expected a head count dividing query's {H} heads, got {Hkv}")


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
    align: str = "top_left",
    return_lse: bool = False,
    backend: str = "auto",
):
    """Fused scaled-dot-product attention.

    query (B, H, Nq, D); key and value (B, Hkv, Nk, D) with H % Hkv == 0 (grouped-query
    attention: head h reads kv head h // (H // Hkv)). Any strides.
    key_padding_mask: (B, Nk) bool, True = ignore that key.
    attn_mask: broadcastable to (B, H, Nq, Nk); bool True = may attend, float = added to scores.
    causal: query i sees keys j <= i + offset, offset = 0 top-left (align="top_left", SDPA's
    is_causal) or Nk - Nq bottom-right (align="bottom_right", FlashAttention's).
    window_size (left, right): query i sees keys i + offset - left <= j <= i + offset + right;
    -1 = unbounded (FlashAttention's). softcap c > 0: scores become c tanh(s / c) before any bias
    or mask. alibi_slopes (H,) or (B, H) float32: the score of (i, j) gets - slope |j - i - offset|,
    after softcapping. sinks (H,) float32: one logit per head added to each softmax denominator
    (no value), differentiable; lse includes it. fastattn.reference_attention defines it all.
    A query that sees no key gives a zero row (lse = -inf, or the sink) and zero gradients.
    Returns out (B, H, Nq, D) in query's dtype, or (out, lse) with lse (B, H, Nq) float32.
    """
    check_qkv(query, key, value)
    call, problem = describe(query, key, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                             causal=causal, scale=scale, dropout_p=dropout_p, window_size=window_size,
                             softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, align=align,
                             return_lse=return_lse, backend=backend)
    out, lse = ops.attention_forward(query, key, value, select_backend(backend, problem).name, call)
    return (out, lse) if return_lse else out


def explain(query: Tensor, key: Tensor, value: Tensor, *, key_padding_mask: Tensor | None = None,
            attn_mask: Tensor | None = None, causal: bool = False, scale: float | None = None,
            dropout_p: float = 0.0, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
            alibi_slopes: Tensor | None = None, sinks: Tensor | None = None, align: str = "top_left",
            backend: str = "auto") -> str:
    """Which backend fastattn.attention takes for this call, and why (the measured ranking it
    followed and what declined before it), as text. Runs nothing."""
    check_qkv(query, key, value)
    problem = describe(query, key, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask, causal=causal,
                       scale=scale, dropout_p=dropout_p, window_size=window_size, softcap=softcap,
                       alibi_slopes=alibi_slopes, sinks=sinks, align=align, backend=backend, draw_seed=False)[1]
    return explain_selection(backend, problem)
