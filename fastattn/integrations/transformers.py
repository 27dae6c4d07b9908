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
Sliding windows (Mistral, Qwen2, Gemma 2/3, gpt-oss), decoding against a cache, logit softcapping
(Gemma 2) and learnable sinks (gpt-oss's s_aux) reach the kernel as its window_size, align, softcap
and sinks: no 4-D mask where the model's mask is a causal one (windowed or not) plus padding.

transformers is optional: nothing here is imported until register_transformers() runs.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from ..api import attention
from ..masks import hidden_from_attend, padding_from_keep
from ..varlen import attention_varlen

_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

# The keywords transformers' attention calls pass, from a survey of every model family in
# transformers 5.24. Honoured: dropout, scaling, is_causal, position_bias, the varlen kwargs and
# position_ids (packing), sliding_window (checked against the mask it comes with), softcap and
# s_aux (learnable sinks). These change the result and are not supported yet, so each raises when set:
_UNSUPPORTED = {
    "sinks": "per-token attention sinks",
    "indices": "sparse attention's top-k key indices (DeepSeek V3.2 and others)",
    "block_indices": "sparse attention's block selection (MiniMax M3)",
}
# These leave the attention's result alone (what the model returns, its cache, its loss):
_NEUTRAL = frozenset({"output_hidden_states", "output_router_logits", "use_cache", "num_items_in_batch", "seq_idx",
                      "encoder_hidden_states", "logits_to_keep", "deterministic", "kernel_options", "cache_position",
                      "position_ids", "position_bias", "sliding_window", "output_attentions", "cache",
                      "past_key_values", "softcap", "s_aux", *_VARLEN_KWARGS})


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
        raise ValueError(f"fastattn: {type(module).__name__}.sinks (learnable attention sinks) came without "
                         f"s_aux, so fastattn cannot tell how the model applies them; use attn_implementation='eager'")
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


def _check_same_window(window, in_mask) -> None:
    """The layer's sliding_window keyword must be the window its mask holds (fastattn applies it,
    eager applies the mask: where they differ, one would be wrong)."""
    if window != in_mask:
        raise ValueError(f"fastattn: sliding_window={window}, but the layer's mask has a window of {in_mask}; "
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
    """What fastattn_mask returns for packed sequences instead of a mask: their position_ids, and
    the sliding window of a windowed causal mask. The kernel's (cu_seqlens, longest) are derived at
    the first layer that needs them (none does when the collator's kwargs come along) and reused
    by all the others."""

    def __init__(self, position_ids: torch.Tensor, window: int | None = None):
        self.position_ids, self.window = position_ids, window

    @functools.cached_property
    def varlen(self) -> tuple[torch.Tensor, int]:
        return _varlen_from_positions(self.position_ids)


@dataclasses.dataclass(frozen=True)
class CausalKeys:
    """What fastattn_mask returns for a causal mask, windowed or not, whose queries are the last
    positions of the first `keys` keys (a cache, a sliding window's cache, a whole sequence):
    causal aligned bottom-right, with the padding of those keys. Key slots past them (an empty
    static cache's) are seen by no query."""
    padding: torch.Tensor | None  # (B, keys), True = keep; None: no padding
    keys: int
    window: int | None  # transformers' sliding_window: a query sees itself and window - 1 keys before


def _closure(f, factory, *args) -> dict | None:
    """f's closure variables, if `factory` made f; else None."""
    if getattr(f, "__code__", None) is not factory(*args).__code__:
        return None
    return dict(zip(f.__code__.co_freevars, (cell.cell_contents for cell in f.__closure__)))


def _plain_pattern(mask_function) -> tuple[bool, int | None] | None:
    """(causal, sliding_window) of a plain causal, sliding-window causal
    (sliding_window_causal_mask_function) or bidirectional mask function; None for any other."""
    from transformers.masking_utils import (and_masks, bidirectional_mask_function, causal_mask_function,
                                            sliding_window_overlay)

    if mask_function in (causal_mask_function, bidirectional_mask_function):
        return mask_function is causal_mask_function, None
    both = _closure(mask_function, and_masks)
    if both is None or len(both["mask_functions"]) != 2:
        return None
    overlay, causal = both["mask_functions"]
    window = _closure(overlay, sliding_window_overlay, 1)
    if causal is not causal_mask_function or window is None or not isinstance(window["sliding_window"], int):
        return None
    return True, window["sliding_window"]


def _packed(mask_function) -> tuple[torch.Tensor, int | None] | None:
    """(position_ids, sliding_window) of the mask create_causal_mask (or
    create_sliding_window_causal_mask) builds for packed sequences over a plain pattern,
    and_masks(remap_positions_for_packed_sequence(plain, position_ids), packed_sequence_mask_function(...));
    None for any other mask function."""
    from transformers.masking_utils import (and_masks, packed_sequence_mask_function,
                                            remap_positions_for_packed_sequence)

    both = _closure(mask_function, and_masks)
    if both is None or len(both["mask_functions"]) != 2:
        return None
    remap, same_sequence = both["mask_functions"]
    remapped = _closure(remap, remap_positions_for_packed_sequence, None, None)
    if remapped is None or _closure(same_sequence, packed_sequence_mask_function, None) is None:
        return None
    pattern = _plain_pattern(remapped["mask_function"])
    return None if pattern is None else (remapped["position_ids"], pattern[1])


def fastattn_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                  mask_function=None, attention_mask=None, **kwargs):
    """The mask a model hands to fastattn_attention_forward. Where the model's mask is causal
    (windowed or not) or bidirectional plus padding, no O(N^2) tensor: over a whole unwindowed
    sequence, the (B, kv_length) padding mask (True = keep), or None without padding; for packed
    sequences, a PackedSequences; a causal mask's queries at the end of its keys (decoding against
    a cache, a sliding window), a CausalKeys. Anything else gets SDPA's 4-D bool mask."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    mask_function = mask_function or causal_mask_function
    offsets_known = isinstance(q_offset, int) and isinstance(kv_offset, int)  # a static cache's is a tensor
    whole = offsets_known and q_offset == 0 and kv_offset == 0 and q_length == kv_length
    if whole and attention_mask is None and (packed := _packed(mask_function)) is not None:
        return PackedSequences(*packed)
    pattern = _plain_pattern(mask_function) if offsets_known else None
    keys = q_offset - kv_offset + q_length if offsets_known else 0
    if pattern is None or not (whole or pattern[0] and q_length <= keys <= kv_length):
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                         attention_mask, **kwargs)
    padding = None
    if attention_mask is not None:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset:kv_offset + keys].bool()
        padding = None if padding.all() else padding
    causal, window = pattern
    return padding if whole and window is None else CausalKeys(padding, keys, window)


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
    window = kwargs.get("sliding_window")
    if isinstance(attention_mask, (CausalKeys, PackedSequences)):
        _check_same_window(window, attention_mask.window)
    elif window is not None:  # in the 4-D mask, or wider than every sequence
        _check_window(window, attention_mask, S if varlen is None else int(varlen[3]))
        window = None
    sinks = kwargs.get("s_aux")
    mods = dict(window_size=(-1, -1) if window is None else (window - 1, 0), softcap=kwargs.get("softcap") or 0.0,
                sinks=None if sinks is None else sinks.float())
    position_bias = kwargs.get("position_bias")
    if varlen is not None and position_bias is not None:
        raise ValueError("fastattn: position_bias with packed sequences (cu_seq_lens_q/k or packed position_ids) "
                         "is not supported; use attn_implementation='eager'")
    if varlen is not None:  # (B, heads, N, D) -> (B * N, heads, D): views when B == 1
        q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], D) for t in (query, key, value))
        out = attention_varlen(q, k, v, *varlen, causal=causal, scale=scaling, dropout_p=dropout, align="top_left",
                               **mods)
        return out.view(B, L, H, D), None
    padding = attn = None
    align = "top_left"
    if isinstance(attention_mask, CausalKeys):  # queries at the end of the keys they can see
        if S < attention_mask.keys:
            raise ValueError(f"fastattn: the mask covers {attention_mask.keys} keys, got {S}")
        key, value = key[:, :, :attention_mask.keys], value[:, :, :attention_mask.keys]
        padding = None if attention_mask.padding is None else padding_from_keep(attention_mask.padding)
        causal, align = True, "bottom_right"
    elif attention_mask is not None and attention_mask.dim() == 2:  # from fastattn_mask
        padding = padding_from_keep(attention_mask)
    elif attention_mask is not None:  # 4-D: the pattern is all in the mask
        attn, causal = attention_mask, False
    if align == "top_left":
        causal = causal and L > 1  # one query (decoding) sees every cached key
        if causal and S > L:  # an empty static cache at prefill: keys past L are unused slots
            key, value = key[:, :, :L], value[:, :, :L]
            padding = None if padding is None else padding[:, :L]
    learned_bias = position_bias is not None and position_bias.grad_fn is not None and torch.is_grad_enabled()
    if position_bias is not None:  # T5-style bias: one float mask carrying everything
        hidden = torch.zeros(L, key.shape[2], dtype=torch.bool, device=query.device)
        if causal:
            hidden = torch.ones_like(hidden).triu(1 + (key.shape[2] - L if align == "bottom_right" else 0))
        if attn is not None:
            hidden = hidden | (hidden_from_attend(attn) if attn.dtype == torch.bool else attn == -math.inf)
        bias = position_bias if attn is None or attn.dtype == torch.bool else position_bias + attn
        attn, causal = bias.detach().masked_fill(hidden, -math.inf), False
    out = attention(query, key, value, key_padding_mask=padding, attn_mask=attn, causal=causal,
                    scale=scaling, dropout_p=dropout, align=align, **mods)
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
