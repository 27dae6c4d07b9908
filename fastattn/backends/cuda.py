"""Backend `cuda`: the CUDA C++ tensor-core kernels (csrc/cuda), through pybind11.

Its 64-query tiles measured a third of Triton's speed on an H200 (benchmarks/results/); the
128-query tiles that replaced them are not yet measured on a GPU. Until a record shows them
ahead, dispatch ranks it after `triton`, so backend="auto" takes it only where Triton cannot
run. Without a GPU, tests/test_cuda.py runs its kernels on a CPU (tests/cuda_emu)."""
from __future__ import annotations

import torch

from ..call import Call
from .base import (Backend, Capabilities, Problem, empty_lse, empty_out, finish_grads, fp32_grad_buffers,
                   tile_aligned)

HEAD_DIMS = (64, 128)  # csrc/cuda: one .cu per (head dim, dtype)


def _tile_ready(t: torch.Tensor) -> torch.Tensor:
    """t, or a fresh dense copy where the kernels' 16-byte row copies could not read it
    (contiguous() would keep a dense tensor with a misaligned base)."""
    return t if tile_aligned(t) else t.clone(memory_format=torch.contiguous_format)


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

    @property
    def ext(self):
        """The module with the kernels' entry points (the tests swap in their CPU emulation)."""
        from .. import _C

        return _C

    def probe(self):
        try:
            if not self.ext.with_cuda:
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

    # The kernels' entry points take the call's fields after their buffers (csrc/call.h).
    def forward(self, q, k, v, call: Call):
        out, lse = empty_out(q), empty_lse(q)
        self.ext.cuda_forward(q, k, v, out, lse, *call)
        return out, lse

    def backward(self, dout, dlse, q, k, v, out, lse, call: Call):
        dq, dk, dv = fp32_grad_buffers(q, k)
        if dlse is not None:
            dlse = dlse.to(torch.float32).contiguous()
        # an incoming gradient (or, traced, an output) of unusual layout: the one copy made here
        dout, out = _tile_ready(dout), _tile_ready(out)
        self.ext.cuda_backward(dout, q, k, v, out, lse, dlse, dq, dk, dv, *call)
        return finish_grads(dq, dk, dv, k, q.dtype)
