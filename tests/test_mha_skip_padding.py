"""MultiHeadAttention(skip_padded_queries=True): valid rows and gradients against torch (padded
batch) and the float64 torch module on each sequence alone, padded rows exactly zero, weights,
dropout, fallbacks and errors, no projection of padding, torch.compile."""
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastattn import MultiHeadAttention, replace_attention
from helpers import count_fastattn_nodes, rel_err

E, H, L = 32, 4, 12
LENGTHS = [12, 5, 0, 1, 9]  # a full row and a fully padded one
B = len(LENGTHS)


def padding(side: str) -> torch.Tensor:
    """(B, L) key_padding_mask, True = padding."""
    lens, pos = torch.tensor(LENGTHS)[:, None], torch.arange(L)
    if side == "right":
        return pos >= lens
    if side == "left":
        return pos < L - lens
    mask = torch.rand(B, L, generator=torch.Generator().manual_seed(0)) < 0.4  # holes
    mask[0], mask[2] = False, True
    return mask


def modules(batch_first: bool, **kw):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, batch_first=batch_first, **kw)
    return ref, MultiHeadAttention.from_torch(ref, skip_padded_queries=True)


def batch(batch_first: bool) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn((B, L, E) if batch_first else (L, B, E), requires_grad=True)


def in_layout(rows: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """A (B, L) mask in the input's (B, L) or (L, B) layout."""
    return rows if batch_first else rows.t()


def causal_kwargs(causal: str) -> dict:
    mask = nn.Transformer.generate_square_subsequent_mask(L)
    return {"none": {}, "mask": dict(attn_mask=mask), "hint": dict(attn_mask=mask, is_causal=True)}[causal]


def each_sequence_alone(ref, x, kpm, batch_first, causal):
    """torch's module in float64 on each sequence's valid tokens alone (unbatched), placed in the
    padded layout with zeros at the padding; and the float64 leaves (input, module)."""
    ref64 = copy.deepcopy(ref).double()
    x64 = x.detach().double().requires_grad_()
    xb = x64 if batch_first else x64.transpose(0, 1)
    out = torch.zeros_like(xb)
    for b in range(B):
        keep = (~kpm[b]).nonzero().squeeze(1)
        if len(keep):
            seq = xb[b, keep]
            mask = nn.Transformer.generate_square_subsequent_mask(len(keep), dtype=torch.float64)
            out[b, keep] = ref64(seq, seq, seq, need_weights=False, attn_mask=mask if causal != "none" else None)[0]
    return (out if batch_first else out.transpose(0, 1)), x64, ref64


@pytest.mark.parametrize("causal", ["none", "mask", "hint"])
@pytest.mark.parametrize("side", ["right", "left", "holes"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_valid_rows_and_gradients_match_torch(batch_first, side, causal):
    ref, ours = modules(batch_first)
    kpm, x = padding(side), batch(batch_first)
    valid = in_layout(~kpm, batch_first)
    out, w = ours(x, x, x, key_padding_mask=kpm, need_weights=False, **causal_kwargs(causal))
    assert w is None and out.shape == x.shape
    assert torch.all(out[~valid] == 0)
    torch_out = ref(x, x, x, key_padding_mask=kpm, need_weights=False, **causal_kwargs(causal))[0]
    torch.testing.assert_close(out[valid], torch_out[valid], rtol=1e-5, atol=1e-6)

    # Causal within each sequence, gradients of a loss over the valid rows only.
    want, x64, ref64 = each_sequence_alone(ref, x, kpm, batch_first, causal)
    assert rel_err(out, want) < 1e-5
    grad = torch.randn_like(out) * valid[..., None]
    got = torch.autograd.grad(out, [x, *ours.parameters()], grad)
    expected = torch.autograd.grad(want, [x64, *ref64.parameters()], grad.double())
    for g, e in zip(got, expected):
        assert rel_err(g, e) < 1e-5
    assert torch.all(got[0][~valid] == 0)  # padded tokens take no part


def test_default_path_keeps_padded_queries():
    """Off by default (and switched off), padded queries attend as in torch: non-zero rows."""
    ref, ours = modules(True)
    ours.skip_padded_queries = False
    kpm, x = padding("right"), batch(True)
    out = ours(x, x, x, key_padding_mask=kpm)[0]
    torch_out = ref(x, x, x, key_padding_mask=kpm)[0]
    finite = ~torch_out.isnan()  # the fully padded row: NaN in torch, zeros in fastattn
    torch.testing.assert_close(out[finite], torch_out[finite], rtol=1e-5, atol=1e-6)
    assert out[kpm & finite.all(-1)].abs().amin(-1).gt(0).all()
    assert not MultiHeadAttention(E, H).skip_padded_queries


def test_modules_swapped_by_replace_attention_can_opt_in():
    ref, _ = modules(True)
    swapped = replace_attention(copy.deepcopy(ref))
    kpm, x = padding("right"), batch(True)
    assert not swapped.skip_padded_queries
    assert not torch.all(swapped(x, x, x, key_padding_mask=kpm)[0][kpm] == 0)
    swapped.skip_padded_queries = True
    assert torch.all(swapped(x, x, x, key_padding_mask=kpm)[0][kpm] == 0)


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("causal", ["none", "hint"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_weights_are_torchs_with_padded_query_rows_zero(side, causal, average):
    ref, ours = modules(False)
    kpm, x = padding(side), batch(False)
    kw = dict(key_padding_mask=kpm, average_attn_weights=average, **causal_kwargs(causal))
    out, w = ours(x, x, x, **kw)
    torch_out, torch_w = ref(x, x, x, **kw)
    rows = ~kpm[:, :, None] if average else ~kpm[:, None, :, None]  # valid query rows
    assert w.shape == torch_w.shape
    torch.testing.assert_close(w, torch_w.masked_fill(~rows, 0.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ours(x, x, x, key_padding_mask=kpm, need_weights=False,
                                         **causal_kwargs(causal))[0])


def test_unbatched_is_a_batch_of_one():
    ref, ours = modules(False)
    kpm, x = padding("left")[1], batch(False)[:, 1]  # (L,) and (L, E)
    out, w = ours(x, x, x, key_padding_mask=kpm, is_causal=True)
    batched, w_batched = ours(x[:, None], x[:, None], x[:, None], key_padding_mask=kpm[None], is_causal=True)
    assert out.shape == (L, E) and w.shape == (L, L)
    # Not bitwise: the two shapes take different GEMM blockings (28 of 384 elements differed by
    # 4.5e-8 on an AMD EPYC).
    torch.testing.assert_close(out, batched[:, 0])
    torch.testing.assert_close(w, w_batched[0])
    assert torch.all(out[kpm] == 0) and torch.all(w[kpm] == 0)
    torch_out = ref(x, x, x, key_padding_mask=kpm, attn_mask=causal_kwargs("mask")["attn_mask"])[0]
    torch.testing.assert_close(out[~kpm], torch_out[~kpm], rtol=1e-5, atol=1e-6)


def test_dropout_in_training():
    """Each sequence draws what the module draws for it alone (sequence 0: the same seed)."""
    _, ours = modules(True, dropout=0.5)
    kpm, x = padding("left")[[1, 4]], batch(True)[[1, 4]]  # left padded, lengths 5 and 9
    keep = (~kpm[0]).nonzero().squeeze(1)
    torch.manual_seed(7)
    out = ours(x, x, x, key_padding_mask=kpm, need_weights=False, is_causal=True)[0]
    torch.manual_seed(7)
    seq = x[:1, keep]
    alone = ours(seq, seq, seq, need_weights=False, is_causal=True)[0]  # no padding: the default path
    torch.testing.assert_close(out[0, keep], alone[0], rtol=1e-5, atol=1e-6)
    assert torch.all(out[kpm] == 0)
    grad = torch.randn_like(alone[0])
    got = torch.autograd.grad(out[0, keep], list(ours.parameters()), grad)
    want = torch.autograd.grad(alone[0], list(ours.parameters()), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    ours.eval()
    assert not torch.allclose(out, ours(x, x, x, key_padding_mask=kpm, need_weights=False, is_causal=True)[0])


class MatmulRows(TorchDispatchMode):
    """The rows of every matrix product and of every attention call's queries."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.addmm.default:
            self.rows.append(args[1].shape[0])
        elif func is torch.ops.aten.mm.default:
            self.rows.append(args[0].shape[0])
        elif func is torch.ops.fastattn.attention_forward.default:
            self.rows.append(args[0].shape[2])  # (1, H, total, D)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("batch_first", [True, False])
def test_only_valid_tokens_are_projected_and_attended(batch_first):
    _, ours = modules(batch_first)
    kpm, x = padding("holes"), batch(batch_first)
    with torch.no_grad(), MatmulRows() as mode:
        ours(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert mode.rows == [int((~kpm).sum())] * 3  # in_proj, attention, out_proj


def test_all_padded_gives_zeros():
    _, ours = modules(True)
    kpm, x = torch.ones(B, L, dtype=torch.bool), batch(True)
    out = ours(x, x, x, key_padding_mask=kpm, need_weights=False, is_causal=True)[0]
    assert out.shape == x.shape and torch.all(out == 0)
    out.sum().backward()
    assert torch.all(x.grad == 0)


def test_calls_with_no_padded_query_take_the_default_path():
    ref, ours = modules(True)
    kpm, x = padding("right"), batch(True)
    memory = torch.randn(B, L + 3, E)
    for args, kw in [((x, memory, memory), dict(key_padding_mask=torch.zeros(B, L + 3, dtype=torch.bool))),
                     ((x, x, x), dict(attn_mask=causal_kwargs("mask")["attn_mask"])),
                     ((x, x.detach().clone(), x), dict(key_padding_mask=kpm))]:  # key is not query
        out, w = ours(*args, **kw)
        torch_out, torch_w = ref(*args, **kw)
        finite = ~torch_out.isnan()
        torch.testing.assert_close(out[finite], torch_out[finite], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w, torch_w.nan_to_num(), rtol=1e-5, atol=1e-6)


def test_float_padding_of_zero_and_neginf_is_padding():
    _, ours = modules(True)
    kpm, x = padding("left"), batch(True)
    float_kpm = torch.zeros(B, L).masked_fill(kpm, float("-inf"))
    assert torch.equal(ours(x, x, x, key_padding_mask=float_kpm)[0], ours(x, x, x, key_padding_mask=kpm)[0])


@pytest.mark.parametrize("case, words", [
    ("add_bias_kv", "add_bias_kv=False and add_zero_attn=False.*got add_bias_kv=True"),
    ("add_zero_attn", "add_zero_attn=False.*got add_bias_kv=False and add_zero_attn=True"),
    ("attn_mask", "attn_mask: with skip_padded_queries, expected a causal mask"),
    ("attn_mask3d", "attn_mask: with skip_padded_queries, expected a causal mask"),
    ("float_padding", "key_padding_mask: with skip_padded_queries, expected a bool mask or a float one of 0"),
])
def test_padding_that_cannot_be_packed_raises(case, words):
    _, ours = modules(True, **({case: True} if case.startswith("add") else {}))
    kpm, x = padding("right"), batch(True)
    kw = dict(key_padding_mask=kpm)
    if case == "attn_mask":
        kw["attn_mask"] = torch.rand(L, L, generator=torch.Generator().manual_seed(0)) < 0.3
    elif case == "attn_mask3d":
        kw["attn_mask"] = causal_kwargs("mask")["attn_mask"].expand(B * H, L, L)
    elif case == "float_padding":
        kw["key_padding_mask"] = torch.randn(B, L)
    with pytest.raises(ValueError, match=words):
        ours(x, x, x, **kw)


def test_flag_must_be_bool():
    with pytest.raises(TypeError, match="skip_padded_queries: expected a bool, got 1"):
        MultiHeadAttention(E, H, skip_padded_queries=1)
    with pytest.raises(TypeError, match="skip_padded_queries: expected a bool, got 'yes'"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(E, H), skip_padded_queries="yes")


def test_compiles_to_one_fastattn_node():
    _, ours = modules(True)
    kpm, x = padding("left"), batch(True)

    def f(x, kpm):
        return ours(x, x, x, key_padding_mask=kpm, need_weights=False, is_causal=True)[0]

    assert count_fastattn_nodes(f, x, kpm) == 1
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, kpm)
    torch.testing.assert_close(out, f(x, kpm))  # the graph's projections may decompose otherwise
    got = torch.autograd.grad(out.square().sum(), [x, *ours.parameters()])
    want = torch.autograd.grad(f(x, kpm).square().sum(), [x, *ours.parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
