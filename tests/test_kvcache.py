"""fastattn.attention_with_kvcache: equals the full forward on the cache's valid prefix, against
the float64 reference; new keys land in the cache in place; bad input."""
import pytest
import torch

import fastattn
from fastattn import attention_with_kvcache
from helpers import CPU_BACKENDS, TOL, count_fastattn_nodes, materialise, rel_err, stable_seed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On a GPU, the backends that run CUDA tensors; without one, the CPU's and Triton's interpreter.
BACKENDS = (["reference"] if DEVICE == "cuda" else CPU_BACKENDS) + \
    [b for b in ("triton",) if b in fastattn.available_backends()]


def expected(q, k_cache, v_cache, lengths, causal, scale):
    """Per row b: the float64 reference on the first lengths[b] keys, causal aligned to the end."""
    outs, lses = [], []
    for b, n in enumerate(lengths.tolist()):
        qb, kb, vb = (t[b:b + 1].double() for t in (q, k_cache[:, :, :n], v_cache[:, :, :n]))
        Nq = q.shape[2]
        visible = torch.arange(n, device=q.device) <= n - Nq + torch.arange(Nq, device=q.device)[:, None]
        o, lse = fastattn.reference_attention(qb, kb, vb, attn_mask=visible if causal else None, scale=scale)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("Nq, Nnew", [(1, 1), (4, 0), (16, 16), (3, 5)], ids=str)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)], ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_equals_full_forward_on_the_valid_prefix(backend, dtype, Nq, Nnew, heads, causal):
    torch.manual_seed(stable_seed(str(dtype), Nq, Nnew, heads, causal))
    H, Hkv = heads
    B, Nmax, D = 4, 300, 64 if H == 4 else 80
    k_cache, v_cache = (torch.randn(B, Hkv, Nmax, D, device=DEVICE).to(dtype) for _ in range(2))
    cache_seqlens = torch.tensor([0, 1, 130, Nmax - Nnew], dtype=torch.int32, device=DEVICE)
    q = torch.randn(B, H, Nq, D, device=DEVICE).to(dtype)
    k_new, v_new = (torch.randn(B, Hkv, Nnew, D, device=DEVICE).to(dtype) for _ in range(2))
    for b, n in enumerate(cache_seqlens.tolist()):  # rows past the valid ones: an uninitialised cache
        k_cache[b, :, n + Nnew:] = v_cache[b, :, n + Nnew:] = float("nan")
    before = k_cache.clone()
    out, lse = attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new=k_new if Nnew else None,
                                      v_new=v_new if Nnew else None, causal=causal, scale=0.2,
                                      return_lse=True, backend=backend)
    for b, n in enumerate(cache_seqlens.tolist()):  # the new rows, and nothing else, were written
        torch.testing.assert_close(k_cache[b, :, n:n + Nnew], k_new[b], rtol=0, atol=0)
        torch.testing.assert_close(v_cache[b, :, n:n + Nnew], v_new[b], rtol=0, atol=0)
        assert torch.equal(k_cache[b, :, :n], before[b, :, :n])
        assert k_cache[b, :, n + Nnew:].isnan().all() and v_cache[b, :, n + Nnew:].isnan().all()
    ref, ref_lse = expected(q, k_cache, v_cache, cache_seqlens + Nnew, causal, 0.2)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == q.shape[:3]
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype], f"out: {rel_err(out, ref):.2e}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert rel_err(lse[finite], ref_lse[finite], floor=finite.sum().item() ** 0.5) < max(TOL[dtype], 1e-5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_long_cache_is_split_and_merged(backend):
    """A cache long enough that the kernels split it (the CPU kernel at 1024 keys a split)."""
    torch.manual_seed(3)
    B, H, Hkv, Nmax, D = 1, 2, 1, 4100, 32
    k_cache, v_cache = torch.randn(2, B, Hkv, Nmax, D, device=DEVICE)
    q = torch.randn(B, H, 2, D, device=DEVICE)
    lengths = torch.tensor([Nmax - 3], dtype=torch.int32, device=DEVICE)
    out = attention_with_kvcache(q, k_cache, v_cache, lengths, backend=backend)
    ref, _ = expected(q, k_cache, v_cache, lengths, True, D ** -0.5)
    assert rel_err(out, ref) < TOL[torch.float32]


def test_one_node_under_compile():
    q = torch.randn(2, 4, 1, 32)
    k_cache, v_cache = torch.randn(2, 2, 2, 50, 32)
    k_new, v_new = torch.randn(2, 2, 2, 1, 32)
    lengths = torch.tensor([3, 20], dtype=torch.int32)
    f = lambda q, kc, vc, kn, vn: attention_with_kvcache(q, kc, vc, lengths, k_new=kn, v_new=vn)  # noqa: E731
    assert count_fastattn_nodes(f, q, k_cache, v_cache, k_new, v_new) == 1
    torch.library.opcheck(torch.ops.fastattn.attention_kvcache.default,
                          (q, k_cache, v_cache, lengths, k_new, v_new, "cpu"), dict(causal=True, scale=0.2))


@pytest.mark.parametrize("change, error, words", [
    (dict(q=torch.randn(2, 4, 17, 32)), ValueError, "1 to 16 queries"),
    (dict(q=torch.randn(2, 3, 1, 32)), ValueError, "dividing"),
    (dict(k_cache=torch.randn(2, 0, 50, 32), v_cache=torch.randn(2, 0, 50, 32), k_new=None, v_new=None),
     ValueError, "dividing"),
    (dict(v_cache=torch.randn(2, 2, 49, 32)), ValueError, "equal shapes"),
    (dict(cache_seqlens=torch.tensor([3, 20])), TypeError, "int32"),
    (dict(cache_seqlens=torch.tensor([3, 50], dtype=torch.int32)), ValueError, r"\[0, 49\]"),
    (dict(k_new=None), ValueError, "both or neither"),
    # an expanded cache: one row's append overwrote another's valid keys
    (dict(k_cache=torch.randn(1, 2, 50, 32).expand(2, 2, 50, 32)), ValueError, "k_cache: expected no broadcast"),
    (dict(v_cache=torch.randn(2, 1, 50, 32).expand(2, 2, 50, 32)), ValueError, "v_cache: expected no broadcast"),
    (dict(q=torch.randn(2, 4, 1, 32).requires_grad_()), ValueError, "forward only"),
    (dict(q=torch.randn(2, 4, 1, 32, dtype=torch.float64).half()), TypeError, "dtype"),
])
def test_bad_input(change, error, words):
    args = dict(q=torch.randn(2, 4, 1, 32), k_cache=torch.randn(2, 2, 50, 32), v_cache=torch.randn(2, 2, 50, 32),
                cache_seqlens=torch.tensor([3, 20], dtype=torch.int32), k_new=torch.randn(2, 2, 1, 32),
                v_new=torch.randn(2, 2, 1, 32))
    args.update(change)
    with pytest.raises(error, match=words):
        attention_with_kvcache(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("cache_seqlens"),
                               **args)


def test_the_op_checks_what_the_front_door_would():
    """fastattn::attention_kvcache is public: called directly, bad new keys raise, not crash."""
    q, k_cache, v_cache = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)
    lengths = torch.tensor([3], dtype=torch.int32)
    op = torch.ops.fastattn.attention_kvcache.default
    with pytest.raises(RuntimeError, match="k_new and v_new come together"):
        op(q, k_cache, v_cache, lengths, torch.randn(1, 2, 1, 16), None, "cpu", causal=True, scale=0.1)
    with pytest.raises(RuntimeError, match=r"v_new must be \(B, Hkv, Nnew, D\)"):
        op(q, k_cache, v_cache, lengths, torch.randn(1, 2, 1, 16), torch.randn(1, 1, 1, 16), "cpu", causal=True, scale=0.1)
    expanded = torch.randn(1, 1, 10, 16).expand(1, 2, 10, 16)
    with pytest.raises(ValueError, match="k_cache: expected no broadcast dim"):
        op(q, expanded, v_cache, lengths, torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), "cpu", causal=True, scale=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_writing_the_cache_bumps_its_version(backend):
    """The caches change in place, so autograd's saved-tensor check still catches a stale use."""
    q, k_cache, v_cache = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)
    new = dict(k_new=torch.randn(1, 2, 1, 16), v_new=torch.randn(1, 2, 1, 16))
    w = torch.randn(1, 2, 10, 16, requires_grad=True)
    y = (w * k_cache).sum()  # saves k_cache
    before = k_cache._version, v_cache._version
    attention_with_kvcache(q, k_cache, v_cache, torch.tensor([3], dtype=torch.int32), backend=backend, **new)
    assert k_cache._version > before[0] and v_cache._version > before[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


DECODE_MODS = [  # keywords beyond the cache's, each row's queries at its end
    dict(window_size=(40, 0), causal=True),
    dict(window_size=(7, 2)),
    dict(softcap=3.0, causal=True),
    dict(alibi_slopes="heads", window_size=(500, -1), causal=True),
    dict(alibi_slopes="batch"),
    dict(sinks=True, causal=True, window_size=(1, 0)),
    dict(sinks=True, softcap=2.0, window_size=(1500, 0), causal=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Nq", [1, 5])
@pytest.mark.parametrize("case", DECODE_MODS, ids=str)
def test_score_mods_aligned_to_the_end(backend, dtype, Nq, case):
    """Against a lone float64 reference call per row on its valid keys, bottom-right: long rows
    are split (the window's left edge first), an empty one gives zeros (lse: its sink)."""
    torch.manual_seed(3)
    B, H, Hkv, D, Nmax = 4, 4, 2, 32, 3100
    kw = materialise(case, B, H, DEVICE)
    causal = kw.pop("causal", False)  # decoding's default is causal
    k_cache, v_cache = (torch.randn(B, Hkv, Nmax, D, device=DEVICE).to(dtype) for _ in range(2))
    lengths = torch.tensor([0, 3, 700, Nmax], dtype=torch.int32, device=DEVICE)
    q = torch.randn(B, H, Nq, D, device=DEVICE).to(dtype)
    out, lse = attention_with_kvcache(q, k_cache, v_cache, lengths, causal=causal, return_lse=True, backend=backend,
                                      **kw)
    for b, n in enumerate(lengths.tolist()):
        rkw = {name: t.double()[b:b + 1] if name == "alibi_slopes" and t.dim() == 2 else
               t.double() if isinstance(t, torch.Tensor) else t for name, t in kw.items()}
        ref, ref_lse = fastattn.reference_attention(*(t[b:b + 1].double() for t in (q, k_cache[:, :, :n],
                                                                                    v_cache[:, :, :n])),
                                                    causal=causal, align="bottom_right", **rkw)
        assert rel_err(out[b:b + 1], ref) < TOL[dtype], f"row {b}: {rel_err(out[b:b + 1], ref):.2e}"
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse[b:b + 1]), finite)
        assert rel_err(lse[b:b + 1][finite], ref_lse[finite]) < max(TOL[dtype], 1e-5)


def test_decoding_has_one_alignment():
    q, cache = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="align: expected 'bottom_right'.*got 'top_left'"):
        attention_with_kvcache(q, cache, cache, torch.tensor([4], dtype=torch.int32), align="top_left")
    with pytest.raises(ValueError, match=r"window_size: expected ints in \[-1, 2\*\*63\)"):
        attention_with_kvcache(q, cache, cache, torch.tensor([4], dtype=torch.int32), window_size=(-2, 0))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_cache_rows_before_the_window_are_never_read(backend):
    """Two queries at the end of 3000 cached keys with a 40-key window see keys 2958 on: NaN rows
    before 2000 would reach the output from any split that loaded them."""
    torch.manual_seed(4)
    k_cache, v_cache = (torch.randn(2, 2, 3000, 32, device=DEVICE) for _ in range(2))
    for t in (k_cache, v_cache):
        t[:, :, :2000] = float("nan")
    q = torch.randn(2, 4, 2, 32, device=DEVICE)
    lengths = torch.full((2,), 3000, dtype=torch.int32, device=DEVICE)
    out = attention_with_kvcache(q, k_cache, v_cache, lengths, window_size=(40, 0), backend=backend)
    ref = fastattn.reference_attention(q.double(), k_cache[:, :, 2900:].double(), v_cache[:, :, 2900:].double(),
                                       causal=True, window_size=(40, 0), align="bottom_right")[0]
    assert rel_err(out, ref) < TOL[torch.float32]
