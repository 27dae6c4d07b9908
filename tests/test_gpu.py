"""What only a GPU shows: torch.compile on CUDA tensors, no host syncs, fp32 precision, tuning
counts during decoding, the score modifiers at the tuned tile sizes. benchmarks/gpu_check.sh runs this file with test_triton and test_cuda."""
import pytest
import torch

import fastattn
from fastattn.triton import tuning as triton_tuning
from helpers import TOL, padding_mask, qkv, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_BACKENDS = [b for b in ("triton", "cuda") if b in fastattn.available_backends()]


def cuda_inputs(*shape, dtype=torch.bfloat16):
    return [t.detach().cuda().requires_grad_() for t in qkv(*shape, dtype=dtype, transposed=True)]


@pytest.mark.parametrize("backend", ["auto", *GPU_BACKENDS])
def test_compile_fullgraph_holds_one_fastattn_node(backend):
    from helpers import count_fastattn_nodes

    q, k, v = cuda_inputs(2, 4, 2, 100, 130, 64)
    kpm = padding_mask("random", 2, 130).cuda()
    f = lambda q, k, v: fastattn.attention(q, k, v, key_padding_mask=kpm, causal=True, backend=backend)  # noqa: E731
    assert count_fastattn_nodes(f, q, k, v) == 1
    # The compiled graph computes what eager does.
    compiled = torch.compile(f, fullgraph=True)
    assert torch.equal(compiled(q, k, v), f(q, k, v))


def without_syncs(step) -> None:
    """Runs step once to compile, then again with any host sync raising."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_host_sync_in_forward_or_backward(backend):
    q, k, v = cuda_inputs(2, 4, 2, 200, 300, 64)
    kpm = padding_mask("random", 2, 300).cuda()  # scattered: the per-key test stays on
    step = lambda: fastattn.attention(q, k, v, key_padding_mask=kpm, causal=True, backend=backend).sum().backward()  # noqa: E731
    without_syncs(step)  # the first run compiles (and, with no shipped defaults, tunes: syncs allowed)


def test_no_host_sync_with_score_mods():
    """Sinks' gradient included (computed from out and lse on the device)."""
    q, k, v = cuda_inputs(2, 4, 2, 200, 300, 64)
    sinks = torch.randn(4, device="cuda", requires_grad=True)
    kw = dict(causal=True, window_size=(64, 0), softcap=20.0, alibi_slopes=torch.rand(4, device="cuda"), sinks=sinks,
              align="bottom_right", backend="triton")
    without_syncs(lambda: fastattn.attention(q, k, v, **kw).sum().backward())
    k_cache, v_cache = (torch.randn(3, 2, 4096, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.tensor([0, 1000, 4000], dtype=torch.int32, device="cuda")
    q1 = torch.randn(3, 4, 1, 64, device="cuda", dtype=torch.bfloat16)
    kw = dict(window_size=(512, 0), softcap=20.0, sinks=sinks.detach(), backend="triton")
    with torch.no_grad():
        without_syncs(lambda: fastattn.attention_with_kvcache(q1, k_cache, v_cache, lengths, **kw))


def test_no_host_sync_in_varlen_or_decoding():
    cu = torch.tensor([0, 100, 130, 300], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(300, h, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (4, 2, 2))
    without_syncs(lambda: fastattn.attention_varlen(q, k, v, cu, cu, 170, 170, causal=True).sum().backward())
    k_cache, v_cache = (torch.randn(3, 2, 4096, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.tensor([0, 1000, 4000], dtype=torch.int32, device="cuda")
    q1, k1, v1 = (torch.randn(3, h, 1, 64, device="cuda", dtype=torch.bfloat16) for h in (4, 2, 2))
    with torch.no_grad():
        without_syncs(lambda: fastattn.attention_with_kvcache(q1, k_cache, v_cache, lengths, k_new=k1, v_new=v1))


def test_more_sequences_and_heads_than_a_grid_axis_takes():
    """Over 65535 (sequence, head) pairs: packed short sequences, and a large decoding batch."""
    torch.manual_seed(0)
    lengths = torch.randint(1, 5, (5000,))
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int().cuda()
    q, k, v = (torch.randn(int(lengths.sum()), 16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out = fastattn.attention_varlen(q, k, v, cu, cu, 4, 4, causal=True)
    out.sum().backward()
    for b in (0, 2500, 4999):
        rows = slice(cu[b], cu[b + 1])
        lone = [t[rows].detach().double().transpose(0, 1)[None] for t in (q, k, v)]
        ref = fastattn.reference_attention(*lone, causal=True)[0][0].transpose(0, 1)
        assert rel_err(out[rows], ref) < TOL[torch.bfloat16]
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    k_cache, v_cache = (torch.randn(10000, 8, 64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    q1 = torch.randn(10000, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
    lengths = torch.randint(1, 65, (10000,), dtype=torch.int32, device="cuda")
    with torch.no_grad():
        got = fastattn.attention_with_kvcache(q1, k_cache, v_cache, lengths)
        want = fastattn.attention_with_kvcache(q1, k_cache, v_cache, lengths, backend="reference")
    assert rel_err(got, want) < TOL[torch.bfloat16]


def test_fp32_dots_3xtf32_by_default_ieee_when_asked_tf32_when_opted_in(monkeypatch):
    """3xTF32 meets the fp32 bound, forward and gradients; IEEE too; TF32 is about 1e-3."""
    from fastattn.triton import attention as ta

    torch.manual_seed(0)
    q, k, v = cuda_inputs(2, 4, 4, 256, 256, 64, dtype=torch.float32)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = fastattn.reference_attention(*leaves)[0]
    dout = torch.randn_like(ref)
    ref.backward(dout)
    assert torch.backends.cuda.matmul.fp32_precision == "none"  # torch's default: nothing asked

    def errors():
        out = fastattn.attention(q, k, v, backend="triton")
        grads = torch.autograd.grad(out, (q, k, v), dout.float())
        return [rel_err(out, ref)] + [rel_err(g, t.grad) for g, t in zip(grads, leaves)]

    assert ta.dot_precision(torch.float32) == "tf32x3"
    assert max(errors()) < TOL[torch.float32], errors()
    monkeypatch.setattr(ta, "FP32_DOTS", "ieee")
    assert max(errors()) < TOL[torch.float32], errors()
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        tf32 = errors()[0]
    finally:
        torch.set_float32_matmul_precision(saved)
        torch.backends.cuda.matmul.fp32_precision = "none"
    assert 1e-5 < tf32 < 3e-3, tf32  # TF32 dots: faster, about 1e-3


def test_greedy_decoding_tunes_a_handful_of_times(tmp_path, monkeypatch):
    """A 200-token generation with a growing cache, after a 100-token prefill: lengths share
    power-of-two buckets and decoding shapes take a rule, so tuning runs only a few times."""
    monkeypatch.setenv("FASTATTN_TUNE", "1")
    monkeypatch.setenv("FASTATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(triton_tuning, "TUNER", triton_tuning.Tuner())
    monkeypatch.setattr(triton_tuning.Tuner, "shipped", lambda self: {})  # tune here, not from defaults
    before = sum(triton_tuning.TUNINGS.values())
    H, D, prompt = 8, 64, 100
    k_cache, v_cache = (torch.randn(1, H, prompt + 200, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    q = torch.randn(1, H, prompt, D, device="cuda", dtype=torch.bfloat16)
    fastattn.attention(q, k_cache[:, :, :prompt], v_cache[:, :, :prompt], causal=True)
    for n in range(prompt + 1, prompt + 201):
        fastattn.attention(q[:, :, :1], k_cache[:, :, :n], v_cache[:, :, :n])
    assert sum(triton_tuning.TUNINGS.values()) - before <= 2


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
@pytest.mark.parametrize("D", [64, 128])
def test_every_candidate_config_is_right(kernel, D, monkeypatch):
    """Run-time tuning may pick any candidate: each must compute the right thing (one did not)."""
    from helpers import check_against_reference

    monkeypatch.setattr(triton_tuning, "TUNER", triton_tuning.Tuner())
    kpm = padding_mask("random", 2, 300).cuda()
    for config in [*triton_tuning.CANDIDATES[kernel], triton_tuning.decode_config(D)]:
        triton_tuning.TUNER.force = {kernel: config}
        torch.manual_seed(0)
        try:
            check_against_reference(*cuda_inputs(2, 4, 2, 200, 300, D), "triton", key_padding_mask=kpm, causal=True)
        except AssertionError as e:
            raise AssertionError(f"{kernel} {config}: {e}") from e


def test_cuda_graph_replays_attention_and_decoding():
    """A small call's host path matters less when replayed from a CUDA graph: the forward (padding,
    causal), forward and backward, and a decoding step (appending to the cache) captured once and
    replayed on new inputs copied in, against the same calls run eagerly."""
    torch.manual_seed(0)
    q, k, v = (t.detach().requires_grad_() for t in cuda_inputs(2, 4, 2, 48, 64, 64))
    kpm = padding_mask("random", 2, 64).cuda()
    dout = torch.randn_like(q)
    k_cache, v_cache = (torch.randn(2, 2, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.tensor([10, 200], dtype=torch.int32, device="cuda")
    q1, k1, v1 = (torch.randn(2, h, 1, 64, device="cuda", dtype=torch.bfloat16) for h in (4, 2, 2))

    def step():
        out = fastattn.attention(q, k, v, key_padding_mask=kpm, causal=True)
        out.backward(dout)
        with torch.no_grad():
            dec = fastattn.attention_with_kvcache(q1, k_cache, v_cache, lengths, k_new=k1, v_new=v1)
        return out.detach(), dec

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # the inputs are written on the default stream
    with torch.cuda.stream(side):  # warm-up (compiles, tunes) off the capturing stream
        step()
    torch.cuda.current_stream().wait_stream(side)
    for t in (q, k, v):
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for t in (q, k, v, q1, k1, v1, dout):  # new inputs into the captured buffers
        with torch.no_grad():
            t.copy_(torch.randn_like(t))
    for t in (q, k, v):
        t.grad.zero_()
    cache_before = k_cache.clone(), v_cache.clone()
    graph.replay()
    torch.cuda.synchronize()
    replayed = [t.clone() for t in (*outs, q.grad, k.grad, v.grad)]
    k_cache.copy_(cache_before[0]), v_cache.copy_(cache_before[1])
    for t in (q, k, v):
        t.grad = None
    eager = [*step(), q.grad, k.grad, v.grad]
    for name, got, want in zip(("out", "decode", "dq", "dk", "dv"), replayed, eager):
        assert rel_err(got, want) < TOL[torch.bfloat16], name


def test_reduce_overhead_compiles_the_decode_step():
    """torch.compile(mode="reduce-overhead") on the notes' model's decoding step (every layer
    over its KV cache): the same tokens as eager generation, with CUDA graphs (the caches marked
    static, as a serving loop would) and none skipped."""
    from torch._dynamo.utils import counters

    from fastattn.models import TransformerLM
    from fastattn.models.transformer import KVCache, greedy

    torch.manual_seed(0)
    model = TransformerLM(50, d_model=64, num_heads=4, num_layers=2, dim_feedforward=128, dropout=0.0,
                          max_len=64).cuda().eval()
    prompt = torch.randint(3, 50, (2, 5), device="cuda")
    want = model.generate(prompt, max_new_tokens=10)

    def layers(h, caches):
        for layer, cache in zip(model.layers, caches):
            h = layer.step(h, cache)
        return h

    compiled = torch.compile(layers, mode="reduce-overhead")
    caches = [KVCache(prompt.shape[1] + 10) for _ in model.layers]
    out, new, start = prompt, prompt, 0
    with torch.no_grad():
        for _ in range(10):
            h = model.embed(new, start=start)
            if start == 0:  # the prompt eagerly, then each step compiled
                h = layers(h, caches)
                for cache in caches:
                    for t in (cache.k, cache.v, cache.seqlens):
                        torch._dynamo.mark_static_address(t)
            else:
                h = compiled(h, caches)
            start += new.shape[1]
            new = greedy(model.generator(h[:, -1:]), model.config.pad_id)
            out = torch.cat([out, new], dim=1)
    assert torch.equal(out, want)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", range(11))
def test_triton_score_mods_at_real_tile_sizes(case, D, dtype):
    """test_score_mods' cases (windows, softcap, ALiBi, sinks, both alignments, padding) through
    the compiled Triton kernels, forward and every gradient against float64."""
    from test_score_mods import CASES, LONG, check

    if "triton" not in GPU_BACKENDS:
        pytest.skip("triton is not installed")
    check((CASES + LONG)[case], 2, 4, 2, 300, 700, D, dtype, "triton", device="cuda")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bf16_gradients_on_a_peaked_softmax(backend):
    """Logits up to ~40: under the interpreter Triton's bf16 gradients reached 0.07-0.11 relative
    error where the cpu kernel and FlashAttention-2's rounding stay at 0.004-0.01 (issue 36)."""
    from helpers import check_against_reference

    torch.manual_seed(0)
    q, k, v = cuda_inputs(2, 4, 4, 256, 256, 64)
    with torch.no_grad():
        q.mul_(12.0)  # scores q.k / 8 with a spread of ~12: the largest near 40
    check_against_reference(q, k, v, backend, causal=True, tol=TOL[torch.bfloat16])


GLUON_NAN_KINDS = {  # kind: (causal, batch row 1's padded keys of 300, where the NaN goes in row 1)
    "causal": (True, lambda j: j < 0, dict(q=150, k=250, dout=100)),
    "right": (False, lambda j: j >= 200, dict(q=30, k=205, dout=30)),
    "scattered": (False, lambda j: j % 3 == 0, dict(q=30, k=42, dout=30)),
}


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="needs an sm_90 GPU (no interpreter runs Gluon)")
@pytest.mark.parametrize("where", ["q", "k", "dout"])
@pytest.mark.parametrize("kind", list(GLUON_NAN_KINDS))
def test_gluon_backward_keeps_hidden_nan_out(kind, where):
    """Issue 36's non-finite policy in the Gluon backward, every variant: a NaN in a hidden key's k,
    or in the query or dO of a row some keys are hidden from, reaches no gradient that no tainted
    row reaches (those equal float64 without the NaN). (The Gluon forward does not zero V's
    non-finite elements yet: NaN in a hidden v is the Triton and CUDA C++ kernels' alone.)"""
    pytest.importorskip("triton.experimental.gluon")
    from fastattn.gluon import launch
    from fastattn.masks import key_ranges

    torch.manual_seed(0)
    causal, padded, at = GLUON_NAN_KINDS[kind]
    B, H, Hkv, N, D = 2, 4, 2, 300, 128
    kpm = torch.zeros(B, N, dtype=torch.bool, device="cuda")
    kpm[1] = padded(torch.arange(N, device="cuda"))
    clean = [t.detach().cuda() for t in qkv(B, H, Hkv, N, N, D, dtype=torch.bfloat16)]
    dout = torch.randn(B, H, N, D, device="cuda").to(torch.bfloat16)
    bad = {"q": torch.zeros(B, H, N, dtype=torch.bool, device="cuda"),
           "k": torch.zeros(B, Hkv, N, dtype=torch.bool, device="cuda"),
           "dout": torch.zeros(B, H, N, dtype=torch.bool, device="cuda")}
    bad[where][1, 0, at[where]] = True
    q, k, do = (torch.where(bad[n][..., None], float("nan"), t).contiguous()
                for n, t in (("q", clean[0]), ("k", clean[1]), ("dout", dout)))
    v = clean[2]

    idx = torch.arange(N, device="cuda")
    vis = ((~kpm)[:, None, None, :] & ((idx[None, :] <= idx[:, None]) if causal else True)).expand(B, H, N, N)
    sees_any = vis.any(-1)
    tainted = sees_any & (bad["q"] | (vis & bad["k"].repeat_interleave(H // Hkv, 1)[:, :, None, :]).any(-1))
    grad_tainted = tainted | (sees_any & bad["dout"])
    excused = (vis & grad_tainted[..., None]).any(2).view(B, Hkv, H // Hkv, N).any(2)

    leaves = [t.double().requires_grad_() for t in clean]
    ref, ref_lse = fastattn.reference_attention(*leaves, kpm, None, causal)
    want = torch.autograd.grad(ref, leaves, dout.double())
    # out and lse as a kernel gives them: NaN in tainted rows
    out = torch.where(tainted[..., None], float("nan"), ref.detach()).to(torch.bfloat16).contiguous()
    lse = torch.where(tainted, float("nan"), ref_lse.detach()).float().contiguous()
    floor = 0.1 * dout.double().norm().item()
    for variant in launch.BWD_VARIANTS:
        dq = torch.full((B, H, N, D), float("nan"), device="cuda", dtype=torch.bfloat16)
        dk, dv = (torch.full((B, Hkv, N, D), float("nan"), device="cuda", dtype=torch.bfloat16) for _ in range(2))
        launch.backward(do, q, k, v, out, lse, dq, dk, dv, causal, D ** -0.5, kpm, key_ranges(kpm), None,
                        variant=variant)
        for name, got, ref_grad, keep in (("q", dq, want[0], ~grad_tainted), ("k", dk, want[1], ~excused),
                                          ("v", dv, want[2], ~excused)):
            assert torch.isfinite(got[keep]).all(), (variant.name, "d" + name)
            err = rel_err(got[keep], ref_grad[keep], floor=floor)
            assert err < 4 * TOL[torch.bfloat16], (variant.name, "d" + name, err)
