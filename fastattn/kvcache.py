"""Decoding with a KV cache, as FlashAttention's flash_attn_with_kvcache: append the new keys
and values to a preallocated cache in place and attend a few new queries to the valid prefix,
all in one op with no host sync (CUDA-graph friendly)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .backends import select_backend
from .front_door import check_tensors, describe

MAX_QUERIES = 16  # new queries per sequence and call: decoding, speculative or not


def _may_overlap(t: Tensor) -> bool:
    """Whether two elements of t may share memory: False when, its dims sorted by stride, each
    stride passes the farthest element the smaller ones reach (every strided, sliced or
    transposed layout of distinct memory, packed K/V views included)."""
    reach = 0
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def _check(q, k_cache, v_cache, cache_seqlens, k_new, v_new) -> None:
    new = [(name, t) for name, t in (("k_new", k_new), ("v_new", v_new)) if t is not None]
    check_tensors([("q", q), ("k_cache", k_cache), ("v_cache", v_cache), *new], "(B, heads, N, D)")
    B, H, Nq, D = q.shape
    if not 1 <= Nq <= MAX_QUERIES:
        raise ValueError(f"q: expected 1 to {MAX_QUERIES} queries per sequence (B, H, Nq, D), got Nq = {Nq}")
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"k_cache/v_cache: expected equal shapes (B, Hkv, Nmax, D) = ({B}, Hkv, Nmax, {D}), "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    Hkv = k_cache.shape[1]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"k_cache: expected a head count dividing q's {H} heads, got {Hkv}")
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new/v_new: expected both or neither")
    if k_new is not None and (k_new.shape != v_new.shape or tuple(k_new.shape[:2]) != (B, Hkv) or k_new.shape[3] != D):
        raise ValueError(f"k_new/v_new: expected equal shapes (B, Hkv, Nnew, D) = ({B}, {Hkv}, Nnew, {D}), "
                         f"got {tuple(k_new.shape)} and {tuple(v_new.shape)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)) if k_new is not None else ():
        if any(stride == 0 and size > 1 for stride, size in zip(cache.stride(), cache.shape)):
            raise ValueError(f"{name}: expected no broadcast dim (stride 0) in a cache k_new is written to: one "
                             f"row's keys would overwrite another's; got strides {cache.stride()}")
        if not torch.compiler.is_compiling() and _may_overlap(cache):  # (sorting symbolic strides would guard)
            raise ValueError(f"{name}: expected a cache k_new is written to whose elements do not overlap, got shape "
                             f"{tuple(cache.shape)} with strides {cache.stride()}")
    if k_new is not None and (k_cache is v_cache or not torch.compiler.is_compiling() and k_cache.numel()
                              and k_cache.data_ptr() == v_cache.data_ptr()):  # (dynamo cannot compare pointers)
        raise ValueError("v_cache: expected memory apart from k_cache's when k_new/v_new are written, got the same "
                         f"data pointer (shape {tuple(v_cache.shape)}, strides {v_cache.stride()})")
    if not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype != torch.int32 or tuple(cache_seqlens.shape) != (B,):
        raise TypeError(f"cache_seqlens: expected a ({B},) int32 tensor, got {cache_seqlens!r:.80}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens: expected device {q.device}, got {cache_seqlens.device}")


def _check_lengths(cache_seqlens, room: int) -> None:
    """Every row's valid keys and the new ones fit the cache (the C++ kernel checks this itself)."""
    ok = ((cache_seqlens >= 0) & (cache_seqlens <= room)).all()
    if cache_seqlens.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(ok, "cache_seqlens: entries must lie in [0, Nmax - Nnew]")
    elif not ok:
        raise ValueError(f"cache_seqlens: expected entries in [0, Nmax - Nnew] = [0, {room}], got {cache_seqlens.tolist()}")


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    *,
    k_new: Tensor | None = None,
    v_new: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
    align: str = "bottom_right",
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention of a few new queries against a KV cache. Forward only.

    q (B, H, Nq <= 16, D); k_cache and v_cache (B, Hkv, Nmax, D), H % Hkv == 0, holding
    cache_seqlens[b] (int32) valid rows before the call. k_new/v_new (B, Hkv, Nnew, D), if given,
    are written into the caches in place at rows cache_seqlens[b] ... + Nnew - 1 (the caller
    advances cache_seqlens). The queries then attend to the first cache_seqlens[b] + Nnew keys;
    causal is aligned to the end: query i sees keys j <= total - Nq + i. The cache is split
    across CTAs (GPU) or threads (CPU) and the splits merged (flash-decoding).
    window_size, softcap, alibi_slopes and sinks as in fastattn.attention, aligned to the end as
    causal is (align="bottom_right", the only alignment decoding has): query i sits at key
    position total - Nq + i, and the window's left edge bounds the keys read.
    Returns out (B, H, Nq, D), or (out, lse) with lse (B, H, Nq) float32."""
    _check(q, k_cache, v_cache, cache_seqlens, k_new, v_new)
    if align != "bottom_right":
        raise ValueError(f"align: expected 'bottom_right' (decoding is aligned to the end of the cache), got {align!r}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k_cache, v_cache, k_new, v_new)):
        raise ValueError("attention_with_kvcache: forward only; call it under torch.no_grad() or on detached tensors")
    call, problem = describe(q, k_cache, v_cache, kind="decode", causal=causal, scale=scale, window_size=window_size,
                             softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, align=align,
                             return_lse=return_lse, backend=backend)
    chosen = select_backend(backend, problem)
    if chosen.name != "cpu":
        _check_lengths(cache_seqlens, k_cache.shape[2] - (0 if k_new is None else k_new.shape[2]))
    out, lse = ops.attention_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, chosen.name, call)
    return (out, lse) if return_lse else out
