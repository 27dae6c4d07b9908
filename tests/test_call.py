"""A call is declared once (fastattn.call.Call); everything else that spells its fields out
is derived from a mirror (csrc/call.h) that these tests hold to it, so neither side can drift."""
import ast

import pytest
import torch

import fastattn
from fastattn.call import Call, SymInt

# Call's annotations -> the schema type each must have.
SCHEMA_TYPES = {"Tensor | None": "Tensor?", "SymInt": "SymInt", "int": "int", "float": "float", "bool": "bool"}
OPS = {  # each op's own arguments before the call's fields
    "attention_forward": ["q", "k", "v", "backend"],
    "attention_backward": ["dout", "dlse", "q", "k", "v", "out", "lse", "backend"],
    "attention_kvcache": ["q", "k_cache", "v_cache", "cache_seqlens", "k_new", "v_new", "backend"],
}


def annotation(name: str) -> str:
    """A field's annotation as written (the package defers annotations: strings or ForwardRefs)."""
    hint = Call.__annotations__[name]
    return getattr(hint, "__forward_arg__", hint)


def call_fields():
    """(name, schema type, default) of each of Call's fields, from its declaration."""
    return [(name, SCHEMA_TYPES[annotation(name)], Call._field_defaults[name]) for name in Call._fields]


@pytest.mark.parametrize("op", sorted(OPS))
def test_op_schema_is_the_declared_call(op):
    """Every op takes its own arguments, then exactly Call's fields: names, types, defaults, order."""
    schema = str(getattr(torch.ops.fastattn, op).default._schema)  # "ns::op(Type name=default, ...) -> ..."
    args = [arg.split(" ") for arg in schema[schema.index("(") + 1:schema.index(") ->")].split(", ")]
    assert [name.split("=")[0] for _, name in args[:len(OPS[op])]] == OPS[op]
    tail = [(name, kind, ast.literal_eval(default))
            for kind, (name, default) in ((kind, named.split("=")) for kind, named in args[len(OPS[op]):])]
    assert tail == call_fields(), f"csrc/call.h has drifted from fastattn.call.Call in {op}"


def test_declaration_types_are_known():
    assert SymInt is int
    assert {annotation(name) for name in Call._fields} <= set(SCHEMA_TYPES)


def test_a_python_backend_receives_the_call_the_front_door_built(monkeypatch):
    """What the front door builds crosses C++ (the op, the autograd, the bridge) and reaches a
    Python backend field for field, forward and backward."""
    backend = fastattn.backends.REGISTRY["reference"]
    seen = {}
    forward, backward = backend.forward, backend.backward

    def spy_forward(q, k, v, call):
        seen["forward"] = call
        return forward(q, k, v, call)

    def spy_backward(dout, dlse, q, k, v, out, lse, call):
        seen["backward"] = call
        return backward(dout, dlse, q, k, v, out, lse, call)

    monkeypatch.setattr(backend, "forward", spy_forward)
    monkeypatch.setattr(backend, "backward", spy_backward)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, 7, 8, generator=gen) for _ in range(2))
    padding = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])
    slopes, sinks = torch.rand(2, 4, generator=gen), torch.randn(4, generator=gen, requires_grad=True)
    out = fastattn.attention(q, k, v, key_padding_mask=padding, causal=True, scale=0.3, dropout_p=0.25,
                             window_size=(3, 1), softcap=20.0, alibi_slopes=slopes, sinks=sinks, align="bottom_right",
                             backend="reference")
    out.sum().backward()
    for call in seen["forward"], seen["backward"]:
        assert type(call) is Call
        assert call.key_padding is padding and call.key_ranges.tolist() == [[0, 0], [7, 4], [0, 0]]
        assert call.attn_mask is None and call.cu_seqlens_q is None and call.cu_seqlens_k is None
        assert (call.max_seqlen_q, call.max_seqlen_k) == (0, 0)
        assert call.causal is True and call.scale == 0.3 and call.dropout_p == 0.25 and call.seed > 0
        assert (call.window_left, call.window_right, call.softcap) == (3, 1, 20.0)
        assert call.alibi_slopes is slopes and call.sinks is sinks and call.bottom_right is True
    assert seen["forward"].seed == seen["backward"].seed


def test_describe_builds_the_problem_field_for_field():
    """describe() builds Problem positionally (a small call's host time): every field lands in its place."""
    from fastattn.backends import Problem
    from fastattn.front_door import describe

    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 5, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, 70, 8, generator=gen) for _ in range(2))
    call, problem = describe(q, k, v, key_padding_mask=torch.zeros(2, 70, dtype=torch.bool),
                             attn_mask=torch.ones(5, 70), causal=True, dropout_p=0.1, softcap=3.0,
                             align="bottom_right", draw_seed=False)
    assert problem == Problem("cpu", torch.float32, 8, mask_kind="float", key_padding=True, causal=True, dropout=True,
                              needs_grad=True, aligned=True, varlen=False, decode=False, nq=8, nk=128, gqa=True,
                              score_mods=("softcap", "bottom_right"))
    assert call.seed == 0 and call.bottom_right and call.softcap == 3.0 and call.attn_mask.shape == (2, 4, 5, 70)
    cache = torch.randn(2, 2, 70, 8)
    with torch.no_grad():
        _, decode = describe(q, cache, cache, kind="decode", causal=True, align="bottom_right")
    assert decode == Problem("cpu", torch.float32, 8, causal=True, decode=True, nq=8, nk=128, gqa=True)
