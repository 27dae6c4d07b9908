"""`python -m fastattn bench`: fastattn against the attention a user would otherwise call,
side by side in one process, with time, throughput, speedup and error against float64."""
from __future__ import annotations

import copy
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from . import attention, replace_attention
from .reference import reference_attention


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    heads: int
    seq: int
    head_dim: int
    causal: bool = False
    padded: bool = False  # valid lengths N, 3N/4, N/2, N/4, ... (right padding)

    def lengths(self) -> list[int]:
        if not self.padded:
            return [self.seq] * self.batch
        return [max(1, self.seq * (4 - i % 4) // 4) for i in range(self.batch)]

    def key_padding_mask(self) -> torch.Tensor | None:
        if not self.padded:
            return None
        lens = torch.tensor(self.lengths())
        return torch.arange(self.seq)[None, :] >= lens[:, None]  # (B, N), True = padding

    def flops(self) -> float:
        """4 * H * D * sum(valid query * valid key pairs); halved when causal."""
        pairs = sum(n * n for n in self.lengths())
        return 4.0 * self.heads * self.head_dim * pairs / (2 if self.causal else 1)


def cases(quick: bool) -> list[Case]:
    return [
        Case(name, 4, 8, n, 64, causal="causal" in name, padded="padded" in name)
        for n in ((2048,) if quick else (1024, 2048, 4096))
        for name in ("dense", "causal", "padded", "causal+padded")
    ]


def median_seconds(fn, min_run_time: float) -> float:
    fn()  # warm-up
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def matmul_peak_gflops(dtype=torch.float32, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, 0.5) / 1e9


def max_error(out: torch.Tensor, ref: torch.Tensor, padded_rows: torch.Tensor | None) -> float:
    """Max abs error, ignoring padded query rows (don't-care for a model); padded_rows
    broadcasts against out."""
    diff = (out.double() - ref).abs()
    return (diff if padded_rows is None else diff.masked_fill(padded_rows, 0)).max().item()


def attention_rows(case: Case, min_run_time: float):
    B, H, N, D = case.batch, case.heads, case.seq, case.head_dim
    q, k, v = (torch.randn(B, N, H, D).transpose(1, 2) for _ in range(3))  # (B, H, N, D) views
    kpm = case.key_padding_mask()
    ref = torch.cat([reference_attention(q[b:b + 1].double(), k[b:b + 1].double(), v[b:b + 1].double(),
                                         None if kpm is None else kpm[b:b + 1], causal=case.causal)[0]
                     for b in range(B)])
    sdpa_mask = None if kpm is None else ~kpm[:, None, None, :]
    if case.causal and sdpa_mask is not None:  # SDPA takes is_causal or a mask, not both
        sdpa_mask = sdpa_mask & torch.ones(N, N, dtype=torch.bool).tril()
    providers = {
        "fastattn": lambda: attention(q, k, v, key_padding_mask=kpm, causal=case.causal),
        "torch SDPA": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=sdpa_mask, is_causal=case.causal and sdpa_mask is None),
    }
    padded_rows = None if kpm is None else kpm[:, None, :, None]
    return [(name, median_seconds(fn, min_run_time), max_error(fn(), ref, padded_rows))
            for name, fn in providers.items()]


def fastattn_mha(mha: torch.nn.MultiheadAttention, x: torch.Tensor, kpm) -> torch.Tensor:
    """nn.MultiheadAttention's self-attention, batch_first, on the fastattn kernel: packed QKV
    projection, heads as strided views, no transpose copies."""
    B, N, E = x.shape
    H = mha.num_heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).view(B, N, 3, H, E // H)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, N, D), no copy
    out = attention(q, k, v, key_padding_mask=kpm)  # (B, H, N, D) laid out (B, N, H, D)
    return F.linear(out.transpose(1, 2).reshape(B, N, E), mha.out_proj.weight, mha.out_proj.bias)


def module_rows(case: Case, min_run_time: float):
    B, H, N, D = case.batch, case.heads, case.seq, case.head_dim
    mha = torch.nn.MultiheadAttention(H * D, H, batch_first=True).eval()
    x = torch.randn(B, N, H * D)
    kpm = case.key_padding_mask()
    ref = mha.double()(x.double(), x.double(), x.double(), key_padding_mask=kpm, need_weights=False)[0]
    mha.float()
    providers = {
        "fastattn on MHA weights": lambda: fastattn_mha(mha, x, kpm),
        "nn.MultiheadAttention": lambda: mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0],
    }
    padded_rows = None if kpm is None else kpm[:, :, None]
    return [(name, median_seconds(fn, min_run_time), max_error(fn(), ref, padded_rows))
            for name, fn in providers.items()]


def encoder_rows(quick: bool):
    """nn.TransformerEncoder (d_model 512, 8 heads, 6 layers, batch 8, sequence 512) untouched
    against the same model after replace_attention: inference forward and training step
    (dropout 0.1, MSE loss, AdamW), dense and with lengths uniform in [128, 512]."""
    torch.manual_seed(0)
    B, L, E = 8, 512, 512
    layer = torch.nn.TransformerEncoderLayer(E, 8, 2048, dropout=0.1, batch_first=True)
    models = {"nn.TransformerEncoder": torch.nn.TransformerEncoder(layer, 6)}
    models["same after replace_attention"] = replace_attention(copy.deepcopy(models["nn.TransformerEncoder"]))
    x, target = torch.randn(B, L, E), torch.randn(B, L, E)
    lengths = torch.randint(128, L + 1, (B,))
    reps = 2 if quick else 5
    rows = []
    for case, pad in (("dense", None), ("padded", torch.arange(L)[None, :] >= lengths[:, None])):
        for name, model in models.items():
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def train_step():
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x, src_key_padding_mask=pad), target).backward()
                opt.step()

            def infer():
                with torch.inference_mode():
                    model(x, src_key_padding_mask=pad)

            model.eval()
            t_infer = median_of(infer, reps)
            model.train()
            rows.append((case, name, t_infer, median_of(train_step, reps)))
    return rows


def median_of(fn, reps: int) -> float:
    """Median wall time of reps calls after one warm-up (for calls of a second or more)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def add_rows(table, case: Case, rows, baseline: str, peak: float, kernel: bool) -> None:
    """Module rows also spend time on projections, so they get no attention GFLOPS."""
    base = dict((name, t) for name, t, _ in rows)[baseline]
    for name, t, err in rows:
        gflops = case.flops() / t / 1e9
        rate = (f"{gflops:.0f}", f"{100 * gflops / peak:.0f}%") if kernel else ("", "")
        table.add_row(case.name, f"{case.batch}×{case.heads}×{case.seq}", name, f"{t * 1e3:.1f}",
                      *rate, f"{base / t:.2f}×", f"{err:.1e}")


def run(quick: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 110))
    min_run_time = 0.3 if quick else 1.0
    peak = matmul_peak_gflops()
    console.print(f"[bold]fastattn bench[/] on CPU: torch {torch.__version__}, "
                  f"{torch.get_num_threads()} threads; measured fp32 matmul peak {peak:.0f} GFLOPS")
    table = Table(title="forward, fp32, D=64. GFLOPS count valid tokens only (padding excluded)")
    for col in ("case", "B×H×N", "provider", "ms", "GFLOPS", "% peak", "speedup", "max err"):
        table.add_column(col, justify="left" if col in ("case", "provider") else "right")
    with torch.inference_mode():
        for case in cases(quick):
            add_rows(table, case, attention_rows(case, min_run_time), "torch SDPA", peak, True)
            if not case.causal:
                add_rows(table, case, module_rows(case, min_run_time), "nn.MultiheadAttention",
                         peak, False)
            table.add_section()
    console.print(table)
    console.print("speedup: kernel rows against torch SDPA given the equivalent boolean mask; module "
                  "rows (E=512, self-attention, eval, need_weights=False) against nn.MultiheadAttention.")

    torch.set_flush_denormal(True)  # both models alike: denormal gradients slow training 10x+
    warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors")  # torch's own
    table = Table(title="nn.TransformerEncoder, d_model 512, 8 heads, 6 layers, batch 8, sequence 512 "
                        "(padded: lengths uniform in [128, 512])")
    for col in ("batch", "model", "inference ms", "speedup", "train step ms", "speedup"):
        table.add_column(col, justify="left" if col in ("batch", "model") else "right")
    rows = encoder_rows(quick)
    for case, name, t_infer, t_train in rows:
        base = next(r for r in rows if r[0] == case)
        table.add_row(case, name, f"{t_infer * 1e3:.0f}", f"{base[2] / t_infer:.2f}×",
                      f"{t_train * 1e3:.0f}", f"{base[3] / t_train:.2f}×")
    console.print(table)
