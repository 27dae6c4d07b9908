"""Bad-input fuzzing (issue 36): start from a valid call of fastattn.attention, attention_varlen,
attention_with_kvcache or merge_attention, change one argument (wrong type, dtype, shape, device,
out-of-range or non-finite number, bool for a number, list for a tensor, strided or overlapping
tensors where they are indexed or written, ...), and require a ValueError/TypeError whose message
names the argument, or, for a change that keeps the call valid, a result. The cases run in a
subprocess (this file is its script), so a crash (signal, abort) fails the test and names the case;
`python tests/test_fuzz_bad_input.py SEED COUNT [INDEX]` replays them."""
from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BOUNDED = (0, 1000)  # (seed, cases) of `make test`; FASTATTN_FUZZ_EXAMPLES=N: N * 20 cases, a fresh seed
RAISE, EITHER = "raise", "either"  # must raise naming the argument / may also return a result


# ---- valid calls -------------------------------------------------------------------------------


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def valid_attention(rng):
    B, Hkv, g, Nq, Nk, D = rng.randint(1, 2), rng.randint(1, 2), rng.randint(1, 2), rng.randint(1, 9), \
        rng.randint(1, 9), rng.choice((1, 3, 8, 16))
    H = Hkv * g
    kw = dict(query=randn(B, H, Nq, D), key=randn(B, Hkv, Nk, D), value=randn(B, Hkv, Nk, D))
    optional = dict(key_padding_mask=torch.rand(B, Nk) < 0.3, attn_mask=torch.rand(B, 1, Nq, Nk) < 0.8,
                    causal=True, scale=0.5, dropout_p=0.1, window_size=(2, 1), softcap=5.0,
                    alibi_slopes=torch.rand(H), sinks=torch.randn(H), align="bottom_right", return_lse=True)
    kw.update({k: v for k, v in optional.items() if rng.random() < 0.5})
    return kw


def valid_varlen(rng):
    B, Hkv, g, D = rng.randint(1, 3), rng.randint(1, 2), rng.randint(1, 2), rng.choice((1, 8, 16))
    lq, lk = [rng.randint(0, 6) for _ in range(B)], [rng.randint(0, 6) for _ in range(B)]
    cu = lambda lens: torch.tensor([0, *lens]).cumsum(0).to(torch.int32)
    kw = dict(q=randn(sum(lq), Hkv * g, D), k=randn(sum(lk), Hkv, D), v=randn(sum(lk), Hkv, D),
              cu_seqlens_q=cu(lq), cu_seqlens_k=cu(lk), max_seqlen_q=max(lq), max_seqlen_k=max(lk))
    optional = dict(causal=True, scale=0.5, window_size=(1, 1), softcap=5.0, alibi_slopes=torch.rand(B, Hkv * g),
                    sinks=torch.randn(Hkv * g), align="top_left", return_lse=True, dropout_p=0.1)
    kw.update({k: v for k, v in optional.items() if rng.random() < 0.5})
    return kw


def valid_kvcache(rng):
    B, Hkv, g, Nq, D, Nmax = rng.randint(1, 2), rng.randint(1, 2), rng.randint(1, 2), rng.randint(1, 4), \
        rng.choice((1, 8, 16)), rng.randint(4, 12)
    new = rng.randint(0, 3) if rng.random() < 0.6 else None
    kw = dict(q=randn(B, Hkv * g, Nq, D), k_cache=randn(B, Hkv, Nmax, D), v_cache=randn(B, Hkv, Nmax, D),
              cache_seqlens=torch.randint(0, Nmax - (new or 0) + 1, (B,), dtype=torch.int32))
    if new is not None:
        kw.update(k_new=randn(B, Hkv, new, D), v_new=randn(B, Hkv, new, D))
    optional = dict(causal=False, scale=0.5, window_size=(3, 0), softcap=5.0, alibi_slopes=torch.rand(Hkv * g),
                    sinks=torch.randn(Hkv * g), return_lse=True)
    kw.update({k: v for k, v in optional.items() if rng.random() < 0.5})
    return kw


def valid_merge(rng):
    B, H, N, D = rng.randint(1, 2), rng.randint(1, 3), rng.randint(1, 5), rng.randint(1, 8)
    return dict(out_a=randn(B, H, N, D), lse_a=randn(B, H, N), out_b=randn(B, H, N, D), lse_b=randn(B, H, N))


ENTRIES = {"attention": valid_attention, "attention_varlen": valid_varlen,
           "attention_with_kvcache": valid_kvcache, "merge_attention": valid_merge}
TENSORS = {"query", "key", "value", "q", "k", "v", "k_cache", "v_cache", "k_new", "v_new", "out_a", "out_b"}
PEERS = {"query": "query key value", "key": "query key value", "value": "query key value",
         "q": "q k v query key value cu_seqlens_q k_cache", "k": "q k v query key value cu_seqlens_k",
         "v": "q k v query key value", "k_cache": "q k_cache v_cache", "v_cache": "q k_cache v_cache", "k_new": "k_new v_new k_cache",
         "v_new": "k_new v_new k_cache", "out_a": "out_a out_b", "out_b": "out_a out_b",
         "lse_a": "out_a out_b lse_a", "lse_b": "out_a out_b lse_b", "cu_seqlens_q": "cu_seqlens_q cu_seqlens_k",
         "cu_seqlens_k": "cu_seqlens_q cu_seqlens_k", "max_seqlen_q": "max_seqlen_q cu_seqlens_q",
         "max_seqlen_k": "max_seqlen_k cu_seqlens_k", "key_padding_mask": "key_padding_mask",
         "cache_seqlens": "cache_seqlens"}


# ---- mutations ---------------------------------------------------------------------------------


def tensor_mutations(name, t: torch.Tensor):
    """(description, new value, expectation) for a tensor argument."""
    yield "a list", t.tolist(), RAISE
    yield "an int", 3, RAISE
    yield "a string", "tensor", RAISE
    yield "on meta", t.to("meta"), RAISE
    # a mask broadcasts; slopes (H,) <-> (B, H) may coincide with B = 1
    reshapes_ok = EITHER if name in ("attn_mask", "alibi_slopes") else RAISE
    yield "one dim fewer", t.flatten(0, 1) if t.dim() > 1 else t.new_zeros(()), reshapes_ok
    yield "one dim more", t[None], reshapes_ok
    if t.dim():
        yield "last dim + 1", torch.cat([t, t[..., :1]], -1) if t.shape[-1] else t.new_ones(*t.shape[:-1], 1), RAISE
        yield "first dim + 1", torch.cat([t, t[:1]], 0) if t.shape[0] else t.new_ones(1, *t.shape[1:]), RAISE
        yield "strided view", torch.stack([t, t], -1)[..., 0], EITHER
        yield "transposed storage", t.transpose(0, -1).contiguous().transpose(0, -1), EITHER
    for dtype in (torch.int32, torch.int64, torch.bool, torch.complex64, torch.float64, torch.float16):
        if dtype != t.dtype:
            yield f"dtype {dtype}", t.to(dtype), EITHER if valid_dtype(name, dtype) else RAISE
    if t.is_floating_point():
        yield "requires grad", t.clone().requires_grad_(), EITHER


def valid_dtype(name, dtype) -> bool:
    """A dtype the argument takes alone (q, k, v must share theirs)."""
    if name == "attn_mask":
        return dtype == torch.bool or dtype.is_floating_point
    return name in ("out_a", "out_b") and dtype.is_floating_point


def int_mutations():
    for v in (-1, -2, 2**31, 2**63, 2**64, True, False, 1.5, "3", None, math.nan, torch.tensor(3)):
        yield f"{v!r}", v, RAISE


def float_mutations():
    for v in (math.nan, math.inf, -math.inf, 1e39, True, "1.0", torch.tensor(0.5), [0.5], 1j):
        yield f"{v!r}", v, RAISE


def mutations(entry, name, value, kw):
    """The changes to try on one argument of a valid call."""
    if name in ("cu_seqlens_q", "cu_seqlens_k", "cache_seqlens"):
        yield from tensor_mutations(name, value)
        yield "strided", torch.stack([value, value], -1)[:, 0], EITHER if name == "cache_seqlens" else RAISE
        yield "negative entry", torch.cat([value[:1] * 0 - 1, value[1:]]), RAISE
        yield "huge entry", value + 2**30, RAISE
        if name != "cache_seqlens" and not torch.equal(value, value.flip(0)):
            yield "decreasing", value.flip(0), RAISE
    elif isinstance(value, torch.Tensor):
        yield from tensor_mutations(name, value)
        if name in ("k_cache", "v_cache") and "k_new" in kw:
            other = "v_cache" if name == "k_cache" else "k_cache"
            yield "the other cache itself (overlapping writes)", kw[other], RAISE
            rows_overlap = RAISE if value.shape[2] > 1 and value.shape[3] > 1 else EITHER  # (else they don't)
            yield "overlapping rows", value.as_strided(value.shape, (*value.stride()[:2], 1, 1)), rows_overlap
            yield "expanded", value[:, :, :1].expand(value.shape), RAISE
    elif name in ("max_seqlen_q", "max_seqlen_k"):
        yield from int_mutations()
    elif name in ("scale", "softcap"):
        yield from float_mutations()
        yield "-1.0", -1.0, EITHER if name == "scale" else RAISE
        yield "2 (an int)", 2, EITHER
    elif name == "dropout_p":
        yield from float_mutations()
        for v in (-0.1, 1.0, 1.5):
            yield f"{v!r}", v, RAISE
    elif name == "window_size":
        for v in ((-2, 0), (0,), (1, 2, 3), (1.5, 2), (True, 1), (2**63, 0), (0, 2**64), None, 5, "1,1",
                  (torch.tensor(1), 1)):
            yield f"{v!r}", v, RAISE
        yield "a list", [1, 2], EITHER
    elif name in ("causal", "return_lse"):
        for v in (1, 0, None, "yes", torch.tensor(True)):
            yield f"{v!r}", v, RAISE
    elif name in ("align", "backend"):
        for v in ("left", "", None, 1, b"top_left"):
            yield f"{v!r}", v, RAISE
    # arguments the valid call left out, added wrongly
    for extra, v in (("alibi_slopes", torch.rand(7)), ("sinks", torch.randn(1, 1)), ("key_padding_mask",
                                                                                       torch.zeros(1, 1))):
        if name == extra and value is None:
            yield f"wrong {extra}", v, RAISE


ARGS = {
    "attention": ("query", "key", "value", "key_padding_mask", "attn_mask", "causal", "scale", "dropout_p",
                  "window_size", "softcap", "alibi_slopes", "sinks", "align", "return_lse", "backend"),
    "attention_varlen": ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "causal",
                         "scale", "dropout_p", "window_size", "softcap", "alibi_slopes", "sinks", "align",
                         "return_lse", "backend"),
    "attention_with_kvcache": ("q", "k_cache", "v_cache", "cache_seqlens", "k_new", "v_new", "causal", "scale",
                               "window_size", "softcap", "alibi_slopes", "sinks", "align", "return_lse", "backend"),
    "merge_attention": ("out_a", "lse_a", "out_b", "lse_b"),
}


def case(seed: int, index: int):
    """(entry, argument, description, kwargs, expectation) of case `index` of `seed`."""
    rng = random.Random(seed * 1_000_003 + index)
    torch.manual_seed(seed * 1_000_003 + index)
    entry = rng.choice(sorted(ENTRIES))
    kw = ENTRIES[entry](rng)
    while True:
        name = rng.choice(ARGS[entry])
        options = list(mutations(entry, name, kw.get(name), kw))
        if options:
            break
    what, value, expect = rng.choice(options)
    return entry, name, what, {**kw, name: value}, expect


def names(entry, name) -> list[str]:
    """The names a message may give for a change to `name`: it, or the argument it is checked against."""
    peers = PEERS.get(name, name).split()
    if name == "align" and entry == "attention_with_kvcache":
        peers.append("align")
    return peers


def outcome(entry, name, kw, expect, fn) -> str | None:
    """None if the call behaves; else what went wrong."""
    try:
        with torch.no_grad() if entry == "attention_with_kvcache" else torch.enable_grad():
            fn(**kw)
    except (ValueError, TypeError) as e:
        msg = str(e)
        if not any(re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", msg) for n in names(entry, name)):
            return f"{type(e).__name__} does not name {name!r}: {msg[:300]}"
        return None
    except Exception as e:  # noqa: BLE001 - any other exception is the finding
        return f"{type(e).__name__} (expected ValueError/TypeError naming {name!r}): {str(e)[:300]}"
    return "accepted (expected a ValueError/TypeError naming it)" if expect == RAISE else None


def worker(seed: int, count: int, only: int | None = None) -> None:
    """Runs the cases, one JSON line each; 'start' is printed first so a crash names its case."""
    import fastattn
    for index in range(count) if only is None else [only]:
        entry, name, what, kw, expect = case(seed, index)
        print(json.dumps({"start": index, "case": f"{entry}: {name} = {what}"}), flush=True)
        problem = outcome(entry, name, kw, expect, getattr(fastattn, entry))
        print(json.dumps({"index": index, "case": f"{entry}: {name} = {what}", "problem": problem}), flush=True)


def test_merge_attention_refuses_a_non_float_output():
    import fastattn
    out, lse = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3)
    for bad in (out.int(), out.bool(), out.to(torch.complex64)):
        with pytest.raises(TypeError, match="out_b: expected a floating-point dtype, got torch"):
            fastattn.merge_attention(out, lse, bad, lse)


def test_kvcache_refuses_overlapping_caches_it_writes():
    import fastattn
    q, cache, new = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 1, 8)
    lens = torch.tensor([2], dtype=torch.int32)
    with pytest.raises(ValueError, match="v_cache: expected memory apart from k_cache's"):
        fastattn.attention_with_kvcache(q, cache, cache, lens, k_new=new, v_new=new)
    rows = cache.as_strided(cache.shape, (96, 48, 1, 1))  # row r starts at element r: rows share memory
    with pytest.raises(ValueError, match="k_cache: expected a cache k_new is written to whose elements do not overlap"):
        fastattn.attention_with_kvcache(q, rows, cache.clone(), lens, k_new=new, v_new=new)
    packed = torch.randn(1, 2, 6, 2, 8)  # K and V interleaved in one tensor: apart, and taken
    out = fastattn.attention_with_kvcache(q, packed[..., 0, :], packed[..., 1, :], lens, k_new=new, v_new=new)
    assert torch.equal(packed[:, :, 2, 0], new[:, :, 0]) and torch.isfinite(out).all()


def test_bad_input_raises_a_named_error_and_never_crashes():
    long_run = int(os.environ.get("FASTATTN_FUZZ_EXAMPLES", "0") or 0)
    seed, count = (random.SystemRandom().randrange(2**31), long_run * 20) if long_run else BOUNDED
    proc = subprocess.run([sys.executable, __file__, str(seed), str(count)], capture_output=True, text=True,
                          timeout=1800, cwd=Path(__file__).parent)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    replay = f"python tests/test_fuzz_bad_input.py {seed} {count}"
    if proc.returncode != 0:
        last = next((line for line in reversed(lines) if "start" in line), None)
        raise AssertionError(f"the worker died (exit {proc.returncode}) at case {last}; replay: {replay} "
                             f"{last and last['start']}\n{proc.stderr[-2000:]}")
    problems = [f"#{line['index']} {line['case']}: {line['problem']}" for line in lines if line.get("problem")]
    print(f"\nbad-input cases: {count} run (seed {seed})")
    assert not problems, f"{len(problems)} of {count} cases misbehave (replay: {replay} INDEX):\n" + \
        "\n".join(problems)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
