"""Packed (varlen) attention: sequences of different lengths laid end to end, with no padding
anywhere, as FlashAttention's flash_attn_varlen_func; and the helpers that go between a padded
batch and its packed form."""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .backends import select_backend
from .front_door import check_tensors, describe


def _check_packed(query, key, value) -> None:
    check_tensors([("query", query), ("key", key), ("value", value)], "(total, heads, D)")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: expected a unit head-dim stride, got strides {t.stride()}")
    H, D = query.shape[1:]
    Hkv = key.shape[1]
    if key.shape[2] != D or value.shape[2] != D:
        raise ValueError(f"key/value: expected head dim {D} (query's), got {key.shape[2]} and {value.shape[2]}")
    if tuple(value.shape[:2]) != tuple(key.shape[:2]):
        raise ValueError(f"value: expected (total, heads) {tuple(key.shape[:2])} (key's), got {tuple(value.shape[:2])}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"key: expected a head count dividing query's {H} heads, got {Hkv}")


def _check_cu_seqlens(name: str, cu: Tensor, total: int, longest, device, batch: int | None) -> None:
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 2:
        raise TypeError(f"{name}: expected a (batch + 1,) int32 tensor, got {cu.dtype} of shape {tuple(cu.shape)}")
    if batch is not None and cu.shape[0] != batch + 1:
        raise ValueError(f"{name}: expected {batch + 1} entries (cu_seqlens_q's), got {cu.shape[0]}")
    if cu.device != device:
        raise ValueError(f"{name}: expected device {device}, got {cu.device}")
    if cu.stride(0) != 1:  # the kernels index it as a plain array
        raise ValueError(f"{name}: expected a contiguous tensor, got stride {cu.stride(0)}")
    max_name = name.replace("cu_seqlens", "max_seqlen")
    # (traced, a longest read from the data is unbounded above: the int32 bound is checked eagerly)
    if (not isinstance(longest, int) or isinstance(longest, bool) or longest < 0
            or not torch.compiler.is_compiling() and longest >= 2**31):
        raise ValueError(f"{max_name}: expected an int in [0, 2**31), got {longest!r}")
    steps = cu[1:] - cu[:-1]
    ok = (cu[0] == 0) & (cu[-1] == total) & (steps >= 0).all() & (steps <= longest).all()
    if cu.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(ok, f"{name}: must rise from 0 to the packed length in steps of at most {max_name}")
    elif not ok:
        raise ValueError(f"{name}: expected to rise from 0 to the packed length {total} in steps of at most "
                         f"{max_name} = {longest}, got {cu.tolist()}")


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
    align: str = "bottom_right",
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention within each of B packed sequences (FlashAttention's flash_attn_varlen_func).

    q (total_q, H, D); k and v (total_k, Hkv, D) with H % Hkv == 0; any strides with a unit
    head-dim stride. cu_seqlens_q/k: (B + 1,) int32, sequence b holds rows [cu[b], cu[b + 1]),
    from 0 to total; max_seqlen_q/k bound their steps. causal, window_size, softcap,
    alibi_slopes ((H,) or (B, H): per sequence), sinks and align as fastattn.attention's, within
    each sequence, but aligned bottom-right by default as FlashAttention's: query i of a sequence
    at key i + Nk - Nq of it (align="top_left": at key i). No work is spent on padding: there is none. Returns out (total_q, H, D),
    or (out, lse) with lse (H, total_q) float32. With dropout, sequence b draws what a lone
    fastattn.attention call with seed + b * H would."""
    _check_packed(q, k, v)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, q.device, None)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, q.device, cu_seqlens_q.shape[0] - 1)
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, heads, total, D) views
    call, problem = describe(q4, k4, v4, kind="varlen", batch=cu_seqlens_q.shape[0] - 1, cu_seqlens_q=cu_seqlens_q,
                             cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                             causal=causal, scale=scale, dropout_p=dropout_p, window_size=window_size,
                             softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, align=align,
                             return_lse=return_lse, backend=backend)
    out, lse = ops.attention_forward(q4, k4, v4, select_backend(backend, problem).name, call)
    out = out[0].transpose(0, 1)
    return (out, lse[0]) if return_lse else out


def unpad(x: Tensor, key_padding_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """A padded batch x (B, N, ...) -> (packed (total, ...), cu_seqlens (B + 1,) int32, indices
    (total,) of the kept tokens in x.flatten(0, 1), the longest sequence). key_padding_mask (B, N)
    bool, True = padding, as fastattn.attention's. One host sync, for the longest length."""
    if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask: expected a bool tensor (True = padding), got {key_padding_mask!r:.60}")
    if tuple(key_padding_mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"key_padding_mask: expected shape {tuple(x.shape[:2])} (x's first two dims), "
                         f"got {tuple(key_padding_mask.shape)}")
    keep = ~key_padding_mask
    lengths = keep.sum(1, dtype=torch.int32)
    indices = keep.flatten().nonzero().squeeze(1)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return x.flatten(0, 1)[indices], cu_seqlens, indices, int(lengths.max()) if lengths.numel() else 0


def pad(packed: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """The inverse of unpad: (total, ...) -> (batch, seqlen, ...), zeros at the padding."""
    out = packed.new_zeros(batch * seqlen, *packed.shape[1:])
    return out.index_copy_(0, indices, packed).unflatten(0, (batch, seqlen))
