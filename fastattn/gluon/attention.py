"""Flash attention forward for Hopper (sm_90a) in Gluon: FlashAttention-3's warp-specialized design.

A producer partition of one warp streams K and V tiles by TMA into a ring of STAGES shared
buffers, each with a `ready` mbarrier (the TMA's bytes arrived) and an `empty` one (the consumers
are done with it), at 24 registers. The default partition is the consumers: one warpgroup per 64
queries (num_warps 4: one, 8: two), which run S = Q K^T and O += P V as asynchronous wgmma from
shared memory (P from registers), the online softmax in between, and release each stage as soon
as its P V is issued and waited. The producer loads each query tile's Q too, once the consumers
have released the last one (a `q_ready` / `q_empty` pair), so that on a persistent grid (a program
per SM, taking the query tiles in turn, causal ones costliest first) the next tile's loads run
under this one's epilogue. Tiles past the causal diagonal are never loaded, and with a padding
mask neither are the tiles outside each row's valid keys.

Rows of D are read through 2-D TMA descriptors over the tensor's storage, (rows, row stride):
sequence row n of (batch b, head h) is row (b sb + h sh) // sm + n, at column (b sb + h sh) % sm,
which serves the (B, H, N, D) and (B, N, H, D) layouts and q, k, v sliced out of one projection.
A tile that runs past a sequence reads the next rows of the same tensor, another sequence's (views
with unused rows between sequences are copied first), or TMA's zeros past its end: their scores
are masked to -inf, their output rows not stored.

No interpreter runs Gluon: this compiles here (`python -m fastattn report`), and is proven on a
GPU by benchmarks/gpu_check.sh (tests/test_gluon.py, each variant in its own process).
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)

# triton 3.6 names the TMA copies async_copy_global_to_shared; 3.7+ async_load (3.9 removed the old)
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

LOG2E = 1.4426950408889634
# Integers the JIT must not specialize on (divisible by 16, equal to 1): lengths, counts and the
# input strides, which only feed scalar arithmetic and TMA coordinates, so that one kernel serves
# every shape (the GPU check's small shapes compile what its timing then runs). The output strides
# stay specialized: they let the epilogue store 16 bytes at a time.
UNSPECIALIZED = ["B", "H", "Nq", "Nk", "group", "stride_kpb"] + [f"stride_{t}{d}" for t in "qkvd" for d in "bhm"]


@gluon.constexpr_function
def wgmma_layout(num_warps, columns):
    """The registers of a wgmma result, 16 rows a warp (a warpgroup per 64 rows) by `columns`."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, columns, 16])


@gluon.jit
def _tile_origin(b, h, stride_b, stride_h, stride_m):
    """(row, column) of sequence row 0 of (b, h) in the 2-D view of the storage."""
    base = b.to(gl.int64) * stride_b + h.to(gl.int64) * stride_h
    return (base // stride_m).to(gl.int32), (base % stride_m).to(gl.int32)


@gluon.jit
def _producer(k_desc, v_desc, k_smem, v_smem, ready, empty, k_row, k_col, v_row, v_col, t_lo, n_tiles, c0,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """K and V tile t_lo + j into the ring once the consumers have freed its stage; c0 + j counts
    the ring's loads over the program's earlier query tiles too (stage and phase)."""
    for j in range(n_tiles):
        c = c0 + j
        s = c % STAGES
        # the first pass over the ring finds every stage free: wait on the phase before it
        mbarrier.wait(empty.index(s), ((c // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        row = (t_lo + j) * BLOCK_N
        tma_load(k_desc, [k_row + row, k_col], ready.index(s), k_smem.index(s))
        tma_load(v_desc, [v_row + row, v_col], ready.index(s), v_smem.index(s))


@gluon.jit
def _key_range(KV_RANGES, b, B, Nk, HAS_KPM: gl.constexpr):
    """Batch row b's valid keys [kv_lo, kv_hi) and whether padding lies inside them (holes)."""
    kv_lo = 0
    kv_hi = Nk
    holes = 0
    if HAS_KPM:
        kv_lo = gl.load(KV_RANGES + b)
        kv_hi = gl.load(KV_RANGES + B + b)
        holes = gl.load(KV_RANGES + 2 * B + b)
    return kv_lo, kv_hi, holes


@gluon.jit
def _query_tile(t, tiles, H, KV_RANGES, B, Nk, CAUSAL: gl.constexpr, HAS_KPM: gl.constexpr, TILE: gl.constexpr,
                BLOCK_N: gl.constexpr):
    """Query tile t of the program's sequence: (start_m, b, h, kv_lo, kv_hi, holes, t_lo, n_tiles),
    its key tiles t_lo .. t_lo + n_tiles. Causal tiles come costliest first (the last query tile
    of every head, then the one before), so that a persistent grid ends on short tiles."""
    if CAUSAL:
        bh = t % (B * H)
        start_m = (tiles - 1 - t // (B * H)) * TILE
    else:
        bh = t // tiles
        start_m = (t % tiles) * TILE  # a head's tiles in turn: its K and V stay in L2
    b = bh // H
    kv_lo, kv_hi, holes = _key_range(KV_RANGES, b, B, Nk, HAS_KPM)
    hi = kv_hi
    if CAUSAL:
        hi = gl.minimum(hi, start_m + TILE)  # both ping-pong consumers visit the same tiles: the turns pair up
    t_lo = kv_lo // BLOCK_N
    return start_m, b, bh % H, kv_lo, kv_hi, holes, t_lo, gl.maximum(gl.cdiv(hi, BLOCK_N) - t_lo, 0)


@gluon.jit
def _rounds(total, PERSISTENT: gl.constexpr):
    """How many query tiles a program takes in turn (at most): one without PERSISTENT."""
    if PERSISTENT:
        return gl.cdiv(total, gl.num_programs(0))
    else:
        return 1


@gluon.jit
def _round_tile(i, total, PERSISTENT: gl.constexpr):
    """The program's i-th query tile; on a persistent grid snaking over the programs (0 .. P-1,
    then P-1 .. 0), so that with the costliest tiles first each program's sum stays close to the
    others'; total where none is left."""
    pid = gl.program_id(0)
    if PERSISTENT:
        P = gl.num_programs(0)
        t = gl.minimum(i * P + gl.where(i % 2 == 0, pid, P - 1 - pid), total)
    else:
        t = pid
    return t


@gluon.jit
def _fwd_producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, ready, empty, KV_RANGES,
                  stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_km, stride_vb, stride_vh, stride_vm, B,
                  H, Nk, group, tiles, CAUSAL: gl.constexpr, HAS_KPM: gl.constexpr, PERSISTENT: gl.constexpr,
                  Q_TILES: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """One warp: for each of the program's query tiles, its Q once the consumers are done with the
    last one, then its K and V tiles through the ring."""
    total = tiles * B * H
    c = 0
    it = 0
    for i in range(_rounds(total, PERSISTENT)):
        t = _round_tile(i, total, PERSISTENT)
        if t < total:
            start_m, b, h, kv_lo, kv_hi, holes, t_lo, n_tiles = _query_tile(t, tiles, H, KV_RANGES, B, Nk, CAUSAL,
                                                                            HAS_KPM, Q_TILES * BLOCK_M, BLOCK_N)
            q_row, q_col = _tile_origin(b, h, stride_qb, stride_qh, stride_qm)
            k_row, k_col = _tile_origin(b, h // group, stride_kb, stride_kh, stride_km)
            v_row, v_col = _tile_origin(b, h // group, stride_vb, stride_vh, stride_vm)
            mbarrier.wait(q_empty, (it & 1) ^ 1)
            mbarrier.expect(q_ready, Q_TILES * q_desc.block_type.nbytes)
            for u in gl.static_range(Q_TILES):
                tma_load(q_desc, [q_row + start_m + u * BLOCK_M, q_col], q_ready, q_smem.index(u))
            _producer(k_desc, v_desc, k_smem, v_smem, ready, empty, k_row, k_col, v_row, v_col, t_lo, n_tiles, c,
                      BLOCK_N, STAGES)
            c += n_tiles
            it += 1


@gluon.jit
def _qk(q_smem, k_smem, ready, c, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        s_layout: gl.constexpr):
    """Issues S = Q K^T (asynchronous) once the ring's c-th tile has landed."""
    s = c % STAGES
    mbarrier.wait(ready.index(s), (c // STAGES) & 1)
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    return warpgroup_mma(q_smem, k_smem.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)


@gluon.jit
def _keep(offs_m, offs_n, kv_lo, kv_hi, holes, kpm_row, Nk, CAUSAL: gl.constexpr, HAS_KPM: gl.constexpr):
    """Whether query offs_m sees key offs_n: inside the row's valid keys [kv_lo, kv_hi) (all keys
    without a padding mask), not at scattered padding inside them, not above the diagonal."""
    keep = gl.expand_dims((offs_n >= kv_lo) & (offs_n < kv_hi), 0)
    if HAS_KPM:
        if holes != 0:
            pad = gl.load(kpm_row + offs_n, mask=offs_n < Nk, other=1)
            keep = keep & gl.expand_dims(pad == 0, 0)
    if CAUSAL:
        keep = keep & (gl.expand_dims(offs_m, 1) >= gl.expand_dims(offs_n, 0))
    return keep


@gluon.jit
def _zero_nonfinite(tile, ROWS: gl.constexpr, D: gl.constexpr, num_warps: gl.constexpr):
    """Zeroes the non-finite elements of a [ROWS, D] shared tile in place, fenced for the wgmma
    that reads it next. Issue 36's non-finite policy (the backward's masked tiles): hidden pairs get p = 0 and dS = 0
    by selects, and this keeps the products from making 0 * NaN of a hidden key's or query's
    element."""
    COLS: gl.constexpr = 16  # columns at a time: fewer live registers
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [256 // COLS, COLS // 8], [num_warps, 1], [1, 0])
    for c in gl.static_range(D // COLS):
        part = tile.slice(c * COLS, COLS, dim=1)
        x = part.load(layout)
        finite = gl.abs(x.to(gl.float32)) < float("inf")  # False for NaN too
        part.store(gl.where(finite, x, gl.zeros_like(x)))
    fence_async_shared()


@gluon.jit
def _masked(scores, offs_m, offs_n, kv_lo, kv_hi, holes, kpm_row, Nk, CAUSAL: gl.constexpr,
            HAS_KPM: gl.constexpr):
    """-inf where a query may not see a key (_keep), by a select: a hidden NaN stays out."""
    return gl.where(_keep(offs_m, offs_n, kv_lo, kv_hi, holes, kpm_row, Nk, CAUSAL, HAS_KPM), scores, float("-inf"))


@gluon.jit
def _softmax(scores, j, m_i, l_i, acc, start_m, offs_m, kv_lo, kv_hi, holes, kpm_row, Nk, t_lo, qk_scale,
             dtype: gl.constexpr, CAUSAL: gl.constexpr, HAS_KPM: gl.constexpr, BLOCK_N: gl.constexpr,
             p_layout: gl.constexpr, o_layout: gl.constexpr, cols: gl.constexpr):
    """Tile j's online-softmax update: (m, l, acc rescaled, P as the P V wgmma's operand). Only
    a tile that straddles a range end or the diagonal, or holds scattered padding, is masked."""
    n0 = (t_lo + j) * BLOCK_N
    masked = scores * qk_scale
    edge = (n0 < kv_lo) | (n0 + BLOCK_N > kv_hi) | (holes != 0)
    if CAUSAL:
        edge = edge | (n0 + BLOCK_N - 1 > start_m)
    if edge:
        offs_n = n0 + gl.arange(0, BLOCK_N, layout=cols)
        masked = _masked(masked, offs_m, offs_n, kv_lo, kv_hi, holes, kpm_row, Nk, CAUSAL, HAS_KPM)
    m_new = gl.maximum(m_i, gl.max(masked, axis=1))
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays 0
    p = gl.exp2(masked - gl.expand_dims(m_use, 1))
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
    return m_new, l_i, acc, gl.convert_layout(p.to(dtype), p_layout)


@gluon.jit
def _attend(q_smem, k_smem, v_smem, q_empty, ready, empty, turn_mine, turn_other, O, LSE, KPM, b, h, stride_ob,
            stride_oh, stride_om, stride_kpb, H, start_m, Nq, Nk, kv_lo, kv_hi, holes, t_lo, n_tiles, c0, qk_scale,
            CAUSAL: gl.constexpr,
            HAS_KPM: gl.constexpr, OVERLAP: gl.constexpr, PINGPONG: gl.constexpr, WG: gl.constexpr,
            BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
            num_warps: gl.constexpr):
    """The online softmax of BLOCK_M queries (their Q landed) over their key tiles, the ring's
    c0-th load on; releases Q, then stores the output and lse. With OVERLAP, tile j + 1's Q K^T
    is issued before tile j's softmax, so the tensor cores work while it runs (FA3's
    intra-warpgroup overlap). With PINGPONG, consumer WG (0 or 1) of two takes turns with the
    other to issue its wgmma (a token passed on the turn mbarriers), so one's softmax runs while
    the other's products occupy the tensor cores (FA3's ping-pong)."""
    s_layout: gl.constexpr = wgmma_layout(num_warps, BLOCK_N)
    o_layout: gl.constexpr = wgmma_layout(num_warps, D)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    cols: gl.constexpr = gl.SliceLayout(0, s_layout)
    dtype: gl.constexpr = v_smem.dtype

    offs_m = start_m + gl.arange(0, BLOCK_M, layout=rows)
    kpm_row = KPM + b.to(gl.int64) * stride_kpb
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=rows)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=rows)
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)
    if OVERLAP:
        if n_tiles > 0:
            scores = warpgroup_mma_wait(num_outstanding=0, deps=(
                _qk(q_smem, k_smem, ready, c0, BLOCK_M, BLOCK_N, STAGES, s_layout), ))
            for j in range(n_tiles - 1):
                following = _qk(q_smem, k_smem, ready, c0 + j + 1, BLOCK_M, BLOCK_N, STAGES, s_layout)
                m_i, l_i, acc, p = _softmax(scores, j, m_i, l_i, acc, start_m, offs_m, kv_lo, kv_hi, holes, kpm_row,
                                            Nk, t_lo, qk_scale, dtype, CAUSAL, HAS_KPM, BLOCK_N, p_layout, o_layout,
                                            cols)
                acc = warpgroup_mma(p, v_smem.index((c0 + j) % STAGES), acc, is_async=True)
                acc, scores = warpgroup_mma_wait(num_outstanding=0, deps=(acc, following))
                mbarrier.arrive(empty.index((c0 + j) % STAGES), count=1)
            last = n_tiles - 1
            m_i, l_i, acc, p = _softmax(scores, last, m_i, l_i, acc, start_m, offs_m, kv_lo, kv_hi, holes, kpm_row,
                                        Nk, t_lo, qk_scale, dtype, CAUSAL, HAS_KPM, BLOCK_N, p_layout, o_layout, cols)
            acc = warpgroup_mma(p, v_smem.index((c0 + last) % STAGES), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index((c0 + last) % STAGES), count=1)
    else:
        for j in range(n_tiles):
            # The turns alternate strictly, Q K^T then P V, so the k-th wait of consumer 1 is for
            # the k-th release of consumer 0, and consumer 0's first wait passes at once.
            if PINGPONG:
                mbarrier.wait(turn_mine, 1 - WG)
            scores = _qk(q_smem, k_smem, ready, c0 + j, BLOCK_M, BLOCK_N, STAGES, s_layout)
            if PINGPONG:
                mbarrier.arrive(turn_other, count=1)
            scores = warpgroup_mma_wait(num_outstanding=0, deps=(scores, ))
            m_i, l_i, acc, p = _softmax(scores, j, m_i, l_i, acc, start_m, offs_m, kv_lo, kv_hi, holes, kpm_row, Nk,
                                        t_lo, qk_scale, dtype, CAUSAL, HAS_KPM, BLOCK_N, p_layout, o_layout, cols)
            if PINGPONG:
                mbarrier.wait(turn_mine, WG)
            acc = warpgroup_mma(p, v_smem.index((c0 + j) % STAGES), acc, is_async=True)
            if PINGPONG:
                mbarrier.arrive(turn_other, count=1)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index((c0 + j) % STAGES), count=1)
    mbarrier.arrive(q_empty, count=1)  # the producer may load the next tile's Q

    seen = l_i != 0.0  # False: the row sees no key: zeros and lse = -inf; NaN (a tainted row): NaN
    l_o = gl.convert_layout(gl.where(seen, l_i, 1.0), gl.SliceLayout(1, o_layout))
    out = acc / gl.expand_dims(l_o, 1)
    o_rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    o_cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    o_row_ptr = O + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
    o_ptrs = o_row_ptr + gl.expand_dims(o_rows.to(gl.int64) * stride_om, 1) + gl.expand_dims(o_cols, 0)
    gl.store(o_ptrs, out.to(O.dtype.element_ty), mask=gl.expand_dims(o_rows < Nq, 1))
    lse = gl.where(seen, (m_i + gl.log2(gl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    gl.store(LSE + (b * H + h).to(gl.int64) * Nq + offs_m, lse, mask=offs_m < Nq)


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, q_ready, q_empty, ready, empty, turn_mine, turn_other, O, LSE, KV_RANGES, KPM,
              stride_ob, stride_oh, stride_om, stride_kpb, B, H, Nq, Nk, tiles, qk_scale, CAUSAL: gl.constexpr,
              HAS_KPM: gl.constexpr, PERSISTENT: gl.constexpr, OVERLAP: gl.constexpr, PINGPONG: gl.constexpr,
              WG: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
              num_warps: gl.constexpr):
    """Consumer WG's BLOCK_M queries of each of the program's query tiles, in the producer's order."""
    TILE: gl.constexpr = 2 * BLOCK_M if PINGPONG else BLOCK_M
    total = tiles * B * H
    c = 0
    it = 0
    for i in range(_rounds(total, PERSISTENT)):
        t = _round_tile(i, total, PERSISTENT)
        if t < total:
            start_m, b, h, kv_lo, kv_hi, holes, t_lo, n_tiles = _query_tile(t, tiles, H, KV_RANGES, B, Nk, CAUSAL,
                                                                            HAS_KPM, TILE, BLOCK_N)
            mbarrier.wait(q_ready, it & 1)
            _attend(q_smem, k_smem, v_smem, q_empty, ready, empty, turn_mine, turn_other, O, LSE, KPM, b, h,
                    stride_ob, stride_oh, stride_om, stride_kpb, H, start_m + WG * BLOCK_M, Nq, Nk, kv_lo, kv_hi,
                    holes, t_lo, n_tiles, c, qk_scale, CAUSAL, HAS_KPM, OVERLAP, PINGPONG, WG, BLOCK_M, BLOCK_N, D,
                    STAGES, num_warps)
            c += n_tiles
            it += 1


@gluon.jit(do_not_specialize=[n for n in UNSPECIALIZED if n not in ("stride_db", "stride_dh", "stride_dm")])
def fwd_kernel(q_desc, k_desc, v_desc, O, LSE, KV_RANGES, KPM, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh,
               stride_km, stride_vb, stride_vh, stride_vm, stride_ob, stride_oh, stride_om, stride_kpb, B, H, Nq, Nk,
               group, qk_scale, CAUSAL: gl.constexpr, HAS_KPM: gl.constexpr, PERSISTENT: gl.constexpr,
               OVERLAP: gl.constexpr, PINGPONG: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
               D: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """A program per query tile of the cdiv(Nq, tile) x B x H (_query_tile); with PERSISTENT,
    fewer programs each taking several in turn (_round_tile), whose producer loads the next tile's
    Q and K/V while the consumers store the last one. qk_scale in log2 units. With
    HAS_KPM, KV_RANGES (3, B) int32 holds each row's valid keys [begin, end) and whether padding
    lies inside them (fastattn.masks.key_ranges), KPM the (B, Nk) padding mask as bytes: key tiles
    outside the range are never loaded. With PINGPONG a tile is two of BLOCK_M queries, one per
    consumer warpgroup (num_warps each), which read the same K/V stages."""
    Q_TILES: gl.constexpr = 2 if PINGPONG else 1
    tiles = gl.cdiv(Nq, Q_TILES * BLOCK_M)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [Q_TILES] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)
    mbarrier.init(q_empty, count=Q_TILES)  # each consumer releases its Q
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=Q_TILES)  # each consumer releases a stage
    for t in gl.static_range(2):
        mbarrier.init(turns.index(t), count=1)

    if PINGPONG:
        gl.warp_specialize([
            (_consumer, (q_smem.index(0), k_smem, v_smem, q_ready, q_empty, ready, empty, turns.index(0),
                         turns.index(1), O, LSE, KV_RANGES, KPM, stride_ob, stride_oh, stride_om, stride_kpb, B, H, Nq,
                         Nk, tiles, qk_scale, CAUSAL, HAS_KPM, PERSISTENT, False, True, 0, BLOCK_M, BLOCK_N, D, STAGES,
                         num_warps)),
            (_consumer, (q_smem.index(1), k_smem, v_smem, q_ready, q_empty, ready, empty, turns.index(1),
                         turns.index(0), O, LSE, KV_RANGES, KPM, stride_ob, stride_oh, stride_om, stride_kpb, B, H, Nq,
                         Nk, tiles, qk_scale, CAUSAL, HAS_KPM, PERSISTENT, False, True, 1, BLOCK_M, BLOCK_N, D, STAGES,
                         num_warps)),
            (_fwd_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, ready, empty,
                             KV_RANGES, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_km, stride_vb,
                             stride_vh, stride_vm, B, H, Nk, group, tiles, CAUSAL, HAS_KPM, PERSISTENT, Q_TILES, BLOCK_M, BLOCK_N,
                             STAGES)),
        ], [num_warps, 1], [240, 24])
    else:
        gl.warp_specialize([
            (_consumer, (q_smem.index(0), k_smem, v_smem, q_ready, q_empty, ready, empty, turns.index(0),
                         turns.index(1), O, LSE, KV_RANGES, KPM, stride_ob, stride_oh, stride_om, stride_kpb, B, H, Nq,
                         Nk, tiles, qk_scale, CAUSAL, HAS_KPM, PERSISTENT, OVERLAP, False, 0, BLOCK_M, BLOCK_N, D, STAGES,
                         num_warps)),
            (_fwd_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, ready, empty,
                             KV_RANGES, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_km, stride_vb,
                             stride_vh, stride_vm, B, H, Nk, group, tiles, CAUSAL, HAS_KPM, PERSISTENT, Q_TILES, BLOCK_M, BLOCK_N,
                             STAGES)),
        ], [1], [24])
    mbarrier.invalidate(q_ready)
    mbarrier.invalidate(q_empty)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))
        mbarrier.invalidate(empty.index(s))
    for t in gl.static_range(2):
        mbarrier.invalidate(turns.index(t))
