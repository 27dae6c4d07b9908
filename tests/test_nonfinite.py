"""The non-finite policy (README, "Non-finite inputs") on every backend that runs here.

NaN or inf is written into q, k, v, dO and the sinks at random places, many of them hidden by the
mask. A row is tainted when it sees a key and its query, a key or value it sees, or its dO holds a
non-finite element (or its head's sink is NaN). Tainted rows must come out non-finite; everything
else (outputs, lse and gradients of untainted rows and keys) must equal the float64 reference on
the same inputs with the non-finite elements replaced by finite ones: what a mask hides never
reaches a result.
"""
from __future__ import annotations

import math

import pytest
import torch

import fastattn
from fastattn.backends import NoBackendError
from fastattn.reference import attention_scores, reference_attention, sink_gradient
from helpers import TOL, rel_err

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),  # NaN on purpose
              pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")]
BACKENDS = [b for b in ("reference", "cpu", "sdpa", "triton") if b in fastattn.available_backends()]


def _device(backend: str) -> str:
    """Triton's kernels on a GPU where there is one (the GPU check runs these), else the CPU."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _on(backend: str, *tensors, grad=False):
    return [t.to(_device(backend)).requires_grad_(grad) if t is not None else None for t in tensors]
KINDS = ["padding", "causal", "bool", "float", "window", "bottom_right"]


def _mask_args(kind: str, B: int, Nq: int, Nk: int, gen: torch.Generator) -> dict:
    if kind == "padding":  # holes and a padded tail
        kpm = torch.rand(B, Nk, generator=gen) < 0.3
        kpm[:, -7:] = True
        return {"key_padding_mask": kpm}
    if kind in ("bool", "float"):
        allowed = torch.rand(Nq, Nk, generator=gen) < 0.7
        return {"attn_mask": allowed if kind == "bool" else
                torch.where(allowed, torch.randn(Nq, Nk, generator=gen), -math.inf)}
    if kind == "window":
        return {"window_size": (5, 3)}
    return {"causal": True, "align": "bottom_right" if kind == "bottom_right" else "top_left"}


def _poison(t: torch.Tensor, gen: torch.Generator, rows: int, infinite: bool, count: int = 3) -> torch.Tensor:
    """A copy of t (B, H, N, D) with `count` elements NaN (or +-inf where `infinite`) in its last `rows`
    rows of batch row 0 (keys there: padded or hidden from most queries; batch row 1 stays clean)."""
    t = t.clone()
    values = torch.tensor([math.nan, math.inf, -math.inf] if infinite else [math.nan] * 3)
    for _ in range(count):
        h, n, d = (int(torch.randint(0, size, (1,), generator=gen)) for size in (t.shape[1], rows, t.shape[3]))
        t[0, h, t.shape[2] - 1 - n, d] = values[int(torch.randint(0, 3, (1,), generator=gen))]
    return t


def _bad_rows(t: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(t).all(-1)


def _call(backend, q, k, v, mods):
    mods = {name: _on(backend, x)[0] if isinstance(x, torch.Tensor) else x for name, x in mods.items()}
    out, lse = fastattn.attention(q, k, v, backend=backend, return_lse=True, **mods)
    return out.cpu(), lse.cpu()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_hidden_non_finite_values_never_reach_a_result(backend, kind, dtype):
    if backend == "triton" and dtype == torch.float32 and not torch.cuda.is_available():
        pytest.skip("the interpreter runs the same kernels in bf16 (CI's time budget)")
    gen = torch.Generator().manual_seed(KINDS.index(kind) * 7 + BACKENDS.index(backend))
    B, H, Hkv, Nq, Nk, D = 2, 2, 1, 150, 150, 32
    if kind == "bottom_right":
        Nq = 70
    mods = _mask_args(kind, B, Nq, Nk, gen)
    clean = [torch.randn(B, h, n, D, generator=gen).to(dtype) for h, n in ((H, Nq), (Hkv, Nk), (Hkv, Nk))]
    dout_clean = torch.randn(B, H, Nq, D, generator=gen).to(dtype)
    # An infinite query or key element may give a score of -inf, which hides the pair (as in SDPA).
    q, k, v, dout = (_poison(t, gen, rows, inf) for t, rows, inf in zip((*clean, dout_clean), (Nq, 10, 10, Nq),
                                                                       (False, False, True, True)))
    leaves = _on(backend, q, k, v, grad=True)
    try:
        out, lse = _call(backend, *leaves, mods)
    except NoBackendError:
        pytest.skip(f"{backend} declines {kind}")
    out.backward(dout.to(out.device))
    grads = [t.grad.cpu() for t in leaves]

    # The pairs each row sees, the tainted rows (forward, then with dO) and the keys they reach.
    align = mods.get("align", "top_left")
    s, _ = attention_scores(clean[0].double(), clean[1].double(), mods.get("key_padding_mask"), mods.get("attn_mask"),
                            mods.get("causal", False), None, mods.get("window_size", (-1, -1)), align=align)
    seen = s != -math.inf  # (B, H, Nq, Nk)
    group = H // Hkv
    kv_bad = (_bad_rows(k) | _bad_rows(v)).repeat_interleave(group, dim=1)  # (B, H, Nk)
    tainted = seen.any(-1) & (_bad_rows(q) | (seen & kv_bad[:, :, None, :]).any(-1))
    tainted_bwd = tainted | (seen.any(-1) & _bad_rows(dout))
    keys_reached = (seen & tainted_bwd[..., None]).any(2).view(B, Hkv, group, Nk).any(2)  # (B, Hkv, Nk)
    dv_exempt = keys_reached.clone()
    if backend == "triton":  # a NaN dO may reach the dv of keys its row does not see (README)
        dv_exempt |= _bad_rows(dout).view(B, Hkv, group, Nq).any(-1).any(-1)[..., None]

    ref_leaves = [t.double().requires_grad_() for t in clean]
    ref, ref_lse = reference_attention(*ref_leaves, mods.get("key_padding_mask"), mods.get("attn_mask"),
                                       mods.get("causal", False), window_size=mods.get("window_size", (-1, -1)),
                                       align=align)
    ref.backward(dout_clean.double())

    assert tainted.any() and (~tainted).any(), "the case must have both kinds of rows"
    assert (~torch.isfinite(out[tainted])).any(-1).all(), "a tainted row came out finite"
    ok = ~tainted
    tol = TOL[dtype] * (2 if backend == "sdpa" else 1)
    assert torch.isfinite(out[ok]).all() and rel_err(out[ok], ref[ok]) < tol, "an untainted row changed"
    assert torch.equal(lse[ok].isinf(), ref_lse[ok].isinf())
    fin = ok & torch.isfinite(ref_lse)
    lse_tol = 1e-5 if dtype == torch.float32 else 1e-2  # the cpu kernel's bf16 dot products round scale * q
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin], rtol=lse_tol, atol=lse_tol)
    ok_bwd = ~tainted_bwd
    for got, want in ((grads[0][ok_bwd], ref_leaves[0].grad[ok_bwd]),
                      (grads[1][~keys_reached], ref_leaves[1].grad[~keys_reached]),
                      (grads[2][~dv_exempt], ref_leaves[2].grad[~dv_exempt])):
        assert torch.isfinite(got).all(), "a gradient the policy keeps exact is not finite"
        assert rel_err(got, want) < 4 * TOL[dtype], f"{rel_err(got, want):.2e}"


SINK_BACKENDS = [b for b in BACKENDS if b != "sdpa"]  # sdpa declines sinks


@pytest.mark.parametrize("backend", SINK_BACKENDS)
def test_a_sink_of_minus_inf_is_no_sink_and_a_nan_sink_is_nan(backend):
    """Rows that see no key (padding) with a sink of -inf gave NaN d(sinks) everywhere and a NaN
    output on triton (exp(-inf + inf)); a NaN sink gave zeros on cpu."""
    gen = torch.Generator().manual_seed(5)
    B, H, N, D = 2, 2, 20, 16
    q, k, v = (torch.randn(B, H, N, D, generator=gen) for _ in range(3))
    kpm = torch.zeros(B, N, dtype=torch.bool)
    kpm[1] = True  # batch row 1 sees no key
    leaves = _on(backend, q, k, v, torch.tensor([-math.inf, 0.5]), grad=True)
    out, lse = fastattn.attention(*leaves[:3], key_padding_mask=_on(backend, kpm)[0], sinks=leaves[3], return_lse=True,
                                  backend=backend)
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    out, lse, sinks = out.cpu(), lse.cpu(), leaves[3]
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), kpm, sinks=sinks.detach().double())
    assert torch.isfinite(out).all() and rel_err(out, ref) < TOL[torch.float32]
    assert torch.equal(lse.isinf(), ref_lse.isinf()) and lse[1, 0].eq(-math.inf).all()
    assert torch.isfinite(sinks.grad).all() and sinks.grad[0] == 0
    assert all(torch.isfinite(t.grad).all() for t in leaves[:3])

    out, lse = _call(backend, *leaves[:3], dict(key_padding_mask=kpm, sinks=torch.tensor([math.nan, 0.5])))
    assert out[:, 0].isnan().all() and lse[:, 0].isnan().all(), "a NaN sink makes its head NaN"
    assert torch.isfinite(out[:, 1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_query_row_is_nan_with_lse_nan(backend):
    """cpu returned zeros and lse -inf for a NaN query (its running max passed the NaN over)."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=gen) for _ in range(3))
    q[0, 1, 3, 5] = math.nan
    out, lse = _call(backend, *_on(backend, q, k, v), {})
    assert out[0, 1, 3].isnan().all() and lse[0, 1, 3].isnan()
    ok = torch.ones_like(lse, dtype=torch.bool)
    ok[0, 1, 3] = False
    assert torch.isfinite(out[ok]).all() and torch.isfinite(lse[ok]).all()


DECODE_BACKENDS = [b for b in ("reference", "cpu", "triton") if b in fastattn.available_backends()]


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
@pytest.mark.parametrize("window", [(-1, -1), (6, 0)])
def test_decoding_never_reads_hidden_or_unused_cache_rows(backend, window):
    """Cache rows past a sequence's length (torch.empty garbage: NaN here) and new keys the causal
    mask hides from earlier new queries hold NaN; only the rows that see a NaN come out NaN."""
    gen = torch.Generator().manual_seed(7)
    B, H, Hkv, Nq, Nmax, D = 2, 4, 2, 4, 300, 32
    q = torch.randn(B, H, Nq, D, generator=gen)
    k_cache, v_cache = (torch.randn(B, Hkv, Nmax, D, generator=gen) for _ in range(2))
    lens = torch.tensor([257, 140], dtype=torch.int32)
    clean_k, clean_v = k_cache.clone(), v_cache.clone()
    for b, n in enumerate(lens.tolist()):
        k_cache[b, :, n:], v_cache[b, :, n:] = math.nan, math.nan  # unused rows
    v_cache[0, 0, 256, 3] = math.nan  # the last key: only the last new query of row 0 sees it
    out = fastattn.attention_with_kvcache(*_on(backend, q, k_cache, v_cache, lens), window_size=window,
                                         backend=backend).cpu()
    ref = torch.stack([reference_attention(q[b:b + 1].double(), clean_k[b:b + 1, :, :n].double(),
                                           clean_v[b:b + 1, :, :n].double(), causal=True, window_size=window,
                                           align="bottom_right")[0][0] for b, n in enumerate(lens.tolist())])
    tainted = torch.zeros(B, H, Nq, dtype=torch.bool)
    tainted[0, :2, Nq - 1] = True  # kv head 0 serves query heads 0 and 1
    assert (~torch.isfinite(out[tainted])).any(-1).all()
    assert torch.isfinite(out[~tainted]).all() and rel_err(out[~tainted], ref[~tainted]) < TOL[torch.float32]


VARLEN_BACKENDS = [b for b in ("reference", "cpu", "triton") if b in fastattn.available_backends()]


@pytest.mark.parametrize("backend", VARLEN_BACKENDS)
def test_a_packed_sequence_never_sees_its_neighbours_nan(backend):
    gen = torch.Generator().manual_seed(8)
    cu = torch.tensor([0, 37, 100, 170], dtype=torch.int32)
    q, k, v = (torch.randn(170, 2, 32, generator=gen) for _ in range(3))
    k[60, 1, 4] = v[150, 0, 7] = math.nan  # in the middle sequence and the last, behind the causal mask
    leaves = _on(backend, q, k, v, grad=True)
    out = fastattn.attention_varlen(*leaves, *_on(backend, cu, cu), 70, 70, causal=True, backend=backend)
    out.backward(_on(backend, torch.randn(out.shape, generator=gen))[0])
    out = out.detach().cpu()
    q, k, v = (torch.cat([t.detach(), t.grad]).cpu() for t in leaves)  # values, then gradients
    tainted = torch.zeros(170, 2, dtype=torch.bool)
    tainted[60:100, 1] = tainted[150:170, 0] = True
    assert (~torch.isfinite(out[tainted])).any(-1).all()
    assert torch.isfinite(out[~tainted]).all()
    for b in range(3):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        ok = ~tainted[rows]
        clean = [t[rows].transpose(0, 1)[None].double() for t in (q, k, v)]
        for t in clean[1:]:
            t.nan_to_num_(0.0)
        ref = reference_attention(*clean, causal=True)[0][0].transpose(0, 1)
        assert rel_err(out[rows][ok], ref[ok]) < TOL[torch.float32]
    assert all(torch.isfinite(t[170:170 + 37]).all() for t in (q, k, v))  # the first sequence's gradients
