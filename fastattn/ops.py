"""The torch.library custom ops: every attention call is one `fastattn::attention_forward`
node (and one `fastattn::attention_backward` in the backward), whatever the backend.

Packed (varlen) calls go through the same ops: q, k, v are (1, H, total, D) views of the packed
tensors, and cu_seqlens_q/k with the longest lengths say where each sequence lies."""
from __future__ import annotations

import torch
from torch import Tensor

from .backends import REGISTRY, Masks
from .backends.base import empty_lse, empty_out


@torch.library.custom_op("fastattn::attention_forward", mutates_args=())
def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, key_ranges: Tensor | None,
    attn_mask: Tensor | None, cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None,
    max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float, dropout_p: float, seed: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    masks = Masks(key_padding_mask, key_ranges, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return REGISTRY[backend].forward(q, k, v, masks, causal, scale, dropout_p, seed)


@attention_forward.register_fake
def _(q, k, v, key_padding_mask, key_ranges, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, causal, scale, dropout_p, seed, backend):
    return empty_out(q), empty_lse(q)


@torch.library.custom_op("fastattn::attention_backward", mutates_args=())
def attention_backward(
    dout: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    key_padding_mask: Tensor | None, key_ranges: Tensor | None, attn_mask: Tensor | None,
    cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
    causal: bool, scale: float, dropout_p: float, seed: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    masks = Masks(key_padding_mask, key_ranges, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return REGISTRY[backend].backward(dout, dlse, q, k, v, out, lse, masks, causal, scale,
                                      dropout_p, seed)


@attention_backward.register_fake
def _(dout, dlse, q, k, v, out, lse, *masks_and_args):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


_MASK_ARGS = 7  # key_padding_mask ... max_seqlen_k


def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    masks, args = inputs[3:3 + _MASK_ARGS], inputs[3 + _MASK_ARGS:]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *masks[:5])
    ctx.lengths = masks[5:]
    ctx.args = args


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *masks = ctx.saved_tensors
    dq, dk, dv = attention_backward(dout, dlse, q, k, v, out, lse, *masks, *ctx.lengths, *ctx.args)
    return dq, dk, dv, *(None,) * (_MASK_ARGS + 5)


torch.library.register_autograd("fastattn::attention_forward", _backward,
                                setup_context=_setup_context)


@torch.library.custom_op("fastattn::attention_kvcache", mutates_args=("k_cache", "v_cache"))
def attention_kvcache(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, k_new: Tensor | None,
    v_new: Tensor | None, causal: bool, scale: float, backend: str,
) -> tuple[Tensor, Tensor]:
    """Writes k_new/v_new (B, Hkv, Nnew, D) into the caches at rows cache_seqlens[b] + t, then
    attends q to the first cache_seqlens[b] + Nnew keys of each row. No host sync."""
    seqlens = cache_seqlens
    if k_new is not None:
        B, Hkv, Nnew, D = k_new.shape
        rows = cache_seqlens.long()[:, None] + torch.arange(Nnew, device=q.device)  # (B, Nnew)
        index = rows[:, None, :, None].expand(B, Hkv, Nnew, D)
        k_cache.scatter_(2, index, k_new)
        v_cache.scatter_(2, index, v_new)
        seqlens = cache_seqlens + Nnew
    return REGISTRY[backend].decode(q, k_cache, v_cache, seqlens.contiguous(), causal, scale)


@attention_kvcache.register_fake
def _(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale, backend):
    return empty_out(q), empty_lse(q)
