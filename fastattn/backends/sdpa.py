"""Backend `sdpa`: torch's own fused attention kernels behind fastattn's contract.

Through the aten ops that have a separate backward: on the CPU
`_scaled_dot_product_flash_attention_for_cpu`; on a GPU cuDNN's kernel for 16-bit inputs (the
fastest on an H200: benchmarks/results/2026-11-26-h200-9bb372e), else FlashAttention-2's, and the
memory-efficient kernel for fp32. The lse is fastattn's (natural log, float32, (B, H, Nq)
contiguous), out has empty_out's layout, the gradients come from the matching aten backward.

What it declines, and why: torch's kernels give a query that sees no key lse 0 (CPU) or NaN
(GPU), where fastattn promises zeros and lse = -inf, so it takes only calls in which every query
sees a key, provably and without looking at the data: no padding mask and no attn_mask (either
may hide every key of a row), dense or causal (top-left: query i sees key 0) with at least one
key. Dropout draws torch's own random stream, which fastattn's op cannot hand on to the
backward; packed sequences and KV-cache decoding have no such ops. None of this is a limit of
fastattn's own kernels, which `auto` falls back to.
"""
from __future__ import annotations

import torch

from .base import Backend, Capabilities, Problem, out_strides

aten = torch.ops.aten


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def torch_kernel(device: str, dtype: torch.dtype, head_dim: int, gqa: bool, cudnn: bool) -> str | None:
    """The torch kernel ("flash", "cudnn", "efficient") a call takes, or None; cudnn: whether
    torch has cuDNN's attention."""
    if device == "cpu":
        return "flash"
    if head_dim % 8 or head_dim > 256:
        return None
    if dtype == torch.float32:
        return None if gqa else "efficient"  # the memory-efficient kernel has no GQA
    return "cudnn" if cudnn and head_dim <= 128 else "flash"


def _kernel(q: torch.Tensor, k: torch.Tensor) -> str | None:
    return torch_kernel(q.device.type, q.dtype, q.shape[-1], k.shape[1] != q.shape[1],
                        torch.backends.cudnn.is_available())


class SdpaBackend(Backend):
    name = "sdpa"
    caps = Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
        max_head_dim=256,
        mask_kinds=frozenset(),
        dropout=False,
        varlen=False,
        decode=False,
    )

    def reasons(self, problem: Problem) -> list[str]:
        why = super().reasons(problem._replace(mask_kind=None))
        if problem.key_padding:
            why.append("a padding mask may leave a query no key, where torch's kernels give lse 0 or NaN")
        if problem.mask_kind is not None:
            why.append("an attn_mask may leave a query no key, where torch's kernels give lse 0 or NaN")
        if problem.nk == 0:
            why.append("no keys: torch's kernels give lse 0 or NaN")
        if problem.device == "cuda" and not problem.aligned:
            why.append("torch's CUDA kernels read 16-byte aligned rows (unit head-dim stride, strides in 8s)")
        if torch_kernel(problem.device, problem.dtype, problem.head_dim, problem.gqa, True) is None:
            why.append("torch's CUDA kernels take head dims that are multiples of 8 up to 256, and fp32 "
                       "(the memory-efficient kernel) no grouped-query attention")
        return why

    def forward(self, q, k, v, masks, causal, scale, dropout_p, seed):
        q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
        B, H, Nq, D = q.shape
        if q.device.type == "cpu":
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        else:
            kernel = _kernel(q, k)
            if kernel == "cudnn":
                out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                     scale=scale)[:2]
            elif kernel == "flash":
                out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
            else:
                out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal,
                                                                        scale=scale)[:2]
        # cuDNN's lse is (B, H, Nq, 1), the memory-efficient kernel's padded to 32 rows
        lse = lse.reshape(B, H, -1)[:, :, :Nq].contiguous()
        if out.stride() != out_strides(q):  # the layout the op's fake promises
            out = torch.empty_strided(out.shape, out_strides(q), dtype=out.dtype, device=out.device).copy_(out)
        return out, lse

    def backward(self, dout, dlse, q, k, v, out, lse, masks, causal, scale, dropout_p, seed):
        q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
        dq, dk, dv = self._backward(dout, q, k, v, out, lse, causal, scale)
        if dlse is not None:  # torch's backwards have no lse gradient: see _lse_gradient
            dq_lse, dk_lse = self._lse_gradient(dlse, q, k, causal, scale)
            dq, dk = dq + dq_lse, dk + dk_lse
        return dq.contiguous(), dk.contiguous(), dv.contiguous()

    def _backward(self, dout, q, k, v, out, lse, causal, scale):
        """Gradients of out alone, through the aten backward that matches the forward."""
        B, H, Nq, D = q.shape
        Nk = k.shape[2]
        if q.device.type == "cpu":
            return aten._scaled_dot_product_flash_attention_for_cpu_backward(
                _rows_contiguous(dout), q, k, v, out, lse, 0.0, causal, scale=scale)
        kernel = _kernel(q, k)
        unused = torch.empty(0, dtype=torch.int64, device=q.device)  # the dropout RNG state: no dropout
        if kernel == "cudnn":  # cuDNN wants dO in O's layout and its lse as (B, H, Nq, 1)
            if dout.stride() != out.stride():
                dout = torch.empty_strided(out.shape, out.stride(), dtype=dout.dtype, device=dout.device).copy_(dout)
            return aten._scaled_dot_product_cudnn_attention_backward(
                dout, q, k, v, out, lse.unsqueeze(-1), unused, unused, None, None, None, Nq, Nk, 0.0, causal,
                scale=scale)
        dout = _rows_contiguous(dout)
        if kernel == "flash":
            return aten._scaled_dot_product_flash_attention_backward(
                dout, q, k, v, out, lse, None, None, Nq, Nk, 0.0, causal, unused, unused, scale=scale)
        padded = torch.nn.functional.pad(lse, (0, 0 if torch.version.hip else -Nq % 32))  # as the forward's lse
        return aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, padded, unused, unused, 0.0, [True, True, True, False], causal,
            scale=scale)[:3]

    def _lse_gradient(self, dlse, q, k, causal, scale):
        """The part of (dq, dk) that flows from lse. d lse_i / d s_ij = p_ij, so
        dq_i = scale dlse_i sum_j p_ij k_j and dk_j = scale sum_i p_ij dlse_i q_i: the first is
        attention with k as the values, the second that attention's dV for dO = dlse q. Two more
        kernel calls, only when the loss uses lse (return_lse)."""
        out_k, lse_k = self.forward(q, k, k, None, causal, scale, 0.0, 0)  # lse_k: the forward's lse
        dq_scaled = dlse[..., None].to(q.dtype) * q
        _, _, dk = self._backward(dq_scaled, q, k, k, out_k, lse_k, causal, scale)
        dq = (scale * dlse[..., None] * out_k.float()).to(q.dtype)
        return dq, (scale * dk.float()).to(k.dtype)
