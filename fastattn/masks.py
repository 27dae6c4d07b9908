"""Mask facts the kernels use to skip work, derived once per call."""
from __future__ import annotations

import torch
from torch import Tensor


def key_ranges(key_padding: Tensor) -> tuple[Tensor, Tensor, bool]:
    """For a (B, Nk) padding mask (True = ignore): the first and one-past-last valid key of each
    batch row as int32 (B,) tensors (begin >= end for a row with no valid key), and whether any
    row has padding inside that range, so that the per-key mask is still needed."""
    B, Nk = key_padding.shape
    if Nk == 0:
        zeros = key_padding.new_zeros(B, dtype=torch.int32)
        return zeros, zeros.clone(), False
    valid = ~key_padding
    idx = torch.arange(Nk, device=key_padding.device)
    begin = torch.where(valid, idx, Nk).amin(dim=1)
    end = torch.where(valid, idx + 1, 0).amax(dim=1)
    scattered = bool((valid.sum(dim=1) < (end - begin).clamp(min=0)).any())
    return begin.to(torch.int32), end.to(torch.int32), scattered


def kernel_padding(key_padding: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """What the kernels take for a padding mask: (kv_begin, kv_end, per-key mask). Right, left
    or no padding is fully described by the range; only scattered padding keeps the per-key
    test inside the tile loop. (None, None, None) without a mask."""
    if key_padding is None:
        return None, None, None
    begin, end, scattered = key_ranges(key_padding)
    return begin, end, key_padding if scattered else None
