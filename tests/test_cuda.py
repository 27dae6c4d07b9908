"""Backend `cuda` (CUDA C++ tensor-core kernels) against the float64 reference and against the
Triton kernels. Needs a GPU and an extension built with its CUDA sources: skipped otherwise."""
import pytest
import torch

import fastattn
from helpers import TOL, check_against_reference, padding_mask, qkv, rel_err

pytestmark = pytest.mark.skipif("cuda" not in fastattn.available_backends(),
                                reason="cuda backend unavailable (needs a GPU and a CUDA build)")


def inputs(*shape, dtype=torch.bfloat16, transposed=False):
    return [t.detach().cuda().requires_grad_() for t in qkv(*shape, dtype=dtype, transposed=transposed)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("lengths", [(1, 1), (7, 300), (129, 129), (300, 65), (1000, 1000)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_shapes(dtype, D, lengths, causal):
    torch.manual_seed(0)
    check_against_reference(*inputs(2, 4, 2, *lengths, D, dtype=dtype), "cuda", causal=causal)


@pytest.mark.parametrize("pad", ["right", "left", "random"])
@pytest.mark.parametrize("causal", [False, True])
def test_padding(pad, causal):
    torch.manual_seed(0)
    kpm = padding_mask(pad, 3, 200).cuda()  # includes a full row and rows with no valid key
    check_against_reference(*inputs(3, 4, 1, 150, 200, 128, transposed=True), "cuda",
                            key_padding_mask=kpm, causal=causal)


def test_fully_masked_rows_are_zero():
    q, k, v = inputs(2, 2, 2, 64, 80, 64)
    kpm = torch.zeros(2, 80, dtype=torch.bool, device="cuda")
    kpm[1] = True
    out, lse = fastattn.attention(q, k, v, key_padding_mask=kpm, return_lse=True, backend="cuda")
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    out.float().sum().backward()
    assert torch.all(q.grad[1] == 0) and torch.all(k.grad[1] == 0) and torch.all(v.grad[1] == 0)


@pytest.mark.skipif("triton" not in fastattn.available_backends(), reason="needs triton")
@pytest.mark.parametrize("causal", [False, True])
def test_agrees_with_triton(causal):
    torch.manual_seed(0)
    q, k, v = inputs(4, 8, 2, 1024, 1024, 128)
    kpm = padding_mask("right", 4, 1024).cuda()
    outs = [fastattn.attention(q, k, v, key_padding_mask=kpm, causal=causal, backend=b) for b in ("cuda", "triton")]
    assert rel_err(outs[0], outs[1]) < TOL[torch.bfloat16]


def test_backward_is_deterministic():
    q, k, v = inputs(2, 4, 2, 300, 300, 64)
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        fastattn.attention(q, k, v, causal=True, backend="cuda").float().square().sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_declines_what_it_cannot_run():
    q, k, v = inputs(1, 2, 2, 16, 16, 80)
    with pytest.raises(fastattn.NoBackendError, match="head_dim 80"):
        fastattn.attention(q, k, v, backend="cuda")
    q, k, v = inputs(1, 2, 2, 16, 16, 64)
    with pytest.raises(fastattn.NoBackendError, match="attn_mask"):
        fastattn.attention(q, k, v, attn_mask=torch.ones(16, 16, dtype=torch.bool, device="cuda"), backend="cuda")
