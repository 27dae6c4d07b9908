"""Flash attention backward for Hopper (sm_90a) in Gluon, in the forward's warp-specialized design.

Two kernels, as fastattn's Triton backward, so that no gradient is accumulated by atomics and the
result is deterministic (FA3 instead adds dQ up with atomics; two kernels recompute Q K^T and
dO V^T once more, 7 products a tile instead of 5):
- dK, dV of one key tile of one kv head (`dkdv_kernel`): K and V stay in shared memory while a
  one-warp producer streams the tiles of Q and dO, of every query head of the GQA group and every
  query tile that sees these keys, through a ring of STAGES buffers. The consumers compute the
  transposed products, S^T = K Q^T and dP^T = V dO^T (keys are the rows of the wgmma), so that
  P^T and dS^T come out of registers as the A operand of dV += P^T dO and dK += dS^T Q.
- dQ of one query tile (`dq_kernel`): the forward's loop with its producer, dQ += dS K.
Both use delta = rowsum(dO * O) - dlse (fastattn.triton.attention.softmax_offsets). Tiles are
masked only where they straddle a range end or the diagonal or hold scattered padding; a query
row past Nq (a tile reads on into the next rows of the storage) gets lse = +inf, so P = 0 there.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from .attention import (UNSPECIALIZED, _keep, _key_range, _producer, _tile_origin, _zero_nonfinite, tma_load,
                        wgmma_layout)


@gluon.jit
def _row_stats(LSE, DELTA, row, offs, Nq):
    """lse in log2 units (+inf where the row has no key or lies past Nq: P = 0 there) and delta."""
    lse2 = gl.load(LSE + row + offs, mask=offs < Nq, other=float("inf")) * 1.4426950408889634
    lse2 = gl.where(lse2 == float("-inf"), float("inf"), lse2)
    return lse2, gl.load(DELTA + row + offs, mask=offs < Nq, other=0.0)


@gluon.jit
def _q_tile(i, n_m, first_m, BLOCK_M: gl.constexpr):
    """Step i of a dK/dV program: (query head of the group, first query of the tile)."""
    return i // n_m, first_m + (i % n_m) * BLOCK_M


@gluon.jit
def _dkdv_producer(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready, empty, b, h0,
                   stride_qb, stride_qh, stride_qm, stride_db, stride_dh, stride_dm, k_row, k_col, v_row, v_col,
                   start_n, first_m, n_m, n_steps, BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
    """One warp: the key tile's K and V once, then Q and dO of step i into stage i % STAGES."""
    if n_steps > 0:
        mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma_load(k_desc, [k_row + start_n, k_col], kv_bar, k_smem)
        tma_load(v_desc, [v_row + start_n, v_col], kv_bar, v_smem)
    for i in range(n_steps):
        s = i % STAGES
        g, start_m = _q_tile(i, n_m, first_m, BLOCK_M)
        q_row, q_col = _tile_origin(b, h0 + g, stride_qb, stride_qh, stride_qm)
        d_row, d_col = _tile_origin(b, h0 + g, stride_db, stride_dh, stride_dm)
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)  # the ring's first pass finds it free
        mbarrier.expect(ready.index(s), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        tma_load(q_desc, [q_row + start_m, q_col], ready.index(s), q_smem.index(s))
        tma_load(do_desc, [d_row + start_m, d_col], ready.index(s), do_smem.index(s))


@gluon.jit
def _dkdv_consumer(q_smem, do_smem, k_smem, v_smem, kv_bar, ready, empty, DK, DV, LSE, DELTA, kpm_row, bh0,
                   stride_gm, Nq, Nk, start_n, kv_lo, kv_hi, holes, first_m, n_m, n_steps, qk_scale, sm_scale,
                   CAUSAL: gl.constexpr, HAS_KPM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   D: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """dK and dV of BLOCK_N keys (16 a warp) over the steps' query tiles; stores them (rows < Nk).
    DK, DV point at the (b, kv head) rows, lse and delta rows of query head h at (bh0 + h) Nq."""
    s_layout: gl.constexpr = wgmma_layout(num_warps, BLOCK_M)
    g_layout: gl.constexpr = wgmma_layout(num_warps, D)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=g_layout, k_width=2)
    keys: gl.constexpr = gl.SliceLayout(1, s_layout)
    queries: gl.constexpr = gl.SliceLayout(0, s_layout)
    dtype: gl.constexpr = k_smem.dtype

    offs_n = start_n + gl.arange(0, BLOCK_N, layout=keys)
    keep_n = (offs_n >= kv_lo) & (offs_n < kv_hi)
    if HAS_KPM:
        if holes != 0:
            keep_n = keep_n & (gl.load(kpm_row + offs_n, mask=offs_n < Nk, other=1) == 0)
    key_edge = (start_n < kv_lo) | (start_n + BLOCK_N > kv_hi) | (holes != 0)
    zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=s_layout)
    dk = gl.zeros([BLOCK_N, D], gl.float32, layout=g_layout)
    dv = gl.zeros([BLOCK_N, D], gl.float32, layout=g_layout)
    if n_steps > 0:
        mbarrier.wait(kv_bar, 0)
    for i in range(n_steps):
        s = i % STAGES
        g, start_m = _q_tile(i, n_m, first_m, BLOCK_M)
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        st = warpgroup_mma(k_smem, q_smem.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
        dpt = warpgroup_mma(v_smem, do_smem.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
        offs_m = start_m + gl.arange(0, BLOCK_M, layout=queries)
        lse2, delta = _row_stats(LSE, DELTA, (bh0 + g).to(gl.int64) * Nq, offs_m, Nq)
        st, dpt = warpgroup_mma_wait(num_outstanding=0, deps=(st, dpt))
        pt = gl.exp2(st * qk_scale - gl.expand_dims(lse2, 0))
        dst = pt * (dpt - gl.expand_dims(delta, 0))
        edge = key_edge
        if CAUSAL:
            edge = edge | (start_m < start_n + BLOCK_N - 1)
        if edge:
            # Issue 36's non-finite policy: selects, not 0 times (a hidden pair's s, dP, lse or
            # delta may be NaN), Q and dO zeroed where non-finite for dK and dV, and P^T NaN where
            # the query's delta is not finite (its dO, or O or dlse, holds a non-finite element),
            # so that a seen NaN in dO still reaches dV.
            keep = gl.expand_dims(keep_n, 1)
            if CAUSAL:
                keep = keep & (gl.expand_dims(offs_m, 0) >= gl.expand_dims(offs_n, 1))
            row_finite = gl.expand_dims(gl.abs(delta) < float("inf"), 0)
            pt = gl.where(keep, gl.where(row_finite, pt, float("nan")), 0.0)
            dst = gl.where(keep, dst, 0.0)
            _zero_nonfinite(q_smem.index(s), BLOCK_M, D, num_warps)
            _zero_nonfinite(do_smem.index(s), BLOCK_M, D, num_warps)
        dv = warpgroup_mma(gl.convert_layout(pt.to(dtype), a_layout), do_smem.index(s), dv, is_async=True)
        dk = warpgroup_mma(gl.convert_layout(dst.to(dtype), a_layout), q_smem.index(s), dk, is_async=True)
        dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))
        mbarrier.arrive(empty.index(s), count=1)

    rows = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, g_layout))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, g_layout))
    at = gl.expand_dims(rows.to(gl.int64) * stride_gm, 1) + gl.expand_dims(cols, 0)
    stored = gl.expand_dims(rows < Nk, 1)
    gl.store(DK + at, (dk * sm_scale).to(DK.dtype.element_ty), mask=stored)
    gl.store(DV + at, dv.to(DV.dtype.element_ty), mask=stored)


@gluon.jit(do_not_specialize=UNSPECIALIZED)
def dkdv_kernel(q_desc, k_desc, v_desc, do_desc, DK, DV, LSE, DELTA, KV_RANGES, KPM, stride_qb, stride_qh, stride_qm,
                stride_kb, stride_kh, stride_km, stride_vb, stride_vh, stride_vm, stride_db, stride_dh, stride_dm,
                stride_gb, stride_gh, stride_gm, stride_kpb, B, H, Nq, Nk, group, qk_scale, sm_scale,
                CAUSAL: gl.constexpr, HAS_KPM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                D: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """One program per (key tile, batch x kv head), tiles fastest. dK and dV (B, Hkv, Nk, D) with
    rows of D contiguous, strides stride_g*; LSE and DELTA (B, H, Nq) contiguous; KV_RANGES and
    KPM as the forward's. A key tile outside its row's valid keys gets zeros without a load."""
    tiles = gl.cdiv(Nk, BLOCK_N)
    pid = gl.program_id(0)
    start_n = (pid % tiles) * BLOCK_N
    bhk = pid // tiles
    Hkv = H // group
    b, hk = bhk // Hkv, bhk % Hkv
    h0 = hk * group
    k_row, k_col = _tile_origin(b, hk, stride_kb, stride_kh, stride_km)
    v_row, v_col = _tile_origin(b, hk, stride_vb, stride_vh, stride_vm)
    kv_lo, kv_hi, holes = _key_range(KV_RANGES, b, B, Nk, HAS_KPM)
    first_m = 0
    if CAUSAL:
        first_m = (start_n // BLOCK_M) * BLOCK_M  # queries before start_n see none of these keys
    n_m = gl.cdiv(Nq - first_m, BLOCK_M)
    seen = (start_n + BLOCK_N > kv_lo) & (start_n < kv_hi) & (n_m > 0)
    n_steps = gl.where(seen, group * n_m, 0)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(do_desc.dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, v_desc.block_type.shape, v_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)

    grads = b.to(gl.int64) * stride_gb + hk.to(gl.int64) * stride_gh
    gl.warp_specialize([
        (_dkdv_consumer, (q_smem, do_smem, k_smem, v_smem, kv_bar, ready, empty, DK + grads, DV + grads, LSE, DELTA,
                          KPM + b.to(gl.int64) * stride_kpb, b * H + h0, stride_gm, Nq, Nk, start_n, kv_lo, kv_hi,
                          holes, first_m, n_m, n_steps, qk_scale, sm_scale, CAUSAL, HAS_KPM, BLOCK_M, BLOCK_N, D,
                          STAGES, num_warps)),
        (_dkdv_producer, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready, empty, b,
                          h0, stride_qb, stride_qh, stride_qm, stride_db, stride_dh, stride_dm, k_row, k_col, v_row,
                          v_col, start_n, first_m, n_m, n_steps, BLOCK_M, STAGES)),
    ], [1], [24])
    mbarrier.invalidate(kv_bar)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))
        mbarrier.invalidate(empty.index(s))


@gluon.jit
def _dq_consumer(q_smem, do_smem, k_smem, v_smem, q_bar, ready, empty, dq_row_ptr, LSE, DELTA, kpm_row, lse_row,
                 stride_gm, start_m, Nq, Nk, kv_lo, kv_hi, holes, t_lo, n_tiles, qk_scale, sm_scale,
                 CAUSAL: gl.constexpr, HAS_KPM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 D: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """dQ of BLOCK_M queries (16 a warp) over the key tiles the forward visited; stores it."""
    s_layout: gl.constexpr = wgmma_layout(num_warps, BLOCK_N)
    g_layout: gl.constexpr = wgmma_layout(num_warps, D)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=g_layout, k_width=2)
    rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    cols: gl.constexpr = gl.SliceLayout(0, s_layout)
    dtype: gl.constexpr = k_smem.dtype

    offs_m = start_m + gl.arange(0, BLOCK_M, layout=rows)
    lse2, delta = _row_stats(LSE, DELTA, lse_row, offs_m, Nq)
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    dq = gl.zeros([BLOCK_M, D], gl.float32, layout=g_layout)
    mbarrier.wait(q_bar, 0)
    for j in range(n_tiles):
        s = j % STAGES
        mbarrier.wait(ready.index(s), (j // STAGES) & 1)
        st = warpgroup_mma(q_smem, k_smem.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
        dp = warpgroup_mma(do_smem, v_smem.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
        st, dp = warpgroup_mma_wait(num_outstanding=0, deps=(st, dp))
        n0 = (t_lo + j) * BLOCK_N
        p = gl.exp2(st * qk_scale - gl.expand_dims(lse2, 1))
        ds = p * (dp - gl.expand_dims(delta, 1))
        edge = (n0 < kv_lo) | (n0 + BLOCK_N > kv_hi) | (holes != 0)
        if CAUSAL:
            edge = edge | (n0 + BLOCK_N - 1 > start_m)
        if edge:
            # Issue 36's non-finite policy: a select, not 0 times (a hidden pair's s, dP, lse or
            # delta may be NaN), and K zeroed where non-finite for dQ += dS K.
            offs_n = n0 + gl.arange(0, BLOCK_N, layout=cols)
            ds = gl.where(_keep(offs_m, offs_n, kv_lo, kv_hi, holes, kpm_row, Nk, CAUSAL, HAS_KPM), ds, 0.0)
            _zero_nonfinite(k_smem.index(s), BLOCK_N, D, num_warps)
        dq = warpgroup_mma(gl.convert_layout(ds.to(dtype), a_layout), k_smem.index(s), dq, is_async=True)
        dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq, ))
        mbarrier.arrive(empty.index(s), count=1)

    o_rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, g_layout))
    o_cols = gl.arange(0, D, layout=gl.SliceLayout(0, g_layout))
    ptrs = dq_row_ptr + gl.expand_dims(o_rows.to(gl.int64) * stride_gm, 1) + gl.expand_dims(o_cols, 0)
    gl.store(ptrs, (dq * sm_scale).to(dq_row_ptr.dtype.element_ty), mask=gl.expand_dims(o_rows < Nq, 1))


@gluon.jit(do_not_specialize=UNSPECIALIZED)
def dq_kernel(q_desc, k_desc, v_desc, do_desc, DQ, LSE, DELTA, KV_RANGES, KPM, stride_qb, stride_qh, stride_qm,
              stride_kb, stride_kh, stride_km, stride_vb, stride_vh, stride_vm, stride_db, stride_dh, stride_dm,
              stride_gb, stride_gh, stride_gm, stride_kpb, B, H, Nq, Nk, group, qk_scale, sm_scale,
              CAUSAL: gl.constexpr, HAS_KPM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              D: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """One program per (query tile, batch x head), tiles fastest: Q and dO loaded once, the
    forward's producer streams K and V. DQ (B, H, Nq, D) with rows of D contiguous."""
    tiles = gl.cdiv(Nq, BLOCK_M)
    pid = gl.program_id(0)
    start_m = (pid % tiles) * BLOCK_M
    bh = pid // tiles
    b, h = bh // H, bh % H
    hk = h // group
    q_row, q_col = _tile_origin(b, h, stride_qb, stride_qh, stride_qm)
    d_row, d_col = _tile_origin(b, h, stride_db, stride_dh, stride_dm)
    k_row, k_col = _tile_origin(b, hk, stride_kb, stride_kh, stride_km)
    v_row, v_col = _tile_origin(b, hk, stride_vb, stride_vh, stride_vm)
    kv_lo, kv_hi, holes = _key_range(KV_RANGES, b, B, Nk, HAS_KPM)
    hi = kv_hi
    if CAUSAL:
        hi = gl.minimum(hi, start_m + BLOCK_M)
    t_lo = kv_lo // BLOCK_N
    n_tiles = gl.maximum(gl.cdiv(hi, BLOCK_N) - t_lo, 0)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(do_desc.dtype, do_desc.block_type.shape, do_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
    tma_load(q_desc, [q_row + start_m, q_col], q_bar, q_smem)
    tma_load(do_desc, [d_row + start_m, d_col], q_bar, do_smem)

    dq_row_ptr = DQ + b.to(gl.int64) * stride_gb + h.to(gl.int64) * stride_gh
    gl.warp_specialize([
        (_dq_consumer, (q_smem, do_smem, k_smem, v_smem, q_bar, ready, empty, dq_row_ptr, LSE, DELTA,
                        KPM + b.to(gl.int64) * stride_kpb, bh.to(gl.int64) * Nq, stride_gm, start_m, Nq, Nk, kv_lo,
                        kv_hi, holes, t_lo, n_tiles, qk_scale, sm_scale, CAUSAL, HAS_KPM, BLOCK_M, BLOCK_N, D,
                        STAGES, num_warps)),
        (_producer, (k_desc, v_desc, k_smem, v_smem, ready, empty, k_row, k_col, v_row, v_col, t_lo, n_tiles, 0,
                     BLOCK_N, STAGES)),
    ], [1], [24])
    mbarrier.invalidate(q_bar)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))
        mbarrier.invalidate(empty.index(s))
