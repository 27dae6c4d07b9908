"""The Triton kernels at the tiles a GPU runs, through Triton's interpreter on the CPU.

Elsewhere the interpreter runs every kernel at tuning.INTERPRETER_CONFIG: square 32 x 32 tiles.
A GPU runs the configs of tuning.CANDIDATES, of the shipped defaults (tuned/sm*.json) and
tuning.FALLBACK: 16 to 128 rows, BLOCK_M != BLOCK_N; at decoding shapes (Nq <= 16) the rule's
16 x 128 (16 x 64 at D = 256). Here each case forces one config per kernel (tuning.TUNER.force, on
a fresh Tuner) and checks the forward, lse and every gradient (the sinks' too) against float64,
with sequences longer than the largest tile and a multiple of none (so interior tiles, boundary
tiles and a partial last tile all run). Configs and flags meet pairwise: every pair of values of
two axes appears in some case (a seeded greedy covering array), not the whole product.

Three arrays: the prefill/training kernels at each of those configs; the same kernels at the
decoding rule's tiles (Nq <= 16, forward and backward); decode.py's split and merge kernels at the
GPU's 64-key tile and an H100's split count (decode() picks 32-key tiles under the interpreter:
the test makes it take the GPU's branch). A spy on the launchers checks that the tiles asked for
are the tiles launched. The interpreter never reads num_warps or num_stages, so there the configs
are taken one per tile shape (BLOCK_M, BLOCK_N); on a GPU, where this file runs as it is, each.
"""
from __future__ import annotations

import json
import random
import zlib
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import fastattn
from helpers import TOL, rel_err

pytest.importorskip("triton")
from fastattn.triton import attention as triton_attention  # noqa: E402
from fastattn.triton import decode as triton_decode  # noqa: E402
from fastattn.triton import tuning  # noqa: E402

pytestmark = pytest.mark.skipif("triton" not in fastattn.available_backends(), reason="triton backend unavailable")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = ("fwd", "dkdv", "dq")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
H100_SMS = 132  # the split count decode() would choose on an H100


def shipped_configs() -> dict[str, list[tuning.Config]]:
    """kernel -> the distinct configs of the shipped defaults (every tuned/sm*.json)."""
    found: dict[str, set] = {}
    for path in sorted((Path(tuning.__file__).parent / "tuned").glob("sm*.json")):
        for key, config in json.loads(path.read_text())["configs"].items():
            found.setdefault(key.split("|")[0], set()).add(tuple(config))
    return {kernel: sorted(configs) for kernel, configs in found.items()}


SHIPPED = shipped_configs()
# What a GPU may run at Nq > 16: the tuning candidates, the shipped defaults, the fallback.
CONFIGS = {k: list(dict.fromkeys([*tuning.CANDIDATES[k], *SHIPPED.get(k, []), tuning.FALLBACK[k]])) for k in KERNELS}


def one_per_tile(configs: list[tuning.Config]) -> list[tuning.Config]:
    """The first config of each (BLOCK_M, BLOCK_N): num_warps and num_stages change nothing in
    the interpreter, so there the others would run the same computation again."""
    first: dict = {}
    for config in configs:
        first.setdefault(config[:2], config)
    return list(first.values())


# The configs the cases force: each config on a GPU, each tile shape in the interpreter.
FORCED = {k: CONFIGS[k] if DEVICE == "cuda" else one_per_tile(CONFIGS[k]) for k in KERNELS}


# --------------------------------------------------------------------------- the covering arrays
def covering_array(axes: list[tuple[str, list]], compatible, seed: int, tries: int = 24) -> list[dict]:
    """Cases (axis name -> value) in which every pair of values of two axes that `compatible`
    allows appears at least once. Greedy: each case starts from a pair not yet covered and fills
    the other axes, in a shuffled order, each with the value that covers the most new pairs; the
    best of `tries` such cases is kept. Deterministic for a seed (random.Random, sorted sets)."""
    rng = random.Random(seed)
    names = [name for name, _ in axes]
    sizes = [len(values) for _, values in axes]
    n = len(axes)

    def key(x, a, y, b):
        return (x, a, y, b) if x < y else (y, b, x, a)

    allowed = {(x, a, y, b) for x in range(n) for y in range(x + 1, n) for a in range(sizes[x]) for b in range(sizes[y])
               if compatible(names[x], axes[x][1][a], names[y], axes[y][1][b])
               and compatible(names[y], axes[y][1][b], names[x], axes[x][1][a])}
    uncovered = set(allowed)

    def pairs(row):
        return {key(x, row[x], y, row[y]) for x in row for y in row if x < y}

    rows = []
    while uncovered:
        todo = sorted(uncovered)
        best, best_gain = None, -1
        for _ in range(tries):
            x, a, y, b = rng.choice(todo)
            row = {x: a, y: b}
            rest = [z for z in range(n) if z not in row]
            rng.shuffle(rest)
            for z in rest:
                options = [c for c in range(sizes[z]) if all(key(z, c, w, row[w]) in allowed for w in row)]
                assert options, f"no value of {names[z]} fits {row}"
                row[z] = max(options, key=lambda c: (sum(key(z, c, w, row[w]) in uncovered for w in row), rng.random()))
            gain = len(pairs(row) & uncovered)
            if gain > best_gain:
                best, best_gain = row, gain
        rows.append(best)
        uncovered -= pairs(best)
    assert all(pairs(row) <= allowed for row in rows)
    return [{names[z]: axes[z][1][row[z]] for z in range(n)} for row in rows]


def block_d(D: int) -> int:
    return triton_attention.block_d(D)


INPUTS = ["dense", "pad-range", "pad-scattered", "bool-mask", "float-mask", "packed"]
MODS = ["none", "window", "softcap", "alibi", "sinks", "bottom-right"]
HEADS = {"mha": (2, 2), "gqa": (2, 1)}

MAIN_AXES = [
    *[(kernel, FORCED[kernel]) for kernel in KERNELS],
    ("input", INPUTS),
    ("causal", [False, True]),
    ("mods", MODS),
    ("dtype", list(DTYPES)),
    ("D", [64, 80, 128, 256]),
    ("lengths", ["q<k", "q>k", "q=k"]),
    ("heads", list(HEADS)),
]


def main_compatible(name_a, a, name_b, b) -> bool:
    if name_a in KERNELS and name_b == "D":
        return tuning.fits(a, block_d(b))  # the tuner offers no config that does not fit
    if name_a == "mods" and a == "bottom-right" and name_b == "lengths":
        return b != "q=k"  # where bottom-right and top-left differ
    return True


def largest_tile(case) -> int:
    return max(max(case[k][0], case[k][1]) for k in KERNELS)


def main_lengths(case) -> tuple[int, int]:
    """(Nq, Nk): a few rows past the largest tile T of the case's configs (so every kernel has
    at least two tiles, the last partial, in each direction), a multiple of no tile (of 16)."""
    t = largest_tile(case)
    return {"q<k": (t + 5, t + 43), "q>k": (t + 35, t + 9), "q=k": (t + 21, t + 21)}[case["lengths"]]


def tile_name(config) -> str:
    return "{}x{}w{}s{}".format(*config)


def case_id(case, fields) -> str:
    parts = []
    for name in fields:
        value = case[name]
        if name in KERNELS:
            parts.append(f"{name}{tile_name(value)}")
        elif name == "causal":
            parts.append("causal" if value else "full")
        elif name == "D":
            parts.append(f"d{value}")
        elif name == "lengths":
            parts.append(value.replace("<", "lt").replace(">", "gt").replace("=", "eq"))
        elif name == "nq":
            parts.append(f"nq{value}")
        else:
            parts.append(str(value))
    return "-".join(parts)


MAIN_CASES = covering_array(MAIN_AXES, main_compatible, seed=2024)
MAIN_IDS = [f"{i:02d}-" + case_id(c, [n for n, _ in MAIN_AXES]) for i, c in enumerate(MAIN_CASES)]

# The prefill kernels at decoding shapes: the rule's tiles for all three (tuning.decode_config).
DECODE_SHAPE_AXES = [
    ("input", INPUTS),
    ("causal", [False, True]),
    ("mods", MODS),
    ("dtype", list(DTYPES)),
    ("D", [64, 80, 128, 256]),
    ("nq", [1, 7, 16]),
    ("heads", list(HEADS)),
]
DECODE_SHAPE_CASES = covering_array(DECODE_SHAPE_AXES, lambda *_: True, seed=2025)
DECODE_SHAPE_IDS = [f"{i:02d}-" + case_id(c, [n for n, _ in DECODE_SHAPE_AXES])
                    for i, c in enumerate(DECODE_SHAPE_CASES)]

# decode.py: (H, Hkv, Nq) so that the split kernel's query tile, group * Nq rows, is 16, 32 or
# 64 rows, full or not, one block of them or two.
DECODE_ROWS = {"g1-nq1": (2, 2, 1), "g4-nq4": (4, 1, 4), "g2-nq9": (2, 1, 9), "g3-nq11": (3, 1, 11),
               "g5-nq13": (5, 1, 13)}
KV_MODS = ["none", "window", "softcap", "alibi", "sinks", "all"]
KV_AXES = [
    ("mods", KV_MODS),
    ("causal", [False, True]),
    ("dtype", list(DTYPES)),
    ("D", [64, 80, 128, 256]),
    ("rows", list(DECODE_ROWS)),
]
KV_CASES = covering_array(KV_AXES, lambda *_: True, seed=2026)
KV_IDS = [f"{i:02d}-" + case_id(c, [n for n, _ in KV_AXES]) for i, c in enumerate(KV_CASES)]


# --------------------------------------------------------------------------- forcing and spying
class Spy:
    """Stands in for a Launcher: records (BLOCK_M, BLOCK_N) of each launch (the last two constexprs)."""

    def __init__(self, launcher, name, log):
        self.launcher, self.name, self.log = launcher, name, log

    def __call__(self, grid, args, constexprs, num_warps, num_stages):
        self.log.append((self.name, tuple(constexprs[-2:])))
        return self.launcher(grid, args, constexprs, num_warps, num_stages)


@pytest.fixture
def force(monkeypatch):
    """force({kernel: config}) -> the list the launches of the attention kernels are logged to."""
    monkeypatch.setattr(tuning, "TUNER", tuning.Tuner())  # restored after the test, force and all
    log: list = []
    for name, attr in (("fwd", "_FWD"), ("dkdv", "_DKDV"), ("dq", "_DQ")):
        monkeypatch.setattr(triton_attention, attr, Spy(getattr(triton_attention, attr), name, log))

    def apply(configs):
        tuning.TUNER.force = dict(configs)
        return log
    return apply


def assert_launched(log, configs):
    tiles = {(name, tile) for name, tile in log}
    assert tiles == {(name, tuple(c[:2])) for name, c in configs.items()}, f"launched {sorted(tiles)}"


def run_forced(fn):
    """On a GPU a forced config that exceeds its shared memory raises (the tuner would move on)."""
    try:
        return fn()
    except Exception as e:  # triton.runtime.errors.OutOfResources, without importing triton here
        if type(e).__name__ == "OutOfResources":
            pytest.skip(f"does not fit this GPU: {e}")
        raise


# --------------------------------------------------------------------------- inputs and the check
class TileCheck(NamedTuple):
    leaves: list  # q, k, v (and sinks): the kernels' inputs, each requiring grad
    call: object  # leaves -> (out, lse) through backend triton
    reference: object  # float64 leaves -> (out, lse)
    rows_and_heads: object  # (out, lse) -> out (H, rows, D), lse (H, rows): for the sinks' gradient


def score_mods(name, causal, B, H, gen):
    """fastattn keywords of a modifier; align top-left unless bottom-right."""
    kw = dict(align="top_left")
    if name == "window":
        kw["window_size"] = (77, 11)  # edges off every tile grid, a window wider than a tile of 64
    elif name == "softcap":
        kw["softcap"] = 2.0
    elif name == "alibi":
        kw["alibi_slopes"] = torch.rand(B, H, generator=gen)  # per batch row (per sequence, packed)
    elif name == "sinks":
        kw["sinks"] = torch.randn(H, generator=gen)
    elif name == "bottom-right":
        kw["align"] = "bottom_right"
        if not causal:
            kw["window_size"] = (-1, 9)  # bottom-right matters with causal, a window or ALiBi
    return kw


def sinks_leaf(sinks) -> list:
    return [] if sinks is None else [sinks.to(DEVICE).requires_grad_()]


def on_device(kw):
    return {n: (t.to(DEVICE) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}


def key_padding(kind, Nk, gen):
    """(1, Nk) bool, True = ignore. pad-range: keys [Nk // 4 + 5, Nk - 6) valid, both ends off
    the tile grids; pad-scattered: holes, and the last quarter of the keys."""
    idx = torch.arange(Nk)
    if kind == "pad-range":
        return ((idx < Nk // 4 + 5) | (idx >= Nk - 6))[None]
    return ((torch.rand(Nk, generator=gen) < 0.3) | (idx >= Nk - Nk // 4))[None]


def padded_check(case, Nq, Nk, dtype, D, gen) -> TileCheck:
    kind = case["input"]
    B = 1  # the interpreter is slow; packed sequences have several
    H, Hkv = HEADS[case["heads"]]
    # (B, N, H, D) storage viewed as (B, H, N, D): the layout a module's projections give
    q, k, v = (torch.randn(B, n, h, D, generator=gen).to(dtype).transpose(1, 2)
               for h, n in ((H, Nq), (Hkv, Nk), (Hkv, Nk)))
    kpm = key_padding(kind, Nk, gen) if kind.startswith("pad-") else None
    mask = None
    if kind == "bool-mask":
        mask = torch.rand(B, 1, Nq, Nk, generator=gen) < 0.75  # broadcast over heads
    elif kind == "float-mask":
        mask = torch.randn(B, H, Nq, Nk, generator=gen)
        mask[torch.rand(B, H, Nq, Nk, generator=gen) < 0.15] = float("-inf")
    kw = score_mods(case["mods"], case["causal"], B, H, gen)
    sinks = kw.pop("sinks", None)
    leaves = [t.to(DEVICE).requires_grad_() for t in (q, k, v)] + sinks_leaf(sinks)
    kpm_d, mask_d = (None if t is None else t.to(DEVICE) for t in (kpm, mask))

    def call(leaves):
        extra = dict(sinks=leaves[3]) if sinks is not None else {}
        return fastattn.attention(*leaves[:3], key_padding_mask=kpm_d, attn_mask=mask_d, causal=case["causal"],
                                  return_lse=True, backend="triton", **on_device(kw), **extra)

    def reference(leaves):
        rkw = {n: (t.to(leaves[0]).double() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
        if sinks is not None:
            rkw["sinks"] = leaves[3]
        m = mask_d if mask_d is None or mask_d.dtype == torch.bool else mask_d.double()
        return fastattn.reference_attention(*leaves[:3], kpm_d, m, case["causal"], **rkw)

    def rows_and_heads(out, lse):
        return out.transpose(0, 1).flatten(1, 2), lse.transpose(0, 1).flatten(1)

    return TileCheck(leaves, call, reference, rows_and_heads)


def packed_check(case, lens_q, lens_k, dtype, D, gen) -> TileCheck:
    """attention_varlen; the float64 reference: a lone call per sequence, concatenated."""
    B = len(lens_q)
    H, Hkv = HEADS[case["heads"]]
    q = torch.randn(sum(lens_q), H, D, generator=gen).to(dtype)
    k, v = (torch.randn(sum(lens_k), Hkv, D, generator=gen).to(dtype) for _ in range(2))
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
                  for lens in (lens_q, lens_k))
    kw = score_mods(case["mods"], case["causal"], B, H, gen)
    sinks = kw.pop("sinks", None)
    leaves = [t.to(DEVICE).requires_grad_() for t in (q, k, v)] + sinks_leaf(sinks)

    def call(leaves):
        extra = dict(sinks=leaves[3]) if sinks is not None else {}
        return fastattn.attention_varlen(*leaves[:3], cu_q, cu_k, max(lens_q), max(lens_k), causal=case["causal"],
                                         return_lse=True, backend="triton", **on_device(kw), **extra)

    def reference(leaves):
        outs, lses = [], []
        for b in range(B):
            qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            lone = [t[rows].transpose(0, 1)[None] for t, rows in ((leaves[0], qs), (leaves[1], ks), (leaves[2], ks))]
            rkw = {n: (t.to(leaves[0]).double() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
            if "alibi_slopes" in rkw:
                rkw["alibi_slopes"] = rkw["alibi_slopes"][b:b + 1]
            if sinks is not None:
                rkw["sinks"] = leaves[3]
            out, lse = fastattn.reference_attention(*lone, None, None, case["causal"], **rkw)
            outs.append(out[0].transpose(0, 1))
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, 1)

    def rows_and_heads(out, lse):
        return out.transpose(0, 1), lse

    return TileCheck(leaves, call, reference, rows_and_heads)


def check(problem: TileCheck, dtype, gen):
    """Forward, lse and every gradient against float64, with helpers.check_against_reference's
    bounds; the sinks' gradient as test_score_mods measures it."""
    tol = TOL[dtype]
    out, lse = run_forced(lambda: problem.call(problem.leaves))
    leaves64 = [t.detach().double().requires_grad_() for t in problem.leaves]
    ref, ref_lse = problem.reference(leaves64)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "NaN/inf in the output"
    assert rel_err(out, ref) < tol, f"out: {rel_err(out, ref):.2e}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse -inf pattern differs"
    lse_err = rel_err(lse[finite], ref_lse[finite], floor=finite.sum().item() ** 0.5)
    assert lse_err < max(tol, 1e-5), f"lse: {lse_err:.2e}"

    dout = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    dlse = torch.randn(ref_lse.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    dlse = torch.where(finite, dlse, torch.zeros_like(dlse))
    grads = run_forced(lambda: torch.autograd.grad([out, lse], problem.leaves, [dout.to(dtype), dlse.float()]))
    want = torch.autograd.grad([ref, ref_lse], leaves64, [dout, dlse])
    for name, got, w in zip("qkv", grads, want):
        assert torch.isfinite(got).all(), f"d{name} not finite"
        err = rel_err(got, w, floor=0.1 * dout.norm().item())
        assert err < 4 * tol, f"d{name}: {err:.2e}"
    if len(problem.leaves) == 4:  # sinks: a sum over rows of terms of either sign, against their size
        ref_h, lse_h = problem.rows_and_heads(ref.detach(), ref_lse.detach())
        dout_h, dlse_h = problem.rows_and_heads(dout, dlse)
        terms = torch.exp(leaves64[3].detach()[:, None] - lse_h) * ((dout_h * ref_h).sum(-1) - dlse_h)
        err = (grads[3].double() - want[3]).norm() / terms.abs().sum(1).norm()
        assert err < tol, f"dsinks: {err:.2e}"


# --------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("case", MAIN_CASES, ids=MAIN_IDS)
def test_candidate_and_shipped_configs(case, force):
    configs = {k: case[k] for k in KERNELS}
    log = force(configs)
    dtype, D = DTYPES[case["dtype"]], case["D"]
    Nq, Nk = main_lengths(case)
    gen = torch.Generator().manual_seed(zlib.crc32(repr(sorted(case.items())).encode()))
    if case["input"] == "packed":  # the long sequence after a short one: it starts off the tile grid
        problem = packed_check(case, (19, Nq, 3), (26, Nk, 40), dtype, D, gen)
    else:
        problem = padded_check(case, Nq, Nk, dtype, D, gen)
    check(problem, dtype, gen)
    assert_launched(log, configs)


@pytest.mark.parametrize("case", DECODE_SHAPE_CASES, ids=DECODE_SHAPE_IDS)
def test_decoding_rule_tiles(case, force):
    """Nq <= 16: the tuner's rule gives every kernel 16-query tiles over 128 keys (64 at D = 256)."""
    D, dtype = case["D"], DTYPES[case["dtype"]]
    rule = tuning.decode_config(block_d(D))
    configs = {k: rule for k in KERNELS}
    log = force(configs)
    Nq, Nk = case["nq"], rule[1] + 13
    gen = torch.Generator().manual_seed(zlib.crc32(repr(sorted(case.items())).encode()))
    if case["input"] == "packed":
        problem = packed_check(case, (3, Nq, 1), (40, Nk, 5), dtype, D, gen)
    else:
        problem = padded_check(case, Nq, Nk, dtype, D, gen)
    check(problem, dtype, gen)
    assert_launched(log, configs)


@pytest.fixture
def gpu_decode_tiles(monkeypatch):
    """decode() with the GPU's tiles and an H100's split count, under the interpreter too;
    returns the log of the split kernel's (BLOCK_M, BLOCK_N)."""
    if triton_decode.INTERPRETING:
        monkeypatch.setattr(triton_decode, "INTERPRETING", False)  # the key tile's rule, not its 32
        monkeypatch.setattr(triton_decode, "_multiprocessors", lambda device: H100_SMS)
    log: list = []
    launcher = triton_decode._SPLIT

    def split(grid, args, constexprs, num_warps, num_stages):  # BLOCK_M, BLOCK_N, BLOCK_D end its constexprs
        log.append(tuple(constexprs[-3:-1]))
        return launcher(grid, args, constexprs, num_warps, num_stages)
    monkeypatch.setattr(triton_decode, "_SPLIT", split)
    return log


def kv_mods(name, B, H, gen):
    if name == "window":
        return dict(window_size=(90, 3))
    if name == "softcap":
        return dict(softcap=2.0)
    if name == "alibi":
        return dict(alibi_slopes=torch.rand(B, H, generator=gen))
    if name == "sinks":
        return dict(sinks=torch.randn(H, generator=gen))
    if name == "all":
        return dict(window_size=(300, 0), softcap=3.0, alibi_slopes=torch.rand(H, generator=gen),
                    sinks=torch.randn(H, generator=gen))
    return {}


@pytest.mark.parametrize("case", KV_CASES, ids=KV_IDS)
def test_decode_kernel_at_the_gpu_tile(case, gpu_decode_tiles):
    """attention_with_kvcache through decode.py's split and merge kernels at the GPU's 64-key tile
    (32 for fp32 at D = 256), cache rows of lengths off that grid, long rows split as on an H100.
    Cache rows a query may not see are NaN: a tile that loads one fails."""
    dtype, D = DTYPES[case["dtype"]], case["D"]
    H, Hkv, Nq = DECODE_ROWS[case["rows"]]
    B, Nmax = 3, 333
    gen = torch.Generator().manual_seed(zlib.crc32(repr(sorted(case.items())).encode()))
    lengths = [3, 203, Nmax]  # fewer keys than most Nq; a split and a bit; the whole cache
    kw = kv_mods(case["mods"], B, H, gen)
    left = kw.get("window_size", (-1, -1))[0]
    clean = [torch.randn(B, Hkv, Nmax, D, generator=gen).to(dtype) for _ in range(2)]
    caches = [t.clone() for t in clean]
    for b, n in enumerate(lengths):  # past the valid rows, and before the window of the first query
        for t in caches:
            t[b, :, n:] = float("nan")
            if left >= 0:
                t[b, :, :max(n - Nq - left, 0)] = float("nan")
    q = torch.randn(B, H, Nq, D, generator=gen).to(dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        out, lse = run_forced(lambda: fastattn.attention_with_kvcache(
            q.to(DEVICE), *(t.to(DEVICE) for t in caches), seqlens, causal=case["causal"], return_lse=True,
            backend="triton", **on_device(kw)))
    want_block_n = 32 if block_d(D) * torch.finfo(dtype).bits // 8 > 512 else 64
    block_m = max(16, min(64, 1 << (H // Hkv * Nq - 1).bit_length()))
    assert set(gpu_decode_tiles) == {(block_m, want_block_n)}, gpu_decode_tiles
    tol = TOL[dtype]
    for b, n in enumerate(lengths):
        rkw = {name: (t[b:b + 1] if name == "alibi_slopes" and t.dim() == 2 else t).double()
               if isinstance(t, torch.Tensor) else t for name, t in kw.items()}
        rows = (t[b:b + 1].double() for t in (q, clean[0][:, :, :n], clean[1][:, :, :n]))
        ref, ref_lse = fastattn.reference_attention(*rows, causal=case["causal"], align="bottom_right", **rkw)
        got, got_lse = out[b:b + 1].cpu(), lse[b:b + 1].cpu()
        assert torch.isfinite(got).all(), f"row {b}: NaN/inf"
        assert rel_err(got, ref) < tol, f"row {b}: {rel_err(got, ref):.2e}"
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(got_lse), finite), f"row {b}: lse -inf pattern"
        lse_err = rel_err(got_lse[finite], ref_lse[finite], floor=finite.sum().item() ** 0.5)
        assert lse_err < max(tol, 1e-5), f"row {b}: lse {lse_err:.2e}"


def test_the_arrays_cover_every_config_and_pair():
    """Every candidate, shipped and fallback config (its tile shape, in the interpreter) runs,
    every allowed pair of values meets, and every case's sequences are longer than its largest
    tile and a multiple of none."""
    for kernel in KERNELS:
        configs = {*tuning.CANDIDATES[kernel], *SHIPPED.get(kernel, []), tuning.FALLBACK[kernel]}
        if DEVICE == "cuda":
            assert configs <= {c[kernel] for c in MAIN_CASES}
        else:
            assert {c[:2] for c in configs} <= {c[kernel][:2] for c in MAIN_CASES}
    for axes, cases, compatible in ((MAIN_AXES, MAIN_CASES, main_compatible),
                                    (DECODE_SHAPE_AXES, DECODE_SHAPE_CASES, lambda *_: True),
                                    (KV_AXES, KV_CASES, lambda *_: True)):
        for i, (x, xs) in enumerate(axes):
            for y, ys in axes[i + 1:]:
                for a in xs:
                    for b in ys:
                        if compatible(x, a, y, b) and compatible(y, b, x, a):
                            assert any(c[x] == a and c[y] == b for c in cases), (x, a, y, b)
    assert len(set(MAIN_IDS + DECODE_SHAPE_IDS + KV_IDS)) == len(MAIN_IDS + DECODE_SHAPE_IDS + KV_IDS)
    for case in MAIN_CASES:
        assert all(tuning.fits(case[k], block_d(case["D"])) for k in KERNELS)
        t = largest_tile(case)
        for n in main_lengths(case):
            assert n > t and n % 16, (case, n)
