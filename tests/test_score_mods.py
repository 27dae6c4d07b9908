"""Windows, softcapping, ALiBi, sinks and the alignment through fastattn.attention: validated
before any kernel runs, carried by the one op (sinks' gradient included), taken by the backends
that declare them (cpu, reference, triton through its interpreter) against float64, and declined
by name by the others."""
import pytest
import torch
from helpers import CPU_BACKENDS, TOL, count_fastattn_nodes, materialise, qkv, rel_err

import fastattn
from fastattn.backends import Problem, select_backend

BACKENDS = CPU_BACKENDS + [b for b in ("triton",) if b in fastattn.available_backends()]

CASES = [  # keywords of fastattn.attention beyond q, k, v
    dict(window_size=(4, 0), causal=True),
    dict(window_size=(3, 2), align="bottom_right"),
    dict(causal=True, align="bottom_right"),
    dict(softcap=5.0),
    dict(alibi_slopes="heads", causal=True),
    dict(alibi_slopes="batch", align="bottom_right", window_size=(-1, 3)),
    dict(sinks=True, causal=True, window_size=(2, -1), softcap=3.0),
    dict(sinks=True, padding=True),
]




def reference_kw(kw):
    """The same call's keywords for fastattn.reference_attention, in float64."""
    out = {n: (t.double() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    out.pop("key_padding_mask", None)
    out.pop("causal", None)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("lengths", [(20, 33), (33, 20)], ids=["Nq<Nk", "Nq>Nk"])
def test_forward_and_gradients_equal_the_float64_reference(case, lengths, backend):
    check(case, 2, 4, 2, *lengths, 16, torch.float32, backend)


# Long enough for several key tiles (64 fp32, 256 with bf16 dot products) and windows that start
# off their grid; B x Hkv = 1 takes the CPU kernel's per-tile path, 4 its per-kv-head packing.
LONG = [dict(window_size=(100, 0), causal=True, align="bottom_right"), dict(window_size=(37, 70), softcap=4.0),
        dict(sinks=True, window_size=(300, -1), alibi_slopes="heads", padding=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LONG, ids=str)
@pytest.mark.parametrize("B, Hkv", [(1, 1), (2, 2)], ids=["per-tile", "per-kv-head"])
def test_cpu_kernel_over_many_tiles(case, B, Hkv, dtype):
    check(case, B, 2 * Hkv, Hkv, 300, 700, 64, dtype, "cpu")


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LONG, ids=str)
def test_triton_kernels_over_many_tiles(case, dtype):
    """The interpreter's 32-query, 32-key tiles: windows over many of them, edges off the grid."""
    check(case, 1, 2, 1, 150, 350, 32, dtype, "triton")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_keys_outside_the_window_are_never_read(backend, dtype):
    """32 queries at the end of 1024 keys (bottom-right) see keys 952 on: NaN keys and values
    before 700 would reach the output, or a gradient, from any tile that loaded them."""
    q, k, v = qkv(1, 2, 2, 32, 1024, 32, dtype=dtype)
    with torch.no_grad():
        for t in (k, v):
            t[:, :, :700] = float("nan")
    out = fastattn.attention(q, k, v, causal=True, window_size=(40, 0), align="bottom_right", backend=backend)
    assert torch.isfinite(out).all()
    dq, dk, dv = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    assert torch.isfinite(dq).all() and torch.isfinite(dk[:, :, 700:]).all() and torch.isfinite(dv[:, :, 700:]).all()
    assert (dk[:, :, :952] == 0).all() and (dv[:, :, :952] == 0).all()
    ref = fastattn.reference_attention(q.double(), k[:, :, 900:].double(), v[:, :, 900:].double(), causal=True,
                                       window_size=(40, 0), align="bottom_right")[0]
    assert rel_err(out, ref) < TOL[dtype]


def check(case, B, H, Hkv, Nq, Nk, D, dtype, backend, device="cpu"):
    """Forward, lse and every gradient (the sinks' too) of one call against float64."""
    lengths = (Nq, Nk)
    torch.manual_seed(Nq * Nk + D)  # reproducible draws
    q, k, v = qkv(B, H, Hkv, *lengths, D, dtype=dtype, transposed=True, device=device)
    kw = materialise(case, B, H, device)
    kpm = (torch.rand(B, lengths[1], device=device) < 0.3) if kw.pop("padding", False) else None
    sinks = kw.get("sinks")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([sinks.clone().requires_grad_()] if sinks is not None
                                                                 else [])
    call_kw = dict(kw, sinks=leaves[3]) if sinks is not None else kw
    out, lse = fastattn.attention(*leaves[:3], key_padding_mask=kpm, return_lse=True, backend=backend, **call_kw)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * dout).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * dlse).sum(),
                                leaves)

    dleaves = [t.detach().double().requires_grad_() for t in leaves]
    rkw = reference_kw(dict(kw, sinks=dleaves[3]) if sinks is not None else kw)
    ref, ref_lse = fastattn.reference_attention(*dleaves[:3], kpm, None, kw.get("causal", False), **rkw)
    want = torch.autograd.grad((ref * dout.double()).sum()
                               + (torch.where(torch.isfinite(ref_lse), ref_lse, 0.0) * dlse.double()).sum(), dleaves)
    assert rel_err(out, ref) < TOL[dtype]
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    lse_tol = max(1e-5, 0.1 * TOL[dtype])  # 16-bit scores: lse within a tenth of the output's bound
    assert rel_err(torch.where(torch.isfinite(lse), lse, 0.0), torch.where(torch.isfinite(ref_lse), ref_lse, 0.0)) < lse_tol
    for got, w in zip(grads[:3], want):
        assert rel_err(got, w) < TOL[dtype]
    if sinks is not None:  # a sum over rows of terms of either sign: its error relative to theirs
        terms = torch.exp(dleaves[3].view(1, -1, 1) - ref_lse) * ((dout.double() * ref).sum(-1) - dlse.double())
        assert (grads[3] - want[3]).norm() / terms.abs().sum((0, 2)).norm() < TOL[dtype]


def test_backends_without_them_decline_by_name_and_auto_takes_the_cpu_kernel():
    q, k, v = qkv(1, 2, 2, 8, 12, 16)
    with pytest.raises(fastattn.NoBackendError, match="window_size not supported; softcap not supported"):
        fastattn.attention(q, k, v, window_size=(2, 2), softcap=1.0, backend="sdpa")
    kw = dict(alibi_slopes=torch.rand(2), sinks=torch.rand(2), causal=True, align="bottom_right")
    assert fastattn.explain(q, k, v, **kw).endswith("-> cpu")
    with pytest.raises(fastattn.NoBackendError, match="alibi_slopes not supported; sinks not supported; align="):
        fastattn.attention(q, k, v, backend="sdpa", **kw)


def test_alignment_only_where_it_matters():
    """Bottom-right equals top-left for square calls and for calls without positions: such calls
    do not ask the backends for it."""
    q, k, v = qkv(1, 2, 2, 8, 8, 16)
    assert "score_mods=()" in fastattn.explain(q, k, v, causal=True, align="bottom_right")
    q2 = qkv(1, 2, 2, 5, 8, 16)[0]
    assert "score_mods=()" in fastattn.explain(q2, k, v, align="bottom_right")
    assert "score_mods=('bottom_right',)" in fastattn.explain(q2, k, v, causal=True, align="bottom_right")
    torch.testing.assert_close(fastattn.attention(q, k, v, causal=True, align="bottom_right"),
                               fastattn.attention(q, k, v, causal=True))
    problem = Problem("cpu", torch.float32, 16, causal=True, score_mods=("bottom_right",))
    assert select_backend("auto", problem).name == "cpu"


@pytest.mark.parametrize("kw, error, match", [
    (dict(window_size=(2,)), TypeError, "window_size: expected two ints"),
    (dict(window_size=(2.0, 1)), TypeError, "window_size: expected two ints"),
    (dict(window_size=(-2, 1)), ValueError, r"window_size: expected ints in \[-1, 2\*\*63\).*\(-2, 1\)"),
    (dict(softcap=-1.0), ValueError, "softcap: expected 0 .off. or a positive float32"),
    (dict(softcap=float("inf")), ValueError, "softcap: expected 0 .off. or a positive float32"),
    (dict(softcap=1e-50), ValueError, "softcap: expected 0 .off. or a positive float32"),
    (dict(softcap=float("nan")), ValueError, "softcap: expected 0 .off. or a positive float32"),
    (dict(softcap="1"), TypeError, "softcap: expected a float, got str"),
    (dict(align="bottom-right"), ValueError, "align: expected one of"),
    (dict(alibi_slopes=torch.rand(3)), ValueError, r"alibi_slopes: expected shape \(2,\) or \(1, 2\).*got \(3,\)"),
    (dict(alibi_slopes=torch.rand(2, dtype=torch.float64)), TypeError, "alibi_slopes: expected dtype torch.float32"),
    (dict(alibi_slopes=[0.5, 0.25]), TypeError, "alibi_slopes: expected a torch.Tensor, got list"),
    (dict(alibi_slopes=torch.rand(2, requires_grad=True)), ValueError, "alibi_slopes: gradients"),
    (dict(sinks=torch.rand(1, 2)), ValueError, r"sinks: expected shape \(2,\)"),
    (dict(sinks=torch.rand(2).half()), TypeError, "sinks: expected dtype torch.float32, got torch.float16"),
    (dict(sinks=torch.rand(2, device="meta")), ValueError, "sinks: expected device cpu"),
])
def test_bad_input_names_the_argument(kw, error, match):
    q, k, v = qkv(1, 2, 2, 8, 12, 16)
    with pytest.raises(error, match=match):
        fastattn.attention(q, k, v, **kw)


def test_one_node_under_compile_and_the_same_gradients():
    q, k, v = qkv(2, 4, 2, 12, 20, 16)
    sinks = torch.randn(4, requires_grad=True)
    slopes = torch.rand(4)
    leaves = (q, k, v, sinks)

    def f(q, k, v, sinks):
        return fastattn.attention(q, k, v, causal=True, window_size=(5, 0), softcap=4.0, alibi_slopes=slopes,
                                  sinks=sinks, align="bottom_right").sum()

    assert count_fastattn_nodes(f, *leaves) == 1
    eager = torch.autograd.grad(f(*leaves), leaves)
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves), leaves)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_windows_wider_than_any_distance_are_unbounded(backend):
    """The kernel's position arithmetic must not overflow (a window of sys.maxsize keys)."""
    import sys

    q, k, v = qkv(1, 2, 2, 40, 50, 16)
    for window in ((-1, sys.maxsize), (sys.maxsize, -1), (0, sys.maxsize), (sys.maxsize, sys.maxsize)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fastattn.attention(*leaves, window_size=window, backend=backend)
        unbounded = [t.clone().requires_grad_() for t in (q, k, v)]
        want = fastattn.attention(*unbounded, window_size=tuple(-1 if w == sys.maxsize else w for w in window),
                                  backend=backend)
        torch.testing.assert_close(out, want)
        for g, w in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(want.sum(), unbounded)):
            torch.testing.assert_close(g, w)


def test_the_op_checks_slopes_and_sinks_shapes_itself():
    """torch.ops.fastattn.attention_forward is public: shapes the front door would reject must not
    be read out of bounds or transposed by the CPU kernel; (1, H) slopes broadcast."""
    q, k, v = qkv(3, 4, 2, 9, 14, 16)
    op = torch.ops.fastattn.attention_forward.default
    args = (q, k, v, "cpu")
    for bad in (torch.rand(12), torch.rand(4, 3), torch.rand(2, 4)):
        with pytest.raises(RuntimeError, match="alibi_slopes: expected"):
            op(*args, scale=0.3, alibi_slopes=bad)
    with pytest.raises(RuntimeError, match="sinks: expected"):
        op(*args, scale=0.3, sinks=torch.rand(2, 2))
    slopes = torch.rand(1, 4)
    torch.testing.assert_close(op(*args, scale=0.3, alibi_slopes=slopes)[0],
                               op(*args, scale=0.3, alibi_slopes=slopes[0])[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_with_score_mods(backend):
    q, k, v = qkv(2, 4, 2, 9, 14, 16, transposed=True)
    call = dict(causal=True, scale=0.3, window_left=3, window_right=1, softcap=2.0, alibi_slopes=torch.rand(2, 4),
                sinks=torch.randn(4, requires_grad=True), bottom_right=True)
    torch.library.opcheck(torch.ops.fastattn.attention_forward.default, (q, k, v, backend), call)


VARLEN = [dict(causal=True, align="bottom_right", window_size=(6, 0)), dict(softcap=3.0, alibi_slopes="batch"),
          dict(sinks=True, causal=True, alibi_slopes="heads", align="bottom_right")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", VARLEN, ids=str)
def test_packed_sequences_each_equal_a_lone_reference_call(case, backend):
    """attention_varlen: sequence b as a lone float64 call, its own alignment (Nq != Nk) and slopes."""
    lens_q, lens_k = (5, 17, 1, 30, 0), (9, 17, 4, 20, 3)
    H, Hkv, D = 4, 2, 16
    cu = [torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32) for lens in (lens_q, lens_k)]
    torch.manual_seed(3)
    q = torch.randn(sum(lens_q), H, D, requires_grad=True)
    k, v = (torch.randn(sum(lens_k), Hkv, D, requires_grad=True) for _ in range(2))
    kw = materialise(case, len(lens_q), H)
    sinks = kw.get("sinks")
    if sinks is not None:
        kw["sinks"] = sinks.requires_grad_()
    out, lse = fastattn.attention_varlen(q, k, v, *cu, max(lens_q), max(lens_k), return_lse=True, backend=backend,
                                         **kw)
    dout = torch.randn_like(out)
    leaves = [q, k, v] + ([kw["sinks"]] if sinks is not None else [])
    grads = torch.autograd.grad((out * dout).sum(), leaves)
    want_sinks = 0
    for b in range(len(lens_q)):
        qs, ks = slice(cu[0][b], cu[0][b + 1]), slice(cu[1][b], cu[1][b + 1])
        lone = [t[rows].detach().double().transpose(0, 1)[None].requires_grad_() for t, rows in ((q, qs), (k, ks), (v, ks))]
        rkw = dict(align="bottom_right") | reference_kw(kw)  # attention_varlen's default
        if rkw.get("alibi_slopes") is not None and rkw["alibi_slopes"].dim() == 2:
            rkw["alibi_slopes"] = rkw["alibi_slopes"][b:b + 1]
        if sinks is not None:
            rkw["sinks"] = rkw["sinks"].detach().requires_grad_()
        ref, ref_lse = fastattn.reference_attention(*lone, None, None, kw.get("causal", False), **rkw)
        assert rel_err(out[qs], ref[0].transpose(0, 1)) < TOL[torch.float32], f"out of sequence {b}"
        finite = torch.isfinite(ref_lse[0])
        assert torch.equal(torch.isfinite(lse[:, qs]), finite)
        if lens_q[b]:
            assert rel_err(lse[:, qs][finite], ref_lse[0][finite]) < 1e-5, f"lse of sequence {b}"
            ref_leaves = lone + ([rkw["sinks"]] if sinks is not None else [])
            want = torch.autograd.grad((ref * dout[qs].double().transpose(0, 1)[None]).sum(), ref_leaves,
                                       allow_unused=True)
            for name, got, w in zip("qkv", (grads[0][qs], grads[1][ks], grads[2][ks]), want):
                assert rel_err(got, w[0].transpose(0, 1)) < 1e-5, f"d{name} of sequence {b}"
            if sinks is not None:
                want_sinks = want_sinks + want[3]
    if sinks is not None:
        assert rel_err(grads[3], want_sinks) < 1e-5


def test_packed_sequences_align_bottom_right_by_default():
    """As flash_attn_varlen_func: causal query i of a sequence sees keys j <= i + Nk - Nq."""
    cu_q, cu_k = torch.tensor([0, 3, 8], dtype=torch.int32), torch.tensor([0, 7, 12], dtype=torch.int32)
    torch.manual_seed(5)
    q, k, v = torch.randn(8, 2, 16), torch.randn(12, 2, 16), torch.randn(12, 2, 16)
    args = (q, k, v, cu_q, cu_k, 5, 7)
    default = fastattn.attention_varlen(*args, causal=True)
    torch.testing.assert_close(default, fastattn.attention_varlen(*args, causal=True, align="bottom_right"))
    assert not torch.allclose(default, fastattn.attention_varlen(*args, causal=True, align="top_left"))
    lone = fastattn.reference_attention(*(t.transpose(0, 1)[None] for t in (q[:3], k[:7], v[:7])), causal=True,
                                        align="bottom_right")[0]
    torch.testing.assert_close(default[:3], lone[0].transpose(0, 1))
