"""Every CPU-side backend against the float64 reference: forward, lse and gradients."""
import pytest
import torch

import fastattn
from helpers import CPU_BACKENDS, check_against_reference, padding_mask, qkv, stable_seed

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (B, H, Hkv, Nq, Nk, D): D over {16, 32, 64, 80, 128}, lengths over {1, 7, 129, 300},
# Nq != Nk both ways, GQA and MQA.
SHAPES = [
    (2, 4, 4, 129, 129, 64),
    (2, 4, 2, 129, 300, 32),
    (1, 6, 2, 300, 129, 80),
    (2, 2, 1, 7, 300, 16),
    (1, 2, 2, 300, 7, 128),
    (3, 2, 2, 1, 129, 64),
    (2, 3, 1, 129, 1, 16),
    (1, 1, 1, 1, 1, 32),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_shapes(backend, dtype, shape, causal):
    torch.manual_seed(stable_seed(shape, causal))
    check_against_reference(*qkv(*shape, dtype=dtype), backend, causal=causal)


MASKS = ["pad-right", "pad-left", "pad-random", "bool", "float", "bool+pad+causal",
         "float+pad-random", "float+causal", "bool-broadcast", "rows-fully-masked"]


def make_masks(kind, B, H, Nq, Nk):
    """Masks for one case: (key_padding_mask, attn_mask, causal)."""
    pad = "none"
    if "pad-" in kind:
        pad = kind.split("pad-")[1].split("+")[0]
    elif "+pad" in kind:
        pad = "right"
    attn = None
    if kind.startswith("bool-broadcast"):
        attn = torch.rand(Nq, Nk) < 0.8  # (Nq, Nk), broadcast over B and H
    elif kind.startswith("bool"):
        attn = torch.rand(B, 1, Nq, Nk) < 0.7
    elif kind.startswith("float"):
        attn = torch.randn(B, H, Nq, Nk)
        attn[torch.rand(B, H, Nq, Nk) < 0.2] = float("-inf")
    elif kind == "rows-fully-masked":
        attn = torch.rand(B, H, Nq, Nk) < 0.5
        attn[:, :, ::3] = False  # every third query sees nothing
    return padding_mask(pad, B, Nk), attn, "causal" in kind


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("lengths", [(129, 300), (300, 129), (7, 7)], ids=str)
def test_masks(backend, dtype, kind, lengths):
    torch.manual_seed(stable_seed(kind, lengths))
    B, H, Hkv, D = 3, 4, 2, 64
    Nq, Nk = lengths
    kpm, attn, causal = make_masks(kind, B, H, Nq, Nk)
    check_against_reference(*qkv(B, H, Hkv, Nq, Nk, D, dtype=dtype), backend,
                            key_padding_mask=kpm, attn_mask=attn, causal=causal)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transposed_inputs(backend, dtype):
    """(B, N, H, D) storage viewed as (B, H, N, D): a module's layout, taken with no copy."""
    torch.manual_seed(0)
    q, k, v = qkv(2, 4, 2, 129, 300, 64, dtype=dtype, transposed=True)
    assert not q.is_contiguous()
    check_against_reference(q, k, v, backend, key_padding_mask=padding_mask("random", 2, 300),
                            causal=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_odd_strides(backend):
    """Strides no layout produces naturally: head-dim stride 2, expanded (stride-0) kv heads."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 70, 2 * 32)[..., ::2].requires_grad_()
    k = torch.randn(2, 1, 90, 32).expand(2, 4, 90, 32).detach().requires_grad_()
    v = torch.randn(2, 90, 4, 32).permute(0, 2, 1, 3).detach().requires_grad_()
    assert q.stride(-1) == 2 and k.stride(1) == 0
    check_against_reference(q, k, v, backend, causal=True, scale=0.3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fully_masked_rows_are_zero(backend):
    """No visible key: zero output, lse = -inf, zero gradients, never NaN."""
    torch.manual_seed(0)
    q, k, v = qkv(2, 2, 2, 65, 80, 32)
    kpm = torch.zeros(2, 80, dtype=torch.bool)
    kpm[1] = True  # batch row 1 has no key at all
    attn = torch.ones(65, 80, dtype=torch.bool)
    attn[5] = False  # query 5 sees nothing anywhere
    out, lse = fastattn_call(q, k, v, kpm, attn, backend)
    assert torch.all(out[1] == 0) and torch.all(out[:, :, 5] == 0)
    assert torch.all(lse[1] == float("-inf")) and torch.all(lse[:, :, 5] == float("-inf"))
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    assert torch.all(q.grad[1] == 0) and torch.all(q.grad[:, :, 5] == 0)
    assert torch.all(k.grad[1] == 0) and torch.all(v.grad[1] == 0)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def fastattn_call(q, k, v, kpm, attn, backend):
    import fastattn

    return fastattn.attention(q, k, v, key_padding_mask=kpm, attn_mask=attn, return_lse=True,
                              backend=backend)


def test_empty_key_sequence():
    import fastattn

    q, k, v = qkv(2, 2, 2, 5, 0, 16)
    out, lse = fastattn.attention(q, k, v, return_lse=True)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


@pytest.mark.parametrize("backend", [b for b in ("cpu", "sdpa", "triton", "reference") if b in fastattn.available_backends()])
@pytest.mark.parametrize("broadcast", ["batch", "head"])
def test_expanded_query(backend, broadcast):
    """A query broadcast over the batch or the heads (stride 0): the output keeps its rows of D
    contiguous with the broadcast dim outermost (it was innermost: Triton wrote garbage, and
    torch's CPU backward, which reads out as if so laid out, gave sdpa wrong dq and dk)."""
    torch.manual_seed(0)
    base = torch.randn(1, 4, 33, 32) if broadcast == "batch" else torch.randn(3, 1, 33, 32)
    q = base.expand(3, 4, 33, 32).detach().requires_grad_()
    k, v = (torch.randn(3, 4, 40, 32, requires_grad=True) for _ in range(2))
    check_against_reference(q, k, v, backend, causal=backend != "sdpa")
    out = fastattn.attention(q, k, v, causal=backend != "sdpa", backend=backend)
    dim = 0 if broadcast == "batch" else 1
    assert out.stride(-1) == 1 and out.stride(dim) == max(out.stride())
