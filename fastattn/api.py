"""fastattn.attention: validate once, normalise masks once, dispatch, call the op."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _C, ops
from .backends import Problem, select_backend
from .backends import explain as explain_selection
from .backends.base import head_dim_value, length_bucket, tile_aligned
from .masks import key_ranges as key_ranges_by_torch_ops
from .reference import ALIGNS

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FP32_TINY, _FP32_MAX = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max


def check_tensors(tensors: list[tuple[str, Tensor]], layout: str) -> None:
    """Each (name, tensor) is a tensor with one dim per letter group of `layout` ("(B, H, N, D)"),
    in the first one's dtype (one of _DTYPES) and on its device."""
    dims = layout.count(",") + 1
    first_name, first = tensors[0]
    for name, t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"{name}: expected {dims} dims {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: expected a dtype in {[str(d) for d in _DTYPES]}, got {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name}: expected device {first.device} ({first_name}'s), got {t.device}")
        if t.dtype != first.dtype:
            raise TypeError(f"{name}: expected dtype {first.dtype} ({first_name}'s), got {t.dtype}")


def _same_device(a: Tensor, b: Tensor, c: Tensor) -> bool:
    """a.device == b.device == c.device for CPU and CUDA tensors, without making torch.device
    objects (~0.8 us each); False for other devices, which take the full checks."""
    if a.is_cpu:
        return b.is_cpu and c.is_cpu
    return a.is_cuda and b.is_cuda and c.is_cuda and a.get_device() == b.get_device() == c.get_device()


def _check_qkv(query, key, value) -> None:
    # The common case in a few comparisons; anything else goes through every check, which names it.
    if (isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)
            and query.dtype in _DTYPES and query.dtype == key.dtype == value.dtype and _same_device(query, key, value)):
        qs, ks = query.shape, key.shape
        if (len(qs) == 4 and len(ks) == 4 and ks == value.shape and ks[0] == qs[0] and ks[3] == qs[3]
                and ks[1] and qs[1] % ks[1] == 0):
            return
    check_tensors([("query", query), ("key", key), ("value", value)], "(B, H, N, D)")
    B, H, _, D = query.shape
    if key.shape[0] != B or value.shape[0] != B:
        raise ValueError(f"key/value: expected batch {B} (query's), got {key.shape[0]} and {value.shape[0]}")
    if key.shape[3] != D or value.shape[3] != D:
        raise ValueError(f"key/value: expected head dim {D} (query's), got {key.shape[3]} and {value.shape[3]}")
    if key.shape[1] != value.shape[1]:
        raise ValueError(f"value: expected {key.shape[1]} heads (key's), got {value.shape[1]}")
    if key.shape[2] != value.shape[2]:
        raise ValueError(f"value: expected length {key.shape[2]} (key's), got {value.shape[2]}")
    Hkv = key.shape[1]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"key: expected a head count dividing query's {H} heads, got {Hkv}")


def _check_key_padding(mask, query, key) -> Tensor | None:
    if mask is None:
        return None
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


def _check_attn_mask(mask, query, key) -> Tensor | None:
    """Returns the mask as a (B, H, Nq, Nk) view (stride 0 on broadcast dims), float32 if float."""
    if mask is None:
        return None
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


def aligned(device: str, *tensors: Tensor) -> bool:
    """tile_aligned for all, where a backend asks (the cuda one, on a GPU); True elsewhere."""
    return device != "cuda" or all(tile_aligned(t) for t in tensors)


def key_ranges(mask: Tensor) -> Tensor:
    """The padding mask's kernel form (fastattn.masks.key_ranges): one C++ pass over a plain CPU
    mask; torch ops on a GPU (no host sync), wherever torch.compile traces, and wherever a
    dispatch mode or a tensor subclass must see them (fake tensors hold no data to read)."""
    if (type(mask) is Tensor and mask.device.type == "cpu" and not torch.compiler.is_compiling()
            and not torch._C._len_torch_dispatch_stack()):
        return _C.key_ranges(mask)
    return key_ranges_by_torch_ops(mask)


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
    align: str = "top_left",
    return_lse: bool = False,
    backend: str = "auto",
):
    """Fused scaled-dot-product attention.

    query (B, H, Nq, D); key and value (B, Hkv, Nk, D) with H % Hkv == 0 (grouped-query
    attention: head h reads kv head h // (H // Hkv)). Any strides.
    key_padding_mask: (B, Nk) bool, True = ignore that key.
    attn_mask: broadcastable to (B, H, Nq, Nk); bool True = may attend, float = added to scores.
    causal: query i sees keys j <= i + offset, offset = 0 top-left (align="top_left", SDPA's
    is_causal) or Nk - Nq bottom-right (align="bottom_right", FlashAttention's).
    window_size (left, right): query i sees keys i + offset - left <= j <= i + offset + right;
    -1 = unbounded (FlashAttention's). softcap c > 0: scores become c tanh(s / c) before any bias
    or mask. alibi_slopes (H,) or (B, H) float32: the score of (i, j) gets - slope |j - i - offset|,
    after softcapping. sinks (H,) float32: one logit per head added to each softmax denominator
    (no value), differentiable; lse includes it. fastattn.reference_attention defines it all.
    A query that sees no key gives a zero row (lse = -inf, or the sink) and zero gradients.
    Returns out (B, H, Nq, D) in query's dtype, or (out, lse) with lse (B, H, Nq) float32.
    """
    key_padding_mask, attn_mask, scale, problem = _problem(query, key, value, key_padding_mask, attn_mask, causal,
                                                           scale, dropout_p, backend, window_size, softcap,
                                                           alibi_slopes, sinks, align)
    check_flag("return_lse", return_lse)
    chosen = select_backend(backend, problem)
    ranges = None if key_padding_mask is None else key_ranges(key_padding_mask)
    out, lse = ops.attention_forward(query, key, value, key_padding_mask, ranges, attn_mask, None, None, 0, 0,
                                     causal, float(scale), float(dropout_p), dropout_seed(dropout_p), chosen.name,
                                     *score_mod_args(problem.score_mods, window_size, softcap, alibi_slopes, sinks))
    return (out, lse) if return_lse else out


def explain(query: Tensor, key: Tensor, value: Tensor, *, key_padding_mask: Tensor | None = None,
            attn_mask: Tensor | None = None, causal: bool = False, scale: float | None = None,
            dropout_p: float = 0.0, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
            alibi_slopes: Tensor | None = None, sinks: Tensor | None = None, align: str = "top_left",
            backend: str = "auto") -> str:
    """Which backend fastattn.attention takes for this call, and why (the measured ranking it
    followed and what declined before it), as text. Runs nothing."""
    problem = _problem(query, key, value, key_padding_mask, attn_mask, causal, scale, dropout_p, backend,
                       window_size, softcap, alibi_slopes, sinks, align)[3]
    return explain_selection(backend, problem)


def check_score_mods(window_size, softcap, alibi_slopes, sinks, align, B: int, H: int, device) -> list[str]:
    """Validates the score modifiers; returns those the call has, by SCORE_MODS' names
    ("bottom_right" left to the caller, who knows whether the alignment matters)."""
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
        if t.device != device:
            raise ValueError(f"{name}: expected device {device} (query's), got {t.device}")
    if alibi_slopes is not None and alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError("alibi_slopes: gradients with respect to the slopes are not supported; pass "
                         "alibi_slopes.detach()")
    present = {"window": max(window_size) >= 0, "softcap": softcap > 0, "alibi": alibi_slopes is not None,
               "sinks": sinks is not None}
    return [name for name, on in present.items() if on]


def sinks_need_grad(sinks) -> bool:
    return sinks is not None and sinks.requires_grad and torch.is_grad_enabled()


def score_mod_args(mods, window_size, softcap, alibi_slopes, sinks) -> tuple:
    """The op's score-modifier arguments (after the backend's name) for the call's mods."""
    return (*(window_size if "window" in mods else (-1, -1)), float(softcap), alibi_slopes, sinks,
            "bottom_right" in mods)


def _problem(query, key, value, key_padding_mask, attn_mask, causal, scale, dropout_p, backend,
             window_size=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None, align="top_left"):
    """The checked masks and scale, and the dispatch facts (Problem) of an attention call."""
    _check_qkv(query, key, value)
    key_padding_mask = _check_key_padding(key_padding_mask, query, key)
    attn_mask = _check_attn_mask(attn_mask, query, key)
    qs, ks = query.shape, key.shape
    D = qs[3]
    scale = check_scalars(causal, scale, dropout_p, backend, D)
    mods = check_score_mods(window_size, softcap, alibi_slopes, sinks, align, qs[0], qs[1], query.device)
    device = "cpu" if query.is_cpu else query.device.type
    needs_grad = (query.requires_grad or key.requires_grad or value.requires_grad) and torch.is_grad_enabled()
    mask_kind = None if attn_mask is None else ("bool" if attn_mask.dtype == torch.bool else "float")
    traced = torch.compiler.is_compiling()
    if traced:
        # Plain values for the dispatch table's lookup while torch.compile traces, where sizes and
        # floats may be symbolic (dynamic shapes): comparisons, which guard, and branches.
        dropout = True if dropout_p > 0.0 else False
        gqa = True if ks[1] != qs[1] else False
        square = True if qs[2] == ks[2] else False
    else:
        dropout, gqa, square = dropout_p > 0.0, ks[1] != qs[1], qs[2] == ks[2]
    if align == "bottom_right" and not square and (causal or "window" in mods or "alibi" in mods):
        mods.append("bottom_right")
    needs_grad = needs_grad or sinks_need_grad(sinks)
    problem = Problem(device, query.dtype, head_dim_value(D, traced), mask_kind, key_padding_mask is not None, causal,
                      dropout, needs_grad, aligned(device, query, key, value), False, False,
                      length_bucket(qs[2], traced), length_bucket(ks[2], traced), gqa, tuple(mods))
    return key_padding_mask, attn_mask, scale, problem


def dropout_seed(dropout_p: float) -> int:
    """A fresh seed from torch's generator (so torch.manual_seed reproduces a run); 0 without dropout."""
    return int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0.0 else 0


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
