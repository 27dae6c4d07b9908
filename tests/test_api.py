"""The contract around the kernels: validation, dispatch, the custom op, dropout."""
import pytest
import torch

import fastattn
from fastattn.backends import REGISTRY, Problem, select_backend
from fastattn.call import Call
from fastattn.masks import key_ranges
from helpers import CPU_BACKENDS, TOL, count_fastattn_nodes, qkv, rel_err


def call(q=None, k=None, v=None, **kw):
    dq, dk, dv = qkv(2, 4, 2, 9, 11, 16)
    return fastattn.attention(dq if q is None else q, dk if k is None else k,
                              dv if v is None else v, **kw)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(q=torch.randn(4, 9, 16)), ValueError, ["query", "4 dims", "(4, 9, 16)"]),
    (dict(k=torch.randn(3, 2, 11, 16)), ValueError, ["batch 2", "3"]),
    (dict(v=torch.randn(2, 2, 11, 8)), ValueError, ["head dim 16", "8"]),
    (dict(k=torch.randn(2, 3, 11, 16), v=torch.randn(2, 3, 11, 16)), ValueError, ["dividing", "4 heads", "3"]),
    (dict(v=torch.randn(2, 1, 11, 16)), ValueError, ["value", "2 heads", "1"]),
    (dict(v=torch.randn(2, 2, 12, 16)), ValueError, ["value", "length 11", "12"]),
    (dict(q=torch.randn(2, 4, 9, 16).to(torch.float64)), TypeError, ["key", "float64", "float32"]),
    (dict(q=torch.randint(0, 3, (2, 4, 9, 16))), TypeError, ["query", "dtype", "int64"]),
    (dict(q=[1.0]), TypeError, ["query", "torch.Tensor", "list"]),
    (dict(q=torch.randn(2, 4, 9, 16, device="meta")), ValueError, ["key", "device", "meta"]),
    (dict(key_padding_mask=torch.zeros(2, 11)), TypeError, ["key_padding_mask", "bool", "float32"]),
    (dict(key_padding_mask=torch.zeros(2, 9, dtype=torch.bool)), ValueError, ["key_padding_mask", "(2, 11)", "(2, 9)"]),
    (dict(attn_mask=torch.zeros(9, 12, dtype=torch.bool)), ValueError, ["attn_mask", "(2, 4, 9, 11)", "(9, 12)"]),
    (dict(attn_mask=torch.zeros(3, 1, 9, 11)), ValueError, ["attn_mask", "broadcastable", "(3, 1, 9, 11)"]),
    (dict(attn_mask=torch.zeros(9, 11, dtype=torch.int32)), TypeError, ["attn_mask", "bool", "int32"]),
    (dict(attn_mask=torch.zeros(9, 11, device="meta")), ValueError, ["attn_mask", "device", "meta"]),
    (dict(causal=1), TypeError, ["causal", "bool", "int"]),
    (dict(scale=float("nan")), ValueError, ["scale", "finite", "nan"]),
    (dict(scale=1e300), ValueError, ["scale", "float32", "1e+300"]),  # inf in float32: was all-NaN output
    (dict(scale=True), TypeError, ["scale", "float", "bool"]),
    (dict(return_lse="no"), TypeError, ["return_lse", "bool", "str"]),
    (dict(return_lse=None), TypeError, ["return_lse", "bool", "NoneType"]),
    (dict(window_size=(2**63, 0)), ValueError, ["window_size", "2**63", "9223372036854775808"]),
    (dict(dropout_p=1.0), ValueError, ["dropout_p", "[0, 1)", "1.0"]),
    (dict(backend="cuda-magic"), ValueError, ["backend", "cpu", "cuda-magic"]),
])
def test_bad_input_names_the_argument(kwargs, error, words):
    with pytest.raises(error) as info:
        call(**kwargs)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_head_dim_zero_is_a_value_error_at_every_entry_point():
    q = torch.randn(2, 4, 3, 0)
    with pytest.raises(ValueError, match="head dim .* at least 1, got 0"):
        fastattn.attention(q, q, q)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="head dim .* at least 1, got 0"):
        fastattn.attention_varlen(q[0].transpose(0, 1), q[0].transpose(0, 1), q[0].transpose(0, 1), cu, cu, 3, 3)
    with pytest.raises(ValueError, match="head dim .* at least 1, got 0"):
        fastattn.attention_with_kvcache(q[:, :, :1], q, q, torch.full((2,), 3, dtype=torch.int32))


def test_head_dim_beyond_backend_limit():
    q, k, v = qkv(1, 2, 2, 5, 5, 512)
    with pytest.raises(ValueError, match=r"cpu: head_dim 512 > 256"):
        fastattn.attention(q, k, v, backend="cpu")
    assert fastattn.attention(q, k, v).shape == q.shape  # auto falls back to the reference


def test_dispatch_lists_every_backend_reason():
    problem = Problem("mps", torch.float32, 64)
    with pytest.raises(fastattn.NoBackendError) as info:
        select_backend("auto", problem)
    for name in REGISTRY:
        assert f"{name}:" in str(info.value)


def test_auto_picks_cpu_kernel_for_cpu_tensors():
    problem = Problem("cpu", torch.bfloat16, 128, mask_kind="bool", key_padding=True, causal=True, dropout=True,
                      needs_grad=True)
    assert select_backend("auto", problem).name == "cpu"
    assert {"cpu", "reference"} <= set(fastattn.available_backends())


def test_opcheck():
    q, k, v = qkv(2, 4, 2, 33, 70, 32, transposed=True)
    kpm = torch.rand(2, 70) < 0.3
    attn = (torch.rand(33, 70) < 0.9).expand(2, 4, 33, 70)
    for backend in CPU_BACKENDS:
        call = dict(key_padding=kpm, key_ranges=key_ranges(kpm), attn_mask=attn, causal=True, scale=0.2)
        torch.library.opcheck(torch.ops.fastattn.attention_forward.default, (q, k, v, backend), call)


def test_compile_sees_one_node():
    q, k, v = qkv(2, 4, 2, 33, 70, 32)
    kpm = torch.rand(2, 70) < 0.3

    def f(q, k, v):
        return fastattn.attention(q, k, v, key_padding_mask=kpm, causal=True).sum()

    assert count_fastattn_nodes(f, q, k, v) == 1
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    loss.backward()
    eager = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    f(q, k, v).backward()
    torch.testing.assert_close(loss, f(q, k, v))
    for a, t in zip(eager, (q, k, v)):  # the traced backward may hand the op dout in another layout
        torch.testing.assert_close(a, t.grad)


def test_profiler_shows_fastattn_ops():
    q, k, v = qkv(1, 2, 2, 17, 17, 16)
    with torch.profiler.profile() as prof:
        fastattn.attention(q, k, v).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert "fastattn::attention_forward" in names and "fastattn::attention_backward" in names


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_reproducible_under_manual_seed(backend):
    q, k, v = qkv(2, 2, 2, 40, 50, 16)
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(fastattn.attention(q, k, v, dropout_p=0.3, backend=backend))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_cpu_dropout_matches_reference_with_the_same_mask():
    """The kernel's dropout (forward and backward) equals the reference given its keep mask."""
    from fastattn import _C, ops, reference_attention

    torch.manual_seed(0)
    B, H, Nq, Nk, p = 2, 2, 70, 90, 0.25
    q, k, v = qkv(B, H, 1, Nq, Nk, 32)
    kpm = torch.rand(B, Nk) < 0.2
    seed = 1234
    out, lse = ops.attention_forward(q, k, v, "cpu", Call(key_padding=kpm, key_ranges=key_ranges(kpm), causal=True,
                                                          scale=0.3, dropout_p=p, seed=seed))
    keep = _C.dropout_keep_mask(seed, B, H, Nq, Nk, p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference_attention(*leaves, kpm, None, True, 0.3, keep.double() / (1 - p))
    assert rel_err(out, ref) < TOL[torch.float32]
    dout = torch.randn_like(ref)
    out.backward(dout.float())
    ref.backward(dout)
    for got, want in zip((q, k, v), leaves):
        assert rel_err(got.grad, want.grad) < 4 * TOL[torch.float32]


def test_dropout_is_unbiased():
    """E[dropout(P)] V = P V: the mean over many seeds approaches the no-dropout output."""
    q, k, v = (t.detach() for t in qkv(1, 1, 1, 8, 64, 16))
    mean = torch.stack([fastattn.attention(q, k, v, dropout_p=0.5) for _ in range(400)]).mean(0)
    assert rel_err(mean, fastattn.attention(q, k, v)) < 0.1


def test_compiled_calls_do_not_recompile_as_dispatch_learns():
    """Eager calls of other kinds between compiled ones change nothing torch.compile guards on."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    f = torch.compile(lambda q: fastattn.attention(q, q, q, causal=True), backend=counter, fullgraph=True)
    q = torch.randn(1, 2, 8, 16)
    f(q)
    f(q)
    fastattn.attention(q, q, q)  # new kinds of call, eagerly
    fastattn.attention(q.double(), q.double(), q.double())
    f(q)
    assert counter.frame_count == 1


def test_padding_mask_under_fake_tensors_and_tracing():
    """The padding mask's C++ fast path steps aside where no data exists (fake tensors) or where
    the mask's ops must be seen (make_fx)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    with FakeTensorMode():
        q, kpm = torch.randn(2, 2, 8, 16), torch.zeros(2, 8, dtype=torch.bool)
        assert fastattn.attention(q, q, q, key_padding_mask=kpm).shape == (2, 2, 8, 16)
    q, kpm = torch.randn(2, 2, 8, 16), torch.arange(8)[None, :] >= torch.tensor([[8], [5]])
    graph = make_fx(lambda q, m: fastattn.attention(q, q, q, key_padding_mask=m))(q, kpm)
    torch.testing.assert_close(graph(q, kpm), fastattn.attention(q, q, q, key_padding_mask=kpm))


def test_torch_function_modes_see_the_op():
    """With a __torch_function__ mode active the call goes through torch.ops, which the mode sees."""
    from torch.overrides import TorchFunctionMode

    class Seen(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.funcs = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.funcs.append(func)
            return func(*args, **(kwargs or {}))

    q = torch.randn(1, 2, 8, 16)
    with Seen() as mode:
        fastattn.attention(q, q, q)
    assert torch.ops.fastattn.attention_forward.default in mode.funcs


def test_scalar_arguments_keep_their_checks():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="dropout_p: expected a float"):
        fastattn.attention(q, q, q, dropout_p=torch.tensor(0.0))

    class Name(str):
        pass

    assert fastattn.attention(q, q, q, backend=Name("cpu")).shape == q.shape  # a str subclass is a str
