"""Backend `triton` against the float64 reference, forward and gradients. Without a GPU the
kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set in conftest):
small shapes whose lengths straddle the 32-wide interpreter tiles. On a GPU the same tests run
on CUDA, plus the `gpu`-marked ones at real sizes."""
import contextlib
import importlib.util

import pytest
import torch

import fastattn
from fastattn.call import Call
from fastattn.masks import key_ranges
from helpers import TOL, check_against_reference, padding_mask, qkv, rel_err, stable_seed
from test_correctness import make_masks

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif("triton" not in fastattn.available_backends(),
                                reason="triton backend unavailable")
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def inputs(*shape, dtype=torch.float32, transposed=False):
    return [t.detach().to(DEVICE).requires_grad_() for t in qkv(*shape, dtype=dtype, transposed=transposed)]


def to_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [
    (2, 4, 2, 70, 45, 64), (1, 3, 1, 33, 97, 16), (1, 2, 2, 45, 70, 80), (2, 2, 1, 1, 33, 32),
    (1, 2, 2, 64, 1, 16),
], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_shapes(dtype, shape, causal):
    torch.manual_seed(0)
    check_against_reference(*inputs(*shape, dtype=dtype), "triton", causal=causal, tol=TOL[dtype])


@pytest.mark.parametrize("kind", ["pad-right", "pad-left", "pad-random", "bool", "float",
                                  "bool+pad+causal", "float+pad-random", "float+causal",
                                  "bool-broadcast", "rows-fully-masked"])
@pytest.mark.parametrize("lengths", [(70, 45), (33, 97)], ids=str)
def test_masks(kind, lengths):
    torch.manual_seed(stable_seed(kind))
    B, H, Hkv, D = 2, 4, 2, 32
    kpm, attn, causal = make_masks(kind, B, H, *lengths)
    kpm, attn = to_device(kpm, attn)
    check_against_reference(*inputs(B, H, Hkv, *lengths, D), "triton", key_padding_mask=kpm,
                            attn_mask=attn, causal=causal, tol=TOL[torch.float32])


def test_rows_of_d_with_a_stride_and_an_expanded_gradient():
    """The kernels read rows of D contiguously: other layouts are copied first (q with D as its
    outer dim; the gradient of out.sum(), whose strides are all 0)."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, 33, device=DEVICE).transpose(-1, -2).requires_grad_()
    k, v = (torch.randn(2, 2, 45, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    assert q.stride(-1) != 1
    check_against_reference(q, k, v, "triton", causal=True, tol=TOL[torch.float32])
    q.grad = k.grad = v.grad = None
    fastattn.attention(q, k, v, backend="triton").sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    fastattn.reference_attention(*leaves)[0].sum().backward()
    for got, want in zip((q, k, v), leaves):
        assert rel_err(got.grad, want.grad) < TOL[torch.float32]


def test_transposed_inputs_and_bf16_padding():
    torch.manual_seed(0)
    q, k, v = inputs(2, 4, 2, 70, 45, 64, dtype=torch.bfloat16, transposed=True)
    check_against_reference(q, k, v, "triton", key_padding_mask=to_device(padding_mask("left", 2, 45))[0],
                            causal=True, tol=TOL[torch.bfloat16])


def test_fully_masked_rows_are_zero():
    q, k, v = inputs(2, 2, 2, 40, 50, 16)
    kpm = torch.zeros(2, 50, dtype=torch.bool, device=DEVICE)
    kpm[1] = True
    out, lse = fastattn.attention(q, k, v, key_padding_mask=kpm, return_lse=True, backend="triton")
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    out.sum().backward()
    assert torch.all(q.grad[1] == 0) and torch.all(k.grad[1] == 0) and torch.all(v.grad[1] == 0)


def test_dropout_matches_reference_with_the_kernels_mask():
    from fastattn import ops, reference_attention
    from fastattn.triton.attention import dropout_keep_mask

    torch.manual_seed(0)
    B, H, Nq, Nk, p, seed = 2, 2, 40, 50, 0.3, 77
    q, k, v = inputs(B, H, 1, Nq, Nk, 16)
    out, _ = ops.attention_forward(q, k, v, "triton", Call(causal=True, scale=0.25, dropout_p=p, seed=seed))
    keep = dropout_keep_mask(seed, B, H, Nq, Nk, p, DEVICE)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference_attention(*leaves, None, None, True, 0.25, keep.double() / (1 - p))
    assert rel_err(out, ref) < TOL[torch.float32]
    dout = torch.randn_like(ref)
    out.backward(dout.float())
    ref.backward(dout)
    for got, want in zip((q, k, v), leaves):
        assert rel_err(got.grad, want.grad) < 4 * TOL[torch.float32]


def test_dropout_reproducible_under_manual_seed():
    q, k, v = (t.detach() for t in inputs(1, 2, 2, 33, 33, 16))
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(fastattn.attention(q, k, v, dropout_p=0.5, backend="triton"))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_backward_is_deterministic():
    q, k, v = inputs(1, 4, 1, 70, 70, 32)
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        fastattn.attention(q, k, v, causal=True, backend="triton").square().sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_auto_never_picks_the_interpreter():
    if CUDA:
        pytest.skip("on a GPU, auto picks triton for CUDA tensors")
    q, k, v = inputs(1, 1, 1, 8, 8, 16)
    with torch.profiler.profile() as prof:
        fastattn.attention(q, k, v)
    assert any(e.key == "fastattn::attention_forward" for e in prof.key_averages())
    from fastattn.backends import Problem, select_backend
    assert select_backend("auto", Problem("cpu", torch.float32, 16)).name == "cpu"


def test_opcheck():
    q, k, v = inputs(2, 2, 1, 33, 40, 16, transposed=True)
    kpm = torch.rand(2, 40, device=DEVICE) < 0.3
    torch.library.opcheck(torch.ops.fastattn.attention_forward.default, (q, k, v, "triton"),
                          dict(key_padding=kpm, key_ranges=key_ranges(kpm), causal=True, scale=0.3))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_real_sizes_on_gpu(dtype, D, causal):
    torch.manual_seed(0)
    B, H, N = 2, 8, 2048 if D < 256 else 1024
    kpm = padding_mask("right", B, N).cuda()
    check_against_reference(*inputs(B, H, H // 2, N, N, D, dtype=dtype), "triton",
                            key_padding_mask=kpm, causal=causal, tol=TOL[dtype])


def test_kernels_compile_for_sm90_without_spilling():
    """What an H100 would run, read without one: every kernel has spill-free configs at D = 64
    and 128, and the forward's dots are wgmma; every Gluon variant (forward and backward) has wgmma, TMA and setmaxnreg
    and does not spill (python -m fastattn report prints it all)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-m", "fastattn", "report", "--check"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "_fwd_kernel" in result.stdout and "FAIL" not in result.stdout
    assert "Gluon, sm_90a" in result.stdout and " dkdv " in result.stdout or not importlib.util.find_spec("triton.experimental.gluon")


def test_fp32_dots_3xtf32_unless_torchs_switch_or_ours_says_otherwise(monkeypatch):
    """3xTF32 by default; TF32 where opted into, through the new settings or the legacy ones
    (reading the legacy flag after the new settings were used raises in torch); IEEE where asked
    for, by torch's switch or FASTATTN_FP32_DOTS."""
    from fastattn.triton import attention as ta

    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        matmul.fp32_precision = "none"
        assert ta.dot_precision(torch.float32) == "tf32x3"
        matmul.fp32_precision = "ieee"
        assert ta.dot_precision(torch.float32) == "ieee"
        matmul.fp32_precision = "tf32"
        assert ta.dot_precision(torch.float32) == "tf32"
        matmul.fp32_precision = "ieee"
        torch.set_float32_matmul_precision("high")
        assert ta.dot_precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("highest")
        assert ta.dot_precision(torch.float32) == "ieee"
        assert ta.dot_precision(torch.float16) == "tf32"  # 16-bit operands: the setting does not apply
        matmul.fp32_precision = "none"
        monkeypatch.setattr(ta, "FP32_DOTS", "ieee")
        assert ta.dot_precision(torch.float32) == "ieee"
        monkeypatch.setattr(ta, "FP32_DOTS", "fast")
        with pytest.raises(ValueError, match="FASTATTN_FP32_DOTS"):
            ta.dot_precision(torch.float32)
    finally:
        matmul.fp32_precision = saved


def test_launches_go_to_the_tensors_gpu(monkeypatch):
    """Triton launches on the current device: forward, backward and decoding make q's current
    first (on_device), so tensors on cuda:1 never launch on cuda:0."""
    from fastattn.backends import triton as triton_backend

    class Cuda1:
        device = torch.device("cuda", 1)

    made_current = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: made_current.append(d) or contextlib.nullcontext())
    triton_backend.on_device(Cuda1())
    assert made_current == [torch.device("cuda", 1)]
    made_current.clear()
    triton_backend.on_device(type("Cuda0", (), {"device": torch.device("cuda", 0)})())
    assert not made_current  # already current: no device switch on the hot path

    guarded = []
    real = triton_backend.on_device
    monkeypatch.setattr(triton_backend, "on_device", lambda t: guarded.append(t.shape) or real(t))
    q, k, v = inputs(1, 2, 2, 5, 7, 16)
    fastattn.attention(q, k, v, backend="triton").sum().backward()
    cache = torch.zeros(1, 2, 8, 16, device=DEVICE)
    fastattn.attention_with_kvcache(q[:, :, :1].detach(), cache, cache.clone(),
                                    torch.tensor([3], dtype=torch.int32, device=DEVICE), backend="triton")
    assert len(guarded) == 3  # forward, backward, decoding
