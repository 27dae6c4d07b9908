"""fastattn.MultiHeadAttention: torch.nn.MultiheadAttention's interface, parameters and
semantics, with the attention itself on the fused fastattn kernel."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import attention
from ..masks import attend_from_hidden, padding_from_float, padding_from_keep
from ..reference import attention_probabilities
from ..varlen import attention_varlen, pad, unpad


def _only_zero_or_neginf(mask: Tensor) -> bool:
    return bool(((mask == 0) | (mask == -math.inf)).all())


def _is_causal_mask(mask: Tensor) -> bool:
    """Whether a 2-D (L, L) mask in torch's convention (bool True = hidden, float -inf = hidden)
    is exactly the causal mask, so the kernel can take a flag and skip tiles instead."""
    L, S = mask.shape
    if L != S:
        return False
    hidden = torch.ones(L, S, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return torch.equal(mask, hidden)
    return torch.equal(mask == -math.inf, hidden) and bool((mask[~hidden] == 0).all())


def _check_flag(skip_padded_queries) -> bool:
    if not isinstance(skip_padded_queries, bool):
        raise TypeError(f"skip_padded_queries: expected a bool, got {skip_padded_queries!r}")
    return skip_padded_queries


class _MaskKeywords:
    """torch's masks as fastattn.attention's mask keywords: padding (key_padding_mask: (B, S) bool),
    attn (attn_mask: (B or 1, H or 1, L, S), bool True = may attend, or float) and causal."""

    def __init__(self, device: torch.device):
        self.device = device
        self.padding: Tensor | None = None
        self.attn: Tensor | None = None
        self.causal = False

    def add_float(self, term: Tensor) -> None:
        if self.attn is not None and self.attn.dtype == torch.bool:
            self.attn = torch.zeros_like(self.attn, dtype=term.dtype).masked_fill(~self.attn, -math.inf)
        self.attn = term if self.attn is None else self.attn + term

    def append_keys(self, n: int, L: int, S: int) -> None:
        """n keys appended after the S given ones (bias_k, add_zero_attn): every query sees them."""
        if self.causal:  # top-left causality would hide the appended keys: spell the mask out
            may = torch.ones(L, S, dtype=torch.bool, device=self.device).tril()
            self.attn = may if self.attn is None else (self.attn & may if self.attn.dtype == torch.bool
                                                       else self.attn.masked_fill(~may, -math.inf))
            self.causal = False
        if self.attn is not None:
            self.attn = F.pad(self.attn, (0, n), value=True if self.attn.dtype == torch.bool else 0.0)
        if self.padding is not None:
            self.padding = F.pad(self.padding, (0, n), value=False)


class MultiHeadAttention(nn.MultiheadAttention):
    """A drop-in for torch.nn.MultiheadAttention (isinstance of it, same parameters,
    initialisation, state_dict and forward semantics) whose attention runs on fastattn.

    Differences from torch: a query that sees no key gives zeros rather than NaN; with dropout
    in training, the returned weights are the probabilities before dropout; is_causal is
    honoured on nested input (torch ignores it there) and, with add_bias_kv or add_zero_attn,
    keeps the appended keys visible on every path (torch's need_weights=False path without a
    key_padding_mask hides them).

    skip_padded_queries=True (off by default; an attribute, so it can be set after from_torch or
    replace_attention too) changes self-attention (query is key is value) with a key_padding_mask:
    padded queries are skipped and their output rows are zeros, as on torch's nested-tensor fast
    path. Only the valid tokens are projected, attended (packed, by fastattn.attention_varlen) and
    scattered back: no work is spent on padding. Valid rows and their gradients are the default
    path's (dropout aside: each sequence draws its own mask). is_causal or a causal attn_mask is
    causal within each sequence, which is what torch's positional mask gives the valid tokens
    wherever the padding lies. need_weights=True returns the default path's weights with the
    padded query rows zero (computed apart, over the padded batch). Calls with no padded query
    (cross-attention, no key_padding_mask) take the default path. Padding that cannot be packed
    raises a ValueError rather than keep padded rows: add_bias_kv or add_zero_attn, an attn_mask
    that is not causal, a float key_padding_mask that is not 0/-inf. Under torch.compile, where
    values cannot be inspected, pass a bool key_padding_mask and a causal attn_mask with
    is_causal=True.
    """

    skip_padded_queries = False  # also for modules whose class replace_attention swaps

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None, *, backend: str = "auto", skip_padded_queries: bool = False):
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim: expected a multiple of num_heads={num_heads}, got {embed_dim}")
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim,
                         vdim, batch_first, device, dtype)
        self.backend = backend
        self.skip_padded_queries = _check_flag(skip_padded_queries)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, *, backend: str = "auto",
                   skip_padded_queries: bool = False) -> "MultiHeadAttention":
        """A fastattn module sharing `mha`'s parameters (as SyncBatchNorm.convert_sync_batchnorm
        does), with its device, dtype and train/eval mode."""
        new = cls.__new__(cls)
        new.__dict__.update(mha.__dict__)
        nn.Module.__init__(new)  # its own hook and parameter dicts...
        new._parameters.update(mha._parameters)  # ...holding the same parameters
        new._buffers.update(mha._buffers)
        new._modules.update(mha._modules)
        new.training = mha.training
        new.backend = backend
        new.skip_padded_queries = _check_flag(skip_padded_queries)
        return new

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if query.is_nested or key.is_nested or value.is_nested:
            if not self._torch_runs_nested(query, key, value, key_padding_mask, attn_mask):
                return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                       average_attn_weights, is_causal)  # raises torch's error
            return self._forward_nested(query, need_weights, average_attn_weights, is_causal)
        packed = query is key and key is value and self._qkv_same_embed_dim
        kv_packed = key is value and self._qkv_same_embed_dim
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            query, key, value = (x.unsqueeze(batch_dim) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        seq_dim = 1 - batch_dim
        B, L, S = query.shape[batch_dim], query.shape[seq_dim], key.shape[seq_dim]
        self._check_shapes(query, key, value, key_padding_mask, attn_mask, B, L, S, is_batched)

        if self.skip_padded_queries and packed and key_padding_mask is not None:
            out, weights = self._attend_valid_tokens(query, key_padding_mask, attn_mask, is_causal,
                                                     need_weights, B, L)
        else:
            out, weights = self._attend_padded(query, key, value, key_padding_mask, attn_mask, is_causal,
                                               need_weights, packed, kv_packed, B, L, S)
        if weights is not None:
            weights = weights.mean(dim=1) if average_attn_weights else weights
        if not is_batched:
            out = out.squeeze(batch_dim)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    def _attend_padded(self, query, key, value, key_padding_mask, attn_mask, is_causal, need_weights,
                       packed, kv_packed, B, L, S) -> tuple[Tensor, Tensor | None]:
        """The default path: the padded batch through the fused kernel. Returns the output in the
        input's layout and, if asked, the weights (B, H, L, S)."""
        seq_dim = 1 if self.batch_first else 0
        masks = self._mask_keywords(key_padding_mask, attn_mask, is_causal, B, L, S, query.device)
        if packed and self.bias_k is None and not self.add_zero_attn:  # the QKV GEMM's heads, in two views
            qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
            qkv = qkv.view(*qkv.shape[:2], 3, self.num_heads, self.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4) if self.batch_first else qkv.permute(2, 1, 3, 0, 4)
            return self._attend_heads(q, k, v, masks, need_weights, query.dtype)
        q, k, v = self._project(query, key, value, packed, kv_packed)  # input layout, (..., E)
        one_key = (B, 1, self.embed_dim) if self.batch_first else (1, B, self.embed_dim)
        if self.bias_k is not None:  # a learned key/value appended to every sequence
            k = torch.cat([k, self.bias_k.expand(one_key)], dim=seq_dim)
            v = torch.cat([v, self.bias_v.expand(one_key)], dim=seq_dim)
        if self.add_zero_attn:  # then a zero key/value
            k = torch.cat([k, k.new_zeros(one_key)], dim=seq_dim)
            v = torch.cat([v, v.new_zeros(one_key)], dim=seq_dim)
        if k.shape[seq_dim] != S:
            masks.append_keys(k.shape[seq_dim] - S, L, S)

        q, k, v = (self._heads(t) for t in (q, k, v))  # (B, H, N, D) views, no copies
        return self._attend_heads(q, k, v, masks, need_weights, query.dtype)

    def _attend_heads(self, q, k, v, masks: _MaskKeywords, need_weights, dtype) -> tuple[Tensor, Tensor | None]:
        """The fused kernel on (B, H, N, D) views of the projections; the output projection."""
        out = attention(q, k, v, key_padding_mask=masks.padding, attn_mask=masks.attn,
                        causal=masks.causal, dropout_p=self.dropout if self.training else 0.0,
                        backend=self.backend)  # (B, H, L, D), laid out like q
        out = out.permute(0, 2, 1, 3) if self.batch_first else out.permute(2, 0, 1, 3)
        out = F.linear(out.reshape(*out.shape[:2], self.embed_dim), self.out_proj.weight, self.out_proj.bias)

        weights = None
        if need_weights:  # exact weights from a separate, unfused computation
            weights = attention_probabilities(q, k, masks.padding, masks.attn, masks.causal)[0]
            weights = weights.to(dtype)  # the input's (q's under autocast)
        return out, weights

    def _attend_valid_tokens(self, x, key_padding_mask, attn_mask, is_causal, need_weights, B, L
                             ) -> tuple[Tensor, Tensor | None]:
        """skip_padded_queries: self-attention of the valid tokens of x, packed. Returns the
        output in x's layout, zero at the padding, and, if asked, the weights (B, H, L, L)."""
        if self.bias_k is not None or self.add_zero_attn:
            raise ValueError("skip_padded_queries: expected add_bias_kv=False and add_zero_attn=False (the "
                             f"appended keys are not in the packed sequences), got add_bias_kv="
                             f"{self.bias_k is not None} and add_zero_attn={self.add_zero_attn}")
        masks = self._mask_keywords(key_padding_mask, attn_mask, is_causal, B, L, L, x.device)
        if masks.padding is None:
            raise ValueError("key_padding_mask: with skip_padded_queries, expected a bool mask or a float one of "
                             "0 and -inf (bool only under torch.compile), got other float values")
        if masks.attn is not None:
            raise ValueError("attn_mask: with skip_padded_queries, expected a causal mask (under torch.compile, "
                             "with is_causal=True), got another mask")
        # Each (batch, position)'s row in x.flatten(0, 1), as (B, L) in either layout: unpad packs
        # these row numbers rather than x, which batch_first=False would copy whole.
        rows = torch.arange(B * L, device=x.device)
        rows = rows.view(B, L) if self.batch_first else rows.view(L, B).t()
        rows, cu_seqlens, _, longest = unpad(rows, masks.padding)
        torch._check(longest >= 0)  # a no-op in eager; under torch.compile, bounds the traced length
        qkv = F.linear(x.flatten(0, 1)[rows], self.in_proj_weight, self.in_proj_bias)  # (total, 3E)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(1)  # (total, H, D) views
        # Torch's positional causal mask, restricted to the valid tokens, keeps their order: it is
        # causal within each packed sequence wherever the padding lies.
        out = attention_varlen(q, k, v, cu_seqlens, cu_seqlens, longest, longest, causal=masks.causal,
                               dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        out = F.linear(out.flatten(1), self.out_proj.weight, self.out_proj.bias)
        out = pad(out, rows, *x.shape[:2])  # zeros at the padded positions

        weights = None
        if need_weights:  # the default path's, over the padded batch, then zero in padded query rows
            q, k = (self._heads(pad(t, rows, *x.shape[:2]).flatten(2)) for t in (q, k))
            weights = attention_probabilities(q, k, masks.padding, None, masks.causal)[0]
            weights = weights.masked_fill(masks.padding[:, None, :, None], 0.0).to(x.dtype)
        return out, weights

    def _torch_runs_nested(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """Whether nn.MultiheadAttention runs these nested inputs: only on its inference fast
        path, so self-attention on a strided nested batch in eval under no_grad, with these
        conditions (torch's, less the device and make_fx checks)."""
        params = (self.in_proj_weight, self.in_proj_bias, self.out_proj.weight, self.out_proj.bias)
        return (torch.backends.mha.get_fastpath_enabled() and query.dim() == 3
                and query is key and key is value and not self.training and self.batch_first
                and self.num_heads % 2 == 0 and self._qkv_same_embed_dim
                and self.in_proj_bias is not None and self.bias_k is None and not self.add_zero_attn
                and self.in_proj_weight.dtype == self.in_proj_bias.dtype == query.dtype
                and key_padding_mask is None and attn_mask is None
                and not torch.is_autocast_enabled()
                and not torch.overrides.has_torch_function((query, *params))  # jagged layout
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, *params))))

    def _forward_nested(self, x: Tensor, need_weights: bool, average_attn_weights: bool,
                        is_causal: bool) -> tuple[Tensor, Tensor | None]:
        """Self-attention of a strided nested (B, ragged L, E) batch: right-padded, with a key
        padding mask, through the dense path. Returns, as torch does, a nested output and
        padded weights (B, [H,] Lmax, Lmax) that are zero outside each sequence. Unlike torch,
        which ignores is_causal here, is_causal applies (within each sequence)."""
        lengths = torch.tensor([t.shape[0] for t in x.unbind()], device=x.device)
        padded = x.to_padded_tensor(0.0)
        valid = torch.arange(padded.shape[1], device=x.device) < lengths[:, None]  # (B, Lmax)
        out, weights = self.forward(padded, padded, padded, key_padding_mask=padding_from_keep(valid),
                                    need_weights=need_weights,
                                    average_attn_weights=average_attn_weights, is_causal=is_causal)
        out = torch._nested_tensor_from_mask(out, valid, mask_check=False)
        if weights is not None:  # torch's weights are zero in the padding queries' rows too
            rows = valid.unsqueeze(-1) if average_attn_weights else valid[:, None, :, None]
            weights = weights.masked_fill(~rows, 0.0)
        return out, weights

    def _check_shapes(self, query, key, value, key_padding_mask, attn_mask, B, L, S, is_batched):
        """Shapes torch checks late or not at all, as ValueErrors naming the argument."""
        def shape(x):  # as the caller passed it
            return tuple(x.shape if is_batched else x.squeeze(0 if self.batch_first else 1).shape)

        for name, x, dim in (("query", query, self.embed_dim), ("key", key, self.kdim),
                             ("value", value, self.vdim)):
            if x.shape[-1] != dim:
                raise ValueError(f"{name}: expected last dimension {dim}, got shape {shape(x)}")
        if value.shape[:2] != key.shape[:2]:
            raise ValueError(f"value: expected batch and length {tuple(key.shape[:2])} (key's), got {tuple(value.shape[:2])}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, S):
            expected = (B, S) if is_batched else (S,)
            got = tuple(key_padding_mask.shape) if is_batched else tuple(key_padding_mask.shape[1:])
            raise ValueError(f"key_padding_mask: expected shape {expected}, got {got}")
        if attn_mask is not None:
            expected = (L, S) if attn_mask.dim() == 2 else (B * self.num_heads, L, S)
            if tuple(attn_mask.shape) != expected:
                raise ValueError(f"attn_mask: expected shape {expected}, got {tuple(attn_mask.shape)}")

    def _project(self, query, key, value, packed: bool, kv_packed: bool):
        E = self.embed_dim
        if packed:  # self-attention: one GEMM for q, k and v
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).split(E, dim=-1)
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.split(E)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.split(E) if self.in_proj_bias is not None else (None,) * 3
        q = F.linear(query, w_q, b_q)
        if kv_packed:  # encoder-decoder attention: one GEMM for k and v
            w_kv = self.in_proj_weight[E:]
            b_kv = None if self.in_proj_bias is None else self.in_proj_bias[E:]
            return (q, *F.linear(key, w_kv, b_kv).split(E, dim=-1))
        return q, F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _heads(self, x: Tensor) -> Tensor:
        """(B, N, E) or (N, B, E) -> a (B, H, N, D) view."""
        x = x.unflatten(-1, (self.num_heads, self.head_dim))
        return x.transpose(1, 2) if self.batch_first else x.permute(1, 2, 0, 3)

    def _mask_keywords(self, key_padding_mask, attn_mask, is_causal, B, L, S, device) -> _MaskKeywords:
        """torch's masks (bool True = hidden, float added) in the kernel's terms. Padding and
        causal masks become a (B, S) padding mask and a flag, never a (B*H, L, S) tensor."""
        masks = _MaskKeywords(device)
        if key_padding_mask is None and attn_mask is None:
            masks.causal = bool(is_causal)
            return masks
        inspect = not torch.compiler.is_compiling()  # value checks would break the graph
        if key_padding_mask is not None:
            if key_padding_mask.dtype == torch.bool:
                masks.padding = key_padding_mask
            elif not key_padding_mask.is_floating_point():
                raise TypeError(f"key_padding_mask: expected dtype torch.bool or a float dtype, got {key_padding_mask.dtype}")
            elif inspect and _only_zero_or_neginf(key_padding_mask):  # a bool mask made float
                masks.padding = padding_from_float(key_padding_mask)
            else:
                masks.add_float(key_padding_mask.view(B, 1, 1, S))
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
                raise TypeError(f"attn_mask: expected dtype torch.bool or a float dtype, got {attn_mask.dtype}")
            if is_causal or (inspect and attn_mask.dim() == 2 and _is_causal_mask(attn_mask)):
                masks.causal = True  # a hint, as in torch: the mask is taken to be causal
            else:
                mask = attn_mask if attn_mask.dim() == 2 else attn_mask.view(B, self.num_heads, L, S)
                if mask.dtype == torch.bool:
                    mask = attend_from_hidden(mask)
                    masks.attn = mask if masks.attn is None else masks.attn.masked_fill(~mask, -math.inf)
                else:
                    masks.add_float(mask)
        elif is_causal:
            masks.causal = True
        return masks
