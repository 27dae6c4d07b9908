"""The reference's definition of windows, softcapping, ALiBi, sinks and alignment against a
row-by-row one written from the definitions, and its explicit backward formulas (and the sinks'
gradient) against autograd through it, in float64."""
import itertools
import math

import pytest
import torch

from fastattn.reference import reference_attention, reference_attention_backward, sink_gradient


def row_by_row(q, k, v, kpm, causal, scale, window, softcap, slopes, sinks, align):
    """out and lse one query row at a time, each condition spelled out."""
    B, H, Nq, D = q.shape
    group = H // k.shape[1]
    Nk = k.shape[2]
    offset = 0 if align == "top_left" else Nk - Nq
    out, lse = torch.zeros_like(q), torch.full((B, H, Nq), -math.inf, dtype=q.dtype)
    for b, h, i in itertools.product(range(B), range(H), range(Nq)):
        at = i + offset  # the query's position among the keys
        seen, scores = [], []
        for j in range(Nk):
            if (kpm is not None and kpm[b, j]) or (causal and j > at):
                continue
            if (window[0] >= 0 and j < at - window[0]) or (window[1] >= 0 and j > at + window[1]):
                continue
            s = scale * float(q[b, h, i] @ k[b, h // group, j])
            if softcap:
                s = softcap * math.tanh(s / softcap)
            if slopes is not None:
                s -= float(slopes[h] if slopes.dim() == 1 else slopes[b, h]) * abs(j - at)
            seen.append(j)
            scores.append(s)
        terms = scores + ([float(sinks[h])] if sinks is not None else [])
        if not terms:
            continue
        top = max(terms)
        total = sum(math.exp(t - top) for t in terms)
        lse[b, h, i] = top + math.log(total)
        for j, s in zip(seen, scores):
            out[b, h, i] += math.exp(s - lse[b, h, i]) * v[b, h // group, j]
    return out, lse


def inputs(B=2, H=4, Hkv=2, Nq=6, Nk=9, D=8, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(B, H, Nq, D, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, Nk, D, dtype=torch.float64) for _ in range(2))
    return q, k, v


CASES = [  # (causal, window, softcap, alibi, sinks, align, padding)
    (False, (2, 1), 0.0, None, False, "top_left", False),
    (True, (3, -1), 0.0, None, False, "bottom_right", False),
    (True, (-1, -1), 0.0, None, False, "bottom_right", True),
    (False, (-1, -1), 2.0, None, False, "top_left", False),
    (False, (-1, -1), 0.0, "heads", False, "bottom_right", False),
    (True, (2, 0), 1.5, "batch", True, "top_left", True),
    (False, (0, 0), 0.0, None, True, "top_left", True),  # rows whose one key is padded: only the sink
    (True, (-1, -1), 0.0, None, True, "top_left", False),
]


def case_args(case, B, H, Nk):
    causal, window, softcap, alibi, sinks, align, padding = case
    torch.manual_seed(1)
    slopes = {None: None, "heads": torch.rand(H, dtype=torch.float64),
              "batch": torch.rand(B, H, dtype=torch.float64)}[alibi]
    sink = torch.randn(H, dtype=torch.float64) if sinks else None
    kpm = (torch.rand(B, Nk) < 0.3) if padding else None
    return kpm, dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes, sinks=sink, align=align)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("shape", [(6, 9), (9, 6)], ids=["Nq<Nk", "Nq>Nk"])
def test_forward_matches_the_definition_row_by_row(case, shape):
    q, k, v = inputs(Nq=shape[0], Nk=shape[1])
    kpm, kw = case_args(case, q.shape[0], q.shape[1], k.shape[2])
    out, lse = reference_attention(q, k, v, kpm, None, kw["causal"], 0.3, **{n: kw[n] for n in kw if n != "causal"})
    want_out, want_lse = row_by_row(q, k, v, kpm, kw["causal"], 0.3, kw["window_size"], kw["softcap"],
                                    kw["alibi_slopes"], kw["sinks"], kw["align"])
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("with_dlse", [False, True])
def test_backward_formulas_and_sink_gradient_match_autograd(case, with_dlse):
    q, k, v = inputs(Nq=7, Nk=10)
    kpm, kw = case_args(case, q.shape[0], q.shape[1], k.shape[2])
    causal = kw.pop("causal")
    sinks = kw["sinks"]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([sinks.clone().requires_grad_()] if sinks is not None
                                                                 else [])
    out, lse = reference_attention(*leaves[:3], kpm, None, causal, 0.4, **dict(kw, sinks=leaves[3] if sinks is not None
                                                                               else None))
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse) if with_dlse else None
    loss = (out * dout).sum() + ((torch.where(torch.isfinite(lse), lse, 0.0) * dlse).sum() if with_dlse else 0.0)
    want = torch.autograd.grad(loss, leaves)
    got = reference_attention_backward(dout, dlse, q, k, v, kpm, None, causal, 0.4, **kw)
    for g, w in zip(got, want[:3]):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    if sinks is not None:
        torch.testing.assert_close(sink_gradient(dout, dlse, out.detach(), lse.detach(), sinks), want[3],
                                   rtol=1e-10, atol=1e-10)


def test_a_row_that_sees_no_key_is_zero_its_lse_the_sink_or_minus_inf():
    q, k, v = inputs(B=1, Nq=3, Nk=4)
    kpm = torch.ones(1, 4, dtype=torch.bool)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    out, lse = reference_attention(q, k, v, kpm, sinks=sinks)
    assert torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(lse, sinks[None, :, None].expand_as(lse))
    out, lse = reference_attention(q, k, v, kpm)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_bottom_right_is_flash_attentions_causal():
    """Query i of Nq sees keys j <= i + Nk - Nq: with 2 queries over 5 keys, the last query sees all."""
    q, k, v = inputs(B=1, H=1, Hkv=1, Nq=2, Nk=5)
    full = reference_attention(q[:, :, 1:], k, v)[0]
    assert torch.allclose(reference_attention(q, k, v, causal=True, align="bottom_right")[0][:, :, 1:], full)
    first = reference_attention(q[:, :, :1], k[:, :, :4], v[:, :, :4])[0]
    assert torch.allclose(reference_attention(q, k, v, causal=True, align="bottom_right")[0][:, :, :1], first)
