"""Host side of the Gluon forward: 2-D TMA descriptors over q, k, v's storage, the variants, the launch.

A variant is (consumer warps, K/V stages, key tile, overlap, ping-pong): 4 warps take 64 queries,
8 take 128 (two consumer warpgroups in step); overlap issues the next tile's QK^T before this
tile's softmax; ping-pong gives a program two 64-query tiles, one per consumer warpgroup, which
take turns on the tensor cores. Which one runs comes from fastattn/gluon/tuned.json, written by
benchmarks/gluon_check.py on a GPU with the fastest variant that passed its float64 check per
head dim; without it the backend declines (a kernel no GPU has checked may hang).
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
        return f"w{self.warps}s{self.stages}n{self.block_n}{'o' if self.overlap else ''}{'p' if self.pingpong else ''}"


# FA3's shape first (two consumer warpgroups, 128-key tiles, two stages, overlap), then its
# ping-pong, the first without the overlap, then smaller ones.
VARIANTS = [Variant(8, 2, 128, True), Variant(4, 2, 128, False, True), Variant(8, 2, 128, False),
            Variant(4, 2, 128, True), Variant(8, 3, 64, False)]
MAXNREG = 168  # registers a thread at launch; setmaxnreg moves them: 240 to the consumers, 24 to the producer


@functools.cache
def launched(variant: Variant, head_dim: int, padded: bool) -> Variant:
    """The variant a call runs: with a padding mask the overlap, which keeps two score tiles
    live, spills (python -m fastattn report: at D 128, and on triton 3.6 at D 64 too), so padded
    calls run without it."""
    return variant._replace(overlap=False) if padded else variant


def default_variant(head_dim: int) -> Variant | None:
    """The variant a GPU check found fastest at this head dim, or None."""
    try:
        chosen = json.loads(TUNED.read_text()).get(f"d{head_dim}")
    except (OSError, ValueError):
        chosen = None
    return Variant(*chosen) if chosen else None


def storage_rows(t: torch.Tensor) -> torch.Tensor | None:
    """t (B, H, N, D) as a 2-D view of its storage with t's row stride, where sequence row n of
    (b, h) is row (b sb + h sh) // sm + n from column (b sb + h sh) % sm; its columns end at the
    last one a head uses (q, k, v sliced out of one projection stay inside their slice). None
    where the rows of some head would wrap around a row of the view (no TMA descriptor reads them)."""
    B, H, N, D = t.shape
    sb, sh, sm, sd = t.stride()
    if sd != 1 or sm < D or sb % sm:
        return None
    if sh % sm == 0:
        cols = D
    elif sh >= D and (H - 1) * sh + D <= sm:
        cols = (H - 1) * sh + D
    else:
        return None
    rows = ((B - 1) * sb + (H - 1) * sh) // sm + N  # the last head's first row, and its N
    return t.as_strided((rows, cols), (sm, 1))


def tma_ready(t: torch.Tensor) -> bool:
    """What a TMA descriptor over storage_rows(t) needs: 16-byte aligned base and row stride."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and (t.stride(2) * size) % 16 == 0 and storage_rows(t) is not None


def forward(q, k, v, out, lse, causal: bool, scale: float, key_padding=None, key_ranges=None,
            variant: Variant | None = None) -> None:
    """q (B, H, Nq, D), k and v (B, Hkv, Nk, D) passing tma_ready; writes out (rows of D
    contiguous) and lse (B, H, Nq) contiguous. key_padding (B, Nk) bool with its key_ranges
    (fastattn.masks.key_ranges), or neither."""
    import triton.experimental.gluon.language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .attention import fwd_kernel

    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    variant = variant or default_variant(D)
    if variant is None:
        raise RuntimeError(f"no Gluon variant has passed its check at D = {D} (benchmarks/gluon_check.py)")
    dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[q.dtype]

    def descriptor(t, rows):
        layout = gl.NVMMASharedLayout.get_default_for([rows, D], dtype)
        return TensorDescriptor.from_tensor(storage_rows(t), [rows, D], layout)

    has_kpm = key_padding is not None
    variant = launched(variant, D, has_kpm)
    if has_kpm and key_padding.stride(1) != 1 and Nk > 1:
        key_padding = key_padding.contiguous()  # each row's keys read in one run
    kpm = key_padding.view(torch.uint8) if has_kpm else lse  # a pointer never read without a mask
    ranges = key_ranges if has_kpm else lse
    grid = (-(-Nq // variant.tile_m) * B * H,)
    fwd_kernel[grid](descriptor(q, variant.block_m), descriptor(k, variant.block_n), descriptor(v, variant.block_n),
                     out, lse, ranges, kpm, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                     key_padding.stride(0) if has_kpm else 0, B, H, Nq, Nk, H // Hkv, scale * LOG2E, CAUSAL=causal,
                     HAS_KPM=has_kpm, OVERLAP=variant.overlap, PINGPONG=variant.pingpong, BLOCK_M=variant.block_m,
                     BLOCK_N=variant.block_n,
                     D=D, STAGES=variant.stages, num_warps=variant.warps, maxnreg=MAXNREG)
