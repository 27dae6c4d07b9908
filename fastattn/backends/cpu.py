"""Backend `cpu`: the fused C++ flash-attention kernels (csrc/cpu), which the ops' C++ kernel
runs itself (csrc/ops.cpp): no Python between the front door and the kernel."""
from __future__ import annotations

import torch

from .base import SCORE_MODS, Backend, Capabilities


class CpuBackend(Backend):
    name = "cpu"
    caps = Capabilities(
        devices=frozenset({"cpu"}),
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
        max_head_dim=256,
        score_mods=frozenset(SCORE_MODS),  # the forward and backward; decoding takes none yet
    )

    def probe(self):
        try:
            from .. import _C  # noqa: F401
        except ImportError as e:
            return f"the C++ extension fastattn._C is not built ({e})"
        return None
