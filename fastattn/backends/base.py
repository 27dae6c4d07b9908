"""What every backend declares, and the one description of a call they judge it by."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..call import Call


class Problem(NamedTuple):
    """The facts about one attention call that decide which backend can take it (a tuple: cheap
    to make and to hash, so dispatch is a dictionary lookup after the first call of a kind)."""

    device: str  # device type: "cpu", "cuda"
    dtype: torch.dtype
    head_dim: int
    mask_kind: str | None = None  # None, "bool" or "float"
    key_padding: bool = False
    causal: bool = False
    dropout: bool = False
    needs_grad: bool = False
    aligned: bool = True  # unit head-dim stride, other strides multiples of 8, 16-byte aligned data
    varlen: bool = False  # packed sequences (fastattn.attention_varlen)
    decode: bool = False  # a few queries against a KV cache (fastattn.attention_with_kvcache)
    nq: int = 1  # Nq and Nk rounded up to powers of two (length_bucket)
    nk: int = 1
    gqa: bool = False  # fewer kv heads than query heads
    score_mods: tuple[str, ...] = ()  # of SCORE_MODS, in its order: what the call's scores take beyond q.k


def length_bucket(n, traced: bool = False) -> int:
    """n rounded up to a power of two (0 stays 0): calls of one bucket share a dispatch answer.
    traced: torch.compile traces the call, where a symbolic length looks like an int; it is then
    bucketed by comparisons, which guard the compiled graph to its bucket under dynamic shapes."""
    if type(n) is int and not traced:
        return 1 << (n - 1).bit_length() if n > 0 else 0
    bucket = 0 if n == 0 else 1
    while bucket and bucket < n:
        bucket <<= 1
    return bucket


def head_dim_value(n, traced: bool = False) -> int:
    """n as a Python int, for the dispatch table's key. traced: torch.compile traces the call,
    where a symbolic n (dynamic shapes) looks like an int; it is then found by comparisons, which
    specialize the graph on it: the only way dynamo lets a size become a constant (int() keeps it
    symbolic). A head dim beyond 4096 reads as 4096, which every backend declines."""
    if type(n) is int and not traced:
        return n
    value = 0
    while value < n and value < 4096:
        value += 1
    return value


# The score modifiers (fastattn.reference defines them), as a Problem and Capabilities name them;
# "bottom_right" is the alignment where it matters (causal, a window or ALiBi with Nq != Nk).
SCORE_MODS = ("window", "softcap", "alibi", "sinks", "bottom_right")
_MOD_NAMES = {"window": "window_size", "softcap": "softcap", "alibi": "alibi_slopes", "sinks": "sinks",
              "bottom_right": "align='bottom_right' (with Nq != Nk)"}


@dataclass(frozen=True)
class Capabilities:
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    max_head_dim: int
    mask_kinds: frozenset[str] = frozenset({"bool", "float"})
    dropout: bool = True
    backward: bool = True
    varlen: bool = True
    decode: bool = True
    score_mods: frozenset[str] = frozenset()  # of SCORE_MODS


class Backend:
    """A fused attention implementation. Subclasses set name and caps and implement
    forward/backward (and decode where caps say so), except `cpu`, which the op's C++ kernel
    runs itself. `probe` says why the backend cannot run on this machine."""

    name: str
    caps: Capabilities

    def __init__(self) -> None:
        # Probed once, when the registry is built at import: dispatch then reads a constant, so
        # nothing that torch.compile traces asks the machine anything.
        self.unavailable_reason = self.probe()

    def probe(self) -> str | None:
        """Why this backend cannot run on this machine; None when it can."""
        return None

    def auto_reasons(self, problem: Problem) -> list[str]:
        """Why backend="auto" should pass over this backend although it could run the call."""
        return []

    def reasons(self, problem: Problem) -> list[str]:
        """Why this backend cannot take the call; empty when it can."""
        caps, why = self.caps, []
        if problem.device not in caps.devices:
            why.append(f"device {problem.device} not in {sorted(caps.devices)}")
        if problem.dtype not in caps.dtypes:
            why.append(f"dtype {problem.dtype} not in {sorted(map(str, caps.dtypes))}")
        if problem.head_dim > caps.max_head_dim:
            why.append(f"head_dim {problem.head_dim} > {caps.max_head_dim}")
        if problem.mask_kind is not None and problem.mask_kind not in caps.mask_kinds:
            why.append(f"{problem.mask_kind} attn_mask not supported")
        if problem.dropout and not caps.dropout:
            why.append("dropout not supported")
        if problem.needs_grad and not caps.backward:
            why.append("backward not supported")
        if problem.varlen and not caps.varlen:
            why.append("packed (varlen) sequences not supported")
        for mod in problem.score_mods:
            if mod not in caps.score_mods:
                why.append(f"{_MOD_NAMES[mod]} not supported")
        if problem.decode and not caps.decode:
            why.append("KV-cache decoding not supported")
        return why

    def forward(self, q, k, v, call: Call) -> tuple[Tensor, Tensor]:
        """(out, lse): out from empty_out(q), lse from empty_lse(q)."""
        raise NotImplementedError(f"backend {self.name} has no Python forward")

    def backward(self, dout, dlse, q, k, v, out, lse, call: Call) -> tuple[Tensor, Tensor, Tensor]:
        """(dq, dk, dv), contiguous, in the inputs' dtypes; dlse may be None."""
        raise NotImplementedError(f"backend {self.name} has no Python backward")

    def decode(self, q, k_cache, v_cache, seqlens, call: Call) -> tuple[Tensor, Tensor]:
        """(out, lse) of q (B, H, Nq, D) against the first seqlens[b] (int32) keys of each cache
        row (B, Hkv, Nmax, D), causal and the call's score modifiers aligned to the last of them.
        Backends whose caps declare decode override this."""
        raise NotImplementedError(f"backend {self.name} declares no KV-cache decoding")


def tile_aligned(t: Tensor) -> bool:
    """What 16-byte tile copies need: unit head-dim stride, other strides multiples of 8
    elements, an aligned base (not inspectable while torch.compile traces; the kernel checks)."""
    strides_ok = t.stride(-1) == 1 and all(s % 8 == 0 or n == 1 for s, n in zip(t.stride()[:3], t.shape[:3]))
    return strides_ok and (torch.compiler.is_compiling() or t.data_ptr() % 16 == 0)


def new_buffer(like: Tensor, *shape: int, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialised kernel output. With FASTATTN_POISON=1 (the tests set it) it is filled
    with NaN, so an element a kernel forgets to write cannot pass for a right answer."""
    return _poisoned(like.new_empty(*shape, dtype=dtype or like.dtype))


def _poisoned(t: Tensor) -> Tensor:
    return t.fill_(math.nan) if os.environ.get("FASTATTN_POISON") == "1" else t


def out_strides(q: Tensor) -> tuple[int, ...]:
    """The strides of a dense (B, H, Nq, D) tensor laid out in q's dimension order: D innermost,
    whatever its stride (the kernels write rows of D), a broadcast dimension (stride 0, an expanded
    q) outermost."""
    strides, step = [0] * 4, 1
    for d in sorted(range(4), key=lambda d: (d != 3, q.stride(d) == 0, q.stride(d), -d)):  # innermost first
        strides[d] = step
        step *= q.shape[d]
    return tuple(strides)


def empty_out(q: Tensor) -> Tensor:
    """The output buffer, (B, H, Nq, D) laid out in q's dimension order (as empty_like does for
    dense tensors, but also for q sliced out of a packed projection): a module that made q by
    viewing its (B, N, E) or (N, B, E) projection reshapes the output back with no copy. The
    fakes and the Python backends allocate through here; the C++ kernels by the same rule
    (csrc/cpu/cpu_glue.cpp, new_output)."""
    return _poisoned(q.new_empty_strided(q.shape, out_strides(q)))


def empty_lse(q: Tensor) -> Tensor:
    B, H, Nq, _ = q.shape
    return new_buffer(q, B, H, Nq, dtype=torch.float32)


def fp32_grad_buffers(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """dq (B, H, Nq, D) and per-query-head dk, dv (B, H, Nk, D), fp32 and contiguous: what the
    C++ kernels write (AttentionBwdParams)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    f32 = torch.float32
    return (new_buffer(q, B, H, Nq, D, dtype=f32), new_buffer(q, B, H, Nk, D, dtype=f32),
            new_buffer(q, B, H, Nk, D, dtype=f32))


def finish_grads(dq: Tensor, dk: Tensor, dv: Tensor, k: Tensor, dtype: torch.dtype):
    """Per-query-head fp32 gradients -> the inputs' dtype, dK/dV summed over each GQA group."""
    B, H, Nk, D = dk.shape
    Hkv = k.shape[1]
    dk = dk.view(B, Hkv, H // Hkv, Nk, D).sum(2)
    dv = dv.view(B, Hkv, H // Hkv, Nk, D).sum(2)
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)
