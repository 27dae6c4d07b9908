"""pytest-benchmark suite over a few key cases: `pytest benchmarks/ --benchmark-only`.
(Not part of `make test`; `python -m fastattn bench` is the full, side-by-side benchmark.)"""
import pytest
import torch
import torch.nn.functional as F

import fastattn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
B, H, N, D = (8, 16, 2048, 128) if DEVICE == "cuda" else (4, 8, 1024, 64)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def inputs(padded: bool):
    q, k, v = (torch.randn(B, N, H, D, device=DEVICE, dtype=DTYPE).transpose(1, 2) for _ in range(3))
    kpm = None
    if padded:  # valid lengths spread over [N/4, N]
        lengths = torch.linspace(N, N // 4, B, device=DEVICE).long()
        kpm = torch.arange(N, device=DEVICE)[None, :] >= lengths[:, None]
    return q, k, v, kpm


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("provider", ["fastattn", "sdpa"])
def test_attention_forward(benchmark, provider, causal, padded):
    q, k, v, kpm = inputs(padded)
    if provider == "fastattn":
        def run():
            fastattn.attention(q, k, v, key_padding_mask=kpm, causal=causal)
            sync()
    else:
        mask = None if kpm is None else ~kpm[:, None, None, :]
        if mask is not None and causal:
            mask = mask & torch.ones(N, N, dtype=torch.bool, device=DEVICE).tril()

        def run():
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
            sync()
    benchmark.group = f"forward {'causal' if causal else 'full'} {'padded' if padded else 'dense'}"
    benchmark.pedantic(run, warmup_rounds=1, rounds=5)
