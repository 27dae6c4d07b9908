"""The ground truth: attention in plain PyTorch, materialising the full score matrix.

Every backend is checked against this, computed in float64. It defines the semantics:
masks compose, a query that sees no key gives a zero row and lse = -inf (with a sink: the
sink), and gradients (by autograd through reference_attention, or by reference_attention_backward's
formulas and sink_gradient) are zero for such rows.

The score of query i and key j, in order: s = scale q.k; softcapped, s = c tanh(s / c); ALiBi's
bias added, - slope |j - (i + offset)|; attn_mask added (float) or applied (bool); then the key
padding, causal (j <= i + offset) and window (i + offset - left <= j <= i + offset + right, -1 =
unbounded) masks. offset aligns the queries to the keys: 0 top-left (SDPA's), Nk - Nq bottom-right
(FlashAttention's: the last query sees the last key). A sink (one logit per head) adds exp(sink)
to each softmax denominator, with no value: p_j = exp(s_j - lse), lse = log(exp(sink) + sum exp(s_j)).

Non-finite inputs (README, "Non-finite inputs"): a pair a mask hides (score -inf) contributes nothing,
not even 0 * NaN, to the output, the lse or a gradient; a non-finite query, key, value or dO that a row
sees makes that row's output (or the gradients through it) non-finite, as in SDPA.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

ALIGNS = ("top_left", "bottom_right")


def relative_positions(Nq: int, Nk: int, align: str, device) -> Tensor:
    """(Nq, Nk) int64: key position minus query position, j - (i + offset)."""
    offset = 0 if align == "top_left" else Nk - Nq
    return torch.arange(Nk, device=device)[None, :] - (torch.arange(Nq, device=device)[:, None] + offset)


def attention_scores(q, k, key_padding_mask=None, attn_mask=None, causal=False, scale=None, window_size=(-1, -1),
                     softcap=0.0, alibi_slopes=None, align="top_left"):
    """The scores s (B, H, Nq, Nk) in at least float32, -inf where masked, and the softcap's
    derivative ds/d(scale q.k) (None without one)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    Nq, Nk = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA: head h reads kv head h // group
    s = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    capped = None
    if softcap:
        s = softcap * torch.tanh(s / softcap)
        capped = 1.0 - (s.detach() / softcap) ** 2
    left, right = window_size
    positional = causal or left >= 0 or right >= 0 or alibi_slopes is not None
    rel = relative_positions(Nq, Nk, align, q.device) if positional else None
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(compute)
        slopes = slopes[None, :, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        s = s - slopes * rel.abs().to(compute)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, -math.inf)
        else:  # -inf hides the key: selected, so a NaN score behind it stays hidden
            m = attn_mask.to(compute)
            s = torch.where(m == -math.inf, -math.inf, s + m)
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, None, :], -math.inf)
    if causal or left >= 0 or right >= 0:
        hidden = torch.zeros(Nq, Nk, dtype=torch.bool, device=q.device)
        if causal:
            hidden |= rel > 0
        if right >= 0:
            hidden |= rel > right
        if left >= 0:
            hidden |= rel < -left
        s = s.masked_fill(hidden, -math.inf)
    return s, capped


def attention_probabilities(q, k, key_padding_mask=None, attn_mask=None, causal=False, scale=None, window_size=(-1, -1),
                            softcap=0.0, alibi_slopes=None, sinks=None, align="top_left"):
    """Softmax probabilities p (B, H, Nq, Nk) and lse (B, H, Nq), in at least float32. Fully
    masked rows give p = 0 and lse = -inf (the sink with one), without NaN in value or gradient:
    the max is a constant shift, and empty rows divide by 1."""
    s, _ = attention_scores(q, k, key_padding_mask, attn_mask, causal, scale, window_size, softcap, alibi_slopes, align)
    return _softmax(s, sinks)


def _softmax(s: Tensor, sinks: Tensor | None):
    Nk = s.shape[-1]
    m = s.detach().amax(dim=-1, keepdim=True) if Nk else s.new_full((*s.shape[:-1], 1), -math.inf)
    sink = None if sinks is None else sinks.to(s.dtype)[None, :, None, None].expand_as(m)
    if sink is not None:
        m = torch.maximum(m, sink.detach())
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    if sink is not None:
        l = l + torch.exp(sink - m)
    empty = l == 0
    l_safe = torch.where(empty, torch.ones_like(l), l)
    lse = torch.where(empty, -math.inf, m + torch.log(l_safe))
    return torch.where(s == -math.inf, 0.0, e / l_safe), lse.squeeze(-1)  # hidden: 0 even where l is NaN


def _finite(t: Tensor) -> Tensor:
    """t with non-finite elements 0: an operand of a product whose zero factors are hidden pairs."""
    return torch.where(torch.isfinite(t), t, 0.0)


def _product(a: Tensor, b: Tensor, seen: Tensor) -> Tensor:
    """a @ b where a is 0 at the pairs `seen` (a's shape) leaves out: b's non-finite elements reach
    only the rows that see them (made NaN there), never through 0 * NaN. The slow path only when b
    holds some (one host sync; the reference's speed is not a goal). A score of -inf is hidden."""
    if bool(torch.isfinite(b).all()):
        return a @ b
    reached = seen.to(b.dtype) @ (~torch.isfinite(b)).to(b.dtype) > 0
    return torch.where(reached, math.nan, a @ _finite(b))


def reference_attention(
    q: Tensor,  # (B, H, Nq, D)
    k: Tensor,  # (B, Hkv, Nk, D)
    v: Tensor,  # (B, Hkv, Nk, D)
    key_padding_mask: Tensor | None = None,  # (B, Nk) bool, True = ignore
    attn_mask: Tensor | None = None,  # broadcastable to (B, H, Nq, Nk); bool True = may attend
    causal: bool = False,
    scale: float | None = None,
    dropout_mask: Tensor | None = None,  # (B, H, Nq, Nk) keep multipliers: 0 or 1 / (1 - p)
    *,
    window_size: tuple[int, int] = (-1, -1),  # (left, right) keys around the aligned diagonal; -1: unbounded
    softcap: float = 0.0,  # 0: off
    alibi_slopes: Tensor | None = None,  # (H,) or (B, H) float32
    sinks: Tensor | None = None,  # (H,) float32 logits
    align: str = "top_left",  # or "bottom_right": where the causal mask, the window and ALiBi put query i
) -> tuple[Tensor, Tensor]:
    """Returns (out (B, H, Nq, D) in q's dtype, lse (B, H, Nq)) computed in at least float32."""
    s, _ = attention_scores(q, k, key_padding_mask, attn_mask, causal, scale, window_size, softcap, alibi_slopes,
                            align)
    p, lse = _softmax(s, sinks)
    if dropout_mask is not None:
        p = p * dropout_mask
    v = v.to(p.dtype).repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = _product(p, v, s != -math.inf)
    if sinks is not None:  # a NaN sink: its head NaN, rows that see no key included
        out = torch.where(sinks.isnan()[None, :, None, None], math.nan, out)
    return out.to(q.dtype), lse


def reference_attention_backward(
    dout: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
    key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None,
    causal: bool = False, scale: float | None = None, dropout_mask: Tensor | None = None, *,
    window_size=(-1, -1), softcap: float = 0.0, alibi_slopes: Tensor | None = None, sinks: Tensor | None = None,
    align: str = "top_left",
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of reference_attention by the explicit formulas the fused kernels use:
    dS = P * (dP - rowsum(P * dP) + dlse), times the softcap's derivative 1 - (s / c)^2 where one
    is set, dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO. A sink changes none of them (P
    leaves it out; lse takes it in); its own gradient is sink_gradient's."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    B, Hkv, Nk, D = k.shape
    group = q.shape[1] // Hkv
    s, capped = attention_scores(q, k, key_padding_mask, attn_mask, causal, scale, window_size, softcap,
                                 alibi_slopes, align)
    p, _ = _softmax(s, sinks)
    seen = s != -math.inf
    ke, ve = (t.to(p.dtype).repeat_interleave(group, dim=1) for t in (k, v))  # (B, H, Nk, D)
    do = dout.to(p.dtype)
    pd, dp = p, do @ ve.transpose(-1, -2)  # (B, H, Nq, Nk)
    if dropout_mask is not None:
        pd, dp = p * dropout_mask, dp * dropout_mask
    dp = torch.where(seen, dp, 0.0)  # a hidden value's NaN stays out
    offset = (p * dp).sum(-1, keepdim=True)
    if dlse is not None:
        offset = offset - dlse.to(p.dtype).nan_to_num().unsqueeze(-1)
    ds = p * (dp - offset)
    if capped is not None:
        ds = ds * capped
    ds = torch.where(seen, ds, 0.0)
    dq = scale * _product(ds, ke, seen)
    dk = scale * _product(ds.transpose(-1, -2), q.to(p.dtype), seen.transpose(-1, -2)).view(B, Hkv, group, Nk, D).sum(2)
    dv = _product(pd.transpose(-1, -2), do, seen.transpose(-1, -2)).view(B, Hkv, group, Nk, D).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def sink_gradient(dout: Tensor, dlse: Tensor | None, out: Tensor, lse: Tensor, sinks: Tensor) -> Tensor:
    """d sinks (H,) from what any backward has at hand: each row's sink probability
    exp(sink - lse) times its softmax offset delta = rowsum(dO * O) - dlse, summed with a minus
    over the head's rows (lse includes the sink, so no row is empty here)."""
    compute = torch.promote_types(out.dtype, torch.float32)
    out = out.to(compute)
    delta = torch.where(out == 0, 0.0, dout.to(compute) * out).sum(-1)  # (B, H, Nq); a zero row: 0 beside any dO
    if dlse is not None:
        delta = delta - dlse.to(compute)
    sink = sinks.to(compute)[None, :, None]
    p_sink = torch.where(sink == -math.inf, 0.0, torch.exp(sink - lse.to(compute)))  # -inf: no sink, even where lse is -inf
    return -(p_sink * delta).sum((0, 2)).to(sinks.dtype)
