"""Backend `triton`: the Triton flash-attention kernels (fastattn/triton/attention.py).

Runs on CUDA tensors; with TRITON_INTERPRET=1 also on CPU tensors through Triton's
interpreter, which is how CI checks the kernels. The interpreter is for testing only, so
backend="auto" never picks it for CPU tensors."""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from ..call import Call
from .base import SCORE_MODS, Backend, Capabilities, Problem, empty_lse, empty_out, new_buffer


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"  # read once, like Triton itself


def _kernels():
    from ..triton import attention as triton_attention

    return triton_attention


def on_device(t: torch.Tensor):
    """t's GPU made current for the launches, which Triton makes on the current device and
    stream: tensors on cuda:1 while cuda:0 is current would otherwise launch on cuda:0."""
    if t.device.type != "cuda" or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


class TritonBackend(Backend):
    name = "triton"
    caps = Capabilities(
        devices=frozenset({"cuda", "cpu"} if INTERPRETING else {"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        max_head_dim=256,
        score_mods=frozenset(SCORE_MODS),
    )

    def probe(self):
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if not INTERPRETING and not torch.cuda.is_available():
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"
        return None

    def auto_reasons(self, problem: Problem) -> list[str]:
        if problem.device == "cpu":
            return ["CPU tensors run only through Triton's interpreter, for tests: name backend='triton'"]
        return []

    def forward(self, q, k, v, call: Call):
        rows = _kernels().rows_contiguous
        q, k, v = rows(q), rows(k), rows(v)
        out, lse = empty_out(q), empty_lse(q)
        with on_device(q):
            _kernels().forward(q, k, v, out, lse, call)
        return out, lse

    def decode(self, q, k_cache, v_cache, seqlens, call: Call):
        from ..triton import decode as triton_decode

        q = _kernels().rows_contiguous(q)
        out, lse = empty_out(q), empty_lse(q)
        with on_device(q):
            triton_decode.decode(q, k_cache, v_cache, seqlens, out, lse, call)
        return out, lse

    def backward(self, dout, dlse, q, k, v, out, lse, call: Call):
        rows = _kernels().rows_contiguous
        dout, q, k, v, out = rows(dout), rows(q), rows(k), rows(v), rows(out)
        B, H, Nq, D = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
        dq = new_buffer(q, B, H, Nq, D)
        dk, dv = new_buffer(k, B, Hkv, Nk, D), new_buffer(v, B, Hkv, Nk, D)
        if dlse is not None:
            dlse = dlse.to(torch.float32).contiguous()
        with on_device(q):
            _kernels().backward(dout, dlse, q, k, v, out, lse, call, dq, dk, dv)
        return dq, dk, dv
