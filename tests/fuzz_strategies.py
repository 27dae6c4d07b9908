"""Hypothesis strategies for the fuzzers: a call is drawn as a plain dict (shapes, dtypes, layouts,
masks, modifiers, non-finite injections, a seed), so a failing example prints whole and replays;
the tensors are made from it with a torch.Generator seeded by the dict's seed. Also the settings
profiles: bounded (derandomized, for `make test`) and long (FASTATTN_FUZZ_EXAMPLES, `make fuzz`)."""
from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings, strategies as st

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("contig", "bnhd", "slice", "stride_d", "expand_b", "expand_h")  # of a (B, H, N, D) input
PACKED_LAYOUTS = ("contig", "hd", "slice_h", "qkv")  # of a (total, H, D) input: unit head-dim stride
EDGE_LENGTHS = (0, 1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129)
EDGE_DIMS = (1, 2, 3, 7, 8, 15, 16, 31, 32, 33, 48, 63, 64, 65, 80, 96, 127, 128, 129, 160, 192, 255, 256)
NONFINITE = (float("nan"), float("inf"), float("-inf"))

# FASTATTN_FUZZ_EXAMPLES=N: the long run (`make fuzz`), N examples for each fast test (a weight
# of 1), fewer for the slow ones; otherwise the bounded, derandomized run of `make test`.
LONG = int(os.environ.get("FASTATTN_FUZZ_EXAMPLES", "0") or 0)
_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("fastattn-fuzz-bounded", derandomize=True, database=None, **_COMMON)
settings.register_profile("fastattn-fuzz-long", **_COMMON)


def fuzz_settings(bounded: int, weight: float = 1.0) -> settings:
    """bounded examples under `make test`; FASTATTN_FUZZ_EXAMPLES * weight (at least bounded) in the long run."""
    if LONG:
        return settings(settings.get_profile("fastattn-fuzz-long"), max_examples=max(bounded, int(LONG * weight)))
    return settings(settings.get_profile("fastattn-fuzz-bounded"), max_examples=bounded)


def floats(lo: float, hi: float, **kw):
    """Without subnormals: the suite runs fastattn's benchmark in-process, which turns on flush-to-zero
    for the process (torch.set_flush_denormal), and hypothesis then refuses to draw them."""
    return st.floats(lo, hi, allow_subnormal=False, **kw)


def lengths(max_n: int):
    return st.one_of(st.sampled_from([n for n in EDGE_LENGTHS if n <= max_n]), st.integers(0, max_n))


def head_dims(max_d: int):
    return st.one_of(st.sampled_from([d for d in EDGE_DIMS if d <= max_d]), st.integers(1, max_d))


def injections(names):
    """{name: [(position in [0, 1), value), ...]}: NaN/±inf written into those inputs (sinks: NaN
    or -inf); empty half of the time."""
    def one(name):
        values = (float("nan"), float("-inf")) if name == "sinks" else NONFINITE
        return st.lists(st.tuples(floats(0, 1, exclude_max=True), st.sampled_from(values)), min_size=1, max_size=3)
    return st.one_of(st.just({}), st.fixed_dictionaries({}, optional={n: one(n) for n in names}))


INJECT_ATTENTION = injections(("q", "k", "v", "dout", "sinks"))
INJECT_KVCACHE = injections(("q", "k", "v", "k_new", "v_new", "sinks"))
FLAGS4 = st.tuples(*[st.booleans()] * 4)
SOFTCAP = st.one_of(st.just(0.0), floats(0.1, 50.0))
SCALE = st.one_of(st.none(), floats(-2.0, 2.0))
ALIGN = st.sampled_from(("top_left", "bottom_right"))


def windows(max_n: int):
    side = st.one_of(st.just(-1), st.integers(0, max_n + 2))
    return st.one_of(st.just((-1, -1)), st.tuples(side, side))


def modifiers(draw, max_n: int) -> dict:
    """Causal, window, alignment, softcap, ALiBi, sinks, scale: none of them a third of the time
    (the calls `sdpa` takes), each independently otherwise."""
    if draw(st.integers(0, 2)) == 0:
        return dict(causal=draw(st.booleans()), window=(-1, -1), align="top_left", softcap=0.0, alibi=None,
                    sinks=None, scale=draw(SCALE))
    return dict(
        causal=draw(st.booleans()), window=draw(windows(max_n)), align=draw(ALIGN), softcap=draw(SOFTCAP),
        alibi=draw(st.sampled_from((None, "H", "BH"))), sinks=draw(st.sampled_from((None, "finite", "with_-inf"))),
        scale=draw(SCALE),
    )


@st.composite
def attention_specs(draw, max_b=3, max_hkv=3, max_n=80, max_d=256, dropout=True):
    """fastattn.attention calls."""
    spec = dict(
        seed=draw(st.integers(0, 2**31 - 1)), dtype=draw(st.sampled_from(DTYPES)),
        B=draw(st.integers(0, max_b)), Hkv=draw(st.integers(1, max_hkv)), group=draw(st.integers(1, 3)),
        Nq=draw(lengths(max_n)), Nk=draw(lengths(max_n)), D=draw(head_dims(max_d)),
        layouts=draw(st.tuples(*[st.sampled_from(LAYOUTS)] * 3)),
        padding=draw(st.sampled_from((None, "right", "left", "random"))),
        mask=draw(st.sampled_from((None, "bool", "float"))),
        mask_dims=draw(FLAGS4), mask_ndim=draw(st.integers(0, 4)),
        mask_dtype=draw(st.sampled_from((torch.float32, torch.float16, torch.bfloat16))),
        dropout=draw(st.sampled_from((0.0, 0.0, 0.0, 0.3))) if dropout else 0.0,
        return_lse=draw(st.booleans()), grad=draw(st.booleans()),
        **modifiers(draw, max_n),
    )
    spec["inject"] = draw(INJECT_ATTENTION)
    return spec


@st.composite
def varlen_specs(draw, max_b=4, max_hkv=3, max_n=48, max_d=128):
    """fastattn.attention_varlen calls: per-sequence lengths, empty sequences included."""
    B = draw(st.integers(1, max_b))
    spec = dict(
        seed=draw(st.integers(0, 2**31 - 1)), dtype=draw(st.sampled_from(DTYPES)),
        Hkv=draw(st.integers(1, max_hkv)), group=draw(st.integers(1, 3)), D=draw(head_dims(max_d)),
        lens_q=draw(st.lists(lengths(max_n), min_size=B, max_size=B)),
        lens_k=draw(st.lists(lengths(max_n), min_size=B, max_size=B)),
        same_cu=draw(st.booleans()), slack=draw(st.integers(0, 3)),
        layouts=draw(st.tuples(*[st.sampled_from(PACKED_LAYOUTS)] * 3)),
        return_lse=draw(st.booleans()), grad=draw(st.booleans()),
        **modifiers(draw, max_n),
    )
    if spec["same_cu"]:
        spec["lens_k"] = spec["lens_q"]
    spec["inject"] = draw(INJECT_ATTENTION)
    return spec


@st.composite
def kvcache_specs(draw, max_b=3, max_hkv=3, max_n=90, max_d=128):
    """fastattn.attention_with_kvcache calls: Nq 1..16, with and without new keys."""
    B = draw(st.integers(1, max_b))
    n_new = draw(st.one_of(st.none(), st.integers(0, 16)))
    nmax = draw(st.integers(n_new or 0, max_n + (n_new or 0)))
    spec = dict(
        seed=draw(st.integers(0, 2**31 - 1)), dtype=draw(st.sampled_from(DTYPES)),
        B=B, Hkv=draw(st.integers(1, max_hkv)), group=draw(st.integers(1, 3)), D=draw(head_dims(max_d)),
        Nq=draw(st.integers(1, 16)), Nmax=nmax, Nnew=n_new,
        cache_lens=draw(st.lists(st.integers(0, nmax - (n_new or 0)), min_size=B, max_size=B)),
        layouts=draw(st.tuples(*[st.sampled_from(("contig", "bnhd", "slice", "stride_d"))] * 3)),
        return_lse=draw(st.booleans()),
        **modifiers(draw, max_n),
    )
    spec["causal"] = draw(st.sampled_from((True, True, False)))
    spec["align"] = "bottom_right"
    spec["inject"] = draw(INJECT_KVCACHE)
    return spec


# ---- tensors from a spec ---------------------------------------------------------------------


def randn(gen, *shape, dtype=torch.float32) -> torch.Tensor:
    """Random normal values, never exactly zero."""
    t = torch.randn(tuple(shape), generator=gen)
    return torch.where(t == 0, torch.full_like(t, 0.5), t).to(dtype)


def view_4d(gen, B, H, N, D, layout, dtype):
    """(base storage, function making the (B, H, N, D) view of it)."""
    shapes = {
        "contig": ((B, H, N, D), lambda t: t),
        "bnhd": ((B, N, H, D), lambda t: t.transpose(1, 2)),
        "slice": ((B, H, N + 3, D + 5), lambda t: t[:, :, 1:N + 1, 2:D + 2]),
        "stride_d": ((B, H, N, 2 * D), lambda t: t[..., ::2]),
        "expand_b": ((1, H, N, D), lambda t: t.expand(B, H, N, D)),
        "expand_h": ((B, 1, N, D), lambda t: t.expand(B, H, N, D)),
    }
    shape, fn = shapes[layout]
    return randn(gen, *shape, dtype=dtype), fn


def view_packed(gen, T, H, D, layout, dtype):
    """(base, function making the (T, H, D) view), every layout with a unit head-dim stride."""
    shapes = {
        "contig": ((T, H, D), lambda t: t),
        "hd": ((H, T, D), lambda t: t.transpose(0, 1)),
        "slice_h": ((T, H + 2, D + 3), lambda t: t[:, 1:H + 1, :D]),
        "qkv": ((T, 3, H, D), lambda t: t[:, 1]),
    }
    shape, fn = shapes[layout]
    return randn(gen, *shape, dtype=dtype), fn


def inject(base: torch.Tensor, where: list) -> torch.Tensor:
    """A copy of base with the (position fraction, value) pairs written in."""
    out = base.clone()
    flat = out.view(-1)
    for frac, value in where:
        if flat.numel():
            flat[int(frac * flat.numel())] = value
    return out
