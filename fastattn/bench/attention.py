"""The attention grid: every fastattn backend, what backend="auto" takes (fastattn:auto: what a
user gets), and every peer a user would call instead (torch SDPA per backend, FlexAttention) on
one case, side by side in one process, each output also checked against the float64 reference
on a sample (max_err)."""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..api import attention
from ..backends import NoBackendError, Problem, available_backends, select_backend
from ..backends.base import length_bucket
from ..masks import sdpa_mask_from_padding
from ..reference import reference_attention
from .cases import DTYPES, Case
from .timing import error_text, measure_ms, peak_memory_mb, time_providers


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


def case_problem(case: Case, device: str) -> Problem:
    """The dispatch facts of the case's calls, as fastattn.attention gathers them."""
    return Problem(device, DTYPES[case.dtype], case.head_dim, key_padding="padded" in case.kind, causal=case.causal,
                   needs_grad=case.mode == "fwd+bwd", nq=length_bucket(case.seq), nk=length_bucket(case.seq),
                   gqa=case.kv_heads != case.heads)


def fastattn_backends(case: Case, device: str) -> list[str]:
    """The backends that take the case (not the float64 reference, nor Triton's interpreter: not
    speed peers)."""
    problem, found = case_problem(case, device), []
    for name in available_backends():
        if name == "reference" or (name == "triton" and device != "cuda"):
            continue
        try:
            select_backend(name, problem)
        except NoBackendError:
            continue
        found.append(name)
    return found


def fastattn_providers(case: Case, device: str, inputs: Inputs) -> dict:
    """fastattn:<backend> for each of fastattn_backends, and fastattn:auto."""
    return {f"fastattn:{name}": lambda q, k, v, name=name: attention(
        q, k, v, key_padding_mask=inputs.kpm, causal=case.causal, backend=name)
        for name in fastattn_backends(case, device) + ["auto"]}


def providers(case: Case, device: str, inputs: Inputs, quick: bool) -> dict:
    """name -> forward callable (q, k, v) -> out, for fastattn and every peer that can run the case."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    found = fastattn_providers(case, device, inputs)

    # "default": no backend forced, what a user gets from SDPA as is
    sdpa_backends = {"default": None, "math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}
    if device == "cuda":
        sdpa_backends.update(efficient=SDPBackend.EFFICIENT_ATTENTION, cudnn=SDPBackend.CUDNN_ATTENTION)
    gqa = case.kv_heads != case.heads
    for name, backend in sdpa_backends.items():
        if name == "math" and (quick or case.seq > (4096 if device == "cuda" else 2048)):
            continue  # a reference nobody picks, O(N^2) memory, seconds per call
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


def run_case(case: Case, device: str, quick: bool, min_run_time: float, fastattn_only: bool = False,
             only: frozenset[str] | None = None) -> list[dict]:
    """Every provider on one case (only fastattn's: the dispatch sweep; `only`: those named); on
    the CPU the providers that run are timed taking turns."""
    inputs = make_inputs(case, device)
    rows, steps = [], {}
    found = fastattn_providers(case, device, inputs) if fastattn_only else providers(case, device, inputs, quick)
    if only is not None:
        found = {name: f for name, f in found.items() if name in only}
    for name, forward in found.items():
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
            row["error"] = error_text(e)
        rows.append(row)
    if device == "cpu":
        for name, ms in time_providers(steps, device, min_run_time, warm=True).items():
            row = next(r for r in rows if r["backend"] == name)
            row["ms" if isinstance(ms, float) else "error"] = ms
    for t in (s for qkv in inputs.sets for s in qkv):
        t.grad = None
    for row in rows:
        if "ms" in row:
            row["tflops"] = case.flops() / row["ms"] / 1e9
    timed = [r for r in rows if "ms" in r]
    peers = [r for r in timed if not r["backend"].startswith("fastattn")]
    best = min(peers, key=lambda r: r["ms"]) if peers else None
    for r in rows:
        r["best_peer"] = best["backend"] if best else None
        r["best_peer_ms"] = best["ms"] if best else None
        r["speedup_vs_best_peer"] = best["ms"] / r["ms"] if best and "ms" in r else None
    return rows
