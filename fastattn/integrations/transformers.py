"""Hugging Face transformers integration: attn_implementation="fastattn".

Padded batches reach fastattn.attention with a (B, S) padding mask, never an O(N^2) one. Packed
batches (padding-free training: sequences laid end to end in a row, as
transformers.DataCollatorWithFlattening makes them) reach fastattn.attention_varlen, with no mask:
- with the collator's FlashAttention kwargs (return_flash_attn_kwargs=True: cu_seq_lens_q/k,
  max_length_q/k), passed through the model to every layer as they are: no host sync;
- else, in causal models, from the position_ids that transformers' create_causal_mask finds packed
  (attention_mask None and no cache, as for eager and sdpa: Trainer's use_cache=False): fastattn_mask
  hands every layer a PackedSequences, whose cu_seqlens are derived on the device once per forward,
  with one host sync;
- else, in bidirectional models (BERT: their masks never see position_ids), from a batch of one
  whose position_ids are passed to the attention function, as flash_attention_2 does: once per layer.

transformers is optional: nothing here is imported until register_transformers() runs.
"""
from __future__ import annotations

import functools
import math

import torch

from ..api import attention
from ..masks import hidden_from_attend, padding_from_keep
from ..varlen import attention_varlen

_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

# The keywords transformers' attention calls pass, from a survey of every model family in
# transformers 5.24. Honoured: dropout, scaling, is_causal, position_bias, the varlen kwargs and
# position_ids (packing), sliding_window (through the mask it comes with, checked). These change
# the result and are not supported yet, so each raises when set:
_UNSUPPORTED = {
    "softcap": "logit softcapping (Gemma 2)",
    "s_aux": "learnable attention sinks (gpt-oss and others)",
    "sinks": "per-token attention sinks",
    "indices": "sparse attention's top-k key indices (DeepSeek V3.2 and others)",
    "block_indices": "sparse attention's block selection (MiniMax M3)",
}
# These leave the attention's result alone (what the model returns, its cache, its loss):
_NEUTRAL = frozenset({"output_hidden_states", "output_router_logits", "use_cache", "num_items_in_batch", "seq_idx",
                      "encoder_hidden_states", "logits_to_keep", "deterministic", "kernel_options", "cache_position",
                      "position_ids", "position_bias", "sliding_window", "output_attentions", "cache",
                      "past_key_values", *_VARLEN_KWARGS})


def _check_keywords(module, kwargs: dict) -> None:
    """Raises for a keyword that would change the result and that fastattn cannot honour: one it
    does not support, or one it does not know, unless None."""
    for name, value in kwargs.items():
        if name in _UNSUPPORTED and value is not None:
            raise ValueError(f"fastattn: {name} ({_UNSUPPORTED[name]}) is not supported, got {name}="
                             f"{_describe(value)}; use attn_implementation='eager'")
        if name not in _UNSUPPORTED and name not in _NEUTRAL and value is not None:
            raise ValueError(f"fastattn: unknown attention keyword {name}={_describe(value)}, which may change "
                             f"the result; use attn_implementation='eager'")
    if kwargs.get("s_aux") is None and isinstance(getattr(module, "sinks", None), torch.Tensor):
        raise ValueError(f"fastattn: {type(module).__name__}.sinks ({_UNSUPPORTED['s_aux']}) is not supported; "
                         f"use attn_implementation='eager'")
    if kwargs.get("output_attentions"):
        raise ValueError("fastattn: output_attentions=True, but fastattn computes no attention weights; "
                         "use attn_implementation='eager'")


def _describe(value) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)


def _check_window(window, mask, longest: int) -> None:
    """A sliding window reaches fastattn only inside the 4-D mask that transformers builds with
    it; where none came (or a padding mask), keys beyond the window must not exist."""
    if window is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 4) and longest > window:
        raise ValueError(f"fastattn: sliding_window={window} with {longest} keys and no 4-D mask to apply it; "
                         f"use attn_implementation='eager'")


def _varlen_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, N) position ids -> (cu_seqlens (n + 1,) int32, longest) of the n sequences in all rows
    laid end to end. A sequence starts each row and wherever a position does not follow the one
    before, as in transformers' find_packed_sequence_indices. On the device but for one host sync,
    which reads n and longest."""
    starts = torch.nn.functional.pad(position_ids[:, 1:] != position_ids[:, :-1] + 1, (1, 0), value=True)
    sequence = starts.flatten().cumsum(0) - 1  # of each token
    lengths = torch.zeros_like(sequence).index_add_(0, sequence, torch.ones_like(sequence))
    count, longest = torch.stack([sequence[-1] + 1, lengths.max()]).tolist()
    return torch.nn.functional.pad(lengths[:count].cumsum(0, dtype=torch.int32), (1, 0)), longest


class PackedSequences:
    """What fastattn_mask returns for packed sequences instead of a mask: their position_ids. The
    kernel's (cu_seqlens, longest) are derived at the first layer that needs them (none does when
    the collator's kwargs come along) and reused by all the others."""

    def __init__(self, position_ids: torch.Tensor):
        self.position_ids = position_ids

    @functools.cached_property
    def varlen(self) -> tuple[torch.Tensor, int]:
        return _varlen_from_positions(self.position_ids)


def _packed_position_ids(mask_function):
    """The position_ids in the mask create_causal_mask builds for packed sequences over a plain
    causal or bidirectional mask, and_masks(remap_positions_for_packed_sequence(plain,
    position_ids), packed_sequence_mask_function(...)); None for any other mask function."""
    from transformers.masking_utils import (and_masks, bidirectional_mask_function, causal_mask_function,
                                            packed_sequence_mask_function, remap_positions_for_packed_sequence)

    def made_by(f, factory, *args):  # f's closure variables, if `factory` made f
        if getattr(f, "__code__", None) is not factory(*args).__code__:
            return None
        return dict(zip(f.__code__.co_freevars, (cell.cell_contents for cell in f.__closure__)))

    both = made_by(mask_function, and_masks)
    if both is None or len(both["mask_functions"]) != 2:
        return None
    remap, same_sequence = both["mask_functions"]
    remapped = made_by(remap, remap_positions_for_packed_sequence, None, None)
    if (remapped is None or made_by(same_sequence, packed_sequence_mask_function, None) is None
            or remapped["mask_function"] not in (causal_mask_function, bidirectional_mask_function)):
        return None
    return remapped["position_ids"]


def fastattn_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                  mask_function=None, attention_mask=None, **kwargs):
    """The mask a model hands to fastattn_attention_forward. Where the model's mask is only
    causal and/or bidirectional plus padding, over the whole sequence, it is the (B, kv_length)
    padding mask (True = keep), or None without padding; for packed sequences, a PackedSequences:
    no O(N^2) tensor. Anything else (sliding windows, decoding against a cache) gets SDPA's 4-D
    bool mask."""
    from transformers.masking_utils import (bidirectional_mask_function, causal_mask_function,
                                            sdpa_mask)

    mask_function = mask_function or causal_mask_function
    whole = isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0 and q_length == kv_length
    if whole and attention_mask is None and (position_ids := _packed_position_ids(mask_function)) is not None:
        return PackedSequences(position_ids)
    if not (whole and mask_function in (causal_mask_function, bidirectional_mask_function)):
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                         attention_mask, **kwargs)
    if attention_mask is None or (attention_mask.shape[-1] == kv_length and attention_mask.all()):
        return None
    return attention_mask[:, -kv_length:].bool()


def _varlen_args(query, key, attention_mask, causal: bool, kwargs: dict):
    """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) where the batch is packed, else None."""
    if isinstance(attention_mask, torch.Tensor):  # padding or a 4-D mask: it says it all
        return None
    given = [kwargs.get(name) for name in _VARLEN_KWARGS]
    if any(value is not None for value in given):
        missing = [name for name, value in zip(_VARLEN_KWARGS, given) if value is None]
        if missing:
            raise ValueError(f"fastattn: expected {', '.join(_VARLEN_KWARGS)} together (as "
                             f"DataCollatorWithFlattening(return_flash_attn_kwargs=True) gives them), "
                             f"got None for {', '.join(missing)}")
        return given
    if isinstance(attention_mask, PackedSequences):
        cu_seqlens, longest = attention_mask.varlen
        return cu_seqlens, cu_seqlens, longest, longest
    position_ids = kwargs.get("position_ids")
    B, L = query.shape[0], query.shape[2]
    if not causal and B == 1 and position_ids is not None and position_ids.numel() == L == key.shape[2] > 1:
        cu_seqlens, longest = _varlen_from_positions(position_ids.reshape(1, L))
        return cu_seqlens, cu_seqlens, longest, longest
    return None


def fastattn_attention_forward(module: torch.nn.Module, query, key, value, attention_mask,
                               dropout: float = 0.0, scaling: float | None = None,
                               is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: query (B, H, L, D), key and value
    (B, Hkv, S, D). Returns ((B, L, H, D), None): no attention weights, as with sdpa. Every other
    keyword is honoured, known to leave the result alone, or raises (_check_keywords)."""
    _check_keywords(module, kwargs)
    B, H, L, D = query.shape
    S = key.shape[2]
    causal = (module.is_causal if is_causal is None else is_causal) if hasattr(module, "is_causal") \
        else bool(is_causal)
    varlen = _varlen_args(query, key, attention_mask, causal, kwargs)
    if (window := kwargs.get("sliding_window")) is not None:
        _check_window(window, attention_mask, S if varlen is None else int(varlen[3]))
    position_bias = kwargs.get("position_bias")
    if varlen is not None and position_bias is not None:
        raise ValueError("fastattn: position_bias with packed sequences (cu_seq_lens_q/k or packed position_ids) "
                         "is not supported; use attn_implementation='eager'")
    if varlen is not None:  # (B, heads, N, D) -> (B * N, heads, D): views when B == 1
        q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], D) for t in (query, key, value))
        out = attention_varlen(q, k, v, *varlen, causal=causal, scale=scaling, dropout_p=dropout)
        return out.view(B, L, H, D), None
    padding = attn = None
    if attention_mask is not None and attention_mask.dim() == 2:  # from fastattn_mask
        padding = padding_from_keep(attention_mask)
    elif attention_mask is not None:  # 4-D: the pattern is all in the mask
        attn, causal = attention_mask, False
    causal = causal and L > 1  # one query (decoding) sees every cached key
    if causal and S > L:  # an empty static cache at prefill: keys past L are unused slots
        key, value = key[:, :, :L], value[:, :, :L]
        padding = None if padding is None else padding[:, :L]
    learned_bias = position_bias is not None and position_bias.grad_fn is not None and torch.is_grad_enabled()
    if position_bias is not None:  # T5-style bias: one float mask carrying everything
        hidden = torch.zeros(L, key.shape[2], dtype=torch.bool, device=query.device)
        if causal:
            hidden = torch.ones_like(hidden).triu(1)
        if attn is not None:
            hidden = hidden | (hidden_from_attend(attn) if attn.dtype == torch.bool else attn == -math.inf)
        bias = position_bias if attn is None or attn.dtype == torch.bool else position_bias + attn
        attn, causal = bias.detach().masked_fill(hidden, -math.inf), False
    out = attention(query, key, value, key_padding_mask=padding, attn_mask=attn, causal=causal,
                    scale=scaling, dropout_p=dropout)
    if learned_bias:  # a gradient would be owed to the bias: refuse it when one is asked for
        out = _NoBiasGradient.apply(out, position_bias)
    return out.transpose(1, 2), None


class _NoBiasGradient(torch.autograd.Function):
    """Identity on the attention output, whose backward raises: fastattn computes no gradient
    for a float mask, and a learned position_bias (T5's relative attention bias, computed from
    an embedding) would silently stop learning. A bias with no history (a constant, or the zeros
    T5 makes for gradient checkpointing) passes, as does any forward without a backward."""

    @staticmethod
    def forward(ctx, out, bias):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        raise ValueError("fastattn: position_bias (T5's learned relative attention bias) needs its gradient, which "
                         "fastattn does not compute; train with attn_implementation='eager' (inference works)")


def register_transformers(name: str = "fastattn") -> None:
    """Registers `name` with transformers' AttentionInterface and AttentionMaskInterface, so
    that `from_pretrained(..., attn_implementation="fastattn")` runs attention on fastattn."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, fastattn_attention_forward)
    AttentionMaskInterface.register(name, fastattn_mask)
