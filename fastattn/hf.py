"""Hugging Face transformers integration: attn_implementation="fastattn".

transformers is optional: nothing here is imported until register_transformers() runs.
"""
from __future__ import annotations

import math

import torch

from .api import attention
from .masks import hidden_from_attend, padding_from_keep


def fastattn_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                  mask_function=None, attention_mask=None, **kwargs):
    """The mask a model hands to fastattn_attention_forward. Where the model's mask is only
    causal and/or bidirectional plus padding, over the whole sequence, it is the (B, kv_length)
    padding mask (True = keep), or None without padding: no O(N^2) tensor. Anything else
    (sliding windows, packed sequences, decoding against a cache) gets SDPA's 4-D bool mask."""
    from transformers.masking_utils import (bidirectional_mask_function, causal_mask_function,
                                            sdpa_mask)

    mask_function = mask_function or causal_mask_function
    plain = (mask_function in (causal_mask_function, bidirectional_mask_function)
             and isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0
             and q_length == kv_length)
    if not plain:
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                         attention_mask, **kwargs)
    if attention_mask is None or (attention_mask.shape[-1] == kv_length and attention_mask.all()):
        return None
    return attention_mask[:, -kv_length:].bool()


def fastattn_attention_forward(module: torch.nn.Module, query, key, value, attention_mask,
                               dropout: float = 0.0, scaling: float | None = None,
                               is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: query (B, H, L, D), key and value
    (B, Hkv, S, D). Returns ((B, L, H, D), None): no attention weights, as with sdpa."""
    if kwargs.get("softcap") is not None:
        raise ValueError("fastattn: softcap is not supported; use attn_implementation='eager'")
    L, S = query.shape[2], key.shape[2]
    causal = (module.is_causal if is_causal is None else is_causal) if hasattr(module, "is_causal") \
        else bool(is_causal)
    padding = attn = None
    if attention_mask is not None and attention_mask.dim() == 2:  # from fastattn_mask
        padding = padding_from_keep(attention_mask)
    elif attention_mask is not None:  # 4-D: the pattern is all in the mask
        attn, causal = attention_mask, False
    causal = causal and L > 1  # one query (decoding) sees every cached key
    if causal and S > L:  # an empty static cache at prefill: keys past L are unused slots
        key, value = key[:, :, :L], value[:, :, :L]
        padding = None if padding is None else padding[:, :L]
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:  # T5-style bias: one float mask carrying everything
        hidden = torch.zeros(L, key.shape[2], dtype=torch.bool, device=query.device)
        if causal:
            hidden = torch.ones_like(hidden).triu(1)
        if attn is not None:
            hidden = hidden | (hidden_from_attend(attn) if attn.dtype == torch.bool else attn == -math.inf)
        bias = position_bias if attn is None or attn.dtype == torch.bool else position_bias + attn
        attn, causal = bias.masked_fill(hidden, -math.inf), False
    out = attention(query, key, value, key_padding_mask=padding, attn_mask=attn, causal=causal,
                    scale=scaling, dropout_p=dropout)
    return out.transpose(1, 2), None


def register_transformers(name: str = "fastattn") -> None:
    """Registers `name` with transformers' AttentionInterface and AttentionMaskInterface, so
    that `from_pretrained(..., attn_implementation="fastattn")` runs attention on fastattn."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, fastattn_attention_forward)
    AttentionMaskInterface.register(name, fastattn_mask)
