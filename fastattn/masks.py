"""Masks: the one place where mask conventions meet, and the one kernel form of a padding mask.

fastattn's own conventions: key_padding_mask (B, Nk) bool, True = ignore that key (as
nn.MultiheadAttention's); attn_mask bool True = may attend (as SDPA's), float added to the
scores. Every other convention is adapted by the functions below, and nowhere else.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _C


def padding_from_keep(keep: Tensor) -> Tensor:
    """Hugging Face's attention_mask and other `valid` masks (1 or True = a real token) ->
    key_padding_mask (True = ignore)."""
    return ~keep if keep.dtype == torch.bool else keep == 0


def padding_from_float(mask: Tensor) -> Tensor:
    """A float key_padding_mask of 0 and -inf (nn.MultiheadAttention accepts one) -> bool."""
    return mask == -math.inf


def attend_from_hidden(hidden: Tensor) -> Tensor:
    """torch.nn's bool attention masks (True = hidden: nn.MultiheadAttention's attn_mask,
    nn.Transformer's causal masks) -> fastattn's and SDPA's (True = may attend)."""
    return ~hidden


def hidden_from_attend(attend: Tensor) -> Tensor:
    """SDPA's bool attn_mask (True = may attend) -> True = hidden."""
    return ~attend


def sdpa_mask_from_padding(padding: Tensor) -> Tensor:
    """key_padding_mask (B, Nk) -> SDPA's attn_mask (B, 1, 1, Nk), True = may attend."""
    return ~padding[:, None, None, :]


def key_ranges(key_padding: Tensor) -> Tensor:
    """For a (B, Nk) padding mask (True = ignore): a (3, B) int32 tensor holding each batch row's
    first valid key, one past its last (begin >= end for a row with no valid key), and whether
    padding also lies inside that range (1: only such rows test keys one by one). The front door
    computes it once and the op hands it to the forward and the backward of every backend: one C++
    pass over a plain CPU mask; torch ops (key_ranges_by_torch_ops) on a GPU (no host sync),
    wherever torch.compile traces, and wherever a dispatch mode or a tensor subclass must see them
    (fake tensors hold no data to read)."""
    if (type(key_padding) is Tensor and key_padding.device.type == "cpu" and not torch.compiler.is_compiling()
            and not torch._C._len_torch_dispatch_stack()):
        return _C.key_ranges(key_padding)
    return key_ranges_by_torch_ops(key_padding)


def key_ranges_by_torch_ops(key_padding: Tensor) -> Tensor:
    """key_ranges in pure tensor ops."""
    B, Nk = key_padding.shape
    valid = ~key_padding
    idx = torch.arange(Nk, device=key_padding.device)
    begin = torch.where(valid, idx, Nk).amin(dim=1) if Nk else valid.new_zeros(B, dtype=torch.long)
    end = torch.where(valid, idx + 1, 0).amax(dim=1) if Nk else begin
    holes = valid.sum(dim=1) < (end - begin).clamp(min=0)
    return torch.stack([begin, end, holes.long()]).to(torch.int32)
