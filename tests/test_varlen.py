"""fastattn.attention_varlen: every packed sequence equals a lone call on it, against the
float64 reference, forward and gradients; the padded <-> packed helpers; bad input."""
import zlib

import pytest
import torch

import fastattn
from fastattn import attention_varlen, ops, pad, unpad
from fastattn.call import Call
from helpers import CPU_BACKENDS, TOL, count_fastattn_nodes, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On a GPU, the backends that run CUDA tensors; without one, the CPU's and Triton's interpreter.
BACKENDS = (["reference"] if DEVICE == "cuda" else CPU_BACKENDS) + \
    [b for b in ("triton",) if b in fastattn.available_backends()]
# Lengths straddle the CPU kernel's 64/128 and the interpreter's 32-wide tiles; one sequence
# has no query, one no key, and the longest is not the first.
LENS_Q = [5, 0, 130, 33, 1]
LENS_K = [7, 3, 130, 0, 65]


def cu(lens, device=DEVICE):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def packed(lens, H, D, dtype, strided=False):
    """Random (total, H, D) leaves; strided: sliced out of a (total, 3, H, D) projection."""
    if strided:
        return torch.randn(sum(lens), 3, H, D, device=DEVICE).to(dtype)[:, 1].requires_grad_()
    return torch.randn(sum(lens), H, D, device=DEVICE).to(dtype).requires_grad_()


def check_each_sequence(q, k, v, lens_q, lens_k, backend, causal, tol, dropout_p=0.0, seed=0):
    """Forward, lse and gradients of a varlen call against a float64 lone call per sequence."""
    cq, ck = cu(lens_q), cu(lens_k)
    H = q.shape[1]
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out, lse = ops.attention_forward(q4, k4, v4, backend, Call(
        cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k), causal=causal,
        scale=0.3, dropout_p=dropout_p, seed=seed))
    out, lse = out[0].transpose(0, 1), lse[0]
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse).masked_fill(torch.isinf(lse), 0)
    torch.autograd.backward([out, lse], [dout, dlse])
    for b in range(len(lens_q)):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        leaves = [t[rows].detach().double().transpose(0, 1)[None].requires_grad_()
                  for t, rows in ((q, qs), (k, ks), (v, ks))]
        ref, ref_lse = ops.attention_forward(*leaves, "reference", Call(
            causal=causal, scale=0.3, dropout_p=dropout_p, seed=seed + b * H)) if dropout_p else \
            fastattn.reference_attention(*leaves, causal=causal, scale=0.3)
        if dropout_p:  # the kernels' own keep mask, redrawn for this sequence alone
            ref, ref_lse = lone_call(q, k, v, qs, ks, causal, dropout_p, seed + b * H, backend)
        torch.autograd.backward([ref, ref_lse], [dout[qs].double().transpose(0, 1)[None],
                                                 dlse[:, qs].double()[None]])
        assert rel_err(out[qs], ref[0].transpose(0, 1)) < tol, f"out of sequence {b}"
        finite = torch.isfinite(ref_lse[0])
        assert torch.equal(torch.isinf(lse[:, qs]), ~finite), f"lse -inf pattern of sequence {b}"
        # lse's error is absolute (16-bit scores), so values near 0 count against sqrt(rows)
        assert rel_err(lse[:, qs][finite], ref_lse[0][finite], floor=finite.sum().item() ** 0.5) < max(tol, 1e-5), \
            f"lse of sequence {b}"
        for name, t, rows, leaf in (("q", q, qs, leaves[0]), ("k", k, ks, leaves[1]), ("v", v, ks, leaves[2])):
            want = leaf.grad[0].transpose(0, 1)
            err = rel_err(t.grad[rows], want, floor=0.1 * dout[qs].norm().item())
            assert err < 4 * tol, f"d{name} of sequence {b}: {err:.2e}"


def lone_call(q, k, v, qs, ks, causal, dropout_p, seed, backend):
    """One sequence through `backend` as a padded call of batch 1, in float64 where it can."""
    dtype = torch.float64 if backend == "reference" else q.dtype
    leaves = [t[rows].detach().to(dtype).transpose(0, 1)[None].requires_grad_() for t, rows in ((q, qs), (k, ks), (v, ks))]
    return ops.attention_forward(*leaves, backend, Call(causal=causal, scale=0.3, dropout_p=dropout_p, seed=seed))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (3, 1)], ids=str)
def test_each_sequence_equals_a_lone_call(backend, dtype, causal, heads):
    torch.manual_seed(zlib.crc32(repr((dtype, causal, heads)).encode()))  # hash() of a str changes per process
    H, Hkv = heads
    D = 80 if heads == (3, 1) else 32
    q = packed(LENS_Q, H, D, dtype, strided=True)
    k, v = packed(LENS_K, Hkv, D, dtype), packed(LENS_K, Hkv, D, dtype, strided=True)
    check_each_sequence(q, k, v, LENS_Q, LENS_K, backend, causal, TOL[dtype])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_dropout_draws_a_lone_call_per_sequence(backend):
    torch.manual_seed(1)
    q, k, v = packed(LENS_Q, 2, 16, torch.float32), packed(LENS_K, 2, 16, torch.float32), packed(LENS_K, 2, 16, torch.float32)
    cq, ck = cu(LENS_Q), cu(LENS_K)
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out, _ = ops.attention_forward(q4, k4, v4, backend, Call(
        cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=max(LENS_Q), max_seqlen_k=max(LENS_K), causal=True, scale=0.3,
        dropout_p=0.3, seed=99))
    for b in range(len(LENS_Q)):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        lone, _ = lone_call(q, k, v, qs, ks, True, 0.3, 99 + b * 2, backend)
        torch.testing.assert_close(out[0, :, qs], lone[0], rtol=1e-6, atol=1e-6)


def test_public_call_matches_padded_attention():
    torch.manual_seed(2)
    B, N, H, D = 3, 40, 2, 16
    kpm = torch.arange(N)[None] >= torch.tensor([40, 17, 1])[:, None]
    x = torch.randn(B, N, 3, H, D)
    packed_x, cu_seqlens, indices, longest = unpad(x, kpm)
    assert longest == 40 and cu_seqlens.tolist() == [0, 40, 57, 58]
    torch.testing.assert_close(pad(packed_x, indices, B, N), x.masked_fill(kpm[:, :, None, None, None], 0))
    q, k, v = packed_x.unbind(1)
    out, lse = fastattn.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, longest, longest, causal=True,
                                         return_lse=True)
    assert out.shape == q.shape and lse.shape == (H, q.shape[0])
    want = fastattn.attention(*(t.transpose(1, 2) for t in x.unbind(2)), key_padding_mask=kpm, causal=True)
    torch.testing.assert_close(pad(out, indices, B, N), want.transpose(1, 2).masked_fill(kpm[:, :, None, None], 0),
                               rtol=1e-5, atol=1e-5)


def test_compiles_to_one_node_per_call():
    q, k, v = (torch.randn(sum(n), 2, 16) for n in (LENS_Q, LENS_K, LENS_K))
    cq, ck = cu(LENS_Q, "cpu"), cu(LENS_K, "cpu")
    f = lambda q, k, v: attention_varlen(q, k, v, cq, ck, max(LENS_Q), max(LENS_K), causal=True)  # noqa: E731
    assert count_fastattn_nodes(f, q, k, v) == 1
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    call = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=max(LENS_Q), max_seqlen_k=max(LENS_K), causal=True,
                scale=0.3)
    for backend in CPU_BACKENDS:
        torch.library.opcheck(torch.ops.fastattn.attention_forward.default, (q4, k4, v4, backend), call)
        out, lse = ops.attention_forward(q4, k4, v4, backend, Call(**call))
        torch.library.opcheck(torch.ops.fastattn.attention_backward.default,
                              (torch.randn_like(out), None, q4, k4, v4, out, lse, backend), call)


@pytest.mark.parametrize("change, error, words", [
    (dict(cu_seqlens_q=torch.tensor([0, 5, 135, 168, 169, 170], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
    (dict(cu_seqlens_q=torch.tensor([0, 5, 169, 168, 169, 169], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
    (dict(cu_seqlens_k=torch.tensor([0, 7, 10], dtype=torch.int32)), ValueError, "cu_seqlens_k: expected 6 entries"),
    (dict(cu_seqlens_q=torch.tensor([0, 5, 5, 135, 168, 169])), TypeError, "int32"),
    (dict(max_seqlen_q=100), ValueError, "max_seqlen_q = 100"),
    (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k"),
    (dict(max_seqlen_k=2**32 + 64), ValueError, "max_seqlen_k"),  # wrapped in int32 and was accepted
    (dict(max_seqlen_q=True), ValueError, "max_seqlen_q"),
    # the kernels index it as an array: a strided one gave Triton wrong rows or NaN
    (dict(cu_seqlens_q=cu(LENS_Q, "cpu").repeat_interleave(2)[::2]), ValueError, "cu_seqlens_q: expected a contiguous"),
    (dict(q=torch.randn(169, 4, 8)), ValueError, "head dim 8"),
    (dict(k=torch.randn(205, 3, 32)), ValueError, "value"),
    (dict(q=torch.randn(169, 4, 32, 2)[..., 0]), ValueError, "unit head-dim stride"),
    (dict(causal=1), TypeError, "causal"),
])
def test_bad_input(change, error, words):
    args = dict(q=torch.randn(169, 4, 32), k=torch.randn(205, 2, 32), v=torch.randn(205, 2, 32),
                cu_seqlens_q=cu(LENS_Q, "cpu"), cu_seqlens_k=cu(LENS_K, "cpu"), max_seqlen_q=130, max_seqlen_k=130)
    args.update(change)
    causal = args.pop("causal", False)
    with pytest.raises(error, match=words):
        attention_varlen(**args, causal=causal)
