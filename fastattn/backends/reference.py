"""Backend `reference`: plain PyTorch, any device, every feature; slow and O(N^2) memory."""
from __future__ import annotations

import torch

from ..reference import reference_attention, reference_attention_backward
from ..call import Call
from .base import SCORE_MODS, Backend, Capabilities, empty_lse, empty_out


def dropout_multipliers(q, kv_len: int, dropout_p: float, seed: int):
    """(B, H, Nq, Nk) keep / (1 - p), drawn from `seed` so the backward redraws the same."""
    if dropout_p == 0.0:
        return None
    gen = torch.Generator(device=q.device).manual_seed(seed)
    B, H, Nq, _ = q.shape
    keep = torch.rand(B, H, Nq, kv_len, generator=gen, device=q.device) >= dropout_p
    return keep.to(torch.promote_types(q.dtype, torch.float32)) / (1.0 - dropout_p)


def _own_slopes(slopes, b: int):
    """Row b's ALiBi slopes: per-row (B, H) slopes sliced to (1, H), per-head (H,) ones as they are."""
    return slopes[b:b + 1] if slopes is not None and slopes.dim() == 2 else slopes


def _sequences(call: Call, heads: int):
    """Packed sequences one by one: (query rows, key rows, the sequence's own Call) of each: not
    packed, its ALiBi slopes sliced, the dropout seed + b * H (as the kernels draw it)."""
    cq, ck = call.cu_seqlens_q.tolist(), call.cu_seqlens_k.tolist()
    return [(slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1]),
             call._replace(cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0,
                           alibi_slopes=_own_slopes(call.alibi_slopes, b), seed=call.seed + b * heads))
            for b in range(len(cq) - 1)]


class ReferenceBackend(Backend):
    name = "reference"
    caps = Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        max_head_dim=2**31 - 1,
        score_mods=frozenset(SCORE_MODS),
    )

    def forward(self, q, k, v, call: Call):
        out, lse = empty_out(q), empty_lse(q)
        if call.varlen:
            for qs, ks, own in _sequences(call, q.shape[1]):
                o, l = self.forward(q[:, :, qs], k[:, :, ks], v[:, :, ks], own)
                out[:, :, qs], lse[:, :, qs] = o, l
            return out, lse
        keep = dropout_multipliers(q, k.shape[2], call.dropout_p, call.seed)
        o, l = reference_attention(q, k, v, call.key_padding, call.attn_mask, call.causal, call.scale, keep,
                                   **call.score_mods())
        return out.copy_(o), lse.copy_(l)

    def decode(self, q, k_cache, v_cache, seqlens, call: Call):
        """Each row as a lone call on its valid keys, end-aligned (one host sync: the lengths)."""
        out, lse = empty_out(q), empty_lse(q)
        for b, length in enumerate(seqlens.tolist()):
            own = call._replace(alibi_slopes=_own_slopes(call.alibi_slopes, b))
            o, l = reference_attention(q[b:b + 1], k_cache[b:b + 1, :, :length], v_cache[b:b + 1, :, :length],
                                       causal=call.causal, scale=call.scale, **own.score_mods())
            out[b:b + 1], lse[b:b + 1] = o, l
        return out, lse

    def backward(self, dout, dlse, q, k, v, out, lse, call: Call):
        if call.varlen:
            # The sequences cover every row; contiguous, as the op's fake promises.
            grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
            for qs, ks, own in _sequences(call, q.shape[1]):
                g = self.backward(dout[:, :, qs], None if dlse is None else dlse[:, :, qs], q[:, :, qs],
                                  k[:, :, ks], v[:, :, ks], out[:, :, qs], lse[:, :, qs], own)
                for grad, rows, part in zip(grads, (qs, ks, ks), g):
                    grad[:, :, rows] = part
            return tuple(grads)
        keep = dropout_multipliers(q, k.shape[2], call.dropout_p, call.seed)
        return reference_attention_backward(dout, dlse, q, k, v, call.key_padding, call.attn_mask, call.causal,
                                            call.scale, keep, **call.score_mods())
