"""Backend `cuda` (CUDA C++ tensor-core kernels) against the float64 reference and against the
Triton kernels. On a GPU with the extension's CUDA sources built: the kernels themselves
(gpu_check.sh runs this file). Elsewhere: the same kernels' source compiled for the CPU
emulation in tests/cuda_emu (fragment layouts, tiling, cp.async pipeline, masking), as backend
"cuda-emu" on CPU tensors, built once into build/cuda_emu with torch's cpp_extension; smaller
shapes there, and what needs a peer or big shapes waits for the GPU."""
import dataclasses
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import fastattn
from fastattn.backends import REGISTRY, CudaBackend
from helpers import TOL, check_against_reference, padding_mask, qkv, rel_err

ON_GPU = "cuda" in fastattn.available_backends()
BACKEND, DEVICE = ("cuda", "cuda") if ON_GPU else ("cuda-emu", "cpu")
HEADS = (2, 4, 2) if ON_GPU else (1, 2, 1)  # (B, H, Hkv): GQA either way
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs the GPU kernels (too slow, or no peer, under the emulation)")
ROOT = Path(__file__).resolve().parents[1]


class EmulatedCuda(CudaBackend):
    """The `cuda` backend's Python code, on CPU tensors, with the emulated kernels behind it."""

    name = "cuda-emu"
    caps = dataclasses.replace(CudaBackend.caps, devices=frozenset({"cpu"}))

    def __init__(self, module):
        self.module = module
        super().__init__()

    @property
    def ext(self):
        return self.module

    def probe(self):
        return None


@pytest.fixture(scope="module", autouse=True)
def emulated():
    if ON_GPU:
        yield
        return
    build = ROOT / "build" / "cuda_emu"
    build.mkdir(parents=True, exist_ok=True)
    # -fno-strict-aliasing: the kernels view registers and tiles through other types, as CUDA
    # compilers allow.
    module = cpp_extension.load(
        name="fastattn_cuda_emu", sources=[str(ROOT / "tests/cuda_emu/emu_glue.cpp"), str(ROOT / "csrc/params_from_tensors.cpp")],
        extra_include_paths=[str(ROOT / "tests/cuda_emu")], extra_cflags=["-O2", "-fno-strict-aliasing", "-DFASTATTN_CUDA_EMU"],
        build_directory=str(build))
    REGISTRY[BACKEND] = EmulatedCuda(module)
    yield
    del REGISTRY[BACKEND]


def inputs(*shape, dtype=torch.bfloat16, transposed=False):
    return [t.detach().to(DEVICE).requires_grad_() for t in qkv(*shape, dtype=dtype, transposed=transposed)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("lengths", [(1, 1), (7, 300), (129, 129), (300, 65), (257, 300),
                                     pytest.param((1000, 1000), marks=gpu_only)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_shapes(dtype, D, lengths, causal):
    """Partial tiles at both ends, several CTAs each way, the forward's three-stage key ring
    wrapping round, GQA."""
    torch.manual_seed(0)
    check_against_reference(*inputs(*HEADS, *lengths, D, dtype=dtype), BACKEND, causal=causal)


@pytest.mark.parametrize("pad", ["right", "left", "random"])
@pytest.mark.parametrize("causal", [False, True])
def test_padding(pad, causal):
    """Padding in each kernel form, with the (B, N, H, D) layout a module's projections give."""
    torch.manual_seed(0)
    kpm = padding_mask(pad, 3, 200).to(DEVICE)  # includes a full row and rows with no valid key
    check_against_reference(*inputs(3, 4 if ON_GPU else 1, 1, 150, 200, 128, transposed=True), BACKEND,
                            key_padding_mask=kpm, causal=causal)


@pytest.mark.parametrize("scale", [-0.2, 0.0], ids=str)
def test_scale_not_positive(scale):
    """The forward's exponent takes the scale in one FMA only for scale > 0; else it folds it in."""
    torch.manual_seed(0)
    check_against_reference(*inputs(1, 2, 2, 70, 90, 64), BACKEND, causal=True, scale=scale)


def test_fully_masked_rows_are_zero():
    q, k, v = inputs(2, 2, 2, 64, 80, 64)
    kpm = torch.zeros(2, 80, dtype=torch.bool, device=DEVICE)
    kpm[1] = True
    out, lse = fastattn.attention(q, k, v, key_padding_mask=kpm, return_lse=True, backend=BACKEND)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    out.float().sum().backward()
    assert torch.all(q.grad[1] == 0) and torch.all(k.grad[1] == 0) and torch.all(v.grad[1] == 0)


def test_no_query_or_no_key():
    """Grids of zero CTAs launch nothing."""
    for nq, nk in ((0, 40), (40, 0)):
        q, k, v = inputs(1, 2, 2, nq, nk, 64)
        out = fastattn.attention(q, k, v, backend=BACKEND)
        assert out.shape == (1, 2, nq, 64) and torch.all(out == 0)
        out.float().sum().backward()
        assert torch.all(q.grad == 0) and torch.all(k.grad == 0) and torch.all(v.grad == 0)


def test_unaligned_output_gradient():
    """Rows the kernels' 16-byte copies cannot read in place: copied once by the backend."""
    torch.manual_seed(0)
    q, k, v = inputs(1, 2, 2, 40, 40, 64)
    out = fastattn.attention(q, k, v, backend=BACKEND)
    dout = torch.randn(1, 2, 40, 65, dtype=out.dtype, device=DEVICE)[..., 1:]  # 2 bytes off alignment
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = torch.autograd.grad(fastattn.attention(q, k, v, backend="reference"), (q, k, v), dout)
    for got, want in zip(grads, ref):
        assert rel_err(got, want) < 4 * TOL[torch.bfloat16]


@gpu_only
@pytest.mark.skipif("triton" not in fastattn.available_backends(), reason="needs triton")
@pytest.mark.parametrize("causal", [False, True])
def test_agrees_with_triton(causal):
    torch.manual_seed(0)
    q, k, v = inputs(4, 8, 2, 1024, 1024, 128)
    kpm = padding_mask("right", 4, 1024).cuda()
    outs = [fastattn.attention(q, k, v, key_padding_mask=kpm, causal=causal, backend=b) for b in ("cuda", "triton")]
    assert rel_err(outs[0], outs[1]) < TOL[torch.bfloat16]


def test_backward_is_deterministic():
    """Bitwise equal gradients; under the emulation, although each launch runs its threads in
    another order."""
    q, k, v = inputs(*HEADS, 300, 300, 64)
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        fastattn.attention(q, k, v, causal=True, backend=BACKEND).float().square().sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_declines_what_it_cannot_run():
    q, k, v = inputs(1, 2, 2, 16, 16, 80)
    with pytest.raises(fastattn.NoBackendError, match="head_dim 80"):
        fastattn.attention(q, k, v, backend=BACKEND)
    q, k, v = inputs(1, 2, 2, 16, 16, 64)
    with pytest.raises(fastattn.NoBackendError, match="attn_mask"):
        fastattn.attention(q, k, v, attn_mask=torch.ones(16, 16, dtype=torch.bool, device=DEVICE), backend=BACKEND)
