"""Shared test tools: inputs, the float64 reference, and relative error with per-dtype bounds."""
from __future__ import annotations

import zlib

import torch

import fastattn
from fastattn import reference_attention

# ||out - ref|| / ||ref|| bounds against the float64 reference.
TOL = {torch.float32: 2e-6, torch.float16: 3e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
CPU_BACKENDS = [b for b in ("cpu", "reference") if b in fastattn.available_backends()]


def stable_seed(*parts) -> int:
    """A seed from the parts' repr, the same in every process (hash() of a str is randomised per
    process, so a failure seeded from it could not be reproduced)."""
    return zlib.crc32(repr(parts).encode())


def param_id(value) -> str:
    """A parametrize id the same in every process: str(), with a set's elements sorted (a set of str
    iterates in a per-process order, and pytest-xdist's workers must collect the same ids)."""
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(map(repr, value))) + "}" if value else "set()"
    return str(value)


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """||out - ref|| / max(||ref||, floor); with floor 0, a zero reference is measured against 1."""
    denominator = max(ref.double().norm().item(), floor)
    return (out.double() - ref.double()).norm().item() / (denominator if denominator > 0 else 1.0)


def qkv(B, H, Hkv, Nq, Nk, D, dtype=torch.float32, transposed=False, device="cpu"):
    """Fresh random q, k, v leaves; transposed=True gives (B, N, H, D) storage viewed as
    (B, H, N, D), the layout a module's projections produce."""
    def make(h, n):
        if transposed:
            return torch.randn(B, n, h, D, device=device).to(dtype).transpose(1, 2).requires_grad_()
        return torch.randn(B, h, n, D, device=device).to(dtype).requires_grad_()
    return make(H, Nq), make(Hkv, Nk), make(Hkv, Nk)


def padding_mask(kind: str, B: int, Nk: int, gen=None) -> torch.Tensor | None:
    """(B, Nk) bool, True = padding: right, left or scattered, with some rows fully padded."""
    if kind == "none":
        return None
    lens = torch.randint(0, Nk + 1, (B,), generator=gen)
    lens[0] = Nk  # one full row
    idx = torch.arange(Nk)[None, :]
    if kind == "right":
        return idx >= lens[:, None]
    if kind == "left":
        return idx < (Nk - lens)[:, None]
    if kind == "random":
        mask = torch.rand(B, Nk, generator=gen) < 0.4
        mask[-1] = True  # one row with no valid key at all
        return mask
    raise ValueError(kind)


def check_against_reference(q, k, v, backend, *, key_padding_mask=None, attn_mask=None,
                            causal=False, scale=None, tol=None):
    """Forward (out and lse) and gradients of `backend` against the float64 reference."""
    out, lse = fastattn.attention(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                  causal=causal, scale=scale, return_lse=True, backend=backend)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = reference_attention(*leaves, key_padding_mask, attn_mask, causal, scale)
    tol = tol or TOL[q.dtype]
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), "NaN/inf in the output"
    assert rel_err(out, ref) < tol, f"out: {rel_err(out, ref):.2e}"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "lse -inf pattern differs"
    finite = torch.isfinite(ref_lse)
    # lse is a log: its rounding error is absolute, so an lse that cancels to near 0 (scores plus
    # a float mask) is measured against a magnitude of at least 1 per row.
    lse_err = rel_err(lse[finite], ref_lse[finite], floor=finite.sum().item() ** 0.5)
    assert lse_err < max(tol, 1e-5), f"lse: {lse_err:.2e}"

    dout = torch.randn_like(ref)
    dlse = torch.randn_like(ref_lse)
    dlse = torch.where(finite, dlse, torch.zeros_like(dlse))
    torch.autograd.backward([out, lse], [dout.to(out.dtype), dlse.float()])
    torch.autograd.backward([ref, ref_lse], [dout, dlse])
    for name, got, want in zip("qkv", (q, k, v), leaves):
        assert got.grad is not None and torch.isfinite(got.grad).all(), f"d{name} not finite"
        # Gradients are measured against at least a tenth of ||dout||: where the true gradient is
        # near zero (a query that sees one key), flash attention's dP - rowsum(dO * O) cancels,
        # and what is left is rounding of the size of dout, not of the gradient.
        err = rel_err(got.grad, want.grad, floor=0.1 * dout.norm().item())
        assert err < 4 * tol, f"d{name}: {err:.2e}"


def count_fastattn_nodes(f, *args) -> int:
    """The fastattn:: nodes in the graph torch.compile(fullgraph=True) captures of f(*args)."""
    count = 0

    def backend(gm, example_inputs):
        nonlocal count
        count += sum(n.op == "call_function" and "fastattn" in str(n.target) for n in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(f, fullgraph=True, backend=backend)(*args)
    return count


def materialise(case, B, H, device="cpu"):
    """A score-mods case's keywords with its tensors drawn: alibi_slopes "heads" (H,) or "batch"
    (B, H), sinks=True (H,)."""
    kw = dict(case)
    if kw.get("alibi_slopes") == "heads":
        kw["alibi_slopes"] = torch.rand(H, device=device)
    elif kw.get("alibi_slopes") == "batch":
        kw["alibi_slopes"] = torch.rand(B, H, device=device)
    if kw.pop("sinks", False):
        kw["sinks"] = torch.randn(H, device=device)
    return kw
