"""The ground truth: attention in plain PyTorch, materialising the full score matrix.

Every backend is checked against this, computed in float64. It defines the semantics:
masks compose, a query that sees no key gives a zero row and lse = -inf, and gradients
(by autograd through reference_attention, or by reference_attention_backward's formulas)
are zero for such rows.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def attention_probabilities(q, k, key_padding_mask=None, attn_mask=None, causal=False, scale=None):
    """Softmax probabilities p (B, H, Nq, Nk) and lse (B, H, Nq), in at least float32. Fully
    masked rows give p = 0 and lse = -inf, without NaN in value or gradient: the max is a
    constant shift, and empty rows divide by 1."""
    compute = torch.promote_types(q.dtype, torch.float32)
    Nq, Nk = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA: head h reads kv head h // group
    s = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, -math.inf)
        else:
            s = s + attn_mask.to(compute)
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, None, :], -math.inf)
    if causal:
        hidden = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).triu(1)  # key j > query i
        s = s.masked_fill(hidden, -math.inf)
    m = s.detach().amax(dim=-1, keepdim=True) if Nk else s.new_full((*s.shape[:-1], 1), -math.inf)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    empty = l == 0
    l_safe = torch.where(empty, torch.ones_like(l), l)
    lse = torch.where(empty, -math.inf, m + torch.log(l_safe))
    return e / l_safe, lse.squeeze(-1)


def reference_attention(
    q: Tensor,  # (B, H, Nq, D)
    k: Tensor,  # (B, Hkv, Nk, D)
    v: Tensor,  # (B, Hkv, Nk, D)
    key_padding_mask: Tensor | None = None,  # (B, Nk) bool, True = ignore
    attn_mask: Tensor | None = None,  # broadcastable to (B, H, Nq, Nk); bool True = may attend
    causal: bool = False,
    scale: float | None = None,
    dropout_mask: Tensor | None = None,  # (B, H, Nq, Nk) keep multipliers: 0 or 1 / (1 - p)
) -> tuple[Tensor, Tensor]:
    """Returns (out (B, H, Nq, D) in q's dtype, lse (B, H, Nq)) computed in at least float32."""
    p, lse = attention_probabilities(q, k, key_padding_mask, attn_mask, causal, scale)
    if dropout_mask is not None:
        p = p * dropout_mask
    v = v.to(p.dtype).repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return (p @ v).to(q.dtype), lse


def reference_attention_backward(
    dout: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
    key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None,
    causal: bool = False, scale: float | None = None, dropout_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of reference_attention by the explicit formulas the fused kernels use:
    dS = P * (dP - rowsum(P * dP) + dlse), dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    B, Hkv, Nk, D = k.shape
    group = q.shape[1] // Hkv
    p, _ = attention_probabilities(q, k, key_padding_mask, attn_mask, causal, scale)
    ke, ve = (t.to(p.dtype).repeat_interleave(group, dim=1) for t in (k, v))  # (B, H, Nk, D)
    do = dout.to(p.dtype)
    pd, dp = p, do @ ve.transpose(-1, -2)  # (B, H, Nq, Nk)
    if dropout_mask is not None:
        pd, dp = p * dropout_mask, dp * dropout_mask
    offset = (p * dp).sum(-1, keepdim=True)
    if dlse is not None:
        offset = offset - dlse.to(p.dtype).nan_to_num().unsqueeze(-1)
    ds = p * (dp - offset)
    dq = scale * ds @ ke
    dk = scale * (ds.transpose(-1, -2) @ q.to(p.dtype)).view(B, Hkv, group, Nk, D).sum(2)
    dv = (pd.transpose(-1, -2) @ do).view(B, Hkv, group, Nk, D).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
