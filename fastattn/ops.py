"""The torch.library custom ops: every attention call is one `fastattn::attention_forward`
node (and one `fastattn::attention_backward` in the backward), whatever the backend."""
from __future__ import annotations

import torch
from torch import Tensor

from .backends import REGISTRY, Masks
from .backends.base import empty_lse, empty_out


@torch.library.custom_op("fastattn::attention_forward", mutates_args=())
def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, key_ranges: Tensor | None,
    attn_mask: Tensor | None, causal: bool, scale: float, dropout_p: float, seed: int, backend: str,
) -> tuple[Tensor, Tensor]:
    masks = Masks(key_padding_mask, key_ranges, attn_mask)
    return REGISTRY[backend].forward(q, k, v, masks, causal, scale, dropout_p, seed)


@attention_forward.register_fake
def _(q, k, v, key_padding_mask, key_ranges, attn_mask, causal, scale, dropout_p, seed, backend):
    return empty_out(q), empty_lse(q)


@torch.library.custom_op("fastattn::attention_backward", mutates_args=())
def attention_backward(
    dout: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    key_padding_mask: Tensor | None, key_ranges: Tensor | None, attn_mask: Tensor | None,
    causal: bool, scale: float, dropout_p: float, seed: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    masks = Masks(key_padding_mask, key_ranges, attn_mask)
    return REGISTRY[backend].backward(dout, dlse, q, k, v, out, lse, masks, causal, scale,
                                      dropout_p, seed)


@attention_backward.register_fake
def _(dout, dlse, q, k, v, out, lse, key_padding_mask, key_ranges, attn_mask, causal, scale,
      dropout_p, seed, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, key_ranges, attn_mask, causal, scale, dropout_p, seed, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, key_ranges, attn_mask)
    ctx.args = (causal, scale, dropout_p, seed, backend)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, key_padding_mask, key_ranges, attn_mask = ctx.saved_tensors
    dq, dk, dv = attention_backward(dout, dlse, q, k, v, out, lse, key_padding_mask, key_ranges,
                                    attn_mask, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd("fastattn::attention_forward", _backward,
                                setup_context=_setup_context)
