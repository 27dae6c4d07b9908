"""The front door every entry point shares (fastattn.attention, attention_varlen,
attention_with_kvcache, ring attention): validate the arguments they have in common, and build the
call's one description, its Call (the op's fields) and its Problem (what dispatch judges).

Each entry point checks its own tensors' layout first, then hands describe() 4-D (B, H, N, D)
views: a packed call's (1, H, total, D), a decoding call's caches."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .backends import Problem
from .call import Call
from .backends.base import head_dim_value, length_bucket, tile_aligned
from .masks import key_ranges
from .reference import ALIGNS

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FP32_TINY, _FP32_MAX = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max


def check_tensors(tensors: list[tuple[str, Tensor]], layout: str) -> None:
    """Each (name, tensor) is a tensor with one dim per letter group of `layout` ("(B, H, N, D)"),
    in the first one's dtype (one of SUPPORTED_DTYPES) and on its device."""
    dims = layout.count(",") + 1
    first_name, first = tensors[0]
    for name, t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"{name}: expected {dims} dims {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: expected a dtype in {[str(d) for d in SUPPORTED_DTYPES]}, got {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name}: expected device {first.device} ({first_name}'s), got {t.device}")
        if t.dtype != first.dtype:
            raise TypeError(f"{name}: expected dtype {first.dtype} ({first_name}'s), got {t.dtype}")


def check_flag(name: str, value) -> None:
    """A bool argument: True or False, not a truthy stand-in ("no", None, 1)."""
    if value is not True and value is not False:
        raise TypeError(f"{name}: expected bool, got {type(value).__name__}")


def check_scalars(causal, scale, dropout_p, backend, head_dim: int) -> float:
    """Validates the arguments every entry point shares; returns the scale to use."""
    if head_dim < 1:
        raise ValueError(f"query: expected a head dim (the last dim) of at least 1, got {head_dim}")
    check_flag("causal", causal)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
    elif not -_FP32_MAX <= scale <= _FP32_MAX:  # the kernels scale in float32: 1e300 there is inf
        raise ValueError(f"scale: expected a finite float32 (|scale| <= {_FP32_MAX}), got {scale!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    return float(scale)


def check_score_mods(window_size, softcap, alibi_slopes, sinks, align, B: int, H: int, query: Tensor) -> list[str]:
    """Validates the score modifiers (their tensors on query's device); returns those the call has,
    by SCORE_MODS' names ("bottom_right" left to describe(), which knows whether the alignment matters)."""
    if (type(window_size) is tuple and window_size == (-1, -1) and type(softcap) is float and softcap == 0.0
            and alibi_slopes is None and sinks is None and (align == "top_left" or align == "bottom_right")):
        return []  # the defaults, in a few comparisons (a small call's host time)
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
        raise TypeError(f"window_size: expected two ints (left, right), -1 = unbounded, got {window_size!r}")
    if min(window_size) < -1 or max(window_size) >= 2**63:
        raise ValueError(f"window_size: expected ints in [-1, 2**63) (-1 = unbounded), got {tuple(window_size)}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap: expected a float, got {type(softcap).__name__}")
    if softcap != 0 and not _FP32_TINY <= softcap <= _FP32_MAX:  # comparisons: softcap may be symbolic (compile)
        raise ValueError(f"softcap: expected 0 (off) or a positive float32 (in [{_FP32_TINY}, {_FP32_MAX}]), "
                         f"got {softcap!r}")
    if align not in ALIGNS:
        raise ValueError(f"align: expected one of {ALIGNS}, got {align!r}")
    for name, t, shapes in (("alibi_slopes", alibi_slopes, ((H,), (B, H))), ("sinks", sinks, ((H,),))):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name}: expected dtype torch.float32, got {t.dtype}")
        if tuple(t.shape) not in shapes:
            want = " or ".join(str(s) for s in shapes)
            raise ValueError(f"{name}: expected shape {want} (H = {H}, B = {B}), got {tuple(t.shape)}")
        if t.device != query.device:
            raise ValueError(f"{name}: expected device {query.device} (query's), got {t.device}")
    if alibi_slopes is not None and alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError("alibi_slopes: gradients with respect to the slopes are not supported; pass "
                         "alibi_slopes.detach()")
    present = {"window": max(window_size) >= 0, "softcap": softcap > 0, "alibi": alibi_slopes is not None,
               "sinks": sinks is not None}
    return [name for name, on in present.items() if on]


def _check_key_padding(mask, query, key) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"key_padding_mask: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask: expected dtype torch.bool (True = ignore), got {mask.dtype}")
    expected = (query.shape[0], key.shape[2])
    if tuple(mask.shape) != expected:
        raise ValueError(f"key_padding_mask: expected shape (B, Nk) = {expected}, got {tuple(mask.shape)}")
    if mask.device != query.device:
        raise ValueError(f"key_padding_mask: expected device {query.device}, got {mask.device}")
    return mask


def _check_attn_mask(mask, query, key) -> Tensor:
    """Returns the mask as a (B, H, Nq, Nk) view (stride 0 on broadcast dims), float32 if float."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"attn_mask: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"attn_mask: expected dtype torch.bool or a float dtype, got {mask.dtype}")
    if mask.device != query.device:
        raise ValueError(f"attn_mask: expected device {query.device}, got {mask.device}")
    if mask.requires_grad and torch.is_grad_enabled():
        raise ValueError("attn_mask: gradients with respect to the mask are not supported; pass attn_mask.detach()")
    full = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    try:
        broadcast = torch.broadcast_shapes(mask.shape, full)
    except RuntimeError:
        broadcast = None
    if mask.dim() > 4 or broadcast != full:
        raise ValueError(f"attn_mask: expected a shape broadcastable to (B, H, Nq, Nk) = {full}, got {tuple(mask.shape)}")
    if mask.is_floating_point():
        mask = mask.to(torch.float32)  # the given shape only, before broadcasting
    return mask.expand(full)


def dropout_seed(dropout_p: float) -> int:
    """A fresh seed from torch's generator (so torch.manual_seed reproduces a run); 0 without dropout."""
    return int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0.0 else 0


_make = tuple.__new__  # a NamedTuple from all its fields, in order


def _aligned(device: str, *tensors: Tensor) -> bool:
    """tile_aligned for all, where a backend asks (the cuda one, on a GPU); True elsewhere."""
    return device != "cuda" or all(tile_aligned(t) for t in tensors)


def describe(q: Tensor, k: Tensor, v: Tensor, *, kind: str = "dense", batch: int | None = None,
             key_padding_mask=None, attn_mask=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
             max_seqlen_k=0, causal=False, scale=None, dropout_p=0.0, window_size=(-1, -1), softcap=0.0,
             alibi_slopes=None, sinks=None, align="top_left", return_lse=False, backend="auto",
             draw_seed: bool = True) -> tuple[Call, Problem]:
    """Validates what the entry points share and describes the call: (Call, Problem).

    q (B, H, Nq, D), k and v (B, Hkv, Nk, D) as the op takes them, their layout already checked by
    the entry point; kind: "dense", "varlen" (packed: (1, H, total, D) with cu_seqlens_q/k and the
    longest lengths; batch = the sequences) or "decode" (k and v the caches; always aligned to the
    end). draw_seed=False leaves the dropout's seed 0 (explain: runs nothing, draws nothing)."""
    qs, ks = q.shape, k.shape
    D = qs[3]
    scale = check_scalars(causal, scale, dropout_p, backend, D)
    if return_lse is not True and return_lse is not False:
        check_flag("return_lse", return_lse)
    mods = check_score_mods(window_size, softcap, alibi_slopes, sinks, align, qs[0] if batch is None else batch,
                            qs[1], q)
    if key_padding_mask is not None:
        key_padding_mask = _check_key_padding(key_padding_mask, q, k)
    if attn_mask is not None:
        attn_mask = _check_attn_mask(attn_mask, q, k)
    device = "cpu" if q.is_cpu else q.device.type
    traced = torch.compiler.is_compiling()
    if traced:
        # Plain values for the dispatch table's lookup while torch.compile traces, where sizes and
        # floats may be symbolic (dynamic shapes): comparisons, which guard, and branches.
        dropout = True if dropout_p > 0.0 else False
        gqa = True if ks[1] != qs[1] else False
        square = True if qs[2] == ks[2] else False
    else:
        dropout, gqa, square = dropout_p > 0.0, ks[1] != qs[1], qs[2] == ks[2]
    if kind == "varlen":
        # Where the two are one tensor every sequence is square; else it may not be (the lengths
        # are on the device: no host sync to find out).
        square = cu_seqlens_k is cu_seqlens_q
        # No length bucket: the longest sequence is often known only from the data (unpad), which a
        # traced call cannot compare without a guard on it.
        nq = nk = 1
    else:
        nq, nk = qs[2], ks[2]
    # Decoding is aligned to the end whatever the lengths, and its kernels know it: no mod to declare.
    if align == "bottom_right" and not square and kind != "decode" and (causal or "window" in mods or "alibi" in mods):
        mods.append("bottom_right")
    needs_grad = ((q.requires_grad or k.requires_grad or v.requires_grad)
                  or sinks is not None and sinks.requires_grad) and torch.is_grad_enabled()
    # Both made as tuples of their fields in their declarations' order: keywords, or even the
    # NamedTuples' own constructors, would cost a small call ~1 us here (tests/test_call.py checks
    # both field by field).
    problem = _make(Problem, (device, q.dtype, head_dim_value(D, traced),
                              None if attn_mask is None else ("bool" if attn_mask.dtype == torch.bool else "float"),
                              key_padding_mask is not None, causal, dropout, needs_grad, _aligned(device, q, k, v),
                              kind == "varlen", kind == "decode", length_bucket(nq, traced), length_bucket(nk, traced),
                              gqa, tuple(mods)))
    call = _make(Call, (key_padding_mask, None if key_padding_mask is None else key_ranges(key_padding_mask),
                        attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        causal, scale, float(dropout_p), dropout_seed(dropout_p) if draw_seed else 0,
                        window_size[0], window_size[1], float(softcap), alibi_slopes, sinks,
                        kind == "decode" or "bottom_right" in mods))
    return call, problem
