"""Backend `sdpa` (torch's kernels) against the float64 reference: forward, lse and gradients
(the lse gradient included), GQA, layouts, torch.compile; and every call it declines. On the CPU
through torch's CPU flash kernel; on a GPU the same tests run on CUDA through cuDNN (16-bit,
D <= 128), FlashAttention-2 (16-bit, larger D) and the memory-efficient kernel (fp32)."""
import pytest
import torch

import fastattn
from fastattn.backends import NoBackendError
from helpers import TOL, check_against_reference, count_fastattn_nodes, qkv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def inputs(*shape, dtype=torch.float32, transposed=False):
    return [t.detach().to(DEVICE).requires_grad_() for t in qkv(*shape, dtype=dtype, transposed=transposed)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 4, 2, 33, 47, 64), (1, 4, 4, 47, 33, 64), (2, 4, 1, 20, 20, 128),
                                   (1, 2, 2, 1, 70, 32)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_against_reference(dtype, shape, causal):
    """check_against_reference also backpropagates through lse (the two extra kernel calls)."""
    torch.manual_seed(0)
    check_against_reference(*inputs(*shape, dtype=dtype), "sdpa", causal=causal, scale=0.2, tol=TOL[dtype])


def test_layouts_and_head_dim_256():
    torch.manual_seed(0)
    q, k, v = inputs(2, 4, 2, 40, 40, 64, dtype=torch.bfloat16, transposed=True)
    out = fastattn.attention(q, k, v, causal=True, backend="sdpa")
    assert out.stride() == fastattn.attention(q, k, v, causal=True, backend="reference").stride()
    check_against_reference(q, k, v, "sdpa", causal=True, tol=TOL[torch.bfloat16])
    check_against_reference(*inputs(1, 2, 2, 24, 24, 256, dtype=torch.bfloat16), "sdpa", tol=TOL[torch.bfloat16])


def test_compile_sees_one_node():
    q, k, v = inputs(2, 4, 2, 33, 47, 32)

    def f(q, k, v):
        return fastattn.attention(q, k, v, causal=True, backend="sdpa").sum()

    assert count_fastattn_nodes(f, q, k, v) == 1
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


@pytest.mark.parametrize("call, why", [
    (dict(key_padding_mask=True), "padding mask may leave a query no key"),
    (dict(attn_mask=True), "attn_mask may leave a query no key"),
    (dict(dropout_p=0.1), "dropout not supported"),
])
def test_declines_what_it_cannot_promise(call, why):
    q, k, v = inputs(2, 2, 2, 16, 24, 32)
    if call.get("key_padding_mask"):
        call["key_padding_mask"] = torch.zeros(2, 24, dtype=torch.bool, device=DEVICE)
    if call.get("attn_mask"):
        call["attn_mask"] = torch.ones(16, 24, dtype=torch.bool, device=DEVICE)
    with pytest.raises(NoBackendError, match=why):
        fastattn.attention(q, k, v, backend="sdpa", **call)
    fastattn.attention(q, k, v, **call)  # auto takes fastattn's own kernels


def test_declines_no_keys_packed_and_decoding():
    q = torch.randn(1, 2, 4, 16, device=DEVICE)
    empty = torch.randn(1, 2, 0, 16, device=DEVICE)
    with pytest.raises(NoBackendError, match="no keys"):
        fastattn.attention(q, empty, empty, backend="sdpa")
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    packed = torch.randn(8, 2, 16, device=DEVICE)
    with pytest.raises(NoBackendError, match="packed"):
        fastattn.attention_varlen(packed, packed, packed, cu, cu, 5, 5, backend="sdpa")
    cache = torch.randn(1, 2, 32, 16, device=DEVICE)
    with pytest.raises(NoBackendError, match="KV-cache"):
        fastattn.attention_with_kvcache(q[:, :, :1], cache, cache, torch.tensor([5], dtype=torch.int32, device=DEVICE),
                                        backend="sdpa")


@pytest.mark.skipif(DEVICE != "cuda", reason="the CUDA kernels' limits")
def test_cuda_declines_head_dims_and_fp32_gqa():
    q, k, v = inputs(1, 4, 2, 16, 16, 64)
    with pytest.raises(NoBackendError, match="grouped-query"):
        fastattn.attention(q, k, v, backend="sdpa")
    q, k, v = inputs(1, 2, 2, 16, 16, 36, dtype=torch.bfloat16)
    with pytest.raises(NoBackendError, match="multiples of 8"):
        fastattn.attention(q, k, v, backend="sdpa")
