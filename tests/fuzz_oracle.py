"""The fuzzers' float64 oracle, written apart from fastattn.reference: every call (padded, packed,
decoding) becomes one dense problem, a visibility matrix plus an additive bias, and attention is
computed over the visible pairs only (torch.where, never a multiplication by 0).

It also says, for the non-finite policy (issue 36), which rows are tainted, which outputs and
gradients may therefore be non-finite, and which rows IEEE float64 makes non-finite."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Dense:
    """One attention problem over (B, H, Nq, Nk) pairs; k and v have H // group heads."""

    visible: Tensor  # (B, H, Nq, Nk) bool: the pairs no mask hides
    bias: Tensor | None  # (B, H, Nq, Nk) float64 added after softcapping (ALiBi + float mask), finite
    scale: float
    softcap: float = 0.0
    sinks: Tensor | None = None  # (H,): -inf = no sink
    keep: Tensor | None = None  # (B, H, Nq, Nk) dropout multipliers: 0 or 1 / (1 - p)


def positions(Nq: int, Nk: int, offset) -> Tensor:
    """(…, Nq, Nk) int64 j - (i + offset); offset an int or a tensor (…, 1, 1)."""
    return torch.arange(Nk)[None, :] - torch.arange(Nq)[:, None] - offset


def positional_visible(rel: Tensor, causal: bool, window: tuple[int, int]) -> Tensor:
    left, right = window
    seen = torch.ones_like(rel, dtype=torch.bool)
    if causal:
        seen &= rel <= 0
    if right >= 0:
        seen &= rel <= right
    if left >= 0:
        seen &= rel >= -left
    return seen


def expand_kv(t: Tensor, group: int) -> Tensor:
    return t.repeat_interleave(group, dim=1)


def scores(q: Tensor, k: Tensor, p: Dense) -> Tensor:
    """s (B, H, Nq, Nk) float64 for every pair (hidden ones included: the caller selects)."""
    s = (q.double() @ expand_kv(k.double(), q.shape[1] // max(k.shape[1], 1)).transpose(-1, -2)) * p.scale
    if p.softcap:
        s = p.softcap * torch.tanh(s / p.softcap)
    return s if p.bias is None else s + p.bias


def oracle(q: Tensor, k: Tensor, v: Tensor, p: Dense) -> tuple[Tensor, Tensor]:
    """(out (B, H, Nq, D), lse (B, H, Nq)) in float64 from finite inputs, differentiable in q, k, v
    and sinks. A row that sees nothing gives zeros and lse -inf (the sink with one)."""
    s = scores(q, k, p)
    vis = p.visible
    s_vis = torch.where(vis, s, torch.zeros_like(s))
    m = torch.where(vis, s, torch.full_like(s, -math.inf)).detach().amax(-1, keepdim=True) if s.shape[-1] else \
        s.new_full((*s.shape[:-1], 1), -math.inf)
    sink = None
    if p.sinks is not None:
        sink = p.sinks.double()[None, :, None, None].expand_as(m)
        m = torch.maximum(m, sink.detach())
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.where(vis, torch.exp(s_vis - m), torch.zeros_like(s))
    total = e.sum(-1, keepdim=True)
    if sink is not None:
        total = total + torch.exp(sink - m)
    empty = total == 0
    safe = torch.where(empty, torch.ones_like(total), total)
    probs = e / safe
    if p.keep is not None:
        probs = probs * p.keep
    out = probs @ expand_kv(v.double(), q.shape[1] // max(v.shape[1], 1))
    lse = torch.where(empty, torch.full_like(total, -math.inf), m + torch.log(safe)).squeeze(-1)
    return out, lse


def nonfinite_rows(t: Tensor) -> Tensor:
    """(…, N) bool: the rows (last dim reduced) holding a NaN or an inf."""
    return ~torch.isfinite(t).all(-1)


@dataclass
class Taint:
    """Where the non-finite policy lets a result be non-finite; everything else must be exact."""

    out_rows: Tensor  # (B, H, Nq): output row and lse exempt
    grad_rows: Tensor  # (B, H, Nq): dq row exempt
    keys: Tensor  # (B, Hkv, Nk): dk and dv rows exempt
    dv_keys: Tensor  # (B, Hkv, Nk): dv rows exempt (keys, and all of a head with a NaN dO row: README)
    sinks: Tensor  # (H,): d(sinks) exempt
    must_be_nonfinite: Tensor  # (B, H, Nq): tainted rows IEEE float64 makes non-finite


def taint(q: Tensor, k: Tensor, v: Tensor, p: Dense, dout: Tensor | None = None) -> Taint:
    """The policy's tainted rows, for inputs that may hold NaN/inf (q, k, v, dout, sinks)."""
    B, H, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = H // max(Hkv, 1)
    vis = p.visible
    sees = vis.any(-1)
    bad_kv = expand_kv((nonfinite_rows(k) | nonfinite_rows(v)).to(torch.int8), group).bool()  # (B, H, Nk)
    sees_bad = (vis & bad_kv[:, :, None, :]).any(-1)
    sink_nan = torch.zeros(H, dtype=torch.bool) if p.sinks is None else torch.isnan(p.sinks.detach())
    out_rows = sees & (nonfinite_rows(q) | sees_bad) | sink_nan[None, :, None]
    grad_rows = out_rows | (sees & nonfinite_rows(dout)) if dout is not None else out_rows
    keys = (vis & grad_rows[..., None]).view(B, Hkv, group, Nq, Nk).any(2).any(2) if Hkv else \
        torch.zeros(B, 0, Nk, dtype=torch.bool)
    head_tainted = grad_rows.any(2).any(0) if B and Nq else torch.zeros(H, dtype=torch.bool)
    # An infinite query or seen key element may make a score -inf, which hides its pair (README): such
    # a row may come out as zeros (nothing seen) or non-finite, so it only has to be exempt.
    inf_k = expand_kv(torch.isinf(k).any(-1).to(torch.int8), group).bool()
    either = sees & (torch.isinf(q).any(-1) | (vis & inf_k[:, :, None, :]).any(-1))
    dv_keys = keys
    if dout is not None and Hkv:  # triton lets a NaN dO reach the dv of keys its row does not see
        bad_do = nonfinite_rows(dout).view(B, Hkv, group, Nq).any(2).any(2)
        dv_keys = keys | bad_do[..., None]
    return Taint(out_rows, grad_rows, keys, dv_keys, head_tainted,
                 out_rows & ~either & ieee_nonfinite_rows(q, k, v, p))


def ieee_nonfinite_rows(q: Tensor, k: Tensor, v: Tensor, p: Dense) -> Tensor:
    """(B, H, Nq): rows whose output IEEE float64 arithmetic over the visible pairs makes
    non-finite: m = max(visible scores, sink) (NaN propagates), e = exp(s - m),
    out = sum e v / (sum e + exp(sink - m)); a row that sees nothing is zeros unless its sink is NaN."""
    vis = p.visible
    s = scores(q, k, p)
    m = torch.where(vis, s, torch.full_like(s, -math.inf)).amax(-1, keepdim=True) if s.shape[-1] else \
        s.new_full((*s.shape[:-1], 1), -math.inf)
    sink = None
    if p.sinks is not None:
        sink = p.sinks.detach().double()[None, :, None, None].expand_as(m)
        m = torch.maximum(m, sink)
    e = torch.where(vis, torch.exp(s - m), torch.zeros_like(s))
    total = e.sum(-1)
    if sink is not None:
        total = total + torch.exp(sink - m).squeeze(-1)
    group = q.shape[1] // max(k.shape[1], 1)
    bad_v = expand_kv(nonfinite_rows(v).to(torch.int8), group).bool()
    row = ~torch.isfinite(e).all(-1) | ~torch.isfinite(total) | (vis & bad_v[:, :, None, :]).any(-1)
    sees = vis.any(-1)
    sink_nan = torch.zeros(q.shape[1], dtype=torch.bool) if p.sinks is None else torch.isnan(p.sinks.detach())
    return torch.where(sees, row, sink_nan[None, :, None].expand_as(row))


def rel_err(got: Tensor, want: Tensor, floor: float = 0.0) -> float:
    """||got - want|| / max(||want||, floor) in float64; a zero reference is measured against 1."""
    den = max(want.double().norm().item(), floor)
    return (got.double() - want.double()).norm().item() / (den if den > 0 else 1.0)
