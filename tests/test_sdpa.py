"""Backend `sdpa` (torch's kernels) against the float64 reference: forward, lse and gradients
(the lse gradient included), GQA, layouts, torch.compile; and every call it declines. On the CPU
through torch's CPU flash kernel; on a GPU the same tests run on CUDA through the kernel torch's
checks accept: cuDNN (16-bit, D <= 128), FlashAttention-2, the memory-efficient kernel (fp32).
Without a GPU, the GPU path runs on meta tensors with fakes for torch's checks: the order it asks
in, the ops it runs, what it asks about, and that what torch refuses it declines."""
import contextlib

import pytest
import torch

import fastattn
from fastattn import backends
from fastattn.backends import REGISTRY, NoBackendError, Problem, dispatch, sdpa, select_backend
from fastattn.call import Call
from helpers import TOL, check_against_reference, count_fastattn_nodes, param_id, qkv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def inputs(*shape, dtype=torch.float32, transposed=False):
    return [t.detach().to(DEVICE).requires_grad_() for t in qkv(*shape, dtype=dtype, transposed=transposed)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 4, 2, 33, 47, 64), (1, 4, 4, 47, 33, 64), (2, 4, 1, 20, 20, 128),
                                   (1, 2, 2, 1, 70, 32)], ids=str)
@pytest.mark.parametrize("scale", [0.2, -0.125])
def test_against_reference(dtype, shape, scale):
    """check_against_reference also backpropagates through lse (the two extra kernel calls)."""
    torch.manual_seed(0)
    check_against_reference(*inputs(*shape, dtype=dtype), "sdpa", scale=scale, tol=TOL[dtype])


def test_layouts_and_head_dim_256():
    torch.manual_seed(0)
    q, k, v = inputs(2, 4, 2, 40, 40, 64, dtype=torch.bfloat16, transposed=True)
    out = fastattn.attention(q, k, v, backend="sdpa")
    assert out.stride() == fastattn.attention(q, k, v, backend="reference").stride()
    check_against_reference(q, k, v, "sdpa", tol=TOL[torch.bfloat16])
    check_against_reference(*inputs(1, 2, 2, 24, 24, 256, dtype=torch.bfloat16), "sdpa", tol=TOL[torch.bfloat16])


def test_compile_sees_one_node():
    q, k, v = inputs(2, 4, 2, 33, 47, 32)

    def f(q, k, v):
        return fastattn.attention(q, k, v, backend="sdpa").sum()

    assert count_fastattn_nodes(f, q, k, v) == 1
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


@pytest.mark.parametrize("call, why", [
    (dict(key_padding_mask=True), "padding mask may leave a query no key"),
    (dict(attn_mask=True), "attn_mask may leave a query no key"),
    (dict(dropout_p=0.1), "dropout not supported"),
    (dict(causal=True), "causal: torch's kernels multiply a future key's value by p = 0"),
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


@pytest.mark.parametrize("shape", [(1, 2, 2, 0, 5, 16), (0, 2, 2, 4, 5, 16), (0, 4, 2, 0, 5, 16)], ids=str)
def test_no_query_gives_empty_outputs(shape):
    """Nq = 0 made torch's CPU kernel divide by zero (SIGFPE, the process gone); B or H = 0 failed
    in a reshape (H = 0 is a ValueError naming key). Each gives empty out and lse, and zero
    gradients, as the cpu backend does."""
    q, k, v = inputs(*shape)
    out, lse = fastattn.attention(q, k, v, return_lse=True, backend="sdpa")
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    (out.sum() + lse.sum()).backward()
    assert all(t.grad is not None and not t.grad.any() for t in (q, k, v))


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
def test_cuda_declines_head_dims_not_in_8s():
    q, k, v = inputs(1, 2, 2, 16, 16, 36, dtype=torch.bfloat16)
    with pytest.raises(NoBackendError, match="multiples of 8"):
        fastattn.attention(q, k, v, backend="sdpa")


@pytest.mark.skipif(DEVICE != "cuda", reason="torch's checks on a GPU")
def test_cuda_declines_what_torch_refuses(monkeypatch):
    """torch refuses meta tensors there (check_all_tensors_on_device): dispatch asks about CUDA ones."""
    monkeypatch.setattr(backends, "_CHOSEN", {})
    assert REGISTRY["sdpa"].stand_in_device == "cuda"
    assert sdpa.problem_choice("cuda", torch.float32, 64, 16, 16, False) == "efficient"
    q, k, v = inputs(1, 2, 2, 16, 16, 64)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # torch's fused kernels off
        with pytest.raises(NoBackendError, match="refuse its efficient kernels"):
            fastattn.attention(q, k, v, backend="sdpa")


# torch's checks of its CUDA kernels, and the aten ops that run them
CAN_USE = {"cudnn": "can_use_cudnn_attention", "flash": "can_use_flash_attention",
           "efficient": "can_use_efficient_attention"}
ATEN = {"cudnn": "_scaled_dot_product_cudnn_attention", "flash": "_scaled_dot_product_flash_attention",
        "efficient": "_scaled_dot_product_efficient_attention"}
ALL = set(CAN_USE)


class TorchChecks:
    """Fakes for torch's checks: they accept the kernels in `accepted` and record what they were
    asked, (kernel, SDPAParams)."""

    def __init__(self, monkeypatch):
        self.accepted, self.asked = set(), []
        for kernel, name in CAN_USE.items():
            monkeypatch.setattr(torch.backends.cuda, name, lambda params, debug=False, kernel=kernel:
                                self.asked.append((kernel, params)) or kernel in self.accepted)

    def kernels_asked(self):
        return [kernel for kernel, _ in self.asked]


@pytest.fixture
def torch_checks(monkeypatch):
    """TorchChecks, asked about meta stand-ins by dispatch, with the dispatch and call-time answers
    forgotten around it."""
    monkeypatch.setattr(REGISTRY["sdpa"], "stand_in_device", "meta")
    monkeypatch.setattr(backends, "_CHOSEN", {})
    monkeypatch.setattr(sdpa, "_CHOICES", {})
    return TorchChecks(monkeypatch)


@pytest.fixture
def aten_calls(monkeypatch):
    """The names of the aten ops the backend calls."""
    calls = []

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(torch.ops.aten, name)

    monkeypatch.setattr(sdpa, "aten", Spy())
    return calls


def cuda_problem(dtype=torch.bfloat16, head_dim=64, gqa=False, nq=64, nk=64):
    return Problem("cuda", dtype, head_dim, needs_grad=True, nq=nq, nk=nk, gqa=gqa)


def meta_qkv(dtype, B=2, H=4, Hkv=2, Nq=40, Nk=40, D=64):
    """Tensors that take the GPU path (not the CPU's) without a GPU; aten's ops have meta kernels."""
    q = torch.empty(B, H, Nq, D, dtype=dtype, device="meta")
    k, v = (torch.empty(B, Hkv, Nk, D, dtype=dtype, device="meta") for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("dtype, head_dim, accepted, asked, chosen", [
    (torch.bfloat16, 64, ALL, ["cudnn"], "cudnn"),
    (torch.float16, 128, {"flash", "efficient"}, ["cudnn", "flash"], "flash"),
    (torch.bfloat16, 64, {"efficient"}, ["cudnn", "flash", "efficient"], "efficient"),
    (torch.bfloat16, 64, set(), ["cudnn", "flash", "efficient"], None),
    (torch.bfloat16, 192, ALL, ["flash"], "flash"),  # cuDNN's only up to D 128
    (torch.float32, 64, ALL, ["efficient"], "efficient"),  # the only one for fp32
    (torch.bfloat16, 36, ALL, [], None),  # D not in 8s: none to ask about
], ids=param_id)
def test_asks_torch_in_the_backends_order(torch_checks, dtype, head_dim, accepted, asked, chosen):
    torch_checks.accepted |= accepted
    assert sdpa.problem_choice("meta", dtype, head_dim, 64, 64, False) == chosen
    assert torch_checks.kernels_asked() == asked


@pytest.mark.parametrize("dtype, head_dim, gqa", [
    (torch.bfloat16, 64, False), (torch.float16, 128, True), (torch.float32, 32, False),
    (torch.bfloat16, 256, True)], ids=str)
def test_dispatch_asks_torch_about_the_problem(torch_checks, dtype, head_dim, gqa):
    REGISTRY["sdpa"].reasons(cuda_problem(dtype, head_dim, gqa, nq=32, nk=128))
    assert torch_checks.kernels_asked() == list(sdpa.cuda_kernels(dtype, head_dim)) != []
    for _, params in torch_checks.asked:
        q, k, v = params.query, params.key, params.value
        assert q.dtype == k.dtype == v.dtype == dtype
        assert q.shape[-1] == k.shape[-1] == v.shape[-1] == head_dim and q.stride(-1) == k.stride(-1) == 1
        assert (q.shape[2], k.shape[2]) == (32, 128)
        assert not params.is_causal and params.enable_gqa == gqa and (q.shape[1] != k.shape[1]) == gqa
        assert params.dropout == 0.0 and params.attn_mask is None
        assert q.requires_grad  # as for training: the backward takes the forward's kernel
        assert q.device.type == "meta"


def test_dispatch_passes_over_sdpa_where_torch_refuses(torch_checks, monkeypatch):
    monkeypatch.setattr(dispatch, "ranking", lambda *problem: ("sdpa", "reference"))
    problem = cuda_problem()
    torch_checks.accepted.add("efficient")
    assert REGISTRY["sdpa"].reasons(problem) == []
    assert select_backend("auto", problem).name == "sdpa"
    torch_checks.accepted.clear()
    backends._CHOSEN.clear()
    refusal = "torch's checks (torch.backends.cuda.can_use_*_attention) refuse its cudnn, flash, efficient kernels"
    assert any(refusal in why for why in REGISTRY["sdpa"].reasons(problem))
    assert select_backend("auto", problem).name == "reference"
    with pytest.raises(NoBackendError) as declined:
        select_backend("sdpa", problem)
    assert f"sdpa: {refusal}" in str(declined.value)


def test_dispatch_asks_torch_outside_the_compiled_graph(torch_checks):
    torch_checks.accepted.add("flash")
    problem = cuda_problem()
    compiled = torch.compile(lambda x: x + len(REGISTRY["sdpa"].reasons(problem)), fullgraph=True, backend="eager")
    assert compiled(torch.zeros(1)).item() == 0
    assert torch_checks.kernels_asked() == ["cudnn", "flash"]  # while tracing
    torch_checks.accepted.clear()
    assert compiled(torch.zeros(1)).item() == 0  # the graph holds the answer, not the question
    assert torch_checks.kernels_asked() == ["cudnn", "flash"]


def test_without_a_gpu_dispatch_judges_by_head_dims_alone(torch_checks, monkeypatch):
    """As where a GPU's benchmark record is read: this machine's torch has nothing to say about it."""
    monkeypatch.setattr(REGISTRY["sdpa"], "stand_in_device", None)
    assert REGISTRY["sdpa"].reasons(cuda_problem()) == []
    assert REGISTRY["sdpa"].reasons(cuda_problem(head_dim=36)) == [
        "torch's CUDA kernels take head dims that are multiples of 8 up to 256"]
    assert torch_checks.asked == []


@pytest.mark.parametrize("dtype, accepted, kernel", [
    (torch.bfloat16, ALL, "cudnn"), (torch.bfloat16, {"flash", "efficient"}, "flash"),
    (torch.float16, {"efficient"}, "efficient"), (torch.float32, ALL, "efficient")], ids=param_id)
def test_forward_and_backward_run_the_kernel_torch_takes(torch_checks, aten_calls, dtype, accepted, kernel):
    """Asked once, about the call's own tensors; the backward runs the forward's kernel even where
    torch would now answer otherwise."""
    torch_checks.accepted |= accepted
    q, k, v = meta_qkv(dtype, Nq=40, Nk=56)
    backend = REGISTRY["sdpa"]
    out, lse = backend.forward(q, k, v, Call(scale=0.125))
    assert (out.shape, lse.shape) == (q.shape, q.shape[:3])
    asked = torch_checks.kernels_asked()
    _, params = torch_checks.asked[-1]
    assert params.query.shape == q.shape and params.key.shape == params.value.shape == k.shape
    assert not params.is_causal and params.enable_gqa and params.query.device.type == "meta"
    torch_checks.accepted.clear()
    backend.backward(torch.empty_like(out), None, q, k, v, out, lse, Call(scale=0.125))
    assert aten_calls == [ATEN[kernel], ATEN[kernel] + "_backward"]
    assert torch_checks.kernels_asked() == asked


def test_asks_again_about_what_torch_reads_anew(torch_checks):
    """The call-time answers are kept by length, layout, alignment and dtype."""
    torch_checks.accepted |= ALL
    q, k, v = meta_qkv(torch.bfloat16)
    offset = torch.empty(q.numel() + 4, dtype=q.dtype, device="meta")[4:].view(q.shape)
    heads_outer = q.transpose(1, 2).contiguous().transpose(1, 2)  # other strides
    for args in [(q, k, v), (q[:, :, :20], k, v), (q, k[:, :, :20], v[:, :, :20]), (heads_outer, k, v),
                 (q, k, heads_outer[:, :2]), (offset, k, v), (q.float(), k.float(), v.float())]:
        asked = len(torch_checks.asked)
        for _ in range(2):
            REGISTRY["sdpa"].forward(*args, Call(scale=0.125))
        assert len(torch_checks.asked) == asked + 1  # once, by its first choice


def test_asks_about_a_call_on_its_device(torch_checks, monkeypatch):
    """torch's checks read the current device's properties: a call's are those of q's device."""
    entered = []

    @contextlib.contextmanager
    def device(index):
        entered.append((index, len(torch_checks.asked)))
        yield
        entered.append(len(torch_checks.asked))

    monkeypatch.setattr(torch.cuda, "device", device)
    torch_checks.accepted.add("flash")
    q, k, v = meta_qkv(torch.bfloat16)
    REGISTRY["sdpa"].forward(q, k, v, Call(scale=0.125))
    assert entered == [(q.get_device(), 0), 2]  # cuDNN, then flash, asked in there


def test_runs_no_kernel_for_a_call_torch_refuses(torch_checks, aten_calls):
    q, k, v = meta_qkv(torch.bfloat16)
    with pytest.raises(RuntimeError, match="refuse its cudnn, flash, efficient kernels for this call"):
        REGISTRY["sdpa"].forward(q, k, v, Call(scale=0.125))
    assert aten_calls == []


def test_torch_kernel_names_what_records_timed():
    """fastattn.bench.dispatch_sweep reads records made before the backend by the kernel names."""
    bf16, fp32 = torch.bfloat16, torch.float32
    assert sdpa.torch_kernel("cpu", fp32, 36, True, False) == "flash"
    assert [sdpa.torch_kernel("cuda", bf16, 128, False, cudnn) for cudnn in (True, False)] == ["cudnn", "flash"]
    assert sdpa.torch_kernel("cuda", bf16, 256, True, True) == "flash"
    assert [sdpa.torch_kernel("cuda", fp32, 64, gqa, True) for gqa in (False, True)] == ["efficient", None]
    assert sdpa.torch_kernel("cuda", bf16, 36, False, True) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gqa", [False, True])
def test_torch_answers_about_meta_tensors(dtype, gqa):
    """The real checks take meta tensors without raising, and refuse them (check_all_tensors_on_device
    wants CUDA ones; a build without CUDA refuses everything): dispatch's stand-ins are CUDA tensors."""
    q, k, v = meta_qkv(dtype, Hkv=2 if gqa else 4)
    params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, gqa)
    assert [getattr(torch.backends.cuda, name)(params) for name in CAN_USE.values()] == [False] * 3
    assert sdpa.problem_choice("meta", dtype, 64, 64, 64, gqa) is None
    assert REGISTRY["sdpa"].stand_in_device == ("cuda" if torch.cuda.is_available() else None)


def test_inference_tensors_are_asked_about_without_a_gradient(torch_checks):
    torch_checks.accepted.add("flash")
    with torch.inference_mode():
        q, k, v = meta_qkv(torch.bfloat16)
    with torch.no_grad():
        assert sdpa.torch_choice(q, k, v) == "flash"
    assert not torch_checks.asked[-1][1].query.requires_grad


def test_asks_again_when_torchs_switches_move(torch_checks):
    torch_checks.accepted |= ALL
    q, k, v = meta_qkv(torch.bfloat16)
    REGISTRY["sdpa"].forward(q, k, v, Call(scale=0.125))
    asked = len(torch_checks.asked)
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        REGISTRY["sdpa"].forward(q, k, v, Call(scale=0.125))
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
    assert len(torch_checks.asked) == asked + 1
