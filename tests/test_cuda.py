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


# Issue 36's non-finite policy (docs: fastattn.reference's policy): a NaN that reaches a row only
# through pairs a mask hides changes nothing; a seen one makes the row non-finite. Each kind puts
# batch row 1 under the mask it names (row 0 unpadded), and the NaN goes where some rows or keys
# cannot see it.
NAN_KINDS = {  # kind: (causal, batch row 1's padded keys of 150, where the NaN goes in row 1)
    "causal": (True, lambda j: j < 0, dict(q=70, k=100, v=60, dout=40)),
    "right": (False, lambda j: j >= 100, dict(q=30, k=110, v=105, dout=30)),
    "left": (False, lambda j: j < 50, dict(q=30, k=40, v=10, dout=30)),
    "scattered": (False, lambda j: j % 3 == 0, dict(q=30, k=42, v=9, dout=30)),
    "causal-left": (True, lambda j: j < 50, dict(q=20, k=40, v=30, dout=20)),  # rows 0..49 see no key
}


@pytest.mark.parametrize("where", ["q", "k", "v", "dout"])
@pytest.mark.parametrize("kind", list(NAN_KINDS) if DEVICE == "cuda" else ["causal", "scattered", "causal-left"])
@pytest.mark.parametrize("D", [64, 128] if DEVICE == "cuda" else [64])  # the emulator: CI's time budget
def test_hidden_nan_stays_out(kind, where, D):
    """NaN in a hidden key or value, or in the query or dO of a row some keys are hidden from:
    what no tainted row reaches equals float64 without the NaN; tainted rows are non-finite."""
    torch.manual_seed(0)
    causal, padded, at = NAN_KINDS[kind]
    B, H, Hkv, N = 2, 2, 1, 150
    kpm = torch.zeros(B, N, dtype=torch.bool)
    kpm[1] = padded(torch.arange(N))
    clean = [t.detach() for t in qkv(B, H, Hkv, N, N, D, dtype=torch.bfloat16)]
    dout = torch.randn(B, H, N, D).to(torch.bfloat16)
    # the NaN: a row of q or dO (batch 1, head 0), or a key's k or v (batch 1, kv head 0)
    bad = {"q": torch.zeros(B, H, N, dtype=torch.bool), "k": torch.zeros(B, Hkv, N, dtype=torch.bool),
           "dout": torch.zeros(B, H, N, dtype=torch.bool)}
    bad["v"] = bad["k"].clone()
    bad[where][1, 0, at[where]] = True
    q, k, v, do = (torch.where(bad[name][..., None], float("nan"), t)
                   for name, t in zip(("q", "k", "v", "dout"), (*clean, dout)))

    # Which rows are tainted and which keys a tainted row sees (policy.md 2), from visibility.
    idx = torch.arange(N)
    vis = (~kpm)[:, None, None, :] & ((idx[None, :] <= idx[:, None]) if causal else True)  # (B, 1, Nq, Nk)
    vis = vis.expand(B, H, N, N)
    sees_any = vis.any(-1)
    kv_bad = (bad["k"] | bad["v"]).repeat_interleave(H // Hkv, 1)
    tainted = sees_any & (bad["q"] | (vis & kv_bad[:, :, None, :]).any(-1))
    grad_tainted = tainted | (sees_any & bad["dout"])
    excused = (vis & grad_tainted[..., None]).any(2).view(B, Hkv, H // Hkv, N).any(2)  # (B, Hkv, Nk)

    leaves = [t.to(DEVICE).requires_grad_() for t in (q, k, v)]
    out, lse = fastattn.attention(*leaves, key_padding_mask=kpm.to(DEVICE), causal=causal, return_lse=True,
                                  backend=BACKEND)
    out.backward(do.to(DEVICE))
    ref_leaves = [t.double().requires_grad_() for t in clean]
    ref, ref_lse = fastattn.reference_attention(*ref_leaves, kpm, None, causal)
    ref.backward(dout.double())

    out, lse = out.cpu(), lse.cpu()
    assert not torch.isfinite(out[tainted]).all(-1).any(), "a tainted row is finite"
    ok = ~tainted
    assert torch.isfinite(out[ok]).all() and rel_err(out[ok], ref[ok]) < TOL[torch.bfloat16]
    assert torch.equal(torch.isinf(lse[ok]), torch.isinf(ref_lse[ok]))
    finite = ok & torch.isfinite(ref_lse)
    assert rel_err(lse[finite], ref_lse[finite], floor=finite.sum().item() ** 0.5) < TOL[torch.bfloat16]
    floor = 0.1 * dout.double().norm().item()
    for name, got, want, keep in (("q", leaves[0], ref_leaves[0], ~grad_tainted), ("k", leaves[1], ref_leaves[1], ~excused),
                                  ("v", leaves[2], ref_leaves[2], ~excused)):
        g = got.grad.cpu()[keep]
        assert torch.isfinite(g).all(), f"d{name} not finite where no tainted row reaches"
        assert rel_err(g, want.grad[keep], floor=floor) < 4 * TOL[torch.bfloat16], f"d{name}"
    if where == "dout" and excused.any():  # a seen NaN in dO reaches dv (the kernels poison P there)
        assert not torch.isfinite(leaves[2].grad.cpu()[excused]).all(-1).any()
