"""The one kernel form of a key padding mask, derived once per call, on the mask's device."""
from __future__ import annotations

import torch
from torch import Tensor


def key_ranges(key_padding: Tensor) -> Tensor:
    """For a (B, Nk) padding mask (True = ignore): a (3, B) int32 tensor holding each batch row's
    first valid key, one past its last (begin >= end for a row with no valid key), and whether
    padding also lies inside that range (1: only such rows test keys one by one). Pure tensor
    ops, no host sync: fastattn.attention computes it once and the op hands it to the forward
    and the backward of every backend."""
    B, Nk = key_padding.shape
    valid = ~key_padding
    idx = torch.arange(Nk, device=key_padding.device)
    begin = torch.where(valid, idx, Nk).amin(dim=1) if Nk else valid.new_zeros(B, dtype=torch.long)
    end = torch.where(valid, idx + 1, 0).amax(dim=1) if Nk else begin
    holes = valid.sum(dim=1) < (end - begin).clamp(min=0)
    return torch.stack([begin, end, holes.long()]).to(torch.int32)
