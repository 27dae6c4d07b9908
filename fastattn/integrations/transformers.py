"""Hugging Face transformers integration: attn_implementation="fastattn".

The attention function (fastattn_attention_forward), the load-time check and the registration; the
masks each layer gets are transformers_mask's. A model either runs its attention on fastattn and
equals eager, or raises a ValueError("fastattn: ...") naming its class and why: when it is built
(attention outside transformers' attention interface, or none at all) or at its first call (a
keyword fastattn cannot honour, a model whose own code uses the compact mask as a tensor, keys its
mask does not cover). Padded batches reach fastattn.attention with a (B, S) padding mask, never an
O(N^2) one; packed batches (padding-free training, transformers.DataCollatorWithFlattening) reach
fastattn.attention_varlen with no mask:
- with the collator's FlashAttention kwargs (return_flash_attn_kwargs=True: cu_seq_lens_q/k,
  max_length_q/k), passed through the model to every layer as they are: no host sync;
- else, from the packed sequences transformers finds in position_ids when it builds the mask (no
  attention_mask and no cache, as for eager and sdpa: Trainer's use_cache=False): derived on the
  device once per forward, with one host sync;
- else, in bidirectional models whose masks never see position_ids (BERT), from a batch of one whose
  position_ids reach the attention function, as flash_attention_2 does: once per layer.
Sliding windows, decoding against a cache, logit softcapping (Gemma 2) and learnable sinks
(gpt-oss's s_aux) reach the kernel as its window_size, align, softcap and sinks.

transformers is optional: nothing here is imported until register_transformers() runs.
"""
from __future__ import annotations

import functools
import math
import sys

import torch

from ..api import attention
from ..masks import hidden_from_attend, padding_from_keep
from ..varlen import attention_varlen
from . import transformers_mask
from .transformers_mask import CompactMask, fastattn_mask

OLDEST_TRANSFORMERS = (5, 17)  # tested in CI with the newest (Makefile: transformers-oldest)
_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

# The keywords transformers' attention calls pass, from a survey of every model family in
# transformers 5.24. Honoured: dropout, scaling, is_causal, position_bias, the varlen kwargs and
# position_ids (packing), sliding_window (where no compact mask holds the window), softcap and
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


def _varlen_args(query, key, mask, causal: bool, kwargs: dict):
    """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) where the batch is packed, else None."""
    given = [kwargs.get(name) for name in _VARLEN_KWARGS]
    if any(value is not None for value in given):
        missing = [name for name, value in zip(_VARLEN_KWARGS, given) if value is None]
        if missing:
            raise ValueError(f"fastattn: expected {', '.join(_VARLEN_KWARGS)} together (as "
                             f"DataCollatorWithFlattening(return_flash_attn_kwargs=True) gives them), "
                             f"got None for {', '.join(missing)}")
        if isinstance(mask, torch.Tensor) or isinstance(mask, CompactMask) and mask.padding is not None:
            raise ValueError(f"fastattn: packed sequences (cu_seq_lens_q/k) came with a mask of their own "
                             f"({_describe(mask)}), which fastattn cannot apply within packed sequences; use "
                             f"attn_implementation='eager'")
        return given
    if isinstance(mask, CompactMask) and mask.sequence_ids is not None:
        cu_seqlens, longest = mask.varlen
        return cu_seqlens, cu_seqlens, longest, longest
    position_ids = kwargs.get("position_ids")
    B, L = query.shape[0], query.shape[2]
    unmasked = mask is None or isinstance(mask, CompactMask) and mask.padding is None
    if unmasked and not causal and B == 1 and position_ids is not None and position_ids.numel() == L == key.shape[2] > 1:
        cu_seqlens, longest = transformers_mask._varlen_from_positions(position_ids.reshape(1, L))
        return cu_seqlens, cu_seqlens, longest, longest
    return None


def _is_causal(module, mask, is_causal: bool | None) -> bool:
    """A compact mask says whether it is causal (a decoder's self-attention may share its module class,
    is_causal False, with the encoder's); without a mask, as SDPA: the call's is_causal, else the module's."""
    if isinstance(mask, CompactMask):
        return mask.causal
    if not hasattr(module, "is_causal"):
        return bool(is_causal)
    return module.is_causal if is_causal is None else is_causal


def fastattn_attention_forward(module: torch.nn.Module, query, key, value, attention_mask,
                               dropout: float = 0.0, scaling: float | None = None,
                               is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: query (B, H, L, D), key and value
    (B, Hkv, S, D). Returns ((B, L, H, D), None): no attention weights, as with sdpa. Every other
    keyword is honoured, known to leave the result alone, or raises (_check_keywords)."""
    _check_keywords(module, kwargs)
    B, H, L, D = query.shape
    S = key.shape[2]
    mask = attention_mask
    compact = isinstance(mask, CompactMask)
    causal = _is_causal(module, mask, is_causal)
    varlen = _varlen_args(query, key, mask, causal, kwargs)
    window = kwargs.get("sliding_window")  # a compact mask holds the layer's window, as eager applies it
    if not compact and window is not None:  # in the 4-D mask, or wider than every sequence
        _check_window(window, mask, S if varlen is None else int(varlen[3]))
    sinks = kwargs.get("s_aux")
    mods = dict(window_size=mask.window_size if compact else (-1, -1), softcap=kwargs.get("softcap") or 0.0,
                sinks=None if sinks is None else sinks.float())
    position_bias = kwargs.get("position_bias")
    if varlen is not None and position_bias is not None:
        raise ValueError("fastattn: position_bias with packed sequences (cu_seq_lens_q/k or packed position_ids) "
                         "is not supported; use attn_implementation='eager'")
    Dv = value.shape[3]
    if Dv != D:  # multi-head latent attention: zero columns, as transformers does for FlashAttention
        scaling = D ** -0.5 if scaling is None else scaling
        query, key, value = _same_head_dim(query, key, value)
    if varlen is not None:  # (B, heads, N, d) -> (B * N, heads, d): views when B == 1
        q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (query, key, value))
        out = attention_varlen(q, k, v, *varlen, causal=causal, scale=scaling, dropout_p=dropout, align="top_left",
                               **mods)
        return out.view(B, L, H, -1)[..., :Dv], None
    padding = attn = None
    align = "top_left"
    if compact:  # queries at the end of the keys they can see
        if S != mask.kv_length:
            raise ValueError(f"fastattn: {type(module).__name__} attends to {S} keys, but its mask covers "
                             f"{mask.kv_length}: keys the mask does not describe (appended by the model's own code), "
                             f"which fastattn cannot place; use attn_implementation='eager'")
        key, value = key[:, :, :mask.keys], value[:, :, :mask.keys]  # slots past them: seen by no query
        padding = None if mask.padding is None else padding_from_keep(mask.padding)
        align = "bottom_right"
    elif mask is not None:  # 4-D: the pattern is all in the mask
        attn, causal = mask, False
    else:
        causal = causal and L > 1  # one query (decoding) sees every cached key, as SDPA's is_causal
    learned = next((t for t in (position_bias, attn) if isinstance(t, torch.Tensor) and t.requires_grad
                    and torch.is_grad_enabled()), None)  # T5's relative position bias, Doge's dynamic mask
    if position_bias is not None:  # T5-style bias: one float mask carrying everything
        hidden = torch.zeros(L, key.shape[2], dtype=torch.bool, device=query.device)
        if causal:
            hidden = torch.ones_like(hidden).triu(1 + (key.shape[2] - L if align == "bottom_right" else 0))
        if attn is not None:
            hidden = hidden | (hidden_from_attend(attn) if attn.dtype == torch.bool else attn == -math.inf)
        bias = position_bias if attn is None or attn.dtype == torch.bool else position_bias + attn
        attn, causal = bias[..., :key.shape[2]].masked_fill(hidden, -math.inf), False
    bias_gradient = learned is not None and dropout == 0 and mods["window_size"] == (-1, -1) and not mods["softcap"]
    out = attention(query, key, value, key_padding_mask=padding, attn_mask=None if attn is None else attn.detach(),
                    causal=causal, scale=scaling, dropout_p=dropout, align=align, return_lse=bias_gradient, **mods)
    if bias_gradient:
        out, lse = out
        out = _BiasGradient.apply(out, attn, query, key, value, lse, scaling or query.shape[3] ** -0.5, padding)
    elif learned is not None:  # a gradient would be owed that _BiasGradient cannot give: refuse it when asked for
        out = _NoBiasGradient.apply(out, learned, type(module).__name__)
    return out.transpose(1, 2)[..., :Dv], None


def _same_head_dim(query, key, value):
    """Query, key and value padded with zero columns to one head dim: the scores and the output's
    first columns are unchanged."""
    width = max(query.shape[3], value.shape[3])
    return (torch.nn.functional.pad(t, (0, width - t.shape[3])) for t in (query, key, value))


class _BiasGradient(torch.autograd.Function):
    """Identity on the attention output whose backward also gives the learned float bias (T5's
    relative position_bias, Doge's dynamic mask) its gradient, which the kernel's backward does not
    return: d bias = P * (dO V^T - rowsum(dO * O)), P = exp(scale q k^T + bias - lse), recomputed
    from the saved lse in float32 over (B, H, L, S), the bias's own size. Hidden keys (the bias's
    -inf, padding) have P = 0; the gradient is summed over the dims the bias broadcasts."""

    @staticmethod
    def forward(ctx, out, bias, query, key, value, lse, scale: float, padding):
        ctx.save_for_backward(bias, query, key, value, out, lse, padding)
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        bias, q, k, v, out, lse, padding = ctx.saved_tensors
        groups = q.shape[1] // k.shape[1]
        k, v = (t.float().repeat_interleave(groups, dim=1) for t in (k, v))
        scores = q.float() @ k.transpose(-1, -2) * ctx.scale + bias.float()
        if padding is not None:
            scores = scores.masked_fill(padding[:, None, None, :], -math.inf)
        p = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # a row that sees no key: lse -inf, p 0
        delta = (grad.float() * out.float()).sum(-1, keepdim=True)
        d_bias = p * (grad.float() @ v.transpose(-1, -2) - delta)
        return grad, d_bias.sum_to_size(bias.shape).to(bias.dtype), None, None, None, None, None, None


class _NoBiasGradient(torch.autograd.Function):
    """Identity on the attention output, whose backward raises: with dropout, a window or softcapping
    fastattn computes no gradient for a learned float bias, which would silently stop learning. A
    bias with no history (a constant, or the zeros T5 makes for gradient checkpointing) passes, as
    does any forward without a backward."""

    @staticmethod
    def forward(ctx, out, bias, owner: str):
        ctx.owner = owner
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        raise ValueError(f"fastattn: {ctx.owner}'s position_bias or float attention mask is learned and needs its "
                         f"gradient, which fastattn does not compute with dropout, a window or softcapping; train "
                         f"with attn_implementation='eager' or without those (inference works)")


def _refusal(model, name: str) -> str | None:
    """Why `model` (a PreTrainedModel, at construction) cannot run its attention on fastattn (registered
    as `name`), or None. transformers' own test for setting an attention implementation: every attention
    module of the model's file calls transformers' attention interface. Else, where the file picks its
    attention modules from a table without `name` (GIT), or calls no attention at all (an attention-free
    model that is neither a composite nor part of one), fastattn would never run."""
    cls = type(model)
    if not cls._can_set_attn_implementation():
        return ("its attention modules compute attention in their own code, not through transformers' attention "
                "interface, so fastattn would never run")
    for table, classes in vars(sys.modules[cls.__module__]).items():
        if table.endswith("ATTENTION_CLASSES") and isinstance(classes, dict) and name not in classes:
            return f"its attention modules come from {table}, which holds only {sorted(classes)}"
    if not (_calls_attention(cls.__module__) or getattr(model.config, "sub_configs", None) or _inside_a_model(model)):
        return "it has no attention layer that calls transformers' attention interface: fastattn has nothing to run"
    return None


def _inside_a_model(model) -> bool:
    """Whether `model` is being built inside another model's constructor (a composite's part)."""
    from transformers import PreTrainedModel

    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name == "__init__" and isinstance(owner, PreTrainedModel) and owner is not model:
            return True
        frame = frame.f_back
    return False


@functools.lru_cache(maxsize=None)
def _calls_attention(module_name: str) -> bool:
    """Whether a model's file mentions transformers' attention interface (True where it cannot be read)."""
    source = getattr(sys.modules.get(module_name), "__file__", None)
    if source is None:
        return True
    with open(source, encoding="utf-8") as f:
        return "ALL_ATTENTION_FUNCTIONS" in f.read()


_REGISTERED: set[str] = set()  # the names fastattn is registered under


def _checked(get_correct_attn_implementation):
    """transformers' PreTrainedModel.get_correct_attn_implementation, which every model runs when it is
    built or its attention implementation is set, refusing fastattn for a model that cannot honour it."""
    def check(self, requested_attention, is_init_check: bool = False):
        applicable = get_correct_attn_implementation(self, requested_attention, is_init_check)
        if applicable in _REGISTERED and (why := _refusal(self, applicable)) is not None:
            raise ValueError(f"fastattn: {type(self).__name__} cannot run attn_implementation={applicable!r}: {why}; "
                             f"use attn_implementation='eager' (in a composite model, a dict can give fastattn to "
                             f"the parts that take it)")
        return applicable

    check.fastattn_wraps = get_correct_attn_implementation
    return check


def register_transformers(name: str = "fastattn") -> None:
    """Registers `name` with transformers' AttentionInterface and AttentionMaskInterface, so
    that `from_pretrained(..., attn_implementation="fastattn")` runs attention on fastattn, and has
    every model checked for it as it is built: one that cannot run its attention on fastattn raises
    a ValueError saying why, as transformers does for 'sdpa'."""
    import transformers
    from packaging.version import Version
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface

    if Version(transformers.__version__).release[:2] < OLDEST_TRANSFORMERS:
        raise ImportError(f"fastattn: the transformers integration needs transformers >= "
                          f"{'.'.join(map(str, OLDEST_TRANSFORMERS))}, found {transformers.__version__}")
    AttentionInterface.register(name, fastattn_attention_forward)
    AttentionMaskInterface.register(name, fastattn_mask)
    _REGISTERED.add(name)
    original = PreTrainedModel.get_correct_attn_implementation
    if not hasattr(original, "fastattn_wraps"):
        PreTrainedModel.get_correct_attn_implementation = _checked(original)
