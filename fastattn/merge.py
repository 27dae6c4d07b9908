"""Merging attention over disjoint key sets by their log-sum-exps: split-K, shared-prefix
(cascade) attention, and ring attention's blocks."""
from __future__ import annotations

import torch
from torch import Tensor


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """(out, lse) of attention over the union of two disjoint key sets, from each one's result:
    out (B, H, N, D) and lse (B, H, N) float32, as fastattn.attention(..., return_lse=True)
    returns them. out = (e^lse_a out_a + e^lse_b out_b) / (e^lse_a + e^lse_b), computed in
    float32 and returned in out_a's dtype; lse = log(e^lse_a + e^lse_b). A row that saw no key
    in either (lse -inf in both) stays zeros with lse -inf. Differentiable."""
    for name, out, lse in (("out_a", out_a, lse_a), ("out_b", out_b, lse_b)):
        for what, t in ((name, out), (f"lse of {name}", lse)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
            if t.device != out_a.device:
                raise ValueError(f"{what}: expected device {out_a.device} (out_a's), got {t.device}")
        if out.dim() != 4 or tuple(lse.shape) != tuple(out.shape[:3]):
            raise ValueError(f"{name}: expected (B, H, N, D) with its lse (B, H, N), got {tuple(out.shape)} and "
                             f"{tuple(lse.shape)}")
        if not out.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point dtype, got {out.dtype}")
        if lse.dtype != torch.float32:
            raise TypeError(f"lse of {name}: expected float32, got {lse.dtype}")
    if out_a.shape != out_b.shape:
        raise ValueError(f"out_b: expected the shape of out_a, {tuple(out_a.shape)}, got {tuple(out_b.shape)}")
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # both -inf: weights 0, not NaN
    w_a, w_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = w_a + w_b
    seen = total > 0
    inv = torch.where(seen, 1.0 / torch.where(seen, total, torch.ones_like(total)), torch.zeros_like(total))
    out = (out_a.float() * (w_a * inv)[..., None] + out_b.float() * (w_b * inv)[..., None]).to(out_a.dtype)
    return out, top + torch.log(total)
