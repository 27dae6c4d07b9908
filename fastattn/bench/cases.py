"""The benchmark's attention cases: a Case (its shape, its valid lengths, its FLOPs) and the grid
of them per device. FLOPs are 4·H·D·Σ(valid query × valid key pairs), halved when causal, ×2.5
with the backward: padded batches count valid tokens only."""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    kind: str  # dense, causal, padded, heavy-padded, causal+padded, gqa
    mode: str  # fwd or fwd+bwd
    dtype: str
    batch: int
    heads: int
    kv_heads: int
    seq: int
    head_dim: int

    @property
    def causal(self) -> bool:
        return "causal" in self.kind

    def lengths(self) -> list[int]:
        """Valid lengths, evenly spread (the quantiles of a uniform draw, so every run and
        provider sees the same batch): over [N/4, N] when padded (N, 3N/4, N/2, N/4 for B = 4),
        and, after one full row, over [1, N/8] when heavy-padded."""
        N, B = self.seq, self.batch
        if "padded" not in self.kind or B == 1:
            return [N] * B
        if self.kind == "heavy-padded":
            return [N] + [max(1, round(N / 8 * (B - 1 - i) / (B - 1))) for i in range(B - 1)]
        return [round(N - 3 * N / 4 * i / (B - 1)) for i in range(B)]

    def flops(self) -> float:
        pairs = sum(n * n for n in self.lengths())
        return 4.0 * self.heads * self.head_dim * pairs / (2 if self.causal else 1) * (2.5 if self.mode == "fwd+bwd" else 1)

    @property
    def label(self) -> str:
        gqa = f"/{self.kv_heads}kv" if self.kv_heads != self.heads else ""
        return f"{self.kind} {self.mode} {self.dtype} B{self.batch} H{self.heads}{gqa} N{self.seq} D{self.head_dim}"


def grid(device: str, quick: bool) -> list[Case]:
    """GPU: 16k tokens per batch (B·N) and H·D = 2048, bf16 over N 1k-16k, D 64 and 128, every
    kind, forward, plus forward+backward at 4k and an fp16 subset. CPU: fp32 and bf16,
    N up to 4k; --quick (CPU: N 1024, a second or two a case): the four fp32 mask kinds, bf16
    dense and padded, and dense forward+backward."""
    kinds = ["dense", "causal", "padded", "heavy-padded", "causal+padded", "gqa"]

    def case(kind, mode, dtype, N, D, tokens, width):
        H = width // D
        return Case(kind, mode, dtype, max(1, tokens // N), H, H // 4 if kind == "gqa" else H, N, D)

    if device == "cuda":
        if quick:
            return [case(k, "fwd", "bf16", 4096, 128, 16384, 2048) for k in kinds]
        cases = [case(k, "fwd", "bf16", N, D, 16384, 2048) for D in (64, 128)
                 for N in (1024, 4096, 16384) for k in kinds]
        cases += [case(k, "fwd+bwd", "bf16", 4096, D, 16384, 2048) for D in (64, 128)
                  for k in ("dense", "causal", "padded")]
        cases += [case(k, m, "fp16", 4096, 128, 16384, 2048) for k in ("dense", "causal") for m in ("fwd", "fwd+bwd")]
        return cases
    if quick:
        cases = [Case(k, "fwd", "fp32", 4, 8, 8, 1024, 64) for k in ("dense", "causal", "padded", "causal+padded")]
        cases += [Case(k, "fwd", "bf16", 4, 8, 8, 1024, 64) for k in ("dense", "padded")]
        return cases + [Case("dense", "fwd+bwd", "fp32", 4, 8, 8, 1024, 64)]
    return [case(k, m, dt, N, 64, 8192, 512) for dt in ("fp32", "bf16") for N in (512, 1024, 2048, 4096)
            for k in kinds for m in ("fwd", "fwd+bwd") if m == "fwd" or N <= 2048]
