"""Backend `cpu`: the fused C++ flash-attention kernel (csrc/cpu), through pybind11."""
from __future__ import annotations

import torch

from .base import Backend, Capabilities, Masks, empty_lse, empty_out, finish_grads, fp32_grad_buffers


def _extension():
    from .. import _C

    return _C


def _kernel_masks(masks: Masks):
    return _extension().MaskTensors(masks.key_ranges, masks.key_padding, masks.attn_mask, masks.cu_seqlens_q,
                                    masks.cu_seqlens_k, masks.max_seqlen_q, masks.max_seqlen_k)


class CpuBackend(Backend):
    name = "cpu"
    caps = Capabilities(
        devices=frozenset({"cpu"}),
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
        max_head_dim=256,
    )

    def probe(self):
        try:
            _extension()
        except ImportError as e:
            return f"the C++ extension fastattn._C is not built ({e})"
        return None

    def forward(self, q, k, v, masks, causal, scale, dropout_p, seed):
        out, lse = empty_out(q), empty_lse(q)
        _extension().cpu_forward(q, k, v, out, lse, _kernel_masks(masks), causal, scale,
                                 dropout_p, seed)
        return out, lse

    def decode(self, q, k_cache, v_cache, seqlens, causal, scale):
        out, lse = empty_out(q), empty_lse(q)
        _extension().cpu_decode(q, k_cache, v_cache, out, lse, seqlens, causal, scale)
        return out, lse

    def backward(self, dout, dlse, q, k, v, out, lse, masks, causal, scale, dropout_p, seed):
        dq, dk, dv = fp32_grad_buffers(q, k)
        if dlse is not None:
            dlse = dlse.to(torch.float32).contiguous()
        _extension().cpu_backward(dout, q, k, v, out, lse, dlse, _kernel_masks(masks), causal,
                                  scale, dropout_p, seed, dq, dk, dv)
        return finish_grads(dq, dk, dv, k, q.dtype)
