"""Backend `reference`: plain PyTorch, any device, every feature; slow and O(N^2) memory."""
from __future__ import annotations

import dataclasses

import torch

from ..reference import reference_attention, reference_attention_backward
from .base import SCORE_MODS, Backend, Capabilities, Masks, empty_lse, empty_out


def dropout_multipliers(q, kv_len: int, dropout_p: float, seed: int):
    """(B, H, Nq, Nk) keep / (1 - p), drawn from `seed` so the backward redraws the same."""
    if dropout_p == 0.0:
        return None
    gen = torch.Generator(device=q.device).manual_seed(seed)
    B, H, Nq, _ = q.shape
    keep = torch.rand(B, H, Nq, kv_len, generator=gen, device=q.device) >= dropout_p
    return keep.to(torch.promote_types(q.dtype, torch.float32)) / (1.0 - dropout_p)


def _sequences(masks: Masks):
    """Packed sequences one by one: (query rows, key rows, the sequence's own Masks: its score
    modifiers, per-sequence ALiBi slopes sliced) of each."""
    cq, ck = masks.cu_seqlens_q.tolist(), masks.cu_seqlens_k.tolist()
    slopes = masks.alibi_slopes
    return [(slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1]),
             Masks(None, None, None, window_left=masks.window_left, window_right=masks.window_right,
                   softcap=masks.softcap, alibi_slopes=slopes[b:b + 1] if slopes is not None and slopes.dim() == 2
                   else slopes, sinks=masks.sinks, bottom_right=masks.bottom_right))
            for b in range(len(cq) - 1)]


class ReferenceBackend(Backend):
    name = "reference"
    caps = Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        max_head_dim=2**31 - 1,
        score_mods=frozenset(SCORE_MODS),
    )

    def forward(self, q, k, v, masks: Masks, causal, scale, dropout_p, seed):
        out, lse = empty_out(q), empty_lse(q)
        if masks.varlen:  # sequence b as a lone call with seed + b * H, as the kernels draw it
            for b, (qs, ks, own) in enumerate(_sequences(masks)):
                o, l = self.forward(q[:, :, qs], k[:, :, ks], v[:, :, ks], own, causal, scale, dropout_p,
                                    seed + b * q.shape[1])
                out[:, :, qs], lse[:, :, qs] = o, l
            return out, lse
        keep = dropout_multipliers(q, k.shape[2], dropout_p, seed)
        o, l = reference_attention(q, k, v, masks.key_padding, masks.attn_mask, causal, scale, keep,
                                   **masks.score_mods())
        return out.copy_(o), lse.copy_(l)

    def decode(self, q, k_cache, v_cache, seqlens, masks: Masks, causal, scale):
        """Each row as a lone call on its valid keys, end-aligned (one host sync: the lengths)."""
        out, lse = empty_out(q), empty_lse(q)
        slopes = masks.alibi_slopes
        for b, length in enumerate(seqlens.tolist()):
            own = dataclasses.replace(masks, alibi_slopes=slopes[b:b + 1] if slopes is not None and slopes.dim() == 2
                                      else slopes)
            o, l = reference_attention(q[b:b + 1], k_cache[b:b + 1, :, :length], v_cache[b:b + 1, :, :length],
                                       causal=causal, scale=scale, **own.score_mods())
            out[b:b + 1], lse[b:b + 1] = o, l
        return out, lse

    def backward(self, dout, dlse, q, k, v, out, lse, masks: Masks, causal, scale, dropout_p, seed):
        if masks.varlen:
            # The sequences cover every row; contiguous, as the op's fake promises.
            grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
            for b, (qs, ks, own) in enumerate(_sequences(masks)):
                g = self.backward(dout[:, :, qs], None if dlse is None else dlse[:, :, qs], q[:, :, qs],
                                  k[:, :, ks], v[:, :, ks], out[:, :, qs], lse[:, :, qs], own, causal, scale,
                                  dropout_p, seed + b * q.shape[1])
                for grad, rows, part in zip(grads, (qs, ks, ks), g):
                    grad[:, :, rows] = part
            return tuple(grads)
        keep = dropout_multipliers(q, k.shape[2], dropout_p, seed)
        return reference_attention_backward(dout, dlse, q, k, v, masks.key_padding, masks.attn_mask, causal, scale,
                                            keep, **masks.score_mods())
