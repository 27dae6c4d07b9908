"""Backend `cuda`: the CUDA C++ tensor-core kernels (csrc/cuda), through pybind11.

Correct on an H200 but a third of Triton's speed there (benchmarks/results/): dispatch ranks it
after `triton`, so backend="auto" takes it only where Triton cannot run."""
from __future__ import annotations

import torch

from .base import Backend, Capabilities, Masks, Problem, empty_lse, empty_out, finish_grads, fp32_grad_buffers

HEAD_DIMS = (64, 128)  # csrc/cuda: one .cu per (head dim, dtype)


def _extension():
    from .. import _C

    return _C


def _kernel_masks(masks: Masks):
    return _extension().MaskTensors(masks.key_ranges, masks.key_padding)


class CudaBackend(Backend):
    name = "cuda"
    caps = Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        max_head_dim=max(HEAD_DIMS),
        mask_kinds=frozenset(),
        dropout=False,
        varlen=False,  # its kernels index padded batches only
        decode=False,
    )

    def probe(self):
        try:
            if not _extension().with_cuda:
                return "fastattn._C was built without its CUDA sources (they need nvcc and a CUDA build of torch)"
        except ImportError as e:
            return f"the C++ extension fastattn._C is not built ({e})"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def reasons(self, problem: Problem) -> list[str]:
        why = super().reasons(problem)
        if problem.head_dim not in HEAD_DIMS and problem.head_dim <= max(HEAD_DIMS):
            why.append(f"head_dim {problem.head_dim} not in {HEAD_DIMS}")
        if not problem.aligned:
            why.append("q/k/v need a unit head-dim stride, other strides multiple of 8, 16-byte aligned data")
        return why

    def forward(self, q, k, v, masks, causal, scale, dropout_p, seed):
        out, lse = empty_out(q), empty_lse(q)
        _extension().cuda_forward(q, k, v, out, lse, _kernel_masks(masks), causal, scale, dropout_p, seed)
        return out, lse

    def backward(self, dout, dlse, q, k, v, out, lse, masks, causal, scale, dropout_p, seed):
        dq, dk, dv = fp32_grad_buffers(q, k)
        if dlse is not None:
            dlse = dlse.to(torch.float32).contiguous()
        if dout.stride(-1) != 1 or any(s % 8 for s in dout.stride()[:3]) or dout.data_ptr() % 16:
            dout = dout.contiguous()  # an incoming gradient of unusual layout: the one copy made here
        _extension().cuda_backward(dout, q, k, v, out, lse, dlse, _kernel_masks(masks), causal, scale,
                                   dropout_p, seed, dq, dk, dv)
        return finish_grads(dq, dk, dv, k, q.dtype)
