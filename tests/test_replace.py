"""Moving modules and whole models onto fastattn: from_torch, state_dict, replace_attention on
nn.Transformer and nn.TransformerEncoder (fast path and nested tensors included), the fused
path's promises, torch.compile."""
import copy
import math

import pytest
import torch
from torch import nn

import fastattn
from fastattn import MultiHeadAttention, replace_attention


def count_ops(fn, prefix):
    with torch.profiler.profile() as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages() if e.key.startswith(prefix)}


def largest_copy(fn) -> int:
    """The most elements any copy (copy_, clone, contiguous) touched while fn ran, leaving out
    the bias broadcast inside a linear layer's addmm."""
    def in_linear(e):
        while e is not None:
            if e.name == "aten::linear":
                return True
            e = e.cpu_parent
        return False

    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    sizes = [math.prod(shape) for e in prof.events()
             if e.name in ("aten::copy_", "aten::clone", "aten::contiguous") and not in_linear(e)
             for shape in e.input_shapes if shape]
    return max(sizes, default=0)


def test_from_torch_keeps_parameters_device_dtype_and_mode():
    mha = nn.MultiheadAttention(16, 4, kdim=12, vdim=10, add_bias_kv=True, dtype=torch.float64).eval()
    ours = MultiHeadAttention.from_torch(mha)
    assert isinstance(ours, MultiHeadAttention) and not ours.training
    assert all(a is b for a, b in zip(mha.parameters(), ours.parameters()))
    assert ours.k_proj_weight.dtype == torch.float64
    q, k, v = torch.randn(5, 2, 16, dtype=torch.float64), torch.randn(7, 2, 12, dtype=torch.float64), torch.randn(7, 2, 10, dtype=torch.float64)
    torch.testing.assert_close(ours(q, k, v)[0], mha(q, k, v)[0])
    ours.train()
    assert not mha.training  # a mode flag of its own


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = nn.MultiheadAttention(16, 4, bias=True, add_bias_kv=True)
    b = MultiHeadAttention(16, 4, bias=True, add_bias_kv=True)
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())
    c = nn.MultiheadAttention(16, 4, bias=True, add_bias_kv=True)
    c.load_state_dict(b.state_dict())
    for x, y in zip(a.state_dict().values(), c.state_dict().values()):
        assert torch.equal(x, y)


def test_same_initialisation():
    for kw in (dict(), dict(kdim=6, vdim=5, bias=False), dict(add_bias_kv=True)):
        torch.manual_seed(3)
        a = nn.MultiheadAttention(8, 2, **kw)
        torch.manual_seed(3)
        b = MultiHeadAttention(8, 2, **kw)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("batch_first", [True, False])
def test_fused_path_packs_qkv_and_copies_nothing(batch_first, monkeypatch):
    """need_weights=False self-attention: one QKV GEMM, padding as (B, S) + a causal flag,
    and no copy on the way in or out."""
    mha = MultiHeadAttention(32, 4, batch_first=batch_first)
    B, L = 3, 20
    x = torch.randn((B, L, 32) if batch_first else (L, B, 32))
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, 15:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    seen = {}
    real = fastattn.nn.multihead_attention.attention

    def spy(q, k, v, **kw):
        seen.update(kw, q_stride=q.stride())
        return real(q, k, v, **kw)

    monkeypatch.setattr(fastattn.nn.multihead_attention, "attention", spy)
    run = lambda: mha(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=False)  # noqa: E731
    assert count_ops(run, "aten::").get("aten::linear") == 2  # packed in-proj + out-proj
    assert seen["attn_mask"] is None and seen["causal"] is True
    assert seen["key_padding_mask"].shape == (B, L)
    assert largest_copy(run) < B * L * 32 // 4  # only mask-sized bookkeeping, no q/k/v/out copy


def test_fully_masked_rows_give_zeros_not_nan():
    mha = MultiHeadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 4, 8)
    pad = torch.tensor([[False] * 4, [True] * 4])
    out, w = mha(x, x, x, key_padding_mask=pad)
    assert torch.isfinite(out).all() and torch.all(w[1] == 0)
    torch.testing.assert_close(out[1], mha.out_proj.bias.expand(4, 8))


def test_is_causal_without_mask_means_causal():
    mha = MultiHeadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 6, 8)
    mask = nn.Transformer.generate_square_subsequent_mask(6)
    torch.testing.assert_close(mha(x, x, x, is_causal=True)[0], mha(x, x, x, attn_mask=mask)[0])


def test_dropout_in_training_only_and_reproducible():
    mha = MultiHeadAttention(16, 2, dropout=0.5, batch_first=True)
    x = torch.randn(2, 30, 16)
    torch.manual_seed(0)
    a = mha(x, x, x, need_weights=False)[0]
    torch.manual_seed(0)
    b = mha(x, x, x, need_weights=False)[0]
    c = mha(x, x, x, need_weights=False)[0]
    mha.eval()
    d = mha(x, x, x, need_weights=False)[0]
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.allclose(a, d)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(embed_dim=10, num_heads=3), ValueError, ["embed_dim", "num_heads=3", "10"]),
])
def test_bad_constructor(kwargs, error, words):
    with pytest.raises(error) as info:
        MultiHeadAttention(**kwargs)
    assert all(w in str(info.value) for w in words)


@pytest.mark.parametrize("call, error, words", [
    (lambda m, x: m(x, torch.randn(2, 5, 7), torch.randn(2, 5, 7)), ValueError, ["key", "6", "(2, 5, 7)"]),
    (lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError, ["key_padding_mask", "(2, 5)", "(2, 4)"]),
    (lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.int64)), TypeError, ["key_padding_mask", "int64"]),
    (lambda m, x: m(x, x, x, attn_mask=torch.zeros(3, 5, 5, dtype=torch.bool)), ValueError, ["attn_mask", "(4, 5, 5)", "(3, 5, 5)"]),
    (lambda m, x: m(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.int32)), TypeError, ["attn_mask", "int32"]),
    (lambda m, x: m(torch.randn(2, 5, 9), x, x), ValueError, ["query", "8", "(2, 5, 9)"]),
])
def test_bad_forward_input(call, error, words):
    m = MultiHeadAttention(8, 2, kdim=6, vdim=6, batch_first=True) if "key" in words[0] and "padding" not in words[0] else MultiHeadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    with pytest.raises(error) as info:
        call(m, x)
    assert all(w in str(info.value) for w in words), str(info.value)


def padded_batch(B, L, E, batch_first=True):
    x = torch.randn((B, L, E) if batch_first else (L, B, E))
    lengths = torch.randint(L // 3, L + 1, (B,))
    lengths[0] = L
    return x, torch.arange(L)[None, :] >= lengths[:, None]


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_transformer_encoder_fast_path_runs_on_fastattn(nested, train):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 3, enable_nested_tensor=nested)
    ours = replace_attention(copy.deepcopy(enc))
    enc.train(train), ours.train(train)
    x, pad = padded_batch(4, 17, 32)
    with torch.set_grad_enabled(train):
        want = enc(x, src_key_padding_mask=pad)
        got = ours(x, src_key_padding_mask=pad)
        valid = ~pad[..., None]
        torch.testing.assert_close(got * valid, want * valid, atol=2e-5, rtol=1e-4)
        if nested and not train:  # torch's nested path zeroes the padded positions
            assert torch.all(got[pad] == 0)
    ops = count_ops(lambda: ours(x, src_key_padding_mask=pad), "fastattn::")
    assert ops.get("fastattn::attention_forward") == 3


@pytest.mark.parametrize("train", [True, False])
def test_nn_transformer_swapped(train):
    torch.manual_seed(0)
    model = nn.Transformer(32, 4, 2, 2, 64, dropout=0.0, batch_first=True)
    ours = replace_attention(copy.deepcopy(model))
    assert sum(isinstance(m, MultiHeadAttention) for m in ours.modules()) == 6
    model.train(train), ours.train(train)
    src, src_pad = padded_batch(3, 11, 32)
    tgt, tgt_pad = padded_batch(3, 9, 32)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(9)
    args = dict(src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad,
                memory_key_padding_mask=src_pad, tgt_mask=tgt_mask, tgt_is_causal=True)
    want = model(src, tgt, **args)
    got = ours(src, tgt, **args)
    valid = ~tgt_pad[..., None]
    torch.testing.assert_close(got * valid, want * valid, atol=3e-5, rtol=1e-4)
    if train:
        (want * valid).sum().backward()
        (got * valid).sum().backward()
        for (name, p), q in zip(model.named_parameters(), ours.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=5e-5, rtol=1e-4, msg=name)


def test_replace_keeps_parameter_identity():
    model = nn.Transformer(16, 2, 1, 1, 32)
    params = list(model.parameters())
    assert replace_attention(model) is model
    assert all(a is b for a, b in zip(params, model.parameters()))


def test_compile_module_without_graph_breaks():
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, batch_first=True)
    x, pad = padded_batch(3, 12, 32)
    x.requires_grad_()

    def f(x):
        return mha(x, x, x, key_padding_mask=pad, is_causal=True, need_weights=False)[0]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    want = f(x)
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got.sum(), [x, mha.in_proj_weight])
    g_want = torch.autograd.grad(want.sum(), [x, mha.in_proj_weight])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)
