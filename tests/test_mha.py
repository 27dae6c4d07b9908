"""fastattn.MultiHeadAttention against torch.nn.MultiheadAttention: randomised parity over
every constructor option and mask kind (outputs, weights, gradients of inputs and parameters),
keys appended after a causal mask, and nested tensors."""
import math
import random

import pytest
import torch
from torch import nn

from fastattn import MultiHeadAttention

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")


def random_config(rng: random.Random, fast: bool) -> dict:
    """Constructor options; fast: only those torch's inference fast path takes."""
    heads = rng.choice([2, 4] if fast else [1, 2, 4])
    embed = heads * rng.choice([2, 4, 8])
    return dict(
        embed_dim=embed, num_heads=heads, bias=rng.random() < 0.8,
        add_bias_kv=not fast and rng.random() < 0.25, add_zero_attn=not fast and rng.random() < 0.25,
        kdim=None if fast else rng.choice([None, None, embed + 3]),
        vdim=None if fast else rng.choice([None, None, embed + 5]),
        batch_first=fast or rng.random() < 0.5, dropout=rng.choice([0.0, 0.0, 0.5]),
    )


def random_call(rng: random.Random, cfg: dict, mha: nn.MultiheadAttention, fast: bool):
    """Inputs and forward kwargs for one call. Some queries may see no key (torch: NaN)."""
    B, L = rng.randint(1, 3), rng.randint(1, 9)
    modes = ["self", "self", "kv", "separate"] if mha._qkv_same_embed_dim else ["separate"]
    mode = "self" if fast else rng.choice(modes)
    S = L if mode == "self" else rng.randint(1, 9)
    batched = fast or rng.random() < 0.8
    E, kdim, vdim = cfg["embed_dim"], mha.kdim, mha.vdim

    def seq(n, dim):
        shape = ((B, n, dim) if cfg["batch_first"] else (n, B, dim)) if batched else (n, dim)
        return torch.randn(shape, requires_grad=True)

    query = seq(L, E)
    key = query if mode == "self" else seq(S, kdim)
    value = key if mode in ("self", "kv") else seq(S, vdim)

    kw = dict(need_weights=rng.random() < 0.5, average_attn_weights=rng.random() < 0.5)
    pad_kind = rng.choice(["none", "bool", "float-inf", "float"])
    hidden = rng.choice([0.2, 0.6])  # how much of a random mask is hidden
    if pad_kind != "none":
        pad = torch.rand(B, S) < hidden
        if pad_kind == "float-inf":
            pad = torch.zeros(B, S).masked_fill(pad, -math.inf)
        elif pad_kind == "float":
            pad = torch.randn(B, S)
        kw["key_padding_mask"] = pad if batched else pad[0]
    attn_kind = rng.choice(["none", "bool2d", "float2d", "bool3d", "float3d", "causal", "causal-hint"])
    H = cfg["num_heads"]
    if attn_kind.startswith("causal") and L == S:
        kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L)
        if rng.random() < 0.5:
            kw["attn_mask"] = kw["attn_mask"] == -math.inf  # the same mask as bool
        kw["is_causal"] = attn_kind == "causal-hint"
    elif attn_kind.startswith("bool"):
        shape = (L, S) if attn_kind == "bool2d" or not batched else (B * H, L, S)
        kw["attn_mask"] = torch.rand(shape) < hidden
    elif attn_kind.startswith("float"):
        shape = (L, S) if attn_kind == "float2d" or not batched else (B * H, L, S)
        kw["attn_mask"] = torch.randn(shape).masked_fill(torch.rand(shape) < hidden, -math.inf)
    return (query, key, value), kw


def torch_kwargs(mha: nn.MultiheadAttention, kw: dict) -> dict:
    """kw for torch, giving the output fastattn should match. With the is_causal hint, no
    key_padding_mask and need_weights=False, torch drops attn_mask for SDPA's top-left causal
    flag, which hides the keys bias_k and add_zero_attn append; its other paths keep them
    visible to every query, as the mask says, and so does fastattn."""
    appends = mha.bias_k is not None or mha.add_zero_attn
    if kw.get("is_causal") and appends and "key_padding_mask" not in kw and not kw["need_weights"]:
        return {**kw, "is_causal": False}
    return kw


def leaves(inputs):
    return list({id(t): t for t in inputs}.values())


@pytest.mark.parametrize("seed", range(100))
def test_parity_with_torch(seed):
    rng = random.Random(seed)
    fast = rng.random() < 0.2
    cfg = random_config(rng, fast)
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(**cfg)
    torch.manual_seed(seed)
    ours = MultiHeadAttention(**cfg)
    assert isinstance(ours, nn.MultiheadAttention)
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), ours.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)  # same names, shapes and initialisation
    if fast or cfg["dropout"] or rng.random() < 0.3:  # dropout is compared off, in eval
        ref.eval(), ours.eval()
    inputs, kw = random_call(rng, cfg, ref, fast)
    with torch.set_grad_enabled(not fast and rng.random() < 0.8):
        out_ref, w_ref = ref(*inputs, **torch_kwargs(ref, kw))
        out, w = ours(*inputs, **kw)

    # Where torch gives NaN (a query that sees no key, in some head), fastattn gives that
    # head a zero attention row.
    seen = ~out_ref.isnan()
    assert out.shape == out_ref.shape and torch.isfinite(out).all()
    assert torch.allclose(out[seen], out_ref[seen], atol=2e-5, rtol=1e-4)
    if kw["need_weights"]:
        w_seen = ~w_ref.isnan()
        assert w.shape == w_ref.shape and torch.allclose(w[w_seen], w_ref[w_seen], atol=1e-5)
        if not kw["average_attn_weights"]:
            assert torch.all(w[~w_seen] == 0)
    else:
        assert w is None and w_ref is None

    if out.requires_grad and seen.all():  # NaN rows spoil all of torch's gradients
        grad = torch.randn_like(out)
        xs = leaves(inputs)
        g_ref = torch.autograd.grad(out_ref, xs + list(ref.parameters()), grad)
        g = torch.autograd.grad(out, xs + list(ours.parameters()), grad)
        for a, b in zip(g, g_ref):
            assert torch.allclose(a, b, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("kv", ["add_zero_attn", "add_bias_kv"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_appended_keys_stay_visible_under_causal_hint(kv, need_weights):
    """torch pads the causal attn_mask with a visible column for each key it appends; a plain
    causal flag would hide those keys from every query (as torch's own SDPA path with the
    hint, need_weights=False and no key_padding_mask does: see torch_kwargs)."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(32, 1, **{kv: True})
    ours = MultiHeadAttention.from_torch(ref)
    x = torch.randn(13, 2, 32)
    mask = nn.Transformer.generate_square_subsequent_mask(13)
    expected = ref(x, x, x, attn_mask=mask)[0]  # torch's mask path
    torch.testing.assert_close(ref(x, x, x, attn_mask=mask, is_causal=True)[0], expected)
    out = ours(x, x, x, attn_mask=mask, is_causal=True, need_weights=need_weights)[0]
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def nested_batch(layout=torch.strided, lengths=(3, 5, 0, 1), E=16):
    return torch.nested.nested_tensor([torch.randn(n, E) for n in lengths], layout=layout)


@pytest.mark.parametrize("need_weights, average", [(False, True), (True, True), (True, False)])
def test_nested_matches_torch(need_weights, average):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    ours = MultiHeadAttention.from_torch(ref)
    x = nested_batch()
    with torch.no_grad():
        out_ref, w_ref = ref(x, x, x, need_weights=need_weights, average_attn_weights=average)
        out, w = ours(x, x, x, need_weights=need_weights, average_attn_weights=average)
    assert out.is_nested and out.layout == torch.strided
    assert [t.shape for t in out.unbind()] == [t.shape for t in out_ref.unbind()]
    for a, b in zip(out.unbind(), out_ref.unbind()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    if need_weights:  # padded (B, [H,] Lmax, Lmax), zero outside each sequence
        assert not w.is_nested and w.shape == w_ref.shape
        torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=1e-4)
    else:
        assert w is None and w_ref is None


def test_nested_is_causal_applies_within_each_sequence():
    """torch's nested path ignores is_causal; fastattn applies it, as on dense input."""
    torch.manual_seed(0)
    ours = MultiHeadAttention(16, 2, batch_first=True).eval()
    x = nested_batch(lengths=(3, 5, 1))
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        out = ours(x, x, x, is_causal=True)[0]
        for seq, got in zip(x.unbind(), out.unbind()):
            n = seq.shape[0]
            expected = ours(seq[None], seq[None], seq[None], attn_mask=mask[:n, :n])[0][0]
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["jagged", "training", "grad", "key_padding_mask", "attn_mask",
                                  "cross", "seq_first", "odd_heads", "add_zero_attn", "no_bias"])
def test_nested_raises_where_torch_does(case):
    """torch runs nested input only on its inference fast path; elsewhere fastattn raises the
    same error, which says why."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 1 if case == "odd_heads" else 2, batch_first=case != "seq_first",
                                add_zero_attn=case == "add_zero_attn", bias=case != "no_bias")
    ref.train(case == "training")
    ours = MultiHeadAttention.from_torch(ref)
    x = nested_batch(torch.jagged if case == "jagged" else torch.strided, lengths=(3, 5))
    args = (x, nested_batch(lengths=(3, 5)), x) if case == "cross" else (x, x, x)
    kw = {"key_padding_mask": torch.zeros(2, 5, dtype=torch.bool)} if case == "key_padding_mask" else {}
    if case == "attn_mask":
        kw = {"attn_mask": torch.zeros(5, 5, dtype=torch.bool)}
    errors = []
    for mha in (ref, ours):
        with torch.set_grad_enabled(case == "grad"), pytest.raises(Exception) as info:
            mha(*args, **kw)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]
