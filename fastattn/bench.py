"""`python -m fastattn bench`: fastattn against the attention a user would otherwise call, side by
side in one process: every fastattn backend, torch SDPA per backend, FlexAttention, and
nn.MultiheadAttention / whole models end to end.

Each timed output is also checked against the float64 reference (max error column). FLOPs are
4·H·D·Σ(valid query × valid key pairs), halved when causal, ×2.5 with the backward: padded
batches count valid tokens only.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import MultiHeadAttention, attention, available_backends, replace_attention
from .backends import NoBackendError, Problem, select_backend
from .bench_decode import decode_rows, varlen_rows
from .bench_decode import print_tables as print_decode_tables
from .masks import sdpa_mask_from_padding
from .reference import reference_attention

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
    N up to 4k; --quick: the headline fp32 shapes and one bf16 and one backward case."""
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
        cases = [Case(k, "fwd", "fp32", 4, 8, 8, 2048, 64) for k in ("dense", "causal", "padded", "causal+padded")]
        return cases + [Case("padded", "fwd", "bf16", 4, 8, 8, 2048, 64), Case("dense", "fwd+bwd", "fp32", 4, 8, 8, 1024, 64)]
    return [case(k, m, dt, N, 64, 8192, 512) for dt in ("fp32", "bf16") for N in (512, 1024, 2048, 4096)
            for k in kinds for m in ("fwd", "fwd+bwd") if m == "fwd" or N <= 2048]


# --------------------------------------------------------------------------- timing and peaks
def measure_ms(fn, device: str, min_run_time: float) -> float:
    """Median milliseconds after warm-up: CUDA events via triton.testing.do_bench (which also
    flushes L2 between runs) on a GPU, torch.utils.benchmark on the CPU."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    from torch.utils import benchmark

    fn()
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def paired_ms(fns, min_run_time: float, min_reps: int = 5) -> list[float]:
    """CPU: median ms of each fn after a warm-up call, the fns called in turn (a, b, a, b, ...):
    a shared machine's load drifts over seconds, and taking turns exposes every fn to it alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < min_reps or time.perf_counter() - start < min_run_time * len(fns):
        for fn, t in zip(fns, times):
            began = time.perf_counter()
            fn()
            t.append(time.perf_counter() - began)
    return [statistics.median(t) * 1e3 for t in times]


def peaks(device: str) -> dict:
    """The machine's measured peaks in the same run: a large matmul and a large copy."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = 8192 if device == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    matmul = 2 * n**3 / measure_ms(lambda: a @ b, device, 0.5) / 1e9
    x = torch.empty(256 * 2**20 // 4 if device == "cuda" else 64 * 2**20 // 4, device=device)
    y = torch.empty_like(x)
    copy_gbps = 2 * x.numel() * 4 / measure_ms(lambda: y.copy_(x), device, 0.3) / 1e6
    return {"matmul_tflops": matmul, "matmul_dtype": str(dtype).removeprefix("torch."), "copy_gbps": copy_gbps}


def peak_memory_mb(fn, device: str) -> float | None:
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not Path("/proc/self/clear_refs").exists():
        return None
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current size
    status = lambda key: int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1))  # noqa: E731
    before = status("VmRSS")
    fn()
    return (status("VmHWM") - before) / 1024


# --------------------------------------------------------------------------- one case
@dataclass
class Inputs:
    """Rotating copies of q, k, v (so that caches do not flatter repeated runs), the padding
    mask, and the same masks as SDPA and FlexAttention take them."""
    sets: list
    kpm: torch.Tensor | None
    sdpa_mask: torch.Tensor | None
    dout: torch.Tensor
    turn: list = field(default_factory=lambda: [0])

    def next(self):
        self.turn[0] = (self.turn[0] + 1) % len(self.sets)
        return self.sets[self.turn[0]]


def make_inputs(case: Case, device: str) -> Inputs:
    dtype = DTYPES[case.dtype]
    B, H, Hkv, N, D = case.batch, case.heads, case.kv_heads, case.seq, case.head_dim
    per_set = 2 * (B * N * (H + 2 * Hkv) * D) * torch.finfo(dtype).bits // 8
    copies = max(2, min(4, (64 * 2**20) // max(per_set, 1) + 1)) if device == "cuda" else 2
    grad = case.mode == "fwd+bwd"

    def tensor(heads):  # (B, heads, N, D) laid out (B, N, heads, D), as a module makes it
        return torch.randn(B, N, heads, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_(grad)

    sets = [(tensor(H), tensor(Hkv), tensor(Hkv)) for _ in range(copies)]
    kpm = sdpa_mask = None
    if "padded" in case.kind:
        lengths = torch.tensor(case.lengths(), device=device)
        kpm = torch.arange(N, device=device)[None, :] >= lengths[:, None]
        sdpa_mask = sdpa_mask_from_padding(kpm)
        if case.causal:
            sdpa_mask = sdpa_mask & torch.ones(N, N, dtype=torch.bool, device=device).tril()
    dout = torch.randn(B, H, N, D, device=device, dtype=dtype)
    return Inputs(sets, kpm, sdpa_mask, dout)


def providers(case: Case, device: str, inputs: Inputs, quick: bool) -> dict:
    """name -> forward callable (q, k, v) -> out, for every peer that can run the case."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    found = {}
    problem = Problem(device, DTYPES[case.dtype], case.head_dim, None, inputs.kpm is not None,
                      case.causal, False, case.mode == "fwd+bwd")
    for name in available_backends():
        if name == "reference" or (name == "triton" and device != "cuda"):
            continue  # the ground truth, and Triton's interpreter, are not speed peers
        try:
            select_backend(name, problem)
        except NoBackendError:
            continue
        found[f"fastattn:{name}"] = lambda q, k, v, name=name: attention(
            q, k, v, key_padding_mask=inputs.kpm, causal=case.causal, backend=name)

    # "default": no backend forced, what a user gets from SDPA as is
    sdpa_backends = {"default": None, "math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}
    if device == "cuda":
        sdpa_backends.update(efficient=SDPBackend.EFFICIENT_ATTENTION, cudnn=SDPBackend.CUDNN_ATTENTION)
    gqa = case.kv_heads != case.heads
    for name, backend in sdpa_backends.items():
        if name == "math" and case.seq > (4096 if device == "cuda" else 2048):
            continue  # O(N^2) memory, and minutes per call
        def sdpa(q, k, v, backend=backend):
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.sdpa_mask, enable_gqa=gqa,
                                                      is_causal=case.causal and inputs.sdpa_mask is None)
        found[f"sdpa:{name}"] = sdpa

    # FlexAttention compiles per shape (seconds to tens of seconds): a representative subset.
    if (device == "cuda" and case.seq == 4096 and case.kind in ("dense", "padded", "causal+padded")) or \
            (device == "cpu" and not quick and case.seq == 1024 and case.mode == "fwd"):
        flex = flex_provider(case, device, inputs)
        if flex is not None:
            found["flex"] = flex
    return found


def flex_provider(case: Case, device: str, inputs: Inputs):
    """FlexAttention, compiled, with a BlockMask for padding and causality."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    lengths = torch.tensor(case.lengths(), device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        keep = kv_idx < lengths[b]
        return keep & (q_idx >= kv_idx) if case.causal else keep

    block_mask = create_block_mask(mask_mod, case.batch, None, case.seq, case.seq, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    gqa = case.kv_heads != case.heads
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def reference_error(case: Case, inputs: Inputs, out: torch.Tensor) -> float:
    """Max abs error against float64 on a sample: batch row 0, two heads, up to 256 valid query
    rows spread over the sequence (a full reference would need O(N^2) memory)."""
    q, k, v = inputs.sets[inputs.turn[0]]
    n_valid = case.lengths()[0]
    rows = torch.linspace(0, n_valid - 1, min(256, n_valid), device=q.device).long().unique()
    heads = min(2, case.heads)
    kv_heads = max(1, heads * case.kv_heads // case.heads)
    qs = q[:1, :heads, rows].double()
    ks, vs = k[:1, :kv_heads].double(), v[:1, :kv_heads].double()
    keys = torch.arange(case.seq, device=q.device)
    allowed = (keys[None, :] < n_valid).expand(len(rows), -1)
    if case.causal:
        allowed = allowed & (keys[None, :] <= rows[:, None])
    ref, _ = reference_attention(qs, ks, vs, attn_mask=allowed)
    return (out[:1, :heads, rows].double() - ref).abs().max().item()


def run_case(case: Case, device: str, quick: bool, peak_tflops: float, min_run_time: float) -> list[dict]:
    """Every provider on one case; on the CPU the providers that run are timed taking turns."""
    inputs = make_inputs(case, device)
    rows, steps = [], {}
    error = lambda e: f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"  # noqa: E731
    for name, forward in providers(case, device, inputs, quick).items():
        row = dict(backend=name, case=case.label, **asdict(case))
        try:
            if case.mode == "fwd":
                step = lambda forward=forward: forward(*inputs.next())  # noqa: E731
            else:
                def step(forward=forward):
                    out = forward(*inputs.next())
                    out.backward(inputs.dout)
            out = forward(*inputs.next())  # also compiles and autotunes
            row["max_err"] = reference_error(case, inputs, out.detach())
            del out
            if device == "cuda":
                row["ms"] = measure_ms(step, device, min_run_time)
            row["peak_mem_mb"] = peak_memory_mb(step, device)
            steps[name] = step
        except Exception as e:  # a failing provider must not stop the rest
            row["error"] = error(e)
        rows.append(row)
    if device == "cpu" and steps:
        try:
            times = dict(zip(steps, paired_ms(list(steps.values()), min_run_time)))
        except Exception:  # one provider failed on a later call: time each alone, recording who
            times = {}
            for name, step in steps.items():
                try:
                    times[name] = measure_ms(step, device, min_run_time)
                except Exception as e:
                    next(r for r in rows if r["backend"] == name)["error"] = error(e)
        for name, ms in times.items():
            next(r for r in rows if r["backend"] == name)["ms"] = ms
    for t in (s for qkv in inputs.sets for s in qkv):
        t.grad = None
    for row in rows:
        if "ms" in row:
            row["tflops"] = case.flops() / row["ms"] / 1e9
            row["pct_of_peak"] = 100 * row["tflops"] / peak_tflops
    timed = [r for r in rows if "ms" in r]
    peers = [r for r in timed if not r["backend"].startswith("fastattn")]
    best = min(peers, key=lambda r: r["ms"]) if peers else None
    for r in rows:
        r["best_peer"] = best["backend"] if best else None
        r["best_peer_ms"] = best["ms"] if best else None
        r["speedup_vs_best_peer"] = best["ms"] / r["ms"] if best and "ms" in r else None
    return rows


# --------------------------------------------------------------------------- modules, models
def module_rows(device: str, min_run_time: float) -> list[dict]:
    """nn.MultiheadAttention (eval, need_weights=False) against fastattn.MultiHeadAttention
    sharing its weights (from_torch): the fused path, packed QKV projection, no copies."""
    rows = []
    B, N, E, H = (8, 2048, 1024, 16) if device == "cuda" else (4, 2048, 512, 8)
    for padded in (False, True):
        mha = torch.nn.MultiheadAttention(E, H, batch_first=True, device=device).eval()
        ours = MultiHeadAttention.from_torch(mha)
        x = torch.randn(B, N, E, device=device)
        kpm = None
        if padded:
            lengths = torch.tensor([N, 3 * N // 4, N // 2, N // 4] * (B // 4), device=device)
            kpm = torch.arange(N, device=device)[None, :] >= lengths[:, None]
        calls = {"fastattn.MultiHeadAttention": lambda: ours(x, x, x, key_padding_mask=kpm, need_weights=False),
                 "nn.MultiheadAttention": lambda: mha(x, x, x, key_padding_mask=kpm, need_weights=False)}
        with torch.inference_mode():
            if device == "cpu":
                times = dict(zip(calls, paired_ms(list(calls.values()), min_run_time)))
            else:
                times = {name: measure_ms(call, device, min_run_time) for name, call in calls.items()}
        for name, ms in times.items():
            rows.append(dict(backend=name, case=f"{'padded' if padded else 'dense'} B{B} N{N} E{E} H{H}", ms=ms,
                             best_peer="nn.MultiheadAttention", best_peer_ms=times["nn.MultiheadAttention"],
                             speedup_vs_best_peer=times["nn.MultiheadAttention"] / ms))
    return rows


def median_of(fn, reps: int) -> float:
    """Median wall time (s) of reps calls after one warm-up (for calls of a second or more)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def encoder_rows(device: str, quick: bool) -> list[dict]:
    """nn.TransformerEncoder (d_model 512, 8 heads, 6 layers, batch 8, sequence 512) untouched
    against the same model after replace_attention: inference forward and a training step
    (dropout 0.1, MSE loss, AdamW), dense and with lengths uniform in [128, 512]."""
    torch.manual_seed(0)
    B, L, E = 8, 512, 512
    layer = torch.nn.TransformerEncoderLayer(E, 8, 2048, dropout=0.1, batch_first=True, device=device)
    models = {"nn.TransformerEncoder": torch.nn.TransformerEncoder(layer, 6)}
    models["same after replace_attention"] = replace_attention(copy.deepcopy(models["nn.TransformerEncoder"]))
    x, target = torch.randn(B, L, E, device=device), torch.randn(B, L, E, device=device)
    lengths = torch.randint(128, L + 1, (B,), device=device)
    reps = 2 if quick else 5
    rows = []
    for case, pad in (("dense", None), ("padded", torch.arange(L, device=device)[None, :] >= lengths[:, None])):
        tokens = B * L if pad is None else int((~pad).sum())
        for name, model in models.items():
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def train_step():
                opt.zero_grad()
                F.mse_loss(model(x, src_key_padding_mask=pad), target).backward()
                opt.step()

            def infer():
                with torch.inference_mode():
                    model(x, src_key_padding_mask=pad)

            model.eval()
            t_infer = median_of(infer, reps)
            model.train()
            t_train = median_of(train_step, reps)
            rows.append(dict(model=name, batch=case, infer_ms=t_infer * 1e3, train_ms=t_train * 1e3,
                             train_tokens_per_s=tokens / t_train))
    return rows


def model_rows(device: str, quick: bool) -> list[dict]:
    """A training step of the notes' encoder-decoder Transformer (fastattn.models; d_model 512, 8
    heads, 2 + 2 layers, dropout 0.1) on padded batches (8 pairs, lengths uniform in [32, 256]),
    on torch attention and on fastattn: real (non-padding) tokens per second."""
    from .models import Transformer

    gen = torch.Generator().manual_seed(0)
    B, L, V = 8, 256, 1000

    def padded():
        ids = torch.randint(3, V, (B, L), generator=gen)
        lengths = torch.randint(32, L + 1, (B,), generator=gen)
        return ids.masked_fill(torch.arange(L)[None, :] >= lengths[:, None], 0).to(device)

    src, tgt = padded(), padded()
    tgt_in = torch.cat([torch.full_like(tgt[:, :1], 1), tgt[:, :-1]], dim=1)
    tokens = int((src != 0).sum() + (tgt != 0).sum())
    rows = []
    for kind in ("torch", "fastattn"):
        torch.manual_seed(0)
        model = Transformer(V, V, 512, 8, 2, 2, 2048, 0.1, L, 0, kind).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad()
            logits = model(src, tgt_in)
            F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=0).backward()
            opt.step()

        seconds = median_of(step, 2 if quick else 5)
        rows.append(dict(model=f"fastattn.models.Transformer, attention={kind}", batch="padded",
                         train_ms=seconds * 1e3, train_tokens_per_s=tokens / seconds))
    return rows


# --------------------------------------------------------------------------- report
def environment(device: str) -> dict:
    def commit():
        try:
            return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return os.environ.get("FASTATTN_COMMIT", "unknown")

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return dict(device=name, commit=os.environ.get("FASTATTN_COMMIT") or commit(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, triton=triton_version, python=platform.python_version())


def markdown_table(record: dict) -> str:
    """The README's GPU table: a line per case, TFLOPS per provider, fastattn's ratio to the best
    peer. Regenerate with `python -m fastattn bench --table RECORD.json`."""
    cases = {}
    for r in record["rows"]:
        cases.setdefault(r["case"], {})[r["backend"]] = r
    names = sorted({r["backend"] for r in record["rows"] if r.get("tflops") and r["backend"] != "sdpa:math"},
                   key=lambda n: (not n.startswith("fastattn"), n))
    lines = [f"| case | {' | '.join(names)} | best peer | {' | '.join(n + ' ÷ best' for n in names if n.startswith('fastattn'))} |",
             "|---" * (2 + len(names) + sum(n.startswith("fastattn") for n in names)) + "|"]
    for case, rows in cases.items():
        cells = [f"{rows[n]['tflops']:.0f}" if "tflops" in rows.get(n, {}) else "—" for n in names]
        any_row = next(iter(rows.values()))
        ratios = [f"{rows[n]['speedup_vs_best_peer']:.2f}×" if rows.get(n, {}).get("speedup_vs_best_peer") else "—"
                  for n in names if n.startswith("fastattn")]
        lines.append(f"| {case} | {' | '.join(cells)} | {any_row['best_peer']} | {' | '.join(ratios)} |")
    return "\n".join(lines)


def print_tables(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    p = record["peaks"]
    console.print(f"[bold]fastattn bench[/] on {record['device']}, torch {record['torch']}, triton "
                  f"{record['triton']}; measured peaks: {p['matmul_dtype']} matmul {p['matmul_tflops']:.2f} "
                  f"TFLOPS, copy {p['copy_gbps']:.0f} GB/s")
    table = Table(title="attention (TFLOPS count valid tokens only: padded queries and keys excluded)")
    for col in ("case", "provider", "ms", "TFLOPS", "% peak", "vs best peer", "best peer", "max err", "peak MB"):
        table.add_column(col, justify="left" if col in ("case", "provider", "best peer") else "right")
    last = None
    for r in record["rows"]:
        if last is not None and r["case"] != last:
            table.add_section()
        last = r["case"]
        if "error" in r:
            table.add_row(r["case"], r["backend"], "—", "", "", "", "", "", "", style="dim")
            continue
        fa = r["backend"].startswith("fastattn")
        speed = f"{r['speedup_vs_best_peer']:.2f}×" if r["speedup_vs_best_peer"] and fa else ""
        mem = f"{max(r['peak_mem_mb'], 0):.0f}" if r.get("peak_mem_mb") is not None else ""
        tflops = f"{r['tflops']:.1f}" if r["tflops"] >= 10 else f"{r['tflops']:.3f}"
        table.add_row(r["case"], r["backend"], f"{r['ms']:.3f}", tflops, f"{r['pct_of_peak']:.0f}%",
                      speed, r["best_peer"] if fa else "", f"{r['max_err']:.1e}", mem, style="bold" if fa else None)
    console.print(table)
    failed = [r for r in record["rows"] if "error" in r]
    if failed:
        console.print(f"{len(failed)} provider/case pairs did not run, e.g. {failed[0]['backend']} on "
                      f"{failed[0]['case']}: {failed[0]['error']}")
    if record.get("isa"):
        table = Table(title=f"the CPU kernel per ISA table against SDPA at the same ISA level (this CPU runs "
                            f"{record['isa'][0]['isa']} by default; FASTATTN_CPU_ISA picks another)")
        for col in ("ISA", "torch level", "case", "fastattn ms", "SDPA ms", "fastattn ÷ SDPA",
                    "bf16 ÷ via fp32", "fp32 GEMM GFLOPS", "% of FMA peak"):
            table.add_column(col)
        for r in record["isa"]:
            vs_fp32 = f"{r['ratio_vs_fp32']:.2f}×" if "ratio_vs_fp32" in r else ""
            sdpa = (f"{r['sdpa_ms']:.1f}", f"{r['ratio']:.2f}×") if "sdpa_ms" in r else ("failed", "")
            table.add_row(r["isa"], r["torch_level"], r["case"], f"{r['fastattn_ms']:.1f}", *sdpa, vs_fp32, f"{r['gemm_gflops']:.0f}",
                          f"{100 * r['gemm_gflops'] / r['fma_peak_gflops']:.0f}%")
        console.print(table)
    print_decode_tables(record, console)
    if record.get("modules"):
        table = Table(title="nn.MultiheadAttention end to end (eval, need_weights=False, self-attention)")
        for col in ("case", "module", "ms", "speedup"):
            table.add_column(col)
        for r in record["modules"]:
            table.add_row(r["case"], r["backend"], f"{r['ms']:.2f}", f"{r['speedup_vs_best_peer']:.2f}×")
        console.print(table)
    if record.get("end_to_end"):
        table = Table(title="Whole models. nn.TransformerEncoder: d_model 512, 8 heads, 6 layers, batch 8, "
                            "sequence 512 (padded: lengths uniform in [128, 512]). fastattn.models.Transformer: "
                            "d_model 512, 2 + 2 layers, 8 pairs of lengths in [32, 256]. Tokens/s count real tokens")
        for col in ("batch", "model", "inference ms", "train step ms", "train tokens/s"):
            table.add_column(col)
        for r in record["end_to_end"]:
            infer = f"{r['infer_ms']:.0f}" if "infer_ms" in r else ""
            table.add_row(r["batch"], r["model"], infer, f"{r['train_ms']:.0f}", f"{r['train_tokens_per_s']:.0f}")
        console.print(table)


def plot(record: dict, path: str) -> None:
    """One PNG: a row of charts per (mode, dtype, D), a column per case kind. TFLOPS against N,
    a line per provider; bars per provider where the group has a single N. A provider keeps its
    colour across charts, and one legend serves them all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for r in record["rows"]:
        if "tflops" in r:
            lines = groups.setdefault((r["mode"], r["dtype"], r["head_dim"]), {}).setdefault(r["kind"], {})
            lines.setdefault(r["backend"], []).append((r["seq"], r["tflops"]))
    if not groups:
        return
    kinds = sorted({kind for charts in groups.values() for kind in charts})
    names = sorted({name for charts in groups.values() for lines in charts.values() for name in lines})
    cmap = plt.get_cmap("tab20")
    colour = {name: cmap(i % 20) for i, name in enumerate(names)}
    fig, axes = plt.subplots(len(groups), len(kinds), figsize=(4.5 * len(kinds), 3.6 * len(groups)), squeeze=False)
    for row, ((mode, dtype, D), charts) in zip(axes, sorted(groups.items())):
        for ax, kind in zip(row, kinds):
            lines = charts.get(kind)
            if not lines:
                ax.axis("off")
                continue
            seqs = sorted({n for points in lines.values() for n, _ in points})
            for i, (name, points) in enumerate(sorted(lines.items())):
                if len(seqs) > 1:
                    n, t = zip(*sorted(points))
                    ax.plot(n, t, marker="o", color=colour[name], linewidth=2.5 if name.startswith("fastattn") else 1)
                else:
                    ax.barh(i, points[0][1], color=colour[name])
            if len(seqs) > 1:
                ax.set_xscale("log", base=2)
                ax.set(xlabel="sequence length N", ylabel="TFLOPS (valid tokens)")
            else:
                ax.set_yticks(range(len(lines)), sorted(lines), fontsize=7)
                ax.set(xlabel=f"TFLOPS (valid tokens), N={seqs[0]}")
            ax.set_title(f"{kind}, {mode} {dtype} D={D}", fontsize=9)
    handles = [plt.Line2D([], [], color=colour[n], linewidth=2.5 if n.startswith("fastattn") else 1) for n in names]
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 6), fontsize=8)
    fig.suptitle(record["device"])
    fig.tight_layout(rect=(0, 0.6 / fig.get_figheight(), 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def run(quick: bool = False, json_path: str | None = None, plot_path: str | None = None,
        device: str | None = None, tests: str | None = None, end_to_end: bool = True) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_flush_denormal(True)  # every provider alike: denormals slow CPU training 10x+
    warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors")  # torch's own
    record = environment(device)
    if tests:
        passed, failed, skipped = (int(x) for x in tests.split(","))
        record["gpu_tests"] = dict(passed=passed, failed=failed, skipped=skipped)
    record["peaks"] = peaks(device)
    peak = record["peaks"]["matmul_tflops"]
    min_run_time = 0.3 if quick else 1.0
    record["rows"] = []
    record["complete"] = False

    def save():  # after every case too, so that a run killed at a time limit still leaves its rows
        if json_path:
            tmp = Path(f"{json_path}.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(record, indent=1, default=str))
            os.replace(tmp, json_path)  # a kill mid-write leaves the previous whole record

    measure = lambda fn: measure_ms(fn, device, min_run_time)  # noqa: E731
    record["decode"] = decode_rows(device, quick, measure)  # first: a run killed at a time limit keeps them
    record["varlen"] = varlen_rows(device, quick, measure)
    save()
    for case in grid(device, quick):
        record["rows"] += run_case(case, device, quick, peak, min_run_time)
        save()
    if device == "cpu":
        from .bench_isa import CASES, QUICK_CASES, isa_rows

        record["isa"] = isa_rows(min_run_time=min_run_time, cases=QUICK_CASES if quick else CASES)
    record["modules"] = module_rows(device, min_run_time)
    record["end_to_end"] = encoder_rows(device, quick) + model_rows(device, quick) if end_to_end else []
    record["complete"] = True
    save()
    print_tables(record)
    if plot_path:
        plot(record, plot_path)
    return record
