"""Backend `reference`: plain PyTorch, any device, every feature; slow and O(N^2) memory."""
from __future__ import annotations

import torch

from ..reference import reference_attention, reference_attention_backward
from .base import Backend, Capabilities, Masks, empty_lse, empty_out


def dropout_multipliers(q, kv_len: int, dropout_p: float, seed: int):
    """(B, H, Nq, Nk) keep / (1 - p), drawn from `seed` so the backward redraws the same."""
    if dropout_p == 0.0:
        return None
    gen = torch.Generator(device=q.device).manual_seed(seed)
    B, H, Nq, _ = q.shape
    keep = torch.rand(B, H, Nq, kv_len, generator=gen, device=q.device) >= dropout_p
    return keep.to(torch.promote_types(q.dtype, torch.float32)) / (1.0 - dropout_p)


class ReferenceBackend(Backend):
    name = "reference"
    caps = Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        max_head_dim=2**31 - 1,
    )

    def forward(self, q, k, v, masks: Masks, causal, scale, dropout_p, seed):
        keep = dropout_multipliers(q, k.shape[2], dropout_p, seed)
        out, lse = reference_attention(q, k, v, masks.key_padding, masks.attn_mask, causal, scale, keep)
        return empty_out(q).copy_(out), empty_lse(q).copy_(lse)

    def backward(self, dout, dlse, q, k, v, out, lse, masks: Masks, causal, scale, dropout_p, seed):
        keep = dropout_multipliers(q, k.shape[2], dropout_p, seed)
        return reference_attention_backward(dout, dlse, q, k, v, masks.key_padding,
                                            masks.attn_mask, causal, scale, keep)
