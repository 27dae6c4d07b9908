"""Flash attention in Triton: forward and backward, masks applied inside the kernels.

Read top to bottom like Triton's fused-attention tutorial: the masks of one tile, the forward
inner loop and kernel, the backward pieces (preprocess, dK/dV, dQ), then the launch glue.

Scores are kept in log2 units (log2 e folded into the softmax scale) so the softmax is exp2.
Key tiles are aligned to BLOCK_N from key 0. Per batch row, keys outside [kv_begin, kv_end)
(the valid range of the padding mask) are never loaded; causal tiles above the diagonal are
skipped, as are tiles outside a sliding window. Only the tiles that straddle a range end, the
diagonal or a window edge pay for that masking; a scattered padding mask or an attn_mask is
applied on every visited tile, softcapping and ALiBi on every score. Positions are aligned by
`offset`: query i sits at key position i + offset (bottom-right: Nk - Nq of its sequence, else 0).

Kernel arguments come in groups, tuples Triton flattens (3.6 and newer), built by the glue's
`_*_args` functions:
  a tensor with its strides: (pointer, batch stride, head stride, row stride) of Q, K, V, O, dO;
  LSE: lse's (B, H, Nq) layout, (pointers, batch stride, head stride): lse in the forward, (lse,
    delta) in the backward, (dlse, delta) in the preprocess; the gradients', (dK, dV) or dQ, the
    same with contiguous rows of D;
  MASKS: (key ranges, key padding, attn_mask pointers, key padding's batch stride, attn_mask's
    batch, head, row and key strides); CU_SEQLENS: (cu_q, cu_k); MODS: (alibi, sinks) pointers;
  SCALARS: (qk_scale, sm_scale, dropout_p, cap) floats (qk_scale and cap in log2 units).
The integers Triton must not specialize (sizes, the seed, the window, the ALiBi stride: listed in
UNSPECIALIZED) stay single arguments: Triton specializes a tuple's integers (on 1 and on
divisibility by 16) whatever do_not_specialize says, in 3.6 as in 3.9. The constexpr flags
follow (Flags' order), each its own argument, BLOCK_M and BLOCK_N last, and reach the helpers
one by one too (a tuple of constexprs unpacked in a helper gives tensors, not constants).
"""
from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from . import tuning
from .launch import INTERPRETING, Launcher

LOG2E = 1.4426950408889634  # log2(e): scores and lse in log2 units
LN2 = 0.6931471805599453  # ln(2): back to natural-log units
# The same, for the kernels (a jitted function reads a global only as a constexpr)
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)
TANH_K = tl.constexpr(2 * LOG2E)  # tanh x = 2 / (1 + 2^(-TANH_K x)) - 1
# Integer arguments that are not worth a compile of their own (see fastattn.triton.launch): single
# arguments, since Triton specializes the integers of a tuple argument regardless.
UNSPECIALIZED = ["B", "H", "Hkv", "Nq", "Nk", "group", "seed", "num_splits", "window_left", "window_right",
                 "alibi_stride"]
FP32_DOTS = os.environ.get("FASTATTN_FP32_DOTS", "3xtf32")  # or "ieee": see dot_precision
# The stages of the inner loops (the tutorial's STAGE): tiles that straddle the valid key range, the
# causal diagonal or a window edge, masked key by key; and the interior tiles, which need none of that.
EDGE = tl.constexpr(1)
INTERIOR = tl.constexpr(2)


# --------------------------------------------------------------------------- masks of one tile
@triton.jit
def _mma(a, b, PREC: tl.constexpr):
    """a @ b, accumulated in fp32. PREC is the dots' input precision for fp32 operands, "ieee",
    "tf32" or "tf32x3" (see dot_precision), or "upcast": Triton's interpreter multiplies bf16 operands
    wrongly, so under it they are widened to fp32 first."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _tanh(x):
    """tanh from exp2 (the interpreter has no tanh): exact at both ends, where exp2 saturates."""
    return 2.0 / (1.0 + tl.math.exp2(x * -TANH_K)) - 1.0


@triton.jit
def _score_mods(s, offs_m, offs_n, tile, head, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Softcapping, then ALiBi, on s (BLOCK_M, BLOCK_N) in log2 units (cap and slope in them
    too). Also returns the softcap's tanh t (dS scales by its derivative 1 - t^2), else 0."""
    offset = tile[5]
    cap, slope, _, _, _, _ = head
    t = 0.0
    if SOFTCAP:
        t = _tanh(s / cap)
        s = cap * t
    if HAS_ALIBI:
        s -= slope * tl.abs(offs_n[None, :] - offs_m[:, None] - offset).to(tl.float32)
    return s, t


@triton.jit
def _mask_tile(s, offs_m, offs_n, tile, head, BOUNDS: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr):
    """s (BLOCK_M, BLOCK_N) in log2 units -> with -inf where a query may not see a key."""
    Nq, Nk, kv_lo, kv_hi, holes, offset, window_left, window_right = tile
    _, _, kpm_row, mask_bh, stride_mm, stride_mn = head
    if MASK_KIND == 2:  # float attn_mask: added to the scores
        m = tl.load(mask_bh + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn,
                    mask=(offs_m[:, None] < Nq) & (offs_n[None, :] < Nk), other=0.0)
        s = tl.where(m == float("-inf"), float("-inf"), s + m.to(tl.float32) * LOG2E_C)  # NaN s hidden too
    if MASK_KIND == 1:  # bool attn_mask: True = may attend
        m = tl.load(mask_bh + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn,
                    mask=(offs_m[:, None] < Nq) & (offs_n[None, :] < Nk), other=0)
        s = tl.where(m != 0, s, float("-inf"))
    if HAS_KPM:  # key padding, True = ignore: tested key by key only in rows with holes
        if holes != 0:
            pad = tl.load(kpm_row + offs_n, mask=offs_n < Nk, other=1)
            s = tl.where(pad[None, :] == 0, s, float("-inf"))
    if BOUNDS:  # the valid key range, causality and the window, on the tiles that straddle them
        keep = (offs_n[None, :] >= kv_lo) & (offs_n[None, :] < kv_hi)
        at = offs_m[:, None] + offset  # each query's key position
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= at)
        if WINDOW:  # -1: unbounded
            keep = keep & ((window_right < 0) | (offs_n[None, :] <= at + window_right))
            keep = keep & ((window_left < 0) | (offs_n[None, :] >= at - window_left))
        s = tl.where(keep, s, float("-inf"))
    return s


@triton.jit
def _finite(x):
    return (x == x) & (tl.abs(x) < float("inf"))


@triton.jit
def _hide_values(p, v):
    """A tile with hidden pairs (p = 0): its values with non-finite elements 0, which p = 0 would
    turn into 0 * NaN, and p NaN where a row sees a key whose value held one (that row's output
    still comes out NaN; a pair whose p underflows to 0 counts as hidden)."""
    finite = _finite(v)
    v = tl.where(finite, v, tl.zeros_like(v))
    bad = tl.sum(tl.where(finite, 0.0, 1.0), 1) != 0.0
    p = tl.where(bad[None, :] & (p != 0.0), float("nan"), p)
    return p, v


@triton.jit
def _zero_non_finite(x):
    return tl.where(_finite(x), x, tl.zeros_like(x))


@triton.jit
def _non_finite_rows(x):
    return tl.max(tl.where(_finite(x), 0, 1), 1) != 0


@triton.jit
def _tile_and_row(N, BLOCK: tl.constexpr):
    """This program's tile of N (its first index) and (batch, head) row, from a 1-D launch of
    tiles x rows, tiles fastest: the order of a 2-D (tiles, rows) grid, which keeps one head's
    tiles together in L2, without the 65535 cap on a grid's second axis (a packed batch of
    thousands of short sequences passes it)."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(N, BLOCK)
    return (pid % tiles) * BLOCK, pid // tiles


@triton.jit
def _seq_info(CU_Q, CU_K, b, Nq, Nk, VARLEN: tl.constexpr):
    """Batch row b's first query and key rows in the seq dim, and its query and key counts:
    one sequence of a packed batch, or one padded row (FlashAttention's BlockInfo)."""
    if VARLEN:  # offsets in 64 bits: a packed batch's row times its stride passes 2^31
        q_off, k_off = tl.load(CU_Q + b), tl.load(CU_K + b)
        q_len, k_len = tl.load(CU_Q + b + 1) - q_off, tl.load(CU_K + b + 1) - k_off
        q_off, k_off = q_off.to(tl.int64), k_off.to(tl.int64)
    else:  # one return for both: Triton compiles a function's returns to one type
        q_off, q_len, k_off, k_len = 0, Nq, 0, Nk
    return q_off, q_len, k_off, k_len


@triton.jit
def _rows_at(T, b, h, row):
    """A (pointer, batch stride, head stride, row stride) group -> the pointer at batch row b,
    head h, sequence row `row`, and the row stride: the base a program offsets once."""
    ptr, stride_b, stride_h, stride_row = T
    return ptr + b * stride_b + h * stride_h + row * stride_row, stride_row


@triton.jit
def _row_info(MASKS, b, B, Nq, Nk, window_left, window_right, HAS_KPM: tl.constexpr, BOTTOM_RIGHT: tl.constexpr):
    """Which keys the queries of batch row b see, `tile`: (Nq, Nk, the valid keys [kv_lo, kv_hi),
    whether padding lies inside them (fastattn.masks.key_ranges: all keys, no holes, without a
    padding mask), the position offset (query i sits at key i + offset: bottom-right aligned, or
    top-left), the window)."""
    KV_RANGES = MASKS[0]
    if HAS_KPM:
        kv_lo, kv_hi, holes = tl.load(KV_RANGES + b), tl.load(KV_RANGES + B + b), tl.load(KV_RANGES + 2 * B + b)
    else:
        kv_lo, kv_hi, holes = 0, Nk, 0
    offset = 0
    if BOTTOM_RIGHT:
        offset = Nk - Nq
    return Nq, Nk, kv_lo, kv_hi, holes, offset, window_left, window_right


@triton.jit
def _head_info(MASKS, MODS, b, h, alibi_stride, cap, HAS_ALIBI: tl.constexpr):
    """What else shapes the scores of head h of batch row b, `head`: (the softcap and head h's
    ALiBi slope in log2 units (alibi_stride 0: (H,) slopes; else 0), the key padding's row, the
    attn_mask's (b, h) plane, its row and key strides)."""
    _, KPM, MASK, stride_kpb, stride_mb, stride_mh, stride_mm, stride_mn = MASKS
    ALIBI, _ = MODS
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * alibi_stride + h) * LOG2E_C
    return cap, slope, KPM + b * stride_kpb, MASK + b * stride_mb + h * stride_mh, stride_mm, stride_mn


@triton.jit
def _dropout_keep(seed, bh, offs_m, offs_n, Nk, dropout_p):
    """The keep mask of scores (offs_m, offs_n) of head bh: Philox, regenerated by the backward.
    Sequence b of a packed batch draws what a lone call with seed + b * H would."""
    return tl.rand(seed + bh, offs_m[:, None] * Nk + offs_n[None, :]) >= dropout_p


@triton.jit
def _tile_ranges(start_m, tile, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Key tiles a query tile visits: [t_lo, t_hi), of which [i_lo, i_hi) need no range, causal
    or window masking (every key in them visible to every query of the tile)."""
    _, _, kv_lo, kv_hi, _, offset, window_left, window_right = tile
    first, last = start_m + offset, start_m + BLOCK_M - 1 + offset  # the tile's queries' key positions
    lo, hi, all_lo, all_hi = kv_lo, kv_hi, kv_lo, kv_hi  # keys some query sees, keys all see
    if CAUSAL:
        hi = tl.minimum(hi, last + 1)
        all_hi = tl.minimum(all_hi, first + 1)
    if WINDOW:  # selects, not branches: the bounds may be compile-time ints (no padding mask)
        right, left = window_right >= 0, window_left >= 0
        hi = tl.where(right, tl.minimum(hi, last + window_right + 1), hi)
        all_hi = tl.where(right, tl.minimum(all_hi, first + window_right + 1), all_hi)
        lo = tl.where(left, tl.maximum(lo, first - window_left), lo)
        all_lo = tl.where(left, tl.maximum(all_lo, last - window_left), all_lo)
    t_lo = (lo // BLOCK_N) * BLOCK_N
    i_lo = tl.cdiv(all_lo, BLOCK_N) * BLOCK_N
    i_hi = tl.maximum((tl.maximum(all_hi, 0) // BLOCK_N) * BLOCK_N, i_lo)
    return t_lo, tl.minimum(i_lo, hi), i_lo, tl.minimum(i_hi, hi), hi


# --------------------------------------------------------------------------- forward
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, kv, offs_m, start, end, tile, head, drop, D: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr,
               HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
               STAGE: tl.constexpr):
    """The key tiles [start, end) of one query tile: EDGE tiles masked key by key for the valid
    range, causality and the window; INTERIOR ones not (padding holes and attn_mask: both). kv:
    (K and its row stride, V and its row stride) at this program's batch row, kv head and first
    key; tile, head: see _row_info, _head_info; drop: (qk_scale, seed, bh, dropout_p)."""
    k_ptr, stride_kn, v_ptr, stride_vn = kv
    Nk = tile[1]
    qk_scale, seed, bh, dropout_p = drop
    offs_d = tl.arange(0, q.shape[1])
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < Nk) & (offs_d[None, :] < D)
        k = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        s = _mma(q, tl.trans(k), PREC) * qk_scale
        s, _ = _score_mods(s, offs_m, offs_n, tile, head, SOFTCAP, HAS_ALIBI)
        s = _mask_tile(s, offs_m, offs_n, tile, head, STAGE == EDGE, CAUSAL, WINDOW, HAS_KPM, MASK_KIND)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays 0
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        if STAGE == EDGE or HAS_KPM or MASK_KIND != 0:  # the tile may hide pairs
            p, v = _hide_values(p, v)
        if DROPOUT:  # multiplied, so that a dropped pair's NaN (seen, not hidden) stays NaN
            keep = _dropout_keep(seed, bh, offs_m, offs_n, Nk, dropout_p)
            p = p * tl.where(keep, 1.0 / (1.0 - dropout_p), 0.0)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _fwd_kernel(Q, K, V, O, LSE, MASKS, CU_SEQLENS, MODS, SCALARS, B, H, Nq, Nk, group, seed, window_left,
                window_right, alibi_stride, D: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
                VARLEN: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
                WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr,
                BOTTOM_RIGHT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    qk_scale, _, dropout_p, cap = SCALARS
    CU_Q, CU_K = CU_SEQLENS
    start_m, bh = _tile_and_row(Nq, BLOCK_M)
    b, h = bh // H, bh % H
    hk = h // group  # GQA: the kv head this query head reads
    q_off, Nq, k_off, Nk = _seq_info(CU_Q, CU_K, b, Nq, Nk, VARLEN)
    if start_m >= Nq:  # past a packed sequence's queries
        return
    # This program's rows of each tensor, offset once (O and lse after the loop: fewer live registers)
    q_ptr, stride_qm = _rows_at(Q, b, h, q_off)
    k_ptr, stride_kn = _rows_at(K, b, hk, k_off)
    v_ptr, stride_vn = _rows_at(V, b, hk, k_off)
    tile = _row_info(MASKS, b, B, Nq, Nk, window_left, window_right, HAS_KPM, BOTTOM_RIGHT)
    head = _head_info(MASKS, MODS, b, h, alibi_stride, cap, HAS_ALIBI)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    kv, drop = (k_ptr, stride_kn, v_ptr, stride_vn), (qk_scale, seed, bh, dropout_p)
    t_lo, head_end, i_lo, i_hi, t_hi = _tile_ranges(start_m, tile, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    # Range, causal and window masks only where a tile straddles them; interior tiles skip that work.
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, kv, offs_m, t_lo, head_end, tile, head, drop, D, CAUSAL, WINDOW,
                               HAS_KPM, MASK_KIND, SOFTCAP, HAS_ALIBI, DROPOUT, PREC,
                               BLOCK_N, EDGE)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, kv, offs_m, i_lo, i_hi, tile, head, drop, D, CAUSAL, WINDOW,
                               HAS_KPM, MASK_KIND, SOFTCAP, HAS_ALIBI, DROPOUT, PREC,
                               BLOCK_N, INTERIOR)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, kv, offs_m, tl.maximum(i_hi, head_end), t_hi, tile, head, drop,
                               D, CAUSAL, WINDOW, HAS_KPM, MASK_KIND, SOFTCAP, HAS_ALIBI, DROPOUT, PREC, BLOCK_N, EDGE)
    if HAS_SINKS:  # the sink joins the denominator with no value: rescale to the larger of it and the max
        _, SINKS = MODS
        sink = tl.load(SINKS + h) * LOG2E_C
        m_new = tl.maximum(m_i, sink)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a sink of -inf and no key: still 0
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.math.exp2(sink - m_use)
        acc = acc * alpha[:, None]
        m_i = m_new

    seen = l_i != 0.0  # False: the row sees no key (and has no sink): zeros and lse = -inf; NaN: tainted
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_ptr, stride_om = _rows_at(O, b, h, q_off)
    LSE_PTR, stride_lb, stride_lh = LSE
    lse_ptr = LSE_PTR + b * stride_lb + h * stride_lh + q_off
    tl.store(o_ptr + offs_m[:, None] * stride_om + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < D))
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2_C, float("-inf"))
    tl.store(lse_ptr + offs_m, lse, mask=offs_m < Nq)


# --------------------------------------------------------------------------- backward
@triton.jit
def _query_range(start_n, tile, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """The queries [first_m, end_m) that may see a key of the tile [start_n, start_n + BLOCK_N),
    first_m at a query tile's start: the others' tiles are skipped."""
    Nq, _, _, _, _, offset, window_left, window_right = tile
    first_m, end_m = 0, Nq
    if CAUSAL:  # queries before the tile's first key (aligned) see none of it
        first_m = tl.maximum(first_m, start_n - offset)
    if WINDOW:  # past end_m, a query's window starts after the tile's last key
        first_m = tl.where(window_right >= 0, tl.maximum(first_m, start_n - offset - window_right), first_m)
        end_m = tl.where(window_left >= 0, tl.minimum(end_m, start_n + BLOCK_N + window_left - offset), end_m)
    return (first_m // BLOCK_M) * BLOCK_M, end_m


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _bwd_preprocess(O, DO, LSE, CU_Q, H, Nq, D: tl.constexpr, HAS_DLSE: tl.constexpr, VARLEN: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) - dlse: the softmax-backward offset of each query row. LSE: (dlse,
    delta, batch stride, head stride), rows with the layout of lse."""
    start_m, bh = _tile_and_row(Nq, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    b, h = bh // H, bh % H
    q_off, Nq, _, _ = _seq_info(CU_Q, CU_Q, b, Nq, 0, VARLEN)
    o_ptr, stride_om = _rows_at(O, b, h, q_off)
    do_ptr, stride_dom = _rows_at(DO, b, h, q_off)
    DLSE, DELTA, stride_lb, stride_lh = LSE
    at = b * stride_lb + h * stride_lh + q_off + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < Nq) & (offs_d[None, :] < D)
    o = tl.load(o_ptr + offs_m[:, None] * stride_om + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(do_ptr + offs_m[:, None] * stride_dom + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + at, mask=offs_m < Nq, other=0.0)
    tl.store(DELTA + at, delta, mask=offs_m < Nq)


@triton.jit
def _bwd_p(q, k, lse2, offs_m, offs_n, tile, head, qk_scale, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
           HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
           PREC: tl.constexpr):
    """p of one (query tile, key tile) pair of the backward, recomputed as the forward had it
    before dropout, and the softcap's tanh t. lse2: lse in log2 units, 0 where -inf (a row with no
    key has only -inf scores: p = 0 there) or NaN (a tainted row's NaN lse shifts by 0 too, so that
    p is 0 where hidden; its delta is NaN: see backward())."""
    s = _mma(q, tl.trans(k), PREC) * qk_scale
    s, t = _score_mods(s, offs_m, offs_n, tile, head, SOFTCAP, HAS_ALIBI)
    s = _mask_tile(s, offs_m, offs_n, tile, head, True, CAUSAL, WINDOW, HAS_KPM, MASK_KIND)
    return tl.math.exp2(s - lse2[:, None]), t


@triton.jit
def _bwd_ds(p, t, dp, delta, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
            MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr):
    """dS (log2 units) from p, the softcap's t and dP (dropped and rescaled as the forward did)."""
    MASKED: tl.constexpr = CAUSAL or WINDOW or HAS_KPM or MASK_KIND != 0  # see backward(): "Hidden pairs"
    ds = p * (dp - delta[:, None])
    if SOFTCAP:  # through the cap
        ds = ds * (1.0 - t * t)
    if MASKED:
        ds = tl.where(p != 0.0, ds, 0.0)
    return ds


@triton.jit
def _usable_lse(lse2):
    """lse in log2 units with -inf and NaN shifted to 0 (see _bwd_ds)."""
    return tl.where((lse2 == float("-inf")) | (lse2 != lse2), 0.0, lse2)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, offs_n, rows, start, end, tile, head, drop, D: tl.constexpr,
                    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
                    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """dK, dV of one key tile from the query tiles [start, end) of one query head; rows: that
    head's q and dO at its sequence's first row with their row strides, the lse and delta pointers
    and that row's offset in them (bases and an offset: fewer live registers than two pointers)."""
    q_ptr, stride_qm, do_ptr, stride_dom, LSE_PTR, DELTA, lse_at = rows
    qk_scale, seed, bh, dropout_p = drop
    Nq = tile[0]
    offs_d = tl.arange(0, k.shape[1])
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ok = (offs_m[:, None] < Nq) & (offs_d[None, :] < D)
        q = tl.load(q_ptr + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_ok, other=0.0)
        do = tl.load(do_ptr + offs_m[:, None] * stride_dom + offs_d[None, :], mask=q_ok, other=0.0)
        # rows past Nq: lse +inf, so their p is 0 (a hidden value's inf must not meet them in dS)
        lse2 = tl.load(LSE_PTR + lse_at + offs_m, mask=offs_m < Nq, other=float("inf")) * LOG2E_C
        delta = tl.load(DELTA + lse_at + offs_m, mask=offs_m < Nq, other=0.0)
        p, t = _bwd_p(q, k, _usable_lse(lse2), offs_m, offs_n, tile, head, qk_scale, CAUSAL, WINDOW, HAS_KPM,
                      MASK_KIND, SOFTCAP, HAS_ALIBI, PREC)
        dp = _mma(do, tl.trans(v), PREC)
        p_used = p
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, offs_n, tile[1], dropout_p)
            p_used = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        dv += _mma(tl.trans(p_used.to(do.dtype)), do, PREC)
        ds = _bwd_ds(p, t, dp, delta, CAUSAL, WINDOW, HAS_KPM, MASK_KIND, SOFTCAP)
        dk += _mma(tl.trans(ds.to(q.dtype)), q, PREC)
    return dk, dv


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DKV, MASKS, CU_SEQLENS, MODS, SCALARS, B, H, Nq, Nk, group, seed,
                     window_left, window_right, alibi_stride, D: tl.constexpr, HAS_KPM: tl.constexpr,
                     MASK_KIND: tl.constexpr, VARLEN: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                     PREC: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                     HAS_SINKS: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of one key tile of one kv head: the sum over the query heads of its GQA group
    and over every query tile that can see it. No atomics: deterministic. LSE: (lse, delta,
    batch stride, head stride); DKV: (dK, dV, batch stride, head stride), (B, Hkv, Nk, D) with
    contiguous rows of D."""
    qk_scale, sm_scale, dropout_p, cap = SCALARS
    CU_Q, CU_K = CU_SEQLENS
    start_n, bhk = _tile_and_row(Nk, BLOCK_N)
    Hkv = H // group
    b, hk = bhk // Hkv, (bhk % Hkv).to(tl.int64)  # 64-bit: hk * stride_gh passes 2^31 in a long packed batch
    q_off, Nq, k_off, Nk = _seq_info(CU_Q, CU_K, b, Nq, Nk, VARLEN)
    if start_n >= Nk:  # past a packed sequence's keys
        return
    DK, DV, stride_gb, stride_gh = DKV
    k_ptr, stride_kn = _rows_at(K, b, hk, k_off)
    v_ptr, stride_vn = _rows_at(V, b, hk, k_off)
    LSE_PTR, DELTA, stride_lb, stride_lh = LSE
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ok = (offs_n[:, None] < Nk) & (offs_d[None, :] < D)
    tile = _row_info(MASKS, b, B, Nq, Nk, window_left, window_right, HAS_KPM, BOTTOM_RIGHT)
    kv_lo, kv_hi = tile[2], tile[3]
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if (start_n + BLOCK_N > kv_lo) & (start_n < kv_hi):  # else no query sees these keys
        k = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        first_m, end_m = _query_range(start_n, tile, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
        for g in range(0, group):
            h = hk * group + g
            head = _head_info(MASKS, MODS, b, h, alibi_stride, cap, HAS_ALIBI)
            q_ptr, stride_qm = _rows_at(Q, b, h, q_off)
            do_ptr, stride_dom = _rows_at(DO, b, h, q_off)
            lse_at = b * stride_lb + h * stride_lh + q_off
            rows = (q_ptr, stride_qm, do_ptr, stride_dom, LSE_PTR, DELTA, lse_at)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, offs_n, rows, first_m, end_m, tile, head,
                                     (qk_scale, seed, b * H + h, dropout_p), D, CAUSAL, WINDOW, HAS_KPM,
                                     MASK_KIND, SOFTCAP, HAS_ALIBI, DROPOUT, PREC, BLOCK_M)
    g_at = b * stride_gb + hk * stride_gh + k_off * D  # dK's and dV's rows of this program
    tl.store(DK + g_at + offs_n[:, None] * D + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + g_at + offs_n[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _bwd_dq_kernel(Q, K, V, DO, LSE, DQ, MASKS, CU_SEQLENS, MODS, SCALARS, B, H, Nq, Nk, group, seed,
                   window_left, window_right, alibi_stride, D: tl.constexpr, HAS_KPM: tl.constexpr,
                   MASK_KIND: tl.constexpr, VARLEN: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                   PREC: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   HAS_SINKS: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query tile: the key tiles the forward visited, probabilities recomputed. LSE:
    (lse, delta, batch stride, head stride); DQ: (dQ, batch stride, head stride), (B, H, Nq, D)
    with contiguous rows of D."""
    qk_scale, sm_scale, dropout_p, cap = SCALARS
    CU_Q, CU_K = CU_SEQLENS
    start_m, bh = _tile_and_row(Nq, BLOCK_M)
    b, h = bh // H, (bh % H).to(tl.int64)  # 64-bit: h * stride_gh passes 2^31 in a long packed batch
    hk = h // group
    q_off, Nq, k_off, Nk = _seq_info(CU_Q, CU_K, b, Nq, Nk, VARLEN)
    if start_m >= Nq:
        return
    q_ptr, stride_qm = _rows_at(Q, b, h, q_off)
    do_ptr, stride_dom = _rows_at(DO, b, h, q_off)
    k_ptr, stride_kn = _rows_at(K, b, hk, k_off)
    v_ptr, stride_vn = _rows_at(V, b, hk, k_off)
    DQ_PTR, stride_gb, stride_gh = DQ
    dq_ptr = DQ_PTR + b * stride_gb + h * stride_gh + q_off * D
    LSE_PTR, DELTA, stride_lb, stride_lh = LSE
    lse_at = b * stride_lb + h * stride_lh + q_off
    tile = _row_info(MASKS, b, B, Nq, Nk, window_left, window_right, HAS_KPM, BOTTOM_RIGHT)
    head = _head_info(MASKS, MODS, b, h, alibi_stride, cap, HAS_ALIBI)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = (offs_m[:, None] < Nq) & (offs_d[None, :] < D)
    q = tl.load(q_ptr + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_ok, other=0.0)
    do = tl.load(do_ptr + offs_m[:, None] * stride_dom + offs_d[None, :], mask=q_ok, other=0.0)
    lse2 = _usable_lse(tl.load(LSE_PTR + lse_at + offs_m, mask=offs_m < Nq, other=0.0) * LOG2E_C)
    delta = tl.load(DELTA + lse_at + offs_m, mask=offs_m < Nq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    t_lo, _, _, _, t_hi = _tile_ranges(start_m, tile, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    for start_n in range(t_lo, t_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < Nk) & (offs_d[None, :] < D)
        k = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        p, t = _bwd_p(q, k, lse2, offs_m, offs_n, tile, head, qk_scale, CAUSAL, WINDOW, HAS_KPM, MASK_KIND,
                      SOFTCAP, HAS_ALIBI, PREC)
        dp = _mma(do, tl.trans(v), PREC)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, offs_n, Nk, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = _bwd_ds(p, t, dp, delta, CAUSAL, WINDOW, HAS_KPM, MASK_KIND, SOFTCAP)
        dq += _mma(ds.to(k.dtype), k, PREC)
    tl.store(dq_ptr + offs_m[:, None] * D + offs_d[None, :], (dq * sm_scale).to(DQ_PTR.dtype.element_ty), mask=q_ok)


@triton.jit
def _dropout_mask_kernel(KEEP, H, Nq, Nk, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Materialises the kernels' keep mask (tests compare against the reference with it)."""
    bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, bh, offs_m, offs_n, Nk, dropout_p)
    tl.store(KEEP + bh * Nq * Nk + offs_m[:, None] * Nk + offs_n[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < Nq) & (offs_n[None, :] < Nk))


# --------------------------------------------------------------------------- launch glue
@functools.cache
def _dummy(device: torch.device) -> torch.Tensor:
    """The pointer passed for an absent mask tensor (never read)."""
    return torch.empty(16, dtype=torch.int32, device=device)


class CallGroups:
    """A Call (fastattn.backends.base) as the kernels take it: the MASKS, CU_SEQLENS and MODS
    groups (a dummy pointer where absent), the flags, the modifiers' scalars. Windows wider than any
    query-key distance are that distance, so the kernels' position sums stay far from int64's end."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, call):
        dummy = _dummy(q.device)
        key_padding, attn_mask, alibi_slopes, sinks = call.key_padding, call.attn_mask, call.alibi_slopes, call.sinks
        self.has_kpm = key_padding is not None
        self.varlen = call.cu_seqlens_q is not None
        self.cu_q = call.cu_seqlens_q if self.varlen else dummy
        self.cu_k = call.cu_seqlens_k if self.varlen else dummy
        self.ranges = call.key_ranges if self.has_kpm else dummy
        if self.has_kpm and key_padding.stride(1) != 1 and key_padding.shape[1] > 1:
            key_padding = key_padding.contiguous()  # the kernels read each row's keys in one run
        self.kpm = key_padding.view(torch.uint8) if self.has_kpm else dummy
        self.kpm_stride = key_padding.stride(0) if self.has_kpm else 0
        self.kind = 0 if attn_mask is None else (1 if attn_mask.dtype == torch.bool else 2)
        self.mask = dummy if attn_mask is None else (attn_mask.view(torch.uint8) if self.kind == 1 else attn_mask)
        self.mask_strides = (0, 0, 0, 0) if attn_mask is None else attn_mask.stride()
        widest = q.shape[2] + k.shape[2]
        self.window = (min(call.window_left, widest), min(call.window_right, widest))
        self.softcap, self.bottom_right = call.softcap, call.bottom_right
        self.alibi = dummy if alibi_slopes is None else alibi_slopes.contiguous()
        self.alibi_stride = alibi_slopes.shape[1] if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
        self.sinks = dummy if sinks is None else sinks.contiguous()
        self.has_alibi, self.has_sinks = alibi_slopes is not None, sinks is not None
        # the kernels' groups
        self.masks = (self.ranges, self.kpm, self.mask, self.kpm_stride, *self.mask_strides)
        self.cu_seqlens = (self.cu_q, self.cu_k)
        self.mods = (self.alibi, self.sinks)
        self.cap = float(call.softcap) * LOG2E  # in log2 units

    def scalars(self):
        """window_left, window_right, alibi_stride: the kernels' integer arguments for the modifiers."""
        return (*self.window, self.alibi_stride)

    def mod_flags(self):
        """WINDOW, SOFTCAP, HAS_ALIBI, HAS_SINKS, BOTTOM_RIGHT."""
        return max(self.window) >= 0, self.softcap > 0, self.has_alibi, self.has_sinks, self.bottom_right


class Flags(NamedTuple):
    """The constexprs of the attention kernels, in their order; BLOCK_M and BLOCK_N follow."""
    D: int
    HAS_KPM: bool
    MASK_KIND: int  # 0 none, 1 bool, 2 float attn_mask
    VARLEN: bool
    CAUSAL: bool
    DROPOUT: bool
    PREC: str
    WINDOW: bool
    SOFTCAP: bool
    HAS_ALIBI: bool
    HAS_SINKS: bool
    BOTTOM_RIGHT: bool
    BLOCK_D: int


def _rows(t: torch.Tensor, varlen: bool) -> tuple:
    """The group of a (B, H, N, D) tensor whose rows of D are contiguous: (t, batch, head and row
    strides); a packed one's single batch row serves every sequence."""
    sb, sh, sm, _ = t.stride()
    return t, 0 if varlen else sb, sh, sm


def _heads(varlen: bool, t: torch.Tensor, *more: torch.Tensor) -> tuple:
    """The group of tensors laid out as t, by (batch, head): (t, *more, batch and head strides)."""
    return t, *more, 0 if varlen else t.stride(0), t.stride(1)


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t itself when each of its rows of D is contiguous, as the kernels read them (the usual
    layouts, packed projections included); else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    """The dots' precision for fp32 operands. By default 3xTF32 ("tf32x3": three TF32 products
    per dot, fp32's error at tensor-core speed; tests/test_gpu.py holds it to the fp32 bound).
    TF32 where the user opted into it through torch's switch for CUDA matmuls
    (torch.backends.cuda.matmul.fp32_precision = "tf32", which the global fp32_precision,
    allow_tf32 and set_float32_matmul_precision("high") also set; reading allow_tf32 itself
    raises once the new settings are in use). IEEE fp32 dots where asked for: that switch set
    to "ieee" (set_float32_matmul_precision("highest") does), or FASTATTN_FP32_DOTS=ieee. Read
    at each call, outside anything torch.compile traces."""
    if INTERPRETING and dtype == torch.bfloat16:
        return "upcast"
    if dtype != torch.float32:
        return "tf32"  # ignored for 16-bit operands
    if FP32_DOTS not in ("3xtf32", "ieee"):
        raise ValueError(f"FASTATTN_FP32_DOTS: expected '3xtf32' or 'ieee', got {FP32_DOTS!r}")
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        torch_choice = matmul.fp32_precision  # "none" until set
    else:
        torch_choice = "tf32" if matmul.allow_tf32 else "none"
    if torch_choice == "tf32":
        return "tf32"
    return "ieee" if torch_choice == "ieee" or FP32_DOTS == "ieee" else "tf32x3"


# triton.cdiv and triton.next_power_of_2, without their wrapping as constexpr functions (~2 us a call)
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 1


def block_d(D: int) -> int:
    return max(16, next_pow2(D))


_FWD = Launcher(_fwd_kernel)
_PREPROCESS = Launcher(_bwd_preprocess)
_DKDV = Launcher(_bwd_dkdv_kernel)
_DQ = Launcher(_bwd_dq_kernel)
_CONFIGS: dict[tuple, tuning.Config] = {}  # (kernel, dtype, Nq, Nk, flags) -> the tuner's answer


def _tuning_key(name: str, flags: Flags, nq: int, nk: int, dtype: torch.dtype) -> str:
    kind = tuning.mask_kind(flags.CAUSAL, flags.HAS_KPM or flags.VARLEN, flags.MASK_KIND, flags.DROPOUT,
                            flags.WINDOW or flags.SOFTCAP or flags.HAS_ALIBI)
    return tuning.make_key(name, tuning.dtype_name(dtype, flags.PREC), flags.BLOCK_D, kind, nq, nk)


def _launch(launcher: Launcher, name: str, grid, args: tuple, flags: Flags, nq: int, nk: int,
            dtype: torch.dtype):
    """Launches with the configuration fastattn.triton.tuning picks for this call, asked once
    per call signature; grid(BLOCK_M, BLOCK_N) -> the launch grid."""
    def run(config):
        m, n, warps, stages = config
        launcher(grid(m, n), args, (*flags, m, n), warps, stages)

    tuner = tuning.TUNER
    if INTERPRETING:
        return run(tuner.force.get(name, tuning.INTERPRETER_CONFIG))
    memo = (name, dtype, nq, nk, flags)
    config = None if tuner.force else _CONFIGS.get(memo)
    if config is not None:
        return run(config)

    def bench(config):
        try:
            return tuning.time_ms(lambda: run(config))
        except OutOfResources:  # too large for this dtype and head dim: not a candidate
            return math.inf

    key = _tuning_key(name, flags, nq, nk, dtype)
    config = tuner.config(key, name, flags.BLOCK_D, nq, bench)
    while True:
        try:
            run(config)
            break
        except OutOfResources:  # e.g. fp32 tiles at D = 128 (the shipped defaults are 16-bit ones)
            if name in tuner.force:
                raise  # the sweep and the tests time or check exactly the config they forced
            config = tuner.next_candidate(key, name, flags.BLOCK_D, config)
    if not tuner.force:
        if len(_CONFIGS) >= 4096:
            _CONFIGS.clear()
        _CONFIGS[memo] = config


def dropout_keep_mask(seed: int, B: int, H: int, Nq: int, Nk: int, p: float, device) -> torch.Tensor:
    keep = torch.empty(B, H, Nq, Nk, dtype=torch.int8, device=device)
    _dropout_mask_kernel[(cdiv(Nq, 32), cdiv(Nk, 32), B * H)](keep, H, Nq, Nk, p, seed, 32, 32)
    return keep.bool()


def _batch_and_lengths(q, k, call) -> tuple[int, int, int]:
    """(B, Nq, Nk): the tensors' own, or for packed sequences their count and the longest."""
    if call.cu_seqlens_q is not None:
        return call.cu_seqlens_q.shape[0] - 1, call.max_seqlen_q, call.max_seqlen_k
    return q.shape[0], q.shape[2], k.shape[2]


def _flags(q, masks: CallGroups, call) -> Flags:
    D = q.shape[3]
    return Flags(D, masks.has_kpm, masks.kind, masks.varlen, call.causal, call.dropout_p > 0, dot_precision(q.dtype),
                 *masks.mod_flags(), block_d(D))


def _fwd_args(q, k, v, out, lse, masks: CallGroups, B: int, Nq: int, Nk: int, scale: float, dropout_p: float,
              seed: int) -> tuple:
    """_fwd_kernel's arguments before its constexprs."""
    H, vl = q.shape[1], masks.varlen
    return (_rows(q, vl), _rows(k, vl), _rows(v, vl), _rows(out, vl), _heads(vl, lse), masks.masks,
            masks.cu_seqlens, masks.mods, (scale * LOG2E, scale, float(dropout_p), masks.cap), B, H, Nq, Nk,
            H // k.shape[1], seed, *masks.scalars())


def _bwd_args(grads: tuple, q, k, v, dout, lse, delta, masks: CallGroups, B: int, Nq: int, Nk: int, scale: float,
              dropout_p: float, seed: int) -> tuple:
    """_bwd_dkdv_kernel's (grads: (dk, dv)) or _bwd_dq_kernel's (grads: (dq,)) arguments before their
    constexprs."""
    H, vl = q.shape[1], masks.varlen
    return (_rows(q, vl), _rows(k, vl), _rows(v, vl), _rows(dout, vl), _heads(vl, lse, delta), _heads(vl, *grads),
            masks.masks, masks.cu_seqlens, masks.mods, (scale * LOG2E, scale, float(dropout_p), masks.cap), B, H,
            Nq, Nk, H // k.shape[1], seed, *masks.scalars())


def forward(q, k, v, out, lse, call) -> None:
    """Writes out and lse of a Call (fastattn.backends.base); q, k, v and out with contiguous rows
    of D (rows_contiguous)."""
    B, Nq, Nk = _batch_and_lengths(q, k, call)
    H, masks = q.shape[1], CallGroups(q, k, call)
    _launch(_FWD, "fwd", lambda m, n: (cdiv(Nq, m) * B * H,),
            _fwd_args(q, k, v, out, lse, masks, B, Nq, Nk, call.scale, call.dropout_p, call.seed),
            _flags(q, masks, call), Nq, Nk, q.dtype)


def softmax_offsets(out, dout, lse, dlse=None, cu_q=None, B=None, Nq=None) -> torch.Tensor:
    """delta = rowsum(dout * out) - dlse in lse's layout, the offset of each query row in the
    softmax backward. out and dout (B, H, Nq, D) with contiguous rows of D; with cu_q, packed
    sequences: B of them, the longest Nq."""
    vl = cu_q is not None
    H, D = out.shape[1], out.shape[3]
    B, Nq = (out.shape[0], out.shape[2]) if B is None else (B, Nq)
    delta = torch.empty_like(lse)
    block = 64
    _PREPROCESS((cdiv(Nq, block) * B * H,),
                (_rows(out, vl), _rows(dout, vl), _heads(vl, dlse if dlse is not None else lse, delta),
                 cu_q if vl else lse, H, Nq), (D, dlse is not None, vl, block_d(D), block), 4, 3)
    return delta


def backward(dout, dlse, q, k, v, out, lse, call, dq, dk, dv) -> None:
    """Writes dq, dk, dv of a Call: dout, q, k, v, out with contiguous rows of D; dq (B, H, Nq, D), dk
    and dv (B, Hkv, Nk, D), contiguous; dlse in lse's layout.

    Hidden pairs in the backward: with masks, q and k enter the kernels with their non-finite
    elements 0 (an elementwise pass each: zeroing them in the kernels' tiles spilled registers), p
    is 0 where hidden (a tainted row's NaN lse shifts by 0) and dS 0 where p is, so what a mask hides
    never meets dS K or dS^T Q as 0 * NaN. A tainted row still comes out NaN through its delta (its
    output or dO is). A NaN in dO may reach the dV of keys its row does not see (P^T dO: containing
    it spilled the dK/dV kernel's registers; README, "Non-finite inputs")."""
    H, Hkv, masks = q.shape[1], k.shape[1], CallGroups(q, k, call)
    B, Nq, Nk = _batch_and_lengths(q, k, call)
    flags = _flags(q, masks, call)
    delta = softmax_offsets(out, dout, lse, dlse, call.cu_seqlens_q, B, Nq)
    if flags.CAUSAL or flags.WINDOW or flags.HAS_KPM or flags.MASK_KIND:
        q, k = (torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in (q, k))
    scalars = (B, Nq, Nk, call.scale, call.dropout_p, call.seed)
    _launch(_DKDV, "dkdv", lambda m, n: (cdiv(Nk, n) * B * Hkv,),
            _bwd_args((dk, dv), q, k, v, dout, lse, delta, masks, *scalars), flags, Nq, Nk, q.dtype)
    _launch(_DQ, "dq", lambda m, n: (cdiv(Nq, m) * B * H,),
            _bwd_args((dq,), q, k, v, dout, lse, delta, masks, *scalars), flags, Nq, Nk, q.dtype)
