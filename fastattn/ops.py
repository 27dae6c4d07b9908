"""The fastattn:: ops: every attention call is one `fastattn::attention_forward` node (and one
`fastattn::attention_backward` in the backward), whatever the backend; decoding is one
`fastattn::attention_kvcache`. They are defined in C++ (csrc/ops.cpp: schemas, the kernel, the
autograd formula), which runs the `cpu` backend itself and the backends written in Python
through python_backends() below, registered at import. This module adds their fake
implementations for torch.compile.

Packed (varlen) calls go through the same ops: q, k, v are (1, H, total, D) views of the packed
tensors, and cu_seqlens_q/k with the longest lengths say where each sequence lies."""
from __future__ import annotations

import torch

try:
    from . import _C  # registers the ops
except ImportError as e:
    raise ImportError(f"fastattn's C++ extension fastattn._C is not built ({e}): `pip install --no-build-isolation "
                      f"-e .` or `make setup` builds it") from e
from .backends import REGISTRY
from .call import Call
from .backends.base import empty_lse, empty_out

_forward_op = torch.ops.fastattn.attention_forward.default
_kvcache_op = torch.ops.fastattn.attention_kvcache.default


def _in_one_call(call: Call, *tensors) -> bool:
    """Whether a call may go straight into the dispatcher (_C: one C++ call, every dispatch key on
    the way) rather than through torch.ops, whose argument parsing costs more than a small call's
    kernel: not while torch.compile traces (it must see torch.ops), nor where __torch_function__
    (a tensor subclass among the tensors and the call's, a mode) has a say."""
    return not torch._C._has_torch_function_variadic(
        *tensors, call.key_padding, call.key_ranges, call.attn_mask, call.cu_seqlens_q, call.cu_seqlens_k,
        call.alibi_slopes, call.sinks) and not torch.compiler.is_compiling()


def attention_forward(q, k, v, backend: str, call: Call):
    """(out, lse) of one call: the op's arguments are q, k, v, the backend's name and the call's fields."""
    op = _C.attention_forward if _in_one_call(call, q, k, v) else _forward_op
    return op(q, k, v, backend, *call)


def attention_backward(dout, dlse, q, k, v, out, lse, backend: str, call: Call):
    """(dq, dk, dv) of one call, as the forward's autograd computes them."""
    return torch.ops.fastattn.attention_backward.default(dout, dlse, q, k, v, out, lse, backend, *call)


def attention_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, backend: str, call: Call):
    op = _C.attention_kvcache if _in_one_call(call, q, k_cache, v_cache, cache_seqlens, k_new, v_new) else _kvcache_op
    return op(q, k_cache, v_cache, cache_seqlens, k_new, v_new, backend, *call)


@torch.library.register_fake("fastattn::attention_forward")
def _(q, k, v, backend, *fields):
    return empty_out(q), empty_lse(q)


@torch.library.register_fake("fastattn::attention_backward")
def _(dout, dlse, q, k, v, out, lse, backend, *fields):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


@torch.library.register_fake("fastattn::attention_kvcache")
def _(q, k_cache, v_cache, cache_seqlens, k_new, v_new, backend, *fields):
    return empty_out(q), empty_lse(q)


def python_backends():
    """What the op's C++ kernel calls for a backend it does not run itself: (forward, backward,
    kvcache), each with the op's own tensors, the backend's name and the call's fields."""
    def forward(q, k, v, backend, *fields):
        return REGISTRY[backend].forward(q, k, v, Call(*fields))

    def backward(dout, dlse, q, k, v, out, lse, backend, *fields):
        return REGISTRY[backend].backward(dout, dlse, q, k, v, out, lse, Call(*fields))

    def kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, backend, *fields):
        """Writes k_new/v_new (B, Hkv, Nnew, D) into the caches at rows cache_seqlens[b] + t, then
        attends q to the first cache_seqlens[b] + Nnew keys of each row. No host sync."""
        seqlens = cache_seqlens
        if k_new is not None:
            B, Hkv, Nnew, D = k_new.shape
            rows = cache_seqlens.long()[:, None] + torch.arange(Nnew, device=q.device)  # (B, Nnew)
            index = rows[:, None, :, None].expand(B, Hkv, Nnew, D)
            k_cache.scatter_(2, index, k_new)
            v_cache.scatter_(2, index, v_new)
            seqlens = cache_seqlens + Nnew
        return REGISTRY[backend].decode(q, k_cache, v_cache, seqlens.contiguous(), Call(*fields))

    return forward, backward, kvcache


_C.set_python_backends(*python_backends())
