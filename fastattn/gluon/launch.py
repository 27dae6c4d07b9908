"""Host side of the Gluon kernels: 2-D TMA descriptors over q, k, v's storage, the variants, the launches.

A variant is (consumer warps, K/V stages, key tile, overlap, ping-pong): 4 warps take 64 queries,
8 take 128 (two consumer warpgroups in step); overlap issues the next tile's QK^T before this
tile's softmax; ping-pong gives a program two 64-query tiles, one per consumer warpgroup, which
take turns on the tensor cores. Which one runs comes from fastattn/gluon/tuned.json, written by
benchmarks/gluon_check.py on a GPU with the fastest variant that passed its float64 check per
head dim; without it the backend declines (a kernel no GPU has checked may hang). The backward's
variants (BwdVariant) are chosen the same way, apart.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import NamedTuple

import torch

LOG2E = 1.4426950408889634
TUNED = Path(__file__).parent / "tuned.json"


class Variant(NamedTuple):
    warps: int  # consumer warps: 16 query rows each
    stages: int  # K/V buffers in the ring
    block_n: int  # keys a tile
    overlap: bool  # the next tile's QK^T in flight during this tile's softmax
    pingpong: bool = False  # two consumer warpgroups of `warps`, each its own query tile, taking turns
    persistent: bool = False  # a program per SM, taking query tiles in turn

    @property
    def block_m(self) -> int:
        """Queries a consumer takes."""
        return 16 * self.warps

    @property
    def tile_m(self) -> int:
        """Queries a program takes."""
        return self.block_m * (2 if self.pingpong else 1)

    @property
    def name(self) -> str:
        flags = f"{'o' if self.overlap else ''}{'p' if self.pingpong else ''}{'-persistent' if self.persistent else ''}"
        return f"w{self.warps}s{self.stages}n{self.block_n}{flags}"


# FA3's shape first (two consumer warpgroups, 128-key tiles, two stages, overlap), then its
# ping-pong, the first without the overlap, smaller ones, and on a persistent grid the ping-pong and
# the first without the overlap (with it, the tile loop's registers make it spill at D 128).
VARIANTS = [Variant(8, 2, 128, True), Variant(4, 2, 128, False, True), Variant(8, 2, 128, False),
            Variant(4, 2, 128, True), Variant(8, 3, 64, False), Variant(8, 2, 128, False, False, True),
            Variant(4, 2, 128, False, True, True)]


class BwdVariant(NamedTuple):
    """The backward's two kernels, each a one-warp producer and `warps` consumer warps: dK/dV
    takes 16 keys a warp and q_step queries a step; dQ 16 queries a warp and k_step keys a step."""
    warps: int
    stages: int  # Q/dO (dK/dV) and K/V (dQ) buffers in the ring
    q_step: int
    k_step: int

    @property
    def name(self) -> str:
        return f"w{self.warps}s{self.stages}q{self.q_step}k{self.k_step}"


# 32-query steps: with 64 the dK/dV consumers spill at D 128 (python -m fastattn report)
BWD_VARIANTS = [BwdVariant(8, 2, 32, 64), BwdVariant(4, 2, 32, 64), BwdVariant(8, 3, 32, 64)]
MAXNREG = 168  # registers a thread at launch; setmaxnreg moves them: 240 to the consumers, 24 to the producer


@functools.cache
def launched(variant: Variant, padded: bool) -> Variant:
    """The variant a call runs: with a padding mask the overlap, which keeps two score tiles
    live, spills (python -m fastattn report: at D 128, and on triton 3.6 at D 64 too), so padded
    calls run without it."""
    return variant._replace(overlap=False) if padded else variant


def default_variant(head_dim: int, backward: bool = False) -> Variant | BwdVariant | None:
    """The variant of the forward (or backward) a GPU check found fastest at this head dim, or None."""
    try:
        chosen = json.loads(TUNED.read_text()).get(f"{'bwd_' if backward else ''}d{head_dim}")
    except (OSError, ValueError):
        chosen = None
    return (BwdVariant if backward else Variant)(*chosen) if chosen else None


def storage_rows(t: torch.Tensor) -> torch.Tensor | None:
    """t (B, H, N, D) as a 2-D view of its storage with t's row stride, where sequence row n of
    (b, h) is row (b sb + h sh) // sm + n from column (b sb + h sh) % sm; its columns end at the
    last one a head uses (q, k, v sliced out of one projection stay inside their slice). None
    where the rows of some head would wrap around a row of the view (no TMA descriptor reads them),
    or where rows that belong to no sequence lie between them (a slice of a longer cache): a tile
    that runs past its sequence reads on into the next rows, which must hold real (finite) data,
    since a masked score's zero times a NaN there is still NaN."""
    B, H, N, D = t.shape
    sb, sh, sm, sd = t.stride()
    if sd != 1 or sm < D or sb % sm:
        return None
    if sh % sm == 0:  # each head a block of rows
        cols, block = D, N * sm
        if (H > 1 and sh != block) or (B > 1 and sb != H * block):
            return None
    elif sh >= D and (H - 1) * sh + D <= sm:  # the heads side by side in each row
        cols = (H - 1) * sh + D
        if B > 1 and sb != N * sm:
            return None
    else:
        return None
    rows = ((B - 1) * sb + (H - 1) * sh) // sm + N  # the last head's first row, and its N
    return t.as_strided((rows, cols), (sm, 1))


def tma_ready(t: torch.Tensor) -> bool:
    """What a TMA descriptor over storage_rows(t) needs: 16-byte aligned base and row stride."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and (t.stride(2) * size) % 16 == 0 and storage_rows(t) is not None


def _descriptor(t: torch.Tensor, rows: int):
    """A TMA descriptor over storage_rows(t), tiles of (rows, D)."""
    import triton.experimental.gluon.language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    D = t.shape[3]
    dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[t.dtype]
    layout = gl.NVMMASharedLayout.get_default_for([rows, D], dtype)
    return TensorDescriptor.from_tensor(storage_rows(t), [rows, D], layout)


def _padding_args(key_padding, key_ranges, lse):
    """(ranges, mask bytes, mask row stride) for the kernels; lse stands in (never read) without."""
    if key_padding is None:
        return lse, lse, 0
    if key_padding.stride(1) != 1 and key_padding.shape[1] > 1:
        key_padding = key_padding.contiguous()  # each row's keys read in one run
    return key_ranges, key_padding.view(torch.uint8), key_padding.stride(0)


@functools.cache
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def forward(q, k, v, out, lse, causal: bool, scale: float, key_padding=None, key_ranges=None,
            variant: Variant | None = None, programs: int | None = None) -> None:
    """q (B, H, Nq, D), k and v (B, Hkv, Nk, D) passing tma_ready; writes out (rows of D
    contiguous) and lse (B, H, Nq) contiguous. key_padding (B, Nk) bool with its key_ranges
    (fastattn.masks.key_ranges), or neither. A persistent variant runs `programs` programs (one
    per SM: 168 registers a thread leave room for one a SM)."""
    from .attention import fwd_kernel

    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    variant = variant or default_variant(D)
    if variant is None:
        raise RuntimeError(f"no Gluon variant has passed its check at D = {D} (benchmarks/gluon_check.py)")
    has_kpm = key_padding is not None
    variant = launched(variant, has_kpm)
    ranges, kpm, kpm_stride = _padding_args(key_padding, key_ranges, lse)
    tiles = -(-Nq // variant.tile_m) * B * H
    if variant.persistent:
        tiles = min(tiles, programs or _sm_count(q.get_device()))
    fwd_kernel[(tiles,)](_descriptor(q, variant.block_m), _descriptor(k, variant.block_n), _descriptor(v, variant.block_n),
                     out, lse, ranges, kpm, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                     kpm_stride, B, H, Nq, Nk, H // Hkv, scale * LOG2E, CAUSAL=causal, HAS_KPM=has_kpm,
                     PERSISTENT=variant.persistent, OVERLAP=variant.overlap, PINGPONG=variant.pingpong, BLOCK_M=variant.block_m,
                     BLOCK_N=variant.block_n, D=D, STAGES=variant.stages, num_warps=variant.warps, maxnreg=MAXNREG)


def backward(dout, q, k, v, out, lse, dq, dk, dv, causal: bool, scale: float, key_padding=None, key_ranges=None,
             dlse=None, variant: BwdVariant | None = None) -> None:
    """Writes dq (B, H, Nq, D) and dk, dv (B, Hkv, Nk, D), contiguous, of the forward that gave out
    and lse; dout, q, k, v pass tma_ready, out has rows of D contiguous, dlse (or None) lse's
    layout. Deterministic: no atomics."""
    from ..triton.attention import softmax_offsets
    from .backward import dkdv_kernel, dq_kernel

    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    variant = variant or default_variant(D, backward=True)
    if variant is None:
        raise RuntimeError(f"no Gluon backward variant has passed its check at D = {D} (benchmarks/gluon_check.py)")
    delta = softmax_offsets(out, dout, lse, dlse)
    ranges, kpm, kpm_stride = _padding_args(key_padding, key_ranges, lse)
    rows, w = 16 * variant.warps, variant.warps
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    tail = (kpm_stride, B, H, Nq, Nk, H // Hkv, scale * LOG2E, scale)
    flags = dict(CAUSAL=causal, HAS_KPM=key_padding is not None, D=D, STAGES=variant.stages, num_warps=w,
                 maxnreg=MAXNREG)
    m, n = variant.q_step, variant.k_step
    dkdv_kernel[(-(-Nk // rows) * B * Hkv,)](
        _descriptor(q, m), _descriptor(k, rows), _descriptor(v, rows), _descriptor(dout, m), dk, dv, lse, delta,
        ranges, kpm, *strides, *dk.stride()[:3], *tail, BLOCK_M=m, BLOCK_N=rows, **flags)
    dq_kernel[(-(-Nq // rows) * B * H,)](
        _descriptor(q, rows), _descriptor(k, n), _descriptor(v, n), _descriptor(dout, rows), dq, lse, delta, ranges,
        kpm, *strides, *dq.stride()[:3], *tail, BLOCK_M=rows, BLOCK_N=n, **flags)
