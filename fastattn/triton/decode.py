"""Decoding against a KV cache in Triton: flash-decoding.

A few new queries per sequence (Nq <= 16) against a long cache leave a normal flash forward
with one CTA per (batch, head): too few to fill the GPU at small batches. Here the cache is cut
into splits, one CTA per (split, kv head): it attends every query of the head's GQA group (rows
r = g * Nq + i: query i of head hk * group + g, so a key tile is loaded once for the whole group)
to its split of the valid keys, and writes a normalised partial output and lse. A small merge
kernel combines the splits by their lse, and a sink's logit as one more split with no value.
Causal, the window and ALiBi are aligned to the last valid key; the window's left edge narrows
the keys split to those some query sees."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .attention import INTERPRETING, LN2_C, LOG2E, LOG2E_C, UNSPECIALIZED, CallGroups, _hide_values, _mma, _tanh, \
    block_d, cdiv, dot_precision, next_pow2
from .launch import Launcher


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _decode_split_kernel(Q, K, V, PARTS, SEQLENS, ALIBI, SCALARS, split_len, H, Hkv, Nq, group, num_splits,
                         window_left, window_right, alibi_stride, D: tl.constexpr, CAUSAL: tl.constexpr,
                         PREC: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Q: (q, batch, head and row strides), q with contiguous rows of D; K, V: (cache, its four
    strides), any strides; PARTS: (partial outputs, their lse); SCALARS: (qk_scale, cap) in log2 units."""
    Q_PTR, stride_qb, stride_qh, stride_qm = Q
    K_PTR, stride_kb, stride_kh, stride_kn, stride_kd = K
    V_PTR, stride_vb, stride_vh, stride_vn, stride_vd = V
    O_PART, LSE_PART = PARTS
    qk_scale, cap = SCALARS
    bhk = tl.program_id(0)  # on the first axis: a grid's others stop at 65535
    split = tl.program_id(1)
    b, hk = (bhk // Hkv).to(tl.int64), (bhk % Hkv).to(tl.int64)  # 64-bit: long caches pass 2^31 elements
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    g, i = rows // Nq, rows % Nq
    row_ok = rows < group * Nq
    h = hk * group + g
    offs_d = tl.arange(0, BLOCK_D)
    length = tl.load(SEQLENS + b)
    lo = split * split_len
    if WINDOW:  # from the first query's left edge
        lo += tl.where(window_left >= 0, tl.maximum(length - Nq - window_left, 0), 0)
    hi = tl.minimum(lo + split_len, length)
    q = tl.load(Q_PTR + b * stride_qb + h[:, None] * stride_qh + i[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K_PTR + b * stride_kb + hk * stride_kh
    v_base = V_PTR + b * stride_vb + hk * stride_vh
    at = length - Nq + i  # query i's key position: causal, the last key it sees
    key_lo, key_hi = tl.zeros_like(at), (at if CAUSAL else tl.zeros_like(at) + length)  # each row's keys, both in
    if WINDOW:  # once per row, not per score
        key_lo = tl.where(window_left >= 0, at - window_left, key_lo)
        key_hi = tl.where(window_right >= 0, tl.minimum(key_hi, at + window_right), key_hi)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * alibi_stride + h, mask=row_ok, other=0.0) * LOG2E_C
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < hi) & (offs_d[None, :] < D)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
        s = _mma(q, tl.trans(k), PREC) * qk_scale
        if SOFTCAP:
            s = cap * _tanh(s / cap)
        if HAS_ALIBI:
            s -= slope[:, None] * tl.abs(offs_n[None, :] - at[:, None]).to(tl.float32)
        keep = offs_n[None, :] < hi
        if CAUSAL or WINDOW:
            keep = keep & (offs_n[None, :] >= key_lo[:, None]) & (offs_n[None, :] <= key_hi[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
        if CAUSAL or WINDOW:  # pairs hidden from some rows
            p, v = _hide_values(p, v)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, PREC)
        m_i = m_new
    seen = l_i != 0.0  # NaN: a tainted row
    part = ((b * H + h) * Nq + i) * num_splits + split  # O_PART (B, H, Nq, splits, D), LSE_PART without D
    tl.store(O_PART + part[:, None] * D + offs_d[None, :], acc / tl.where(seen, l_i, 1.0)[:, None],
             mask=row_ok[:, None] & (offs_d[None, :] < D))
    tl.store(LSE_PART + part, tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf")),
             mask=row_ok)


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _decode_merge_kernel(PARTS, O, LSE, SINKS, H, Nq, num_splits, D: tl.constexpr, HAS_SINKS: tl.constexpr,
                         SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = sum_s 2^(lse_s - lse) out_s and lse = log2-sum-exp2 of lse_s (and of the sink), for
    one query row. PARTS: (partial outputs, their lse); O: (out, batch, head and row strides),
    out with contiguous rows of D."""
    O_PART, LSE_PART = PARTS
    O_PTR, stride_ob, stride_oh, stride_om = O
    row = tl.program_id(0)  # (b * H + h) * Nq + i
    b, h, i = row // (H * Nq), row // Nq % H, row % Nq
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    lse2 = tl.load(LSE_PART + row * num_splits + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    top = tl.max(lse2, 0)
    if HAS_SINKS:
        sink = tl.load(SINKS + h) * LOG2E_C
        top = tl.maximum(top, sink)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.math.exp2(lse2 - top)
    total = tl.sum(w, 0)
    if HAS_SINKS:
        total += tl.math.exp2(sink - top)
    o = tl.load(O_PART + (row * num_splits + offs_s)[:, None] * D + offs_d[None, :],
                mask=(offs_s[:, None] < num_splits) & (offs_d[None, :] < D), other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total != 0.0, total, 1.0)
    tl.store(O_PTR + b * stride_ob + h * stride_oh + i * stride_om + offs_d, out.to(O_PTR.dtype.element_ty),
             mask=offs_d < D)
    lse = tl.where(total != 0.0, (top + tl.math.log2(tl.where(total != 0.0, total, 1.0))) * LN2_C,
                   float("-inf"))
    tl.store(LSE + row, lse)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if INTERPRETING:
        return 4  # a small pretend GPU, so that the interpreter tests split the cache too
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_count(ctas: int, cache_len: int, block_n: int, multiprocessors: int) -> int:
    """Splits per kv head: enough CTAs for two waves, each split at least two key tiles."""
    wanted = cdiv(2 * multiprocessors, max(ctas, 1))
    return max(1, min(wanted, cache_len // (2 * block_n), 128))


_SPLIT = Launcher(_decode_split_kernel)
_MERGE = Launcher(_decode_merge_kernel)


def decode(q, k_cache, v_cache, seqlens, out, lse, call) -> None:
    """q (B, H, Nq, D) with contiguous rows of D; caches (B, Hkv, Nmax, D); seqlens (B,) int32
    valid keys per row; call: a Call (fastattn.backends.base) with score modifiers and no masks;
    writes out (B, H, Nq, D), contiguous rows of D, and lse (B, H, Nq), contiguous."""
    causal, scale, mods = call.causal, call.scale, CallGroups(q, k_cache, call)
    B, H, Nq, D = q.shape
    Hkv, Nmax = k_cache.shape[1], k_cache.shape[2]
    window, softcap, alibi, sinks, _ = mods.mod_flags()
    span = Nmax if mods.window[0] < 0 else min(Nmax, mods.window[0] + Nq)  # the keys some query sees
    group = H // Hkv
    block_m = max(16, min(64, next_pow2(group * Nq)))
    m_blocks = cdiv(group * Nq, block_m)
    # 64 keys a tile; 32 for fp32 at D = 256, whose 64-key tiles take 148 KiB of shared memory
    # on sm_90 (one CTA an SM; 82 KiB at 32, compiled here)
    block_n = 32 if INTERPRETING or block_d(D) * q.element_size() > 512 else 64
    splits = split_count(B * Hkv * m_blocks, span, block_n, _multiprocessors(q.device))
    split_len = cdiv(cdiv(span, splits), block_n) * block_n
    o_part = torch.empty(B, H, Nq, splits, D, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B, H, Nq, splits, device=q.device, dtype=torch.float32)
    parts = (o_part, lse_part)
    _SPLIT((B * Hkv, splits, m_blocks),
           _split_args(q, k_cache, v_cache, parts, seqlens, mods, scale, split_len, splits),
           (D, causal, dot_precision(q.dtype), window, softcap, alibi, block_m, block_n, block_d(D)), 4, 2)
    _MERGE((B * H * Nq,), (parts, (out, *out.stride()[:3]), lse, mods.sinks, H, Nq, splits),
           (D, sinks, next_pow2(splits), block_d(D)), 4, 3)


def _split_args(q, k_cache, v_cache, parts, seqlens, mods: CallGroups, scale: float, split_len: int,
                splits: int) -> tuple:
    """_decode_split_kernel's arguments before its constexprs."""
    H, Hkv = q.shape[1], k_cache.shape[1]
    return ((q, *q.stride()[:3]), (k_cache, *k_cache.stride()), (v_cache, *v_cache.stride()), parts, seqlens,
            mods.alibi, (scale * LOG2E, mods.cap), split_len, H, Hkv, q.shape[2], H // Hkv, splits, *mods.scalars())
