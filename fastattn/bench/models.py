"""Modules and whole models: fastattn.MultiHeadAttention against nn.MultiheadAttention, the
same nn.TransformerEncoder before and after replace_attention, and the notes' Transformer on
torch attention and on fastattn."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..models import Transformer
from ..nn import MultiHeadAttention, replace_attention
from .timing import compare_to, median_of, paired_ms, timed_rows


def module_rows(device: str, quick: bool, min_run_time: float) -> list[dict]:
    """nn.MultiheadAttention (eval, need_weights=False) against fastattn.MultiHeadAttention
    sharing its weights (from_torch): the fused path, packed QKV projection, no copies. GPU: B 8,
    N 2048, E 1024; CPU: B 4, N 2048 (quick: 1024), E 512."""
    rows = []
    B, N, E, H = (8, 2048, 1024, 16) if device == "cuda" else (4, 1024 if quick else 2048, 512, 8)
    for padded in (False, True):
        mha = torch.nn.MultiheadAttention(E, H, batch_first=True, device=device).eval()
        ours = MultiHeadAttention.from_torch(mha)
        x = torch.randn(B, N, E, device=device)
        kpm = None
        if padded:
            lengths = torch.tensor([N, 3 * N // 4, N // 2, N // 4] * (B // 4), device=device)
            kpm = torch.arange(N, device=device)[None, :] >= lengths[:, None]
        calls = {"fastattn.MultiHeadAttention": lambda: ours(x, x, x, key_padding_mask=kpm, need_weights=False),
                 "nn.MultiheadAttention": lambda: mha(x, x, x, key_padding_mask=kpm, need_weights=False)}
        with torch.inference_mode():
            group = timed_rows(calls, f"{'padded' if padded else 'dense'} B{B} N{N} E{E} H{H}", device, min_run_time)
        rows += compare_to(group, "nn.MultiheadAttention")
    return rows


def encoder_rows(device: str) -> list[dict]:
    """nn.TransformerEncoder (d_model 512, 8 heads, 6 layers, batch 8, sequence 512) untouched
    against the same model after replace_attention: inference forward and a training step
    (dropout 0.1, MSE loss, AdamW), dense and with lengths uniform in [128, 512]."""
    torch.manual_seed(0)
    B, L, E = 8, 512, 512
    layer = torch.nn.TransformerEncoderLayer(E, 8, 2048, dropout=0.1, batch_first=True, device=device)
    models = {"nn.TransformerEncoder": torch.nn.TransformerEncoder(layer, 6)}
    models["same after replace_attention"] = replace_attention(copy.deepcopy(models["nn.TransformerEncoder"]))
    x, target = torch.randn(B, L, E, device=device), torch.randn(B, L, E, device=device)
    lengths = torch.randint(128, L + 1, (B,), device=device)
    rows = []
    for case, pad in (("dense", None), ("padded", torch.arange(L, device=device)[None, :] >= lengths[:, None])):
        tokens = B * L if pad is None else int((~pad).sum())
        for name, model in models.items():
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def train_step():
                opt.zero_grad()
                F.mse_loss(model(x, src_key_padding_mask=pad), target).backward()
                opt.step()

            def infer():
                with torch.inference_mode():
                    model(x, src_key_padding_mask=pad)

            model.eval()
            t_infer = median_of(infer, 5)
            model.train()
            t_train = median_of(train_step, 5)
            rows.append(dict(model=name, batch=case, infer_ms=t_infer * 1e3, train_ms=t_train * 1e3,
                             train_tokens_per_s=tokens / t_train))
    return rows


def model_rows(device: str, quick: bool) -> list[dict]:
    """A training step of the notes' encoder-decoder Transformer (fastattn.models; d_model 512, 8
    heads, 2 + 2 layers, dropout 0.1; quick: d_model 256, 4 heads) on padded batches (8 pairs,
    lengths uniform in [32, 256]), on torch attention and on fastattn, the two taking turns: real
    (non-padding) tokens per second."""
    gen = torch.Generator().manual_seed(0)
    B, L, V = 8, 256, 1000
    E, H = (256, 4) if quick else (512, 8)

    def padded():
        ids = torch.randint(3, V, (B, L), generator=gen)
        lengths = torch.randint(32, L + 1, (B,), generator=gen)
        return ids.masked_fill(torch.arange(L)[None, :] >= lengths[:, None], 0).to(device)

    src, tgt = padded(), padded()
    tgt_in = torch.cat([torch.full_like(tgt[:, :1], 1), tgt[:, :-1]], dim=1)
    tokens = int((src != 0).sum() + (tgt != 0).sum())
    steps = {}
    for kind in ("torch", "fastattn"):
        torch.manual_seed(0)
        model = Transformer(V, V, E, H, 2, 2, 4 * E, 0.1, L, 0, kind).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            opt.zero_grad()
            logits = model(src, tgt_in)
            F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=0).backward()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()

        steps[f"fastattn.models.Transformer, attention={kind}"] = step
    seconds = [ms / 1e3 for ms in paired_ms(list(steps.values()), 0.0, min_reps=3 if quick else 5)]
    return [dict(model=name, batch=f"padded, d_model {E}", train_ms=s * 1e3, train_tokens_per_s=tokens / s)
            for name, s in zip(steps, seconds)]
