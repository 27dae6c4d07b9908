"""Differential fuzzing (issue 36): random calls of fastattn.attention, attention_varlen,
attention_with_kvcache and merge_attention on every backend that runs here, against the float64
oracle of fuzz_oracle.py (not fastattn.reference): shapes (empty and odd ones included), GQA,
dtypes, strided and expanded views, every mask, window, alignment, softcap, ALiBi, sinks, scale,
dropout (given the backend's own keep mask), lse and gradients (q, k, v, sinks).

With NaN/±inf injected into q, k, v, dO, sinks and a cache's keys and values, it checks the
non-finite policy: a tainted row whose IEEE float64 output is non-finite is non-finite, and every
untainted output, lse and gradient element is exact. A backend that declines a call
(NoBackendError) is skipped for it. `make test` runs a bounded, derandomized set; `make fuzz`
many more (FASTATTN_FUZZ_EXAMPLES)."""
from __future__ import annotations

import collections
import math

import pytest
import torch
from hypothesis import given, note
from hypothesis.control import currently_in_test_context

import fastattn
from fuzz_oracle import Dense, Taint, oracle, positional_visible, positions, rel_err, taint
from fuzz_strategies import (attention_specs, fuzz_settings, inject, kvcache_specs, randn, varlen_specs, view_4d,
                             view_packed)

TOL = {torch.float32: 2e-6, torch.float16: 3e-3, torch.bfloat16: 1e-2}  # tests/helpers.py's
FAST = [b for b in ("cpu", "reference", "sdpa") if b in fastattn.available_backends()]
TRITON = "triton" in fastattn.available_backends()
needs_triton = pytest.mark.skipif(not TRITON, reason="triton (or its interpreter) is not available")
COUNT = collections.Counter()  # checked calls per entry point and backend, and the declined ones


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print(f"\nfuzz cases: {sum(v for k, v in COUNT.items() if 'declined' not in k)} checked, "
          f"{sum(v for k, v in COUNT.items() if 'declined' in k)} declined: {dict(sorted(COUNT.items()))}")


def show(spec):
    """The spec in the failure report (hypothesis prints the drawn dict too; this one pastes as is)."""
    if currently_in_test_context():
        note(f"spec = {spec!r}")


# ---- building a call and its dense problem from a spec ----------------------------------------


class Inputs:
    """One tensor input: the clean view (for the oracle) and the injected one (for the call)."""

    def __init__(self, base, fn, where, grad=False):
        self.clean = fn(base)
        self.leaf = inject(base, where).requires_grad_(grad)
        self.view = fn(self.leaf)

    def dirty(self):
        return self.view.detach()


def scale_of(spec) -> float:
    return 1.0 / math.sqrt(spec["D"]) if spec["scale"] is None else spec["scale"]


def make_sinks(spec, gen, H):
    """(clean sinks for the oracle: finite or -inf, the injected leaf for the call) or (None, None)."""
    if spec["sinks"] is None:
        return None, None
    clean = randn(gen, H)
    if spec["sinks"] == "with_-inf" and H:
        clean[0] = -math.inf
    dirty = inject(clean, spec["inject"].get("sinks", []))
    return torch.where(torch.isnan(dirty), clean, dirty), dirty.requires_grad_()


def make_slopes(spec, gen, B, H):
    shape = {None: None, "H": (H,), "BH": (B, H)}[spec["alibi"]]
    return None if shape is None else torch.rand(*shape, generator=gen) + 0.05


def padding_mask(kind, gen, B, Nk):
    if kind is None:
        return None
    lens = torch.randint(0, Nk + 1, (B,), generator=gen)
    idx = torch.arange(Nk)[None, :]
    if kind == "right":
        return idx >= lens[:, None]
    if kind == "left":
        return idx < (Nk - lens)[:, None]
    return torch.rand(B, Nk, generator=gen) < 0.4


def attn_mask(spec, gen, full):
    if spec["mask"] is None:
        return None
    shape = [n if keep else 1 for n, keep in zip(full, spec["mask_dims"])][4 - spec["mask_ndim"]:]
    if spec["mask"] == "bool":
        return torch.rand(tuple(shape), generator=gen) < 0.75
    values = randn(gen, *shape) * 2
    return torch.where(torch.rand(tuple(shape), generator=gen) < 0.15, -math.inf, values).to(spec["mask_dtype"])


def alibi_bias(slopes, rel):
    """-slope |rel| with slopes (H,) or (B, H) and rel (…, Nq, Nk): (B or 1, H, Nq, Nk) float64."""
    s = slopes.double()
    s = s[None, :, None, None] if s.dim() == 1 else s[:, :, None, None]
    return -s * rel.abs().double()


def attention_call(spec):
    """(kwargs of fastattn.attention without backend, {name: Inputs}, the clean Dense problem)."""
    gen = torch.Generator().manual_seed(spec["seed"])
    B, Hkv, Nq, Nk, D, dt = spec["B"], spec["Hkv"], spec["Nq"], spec["Nk"], spec["D"], spec["dtype"]
    H = Hkv * spec["group"]
    grad, inj = spec["grad"], spec["inject"]
    ins = {name: Inputs(*view_4d(gen, B, h, n, D, lay, dt), inj.get(name, []), grad)
           for name, h, n, lay in (("q", H, Nq, spec["layouts"][0]), ("k", Hkv, Nk, spec["layouts"][1]),
                                   ("v", Hkv, Nk, spec["layouts"][2]))}
    kpm = padding_mask(spec["padding"], gen, B, Nk)
    mask = attn_mask(spec, gen, (B, H, Nq, Nk))
    slopes = make_slopes(spec, gen, B, H)
    clean_sinks, sinks = make_sinks(spec, gen, H)
    rel = positions(Nq, Nk, Nk - Nq if spec["align"] == "bottom_right" else 0)
    visible = positional_visible(rel, spec["causal"], spec["window"]).expand(B, H, Nq, Nk)
    bias = torch.zeros(B, H, Nq, Nk, dtype=torch.float64)
    if kpm is not None:
        visible = visible & ~kpm[:, None, None, :]
    if mask is not None and mask.dtype == torch.bool:
        visible = visible & mask
    elif mask is not None:
        visible = visible & (mask != -math.inf)
        bias = bias + torch.where(mask == -math.inf, 0.0, mask.float().double())
    if slopes is not None:
        bias = bias + alibi_bias(slopes, rel)
    kw = dict(key_padding_mask=kpm, attn_mask=mask, causal=spec["causal"], scale=spec["scale"],
              dropout_p=spec["dropout"], window_size=spec["window"], softcap=spec["softcap"], alibi_slopes=slopes,
              sinks=sinks, align=spec["align"], return_lse=spec["return_lse"])
    dense = Dense(visible.contiguous(), bias, scale_of(spec), spec["softcap"], clean_sinks)
    return kw, ins, dense


def keep_multipliers(backend, seed, shape, p):
    """The backend's own dropout keep mask for `seed`, as 0 or 1 / (1 - p) in float64."""
    if backend == "cpu":
        keep = fastattn._C.dropout_keep_mask(seed, *shape, p)
    elif backend == "reference":
        keep = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) >= p
    elif backend == "triton":
        from fastattn.triton.attention import dropout_keep_mask
        keep = dropout_keep_mask(seed, *shape, p, "cpu")
    else:
        return None
    return keep.double() / (1 - p)


# ---- running and checking -----------------------------------------------------------------------


def call_backend(fn, args, kw, backend, key):
    """fn(*args, **kw, backend=backend); None where the backend declines the call."""
    try:
        result = fn(*args, **kw, backend=backend)
    except fastattn.NoBackendError:
        COUNT[f"{key}/{backend} declined"] += 1
        return None
    COUNT[f"{key}/{backend}"] += 1
    return result if isinstance(result, tuple) else (result,)


def grads(outputs, cotangents, inputs):
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o is not None and c is not None]
    needed = [t for t in inputs if t is not None and t.requires_grad]
    got = torch.autograd.grad([o for o, _ in pairs], needed, [c for _, c in pairs], allow_unused=True)
    it = iter(got)
    return [next(it) if t is not None and t.requires_grad else None for t in inputs]


def check_close(name, got, want, exempt, tol, floor=0.0):
    """got == want within tol (relative, in norm) on the elements whose leading index is not exempt."""
    keep = ~exempt
    g, w = got.detach()[keep], want.detach()[keep]
    bad = ~torch.isfinite(g)
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite elements where the policy requires exact values"
    err = rel_err(g, w, floor)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def check_lse(got, want, exempt, tol):
    g, w = got.detach()[~exempt], want.detach()[~exempt]
    assert torch.equal(torch.isneginf(g), torch.isneginf(w)), "lse: its -inf pattern differs from the oracle's"
    fin = torch.isfinite(w)
    assert torch.isfinite(g[fin]).all(), "lse: non-finite where the oracle's is finite"
    # lse is a log: absolute rounding, so each row is measured against a magnitude of at least 1
    err = rel_err(g[fin], w[fin], floor=fin.sum().item() ** 0.5)
    assert err < max(tol, 1e-5), f"lse: relative error {err:.2e}"


def amplification(spec) -> float:
    """|scale| sqrt(D), at least 1: float32 scores carry rounding of about eps |s|, and |s| grows by
    this over the default scale's (tests/helpers.py's bounds assume that one): the bounds on out and
    lse, and those on dq and dk and the floor under them (scale dS K: dS's cancellation times scale |k|), grow
    with it."""
    return max(1.0, abs(scale_of(spec)) * math.sqrt(spec["D"]))


def verify(got: dict, want: dict, t: Taint, dtype, dout, dlse, amp=1.0):
    """Every result in the dense layout: out/dq (B, H, Nq, D), lse (B, H, Nq), dk/dv (B, Hkv, Nk, D),
    dsinks (H,)."""
    tol = TOL[dtype] * amp
    assert got["out"].dtype == dtype, f"out: dtype {got['out'].dtype}, expected {dtype}"
    assert got["out"].shape == want["out"].shape, f"out: shape {tuple(got['out'].shape)}"
    check_close("out", got["out"], want["out"], t.out_rows, tol, want.get("out_floor", 0.0))
    finite_rows = torch.isfinite(got["out"].detach()).all(-1)
    missing = t.must_be_nonfinite & finite_rows
    assert not missing.any(), (f"out: {int(missing.sum())} tainted rows (IEEE float64 gives NaN/inf) are finite, "
                               f"first at (b, h, i) = {missing.nonzero()[0].tolist()}")
    if got.get("lse") is not None:
        assert got["lse"].dtype == torch.float32 and got["lse"].shape == want["lse"].shape, "lse: dtype or shape"
        check_lse(got["lse"], want["lse"], t.out_rows, tol)
    if dout is None:
        return
    floor = 0.1 * dout.double().norm().item()  # tests/helpers.py's: dP - rowsum(dO O) cancels near zero
    tol = TOL[dtype]
    for name, exempt, grow in (("dq", t.grad_rows, amp), ("dk", t.keys, amp), ("dv", t.dv_keys, 1.0)):
        if got.get(name) is not None:
            check_close(name, got[name], want[name], exempt, 4 * tol * grow, floor * grow)
    if got.get("dsinks") is not None:
        # a sum over rows of terms of either sign: measured against the terms' magnitude
        delta = (dout.double() * want["out"].detach()).sum(-1) - (0 if dlse is None else dlse.double())
        terms = (torch.exp(want["sinks"][None, :, None] - want["lse"].detach()) * delta).nan_to_num(0.0)
        check_close("dsinks", got["dsinks"], want["dsinks"], t.sinks, 4 * tol * amp,
                    terms.abs().sum((0, 2)).norm().item())


def oracle_results(q, k, v, sinks, dense, dout, dlse, grad):
    """The oracle's out, lse and (grad) its dq, dk, dv, dsinks in float64."""
    leaves = [t.detach().double().requires_grad_(grad) for t in (q, k, v)]
    s = None if sinks is None else sinks.detach().double().requires_grad_(grad)
    out, lse = oracle(*leaves, Dense(dense.visible, dense.bias, dense.scale, dense.softcap, s, dense.keep))
    with torch.no_grad():  # sum_j p_ij |v_j|: the scale of out's rounding where its terms cancel
        scale = oracle(*(t.detach() for t in leaves[:2]), leaves[2].detach().abs(),
                       Dense(dense.visible, dense.bias, dense.scale, dense.softcap, s, dense.keep))[0]
    want = dict(out=out, lse=lse, sinks=s, out_floor=scale.nan_to_num(0.0, 0.0, 0.0).norm().item())
    if grad:
        finite = torch.isfinite(lse)
        dl = None if dlse is None else torch.where(finite, dlse.double(), 0.0)
        g = grads([out, lse], [dout.double(), dl], [*leaves, s])
        want.update(dq=g[0], dk=g[1], dv=g[2], dsinks=g[3])
    return want


# ---- fastattn.attention ------------------------------------------------------------------------


def check_attention(spec, backends):
    show(spec)
    kw, ins, dense = attention_call(spec)
    q, k, v = (ins[n] for n in "qkv")
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    B, H, Nq, D = q.clean.shape
    dout = randn(gen, B, H, Nq, D, dtype=spec["dtype"])
    dout_dirty = inject(dout, spec["inject"].get("dout", []))
    dlse = randn(gen, B, H, Nq) if spec["return_lse"] else None
    grad = spec["grad"] or (kw["sinks"] is not None)
    t = taint(q.dirty(), k.dirty(), v.dirty(), Dense(dense.visible, dense.bias, dense.scale, dense.softcap,
                                                      kw["sinks"]), dout_dirty if grad else None)
    shared = None
    for backend in backends:
        torch.manual_seed(spec["seed"])
        seed = int(torch.randint(0, 2**62, (1,)).item())  # what fastattn's dropout_seed draws next
        torch.manual_seed(spec["seed"])
        result = call_backend(fastattn.attention, (q.view, k.view, v.view), kw, backend, "attention")
        if result is None:
            continue
        if spec["dropout"]:
            dense.keep = keep_multipliers(backend, seed, (B, H, Nq, k.clean.shape[2]), spec["dropout"])
            if dense.keep is None:
                continue
        if shared is None or spec["dropout"]:
            shared = oracle_results(q.clean, k.clean, v.clean, dense.sinks, dense, dout, dlse, grad)
        got = dict(out=result[0], lse=result[1] if spec["return_lse"] else None)
        if grad:
            g = grads(result, [dout_dirty, dlse], [q.view, k.view, v.view, kw["sinks"]])
            got.update(dq=g[0], dk=g[1], dv=g[2], dsinks=g[3])
        verify(got, shared, t, spec["dtype"], dout, dlse, amplification(spec))


@fuzz_settings(bounded=150)
@given(spec=attention_specs())
def test_attention_cpu_backends(spec):
    check_attention(spec, FAST)


@needs_triton
@fuzz_settings(bounded=25, weight=0.05)
@given(spec=attention_specs(max_b=2, max_hkv=2, max_n=40, max_d=40))
def test_attention_triton(spec):
    check_attention(spec, ["triton"])


# ---- fastattn.attention_varlen -----------------------------------------------------------------


def varlen_dense(spec, H, slopes, sinks):
    """The packed call as one dense problem over (1, H, total_q, total_k): pairs within a sequence."""
    lq, lk = torch.tensor(spec["lens_q"]), torch.tensor(spec["lens_k"])
    seq_q, seq_k = torch.repeat_interleave(torch.arange(len(lq)), lq), torch.repeat_interleave(torch.arange(len(lk)), lk)
    start_q, start_k = torch.cumsum(lq, 0) - lq, torch.cumsum(lk, 0) - lk
    iq = torch.arange(len(seq_q)) - start_q[seq_q]
    jk = torch.arange(len(seq_k)) - start_k[seq_k]
    offset = (lk - lq)[seq_q] if spec["align"] == "bottom_right" else torch.zeros_like(seq_q)
    rel = jk[None, :] - iq[:, None] - offset[:, None]
    visible = (seq_q[:, None] == seq_k[None, :]) & positional_visible(rel, spec["causal"], spec["window"])
    bias = None
    if slopes is not None:
        per_row = slopes.double()[None, :].expand(len(seq_q), H) if slopes.dim() == 1 else slopes.double()[seq_q]
        bias = (-per_row.t()[:, :, None] * rel.abs().double()[None])[None]
    return Dense(visible.expand(1, H, *visible.shape).contiguous(), bias, scale_of(spec), spec["softcap"], sinks)


def to_dense(t):
    """(total, heads, D) -> (1, heads, total, D)."""
    return None if t is None else t.transpose(0, 1).unsqueeze(0)


def check_varlen(spec, backends):
    show(spec)
    gen = torch.Generator().manual_seed(spec["seed"])
    Hkv, D, dt, grad, inj = spec["Hkv"], spec["D"], spec["dtype"], spec["grad"], spec["inject"]
    H, B = Hkv * spec["group"], len(spec["lens_q"])
    Tq, Tk = sum(spec["lens_q"]), sum(spec["lens_k"])
    ins = {name: Inputs(*view_packed(gen, T, h, D, lay, dt), inj.get(name, []), grad)
           for name, T, h, lay in (("q", Tq, H, spec["layouts"][0]), ("k", Tk, Hkv, spec["layouts"][1]),
                                   ("v", Tk, Hkv, spec["layouts"][2]))}
    cu_q = torch.tensor([0, *spec["lens_q"]]).cumsum(0).to(torch.int32)
    cu_k = cu_q if spec["same_cu"] else torch.tensor([0, *spec["lens_k"]]).cumsum(0).to(torch.int32)
    slopes = make_slopes(spec, gen, B, H)
    clean_sinks, sinks = make_sinks(spec, gen, H)
    dense = varlen_dense(spec, H, slopes, clean_sinks)
    dout = randn(gen, Tq, H, D, dtype=dt)
    dout_dirty = inject(dout, inj.get("dout", []))
    dlse = randn(gen, H, Tq) if spec["return_lse"] else None
    q, k, v = (ins[n] for n in "qkv")
    grad = grad or sinks is not None
    t = taint(*(to_dense(x.dirty()) for x in (q, k, v)), Dense(dense.visible, dense.bias, dense.scale, dense.softcap,
                                                               sinks), to_dense(dout_dirty) if grad else None)
    want = oracle_results(*(to_dense(x.clean) for x in (q, k, v)), clean_sinks, dense, to_dense(dout),
                          None if dlse is None else dlse[None], grad)
    kw = dict(causal=spec["causal"], scale=spec["scale"], window_size=spec["window"], softcap=spec["softcap"],
              alibi_slopes=slopes, sinks=sinks, align=spec["align"], return_lse=spec["return_lse"])
    args = (q.view, k.view, v.view, cu_q, cu_k, max(spec["lens_q"]) + spec["slack"],
            max(spec["lens_k"]) + spec["slack"])
    for backend in backends:
        result = call_backend(fastattn.attention_varlen, args, kw, backend, "varlen")
        if result is None:
            continue
        got = dict(out=to_dense(result[0]), lse=result[1][None] if spec["return_lse"] else None)
        if grad:
            g = grads(result, [dout_dirty, dlse], [q.view, k.view, v.view, sinks])
            got.update(dq=to_dense(g[0]), dk=to_dense(g[1]), dv=to_dense(g[2]), dsinks=g[3])
        verify(got, want, t, dt, to_dense(dout), None if dlse is None else dlse[None], amplification(spec))


@fuzz_settings(bounded=100, weight=0.5)
@given(spec=varlen_specs())
def test_varlen_cpu_backends(spec):
    check_varlen(spec, FAST)


@needs_triton
@fuzz_settings(bounded=10, weight=0.03)
@given(spec=varlen_specs(max_b=3, max_hkv=2, max_n=36, max_d=40))
def test_varlen_triton(spec):
    check_varlen(spec, ["triton"])


# ---- fastattn.attention_with_kvcache -----------------------------------------------------------


def same(a, b) -> bool:
    """Equal elements, NaN matching NaN (its payload is free)."""
    return a.shape == b.shape and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def check_kvcache(spec, backends):
    show(spec)
    gen = torch.Generator().manual_seed(spec["seed"])
    B, Hkv, D, dt, Nq, Nmax, Nnew, inj = (spec[n] for n in ("B", "Hkv", "D", "dtype", "Nq", "Nmax", "Nnew", "inject"))
    H = Hkv * spec["group"]
    parts = {name: (view_4d(gen, B, h, n, D, lay, dt), inj.get(name, []))
             for name, h, n, lay in (("q", H, Nq, spec["layouts"][0]), ("k", Hkv, Nmax, spec["layouts"][1]),
                                     ("v", Hkv, Nmax, spec["layouts"][2]))}
    new = {name: inject(randn(gen, B, Hkv, Nnew, D, dtype=dt), inj.get(name, [])) if Nnew is not None else None
           for name in ("k_new", "v_new")}
    lens = torch.tensor(spec["cache_lens"], dtype=torch.int32)
    slopes = make_slopes(spec, gen, B, H)
    clean_sinks, sinks = make_sinks(spec, gen, H)
    sinks = None if sinks is None else sinks.detach()
    total = lens.long() + (Nnew or 0)
    rel = positions(Nq, Nmax, (total - Nq)[:, None, None, None])  # (B, 1, Nq, Nmax): end-aligned
    visible = (positional_visible(rel, spec["causal"], spec["window"]) &
               (torch.arange(Nmax)[None, None, None, :] < total[:, None, None, None])).expand(B, H, Nq, Nmax)
    bias = None if slopes is None else alibi_bias(slopes, rel)
    dense = Dense(visible.contiguous(), bias, scale_of(spec), spec["softcap"], clean_sinks)
    want = None
    for backend in backends:
        (qb, qf), qi = parts["q"]
        q = qf(inject(qb, qi))
        caches = [fn(inject(base, where)) for (base, fn), where in (parts["k"], parts["v"])]
        before = [c.clone() for c in caches]
        kw = dict(k_new=new["k_new"], v_new=new["v_new"], causal=spec["causal"], scale=spec["scale"],
                  window_size=spec["window"], softcap=spec["softcap"], alibi_slopes=slopes, sinks=sinks,
                  align="bottom_right", return_lse=spec["return_lse"])
        with torch.no_grad():
            result = call_backend(fastattn.attention_with_kvcache, (q, *caches, lens.clone()), kw, backend, "kvcache")
        if result is None:
            continue
        expected = check_cache_writes(before, caches, new, lens)
        if want is None:  # the same for every backend
            clean = [fn(base).clone() for (base, fn), _ in (parts["k"], parts["v"])]
            for c, n in zip(clean, (new["k_new"], new["v_new"])):  # the clean keys and values the queries see
                write_rows(c, n, lens, clean_only=True)
            t = taint(q, *expected, Dense(dense.visible, dense.bias, dense.scale, dense.softcap, sinks))
            want = oracle_results(qf(qb), *clean, clean_sinks, dense, None, None, False)
        verify(dict(out=result[0], lse=result[1] if spec["return_lse"] else None), want, t, dt, None, None,
               amplification(spec))


def write_rows(cache, new, lens, clean_only=False):
    """cache rows lens[b] ... + Nnew - 1 = new (clean_only: with new's non-finite values as 0.5 ...
    never read, since they only stand where a tainted row is exempt)."""
    if new is None:
        return cache
    for b, n in enumerate(lens.tolist()):
        cache[b, :, n:n + new.shape[2]] = torch.nan_to_num(new[b], 0.5, 0.5, 0.5) if clean_only else new[b]
    return cache


def check_cache_writes(before, after, new, lens):
    """The new keys and values land at each row's length, and nothing else changes; returns the
    caches as the queries see them."""
    expected = [write_rows(c.clone(), n, lens) for c, n in zip(before, (new["k_new"], new["v_new"]))]
    for name, got, want in zip(("k_cache", "v_cache"), after, expected):
        assert same(got, want), f"{name}: wrong contents after the call (rows written: new ones)"
    return expected


@fuzz_settings(bounded=80, weight=0.5)
@given(spec=kvcache_specs())
def test_kvcache_cpu_backends(spec):
    check_kvcache(spec, FAST)


@needs_triton
@fuzz_settings(bounded=10, weight=0.03)
@given(spec=kvcache_specs(max_b=2, max_hkv=2, max_n=40, max_d=40))
def test_kvcache_triton(spec):
    check_kvcache(spec, ["triton"])


# ---- fastattn.merge_attention ------------------------------------------------------------------


@fuzz_settings(bounded=60, weight=0.2)
@given(spec=attention_specs(dropout=False))
def test_merge_attention(spec):
    """Attention over a random split of the keys, merged by lse, equals attention over all."""
    show(spec)
    spec = dict(spec, inject={}, sinks=None)
    _, ins, dense = attention_call(spec)
    q, k, v = (ins[n].clean for n in "qkv")
    side = torch.rand(k.shape[2], generator=torch.Generator().manual_seed(spec["seed"])) < 0.5
    halves = []
    for part in (side, ~side):
        d = Dense(dense.visible & part, dense.bias, dense.scale, dense.softcap)
        out, lse = oracle(q, k, v, d)
        halves += [out.to(spec["dtype"]), lse.float()]
    COUNT["merge"] += 1
    out, lse = fastattn.merge_attention(*halves)
    want_out, want_lse = oracle(q, k, v, dense)
    assert out.dtype == spec["dtype"] and lse.dtype == torch.float32
    check_close("out", out, want_out, torch.zeros(out.shape[:3], dtype=torch.bool), TOL[spec["dtype"]])
    check_lse(lse, want_lse, torch.zeros(lse.shape, dtype=torch.bool), TOL[spec["dtype"]])
