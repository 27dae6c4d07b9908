"""The one declaration of an attention call after its tensors: Call. Every layer takes it as it is,
from the front door (fastattn.front_door builds it) through the op (its schemas' arguments after the
backend's name are these fields, in this order: csrc/call.h mirrors the list, tests/test_call.py
fails when the two drift) to the backends and the kernels' glue."""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

SymInt = int  # an int the op schemas take as SymInt: symbolic while torch.compile traces


class Call(NamedTuple):
    """One attention call after its tensors. Masks are in their kernel form, normalised by the front
    door; a backend receives only the score modifiers its caps name."""

    key_padding: Tensor | None = None  # (B, Nk) bool, True = ignore
    key_ranges: Tensor | None = None  # (3, B) int32 from masks.key_ranges: begin, end, holes
    attn_mask: Tensor | None = None  # (B, H, Nq, Nk) bool or float32, broadcast dims with stride 0
    # Packed sequences: (B + 1,) int32 cumulative lengths and the longest, q/k/v (1, H, total, D)
    cu_seqlens_q: Tensor | None = None
    cu_seqlens_k: Tensor | None = None
    max_seqlen_q: SymInt = 0
    max_seqlen_k: SymInt = 0
    causal: bool = False
    scale: float = 1.0
    dropout_p: float = 0.0
    seed: SymInt = 0  # the dropout's
    window_left: int = -1  # keys before the aligned diagonal a query sees; -1: unbounded
    window_right: int = -1  # keys after it
    softcap: float = 0.0  # 0: off
    alibi_slopes: Tensor | None = None  # (H,) or (B, H) float32
    sinks: Tensor | None = None  # (H,) float32
    bottom_right: bool = False  # causal, window and ALiBi aligned bottom-right (else top-left)

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    def score_mods(self) -> dict:
        """The score modifiers as fastattn.reference's keywords."""
        return dict(window_size=(self.window_left, self.window_right), softcap=self.softcap,
                    alibi_slopes=self.alibi_slopes, sinks=self.sinks,
                    align="bottom_right" if self.bottom_right else "top_left")
