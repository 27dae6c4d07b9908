"""replace_attention: move a whole model onto fastattn in place."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import attention
from ..masks import padding_from_keep
from .multihead_attention import MultiHeadAttention


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer whose forward always goes through self_attn. torch's inference
    fast path (torch._transformer_encoder_layer_fwd) would run its own attention instead."""

    def forward(self, src: Tensor, src_mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if src.is_nested:  # from nn.TransformerEncoder's nested-tensor fast path
            return self._forward_nested(src, src_mask, is_causal)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _forward_nested(self, src: Tensor, src_mask: Tensor | None, is_causal: bool) -> Tensor:
        """A nested batch (from nn.TransformerEncoder's inference fast path, so eval mode): the
        position-wise parts run on the packed real tokens only, as torch's nested path does, and
        attention on a right-padded layout with a padding mask."""
        lengths = [t.shape[0] for t in src.unbind()]
        x = torch.cat(src.unbind())  # (T, E): the real tokens, packed
        valid = torch.arange(max(lengths), device=x.device)[None, :] < torch.tensor(lengths, device=x.device)[:, None]
        if self.norm_first:
            x = x + self._sa_packed(self.norm1(x), valid, src_mask, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_packed(x, valid, src_mask, is_causal))
            x = self.norm2(x + self._ff_block(x))
        return torch._nested_tensor_from_mask(_unpack(x, valid), valid, mask_check=False)

    def _sa_packed(self, x: Tensor, valid: Tensor, src_mask: Tensor | None, is_causal: bool) -> Tensor:
        """Self-attention of packed tokens x (T, E); valid (B, Lmax) says where they sit."""
        mha = self.self_attn
        B, L = valid.shape
        qkv = _unpack(F.linear(x, mha.in_proj_weight, mha.in_proj_bias), valid)  # (B, L, 3E)
        q, k, v = (t.unflatten(-1, (mha.num_heads, mha.head_dim)).transpose(1, 2)
                   for t in qkv.split(mha.embed_dim, dim=-1))  # (B, H, L, D) views
        if src_mask is not None:
            src_mask = src_mask[..., :L, :L]
        masks = mha._mask_keywords(padding_from_keep(valid), src_mask, is_causal, B, L, L, x.device)
        out = attention(q, k, v, key_padding_mask=masks.padding, attn_mask=masks.attn,
                        causal=masks.causal, backend=mha.backend)  # (B, H, L, D)
        out = out.transpose(1, 2).reshape(B, L, mha.embed_dim)[valid]  # (T, E)
        return self.dropout1(F.linear(out, mha.out_proj.weight, mha.out_proj.bias))


def _unpack(x: Tensor, valid: Tensor) -> Tensor:
    """Packed rows (T, C) into a zero-padded (B, L, C) batch at the True places of valid."""
    out = x.new_zeros(*valid.shape, x.shape[-1])
    out[valid] = x
    return out


def replace_attention(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Swaps, in place, every torch.nn.MultiheadAttention inside `model` (the model itself
    included) for fastattn.MultiHeadAttention, and every nn.TransformerEncoderLayer for one
    whose inference fast path also runs on fastattn. The modules keep their identity, so
    parameters, device, dtype, train/eval mode, hooks and optimizers that hold the parameters
    are untouched. Subclasses of those torch modules are left alone (their forward may differ).
    Returns `model`."""
    for module in model.modules():
        if type(module) is nn.MultiheadAttention:
            module.__class__ = MultiHeadAttention
            module.backend = backend
        elif type(module) is nn.TransformerEncoderLayer:
            module.__class__ = TransformerEncoderLayer
    return model
