"""Backend `gluon`: the Hopper forward in Gluon (fastattn/gluon), FlashAttention-3's design.

Opt-in (backend="gluon") until a GPU record ranks it fastest for a call in this machine's
dispatch table: no interpreter runs Gluon, so its correctness is known only from a GPU, and none
has run it yet; it declines until a GPU check has passed a variant (fastattn/gluon/tuned.json).
What it takes: sm_90 (H100, H200), triton 3.6 to 3.9 (the Gluon API it was written against),
bf16 and fp16, D 64 and 128, dense, causal and key padding (tiles outside each row's valid keys
skipped), GQA, lse and its gradient, the backward (deterministic: no atomics) where a backward
variant has passed its check too; q, k, v whose rows a TMA descriptor reads (16-byte aligned; the
(B, H, N, D) and (B, N, H, D) layouts and slices of one projection), others copied.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from . import dispatch
from ..call import Call
from .base import Backend, Capabilities, Problem, empty_lse, empty_out, new_buffer

KNOWN_TRITON = ("3.6", "3.7", "3.8", "3.9")


@functools.cache
def _hopper() -> bool:
    return torch.cuda.get_device_capability() == (9, 0)


class GluonBackend(Backend):
    name = "gluon"
    caps = Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        max_head_dim=128,
        mask_kinds=frozenset(),
        dropout=False,
        backward=True,
        varlen=False,
        decode=False,
    )

    def probe(self):
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        import triton

        if not triton.__version__.startswith(KNOWN_TRITON):
            return f"written against triton {', '.join(KNOWN_TRITON)}'s Gluon, found {triton.__version__}"
        if importlib.util.find_spec("triton.experimental.gluon") is None:
            return "this triton has no Gluon"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def reasons(self, problem: Problem) -> list[str]:
        why = super().reasons(problem)
        if problem.head_dim not in (64, 128):
            why.append(f"head_dim {problem.head_dim}: compiled for 64 and 128")
        if not problem.aligned:
            why.append("TMA reads 16-byte aligned rows")
        if problem.causal or problem.key_padding:  # README, "Non-finite inputs"
            why.append("a causal or padding mask: the forward lets a NaN in a value the mask hides reach the "
                       "output (zeroing it spilled the overlap variant's registers; waits for a GPU)")
        if problem.device == "cuda" and not why and not _hopper():
            why.append("needs sm_90 (Hopper): wgmma, TMA, setmaxnreg")
        if not why:
            from ..gluon.launch import default_variant

            for part in ("forward", "backward") if problem.needs_grad else ("forward",):
                if default_variant(problem.head_dim, part == "backward") is None:
                    why.append(f"no {part} variant has passed its float64 check on a GPU at D = {problem.head_dim} "
                               "yet (benchmarks/gluon_check.py writes fastattn/gluon/tuned.json)")
        return why

    def auto_reasons(self, problem: Problem) -> list[str]:
        if self.name not in dispatch.ranking(*problem):
            return ["opt-in (backend='gluon') until a GPU record ranks it for this call"]
        return []

    def forward(self, q, k, v, call: Call):
        from ..gluon import launch

        q, k, v = _readable(q, k, v)
        out, lse = empty_out(q), empty_lse(q)
        launch.forward(q, k, v, out, lse, call.causal, call.scale, call.key_padding, call.key_ranges)
        return out, lse

    def backward(self, dout, dlse, q, k, v, out, lse, call: Call):
        from ..gluon import launch

        dout, q, k, v = _readable(dout, q, k, v)
        B, H, Nq, D = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
        dq, dk, dv = new_buffer(q, B, H, Nq, D), new_buffer(k, B, Hkv, Nk, D), new_buffer(v, B, Hkv, Nk, D)
        if dlse is not None:
            dlse = dlse.to(torch.float32).contiguous()
        launch.backward(dout, q, k, v, out, lse, dq, dk, dv, call.causal, call.scale, call.key_padding, call.key_ranges,
                        dlse)
        return dq, dk, dv


def _readable(*tensors):
    """Each tensor as it is where a TMA descriptor reads it, else a contiguous copy in fresh
    (aligned) memory."""
    from ..gluon import launch

    return tuple(t if launch.tma_ready(t) else t.clone(memory_format=torch.contiguous_format) for t in tensors)
