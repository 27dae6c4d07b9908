"""The Transformer of the study notes (shared/seed-notes-ko.txt), built on fastattn.

Encoder layer: self-attention with pad masking -> add & norm -> position-wise feed-forward
(two linear layers, ReLU) -> add & norm. Decoder layer: masked self-attention -> add & norm ->
encoder-decoder attention (Q from the decoder, K and V from the encoder's context, source
padding masked) -> add & norm -> feed-forward -> add & norm. A final "Generator" linear layer
maps d_model to the vocabulary. Inference starts from <SOS> and feeds outputs back, with a
preallocated key/value cache: one query per step, which fastattn.attention_with_kvcache
appends to the cache and attends to it in one call.

attention="torch" builds the same model on torch.nn.MultiheadAttention, with the same
parameter names, so a state_dict moves between the two.

Packed batches: forward also takes Packed ids, every sequence's tokens end to end with no
padding, and returns logits (total, vocab). The same modules run them; where the padded path
passes a padding mask, the packed path passes the Packed batch, whose cu_seqlens attention reads
(fastattn.attention_varlen), and positions restart at each sequence's start. fastattn only.

Context parallelism: TransformerLM also takes a ContextShard, this rank's part of every sequence
of the batch; everything but attention is per position, and attention runs as ring attention over
the ranks (fastattn.distributed). fastattn only, no attention dropout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import attention as fused_attention
from ..distributed import ring_attention, shard
from ..kvcache import attention_with_kvcache
from ..masks import sdpa_mask_from_padding
from ..nn import MultiHeadAttention
from ..varlen import attention_varlen, unpad

ATTENTION = ("fastattn", "torch")


@dataclass
class TransformerConfig:
    src_vocab: int
    tgt_vocab: int
    d_model: int = 512
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    max_len: int = 512
    pad_id: int = 0
    attention: str = "fastattn"


@dataclass
class LMConfig:
    vocab: int
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    max_len: int = 512
    pad_id: int = 0
    attention: str = "fastattn"


def multihead(cfg) -> nn.MultiheadAttention:
    if cfg.attention not in ATTENTION:
        raise ValueError(f"attention: expected one of {ATTENTION}, got {cfg.attention!r}")
    cls = MultiHeadAttention if cfg.attention == "fastattn" else nn.MultiheadAttention
    return cls(cfg.d_model, cfg.num_heads, dropout=cfg.dropout, batch_first=True)


class Packed(NamedTuple):
    """A batch of sequences laid end to end, no padding: sequence b is
    ids[cu_seqlens[b]:cu_seqlens[b + 1]]."""

    ids: Tensor  # (total,)
    cu_seqlens: Tensor  # (B + 1,) int32, from 0 to total
    max_seqlen: int  # the longest sequence

    @classmethod
    def from_padded(cls, ids: Tensor, padding: Tensor) -> "Packed":
        """(B, T) ids -> those not masked by padding (B, T), True = padding, row after row."""
        packed, cu_seqlens, _, max_seqlen = unpad(ids, padding)
        return cls(packed, cu_seqlens, max_seqlen)

    def to(self, device) -> "Packed":
        return self._replace(ids=self.ids.to(device), cu_seqlens=self.cu_seqlens.to(device))

    def positions(self) -> Tensor:
        """Each token's position in its own sequence (total,), computed on the device."""
        i = torch.arange(self.ids.shape[0], dtype=torch.int32, device=self.ids.device)
        seq = torch.searchsorted(self.cu_seqlens[1:], i, right=True)  # the sequence holding token i
        return i - self.cu_seqlens[seq]


class ContextShard(NamedTuple):
    """This rank's part of a batch of (B, T) ids under context parallelism
    (fastattn.distributed.shard's layout over group): its ids (B, n), their positions (n,) in the
    sequence and their padding (B, n) (None: none). Self-attention runs as ring attention."""

    ids: Tensor
    positions: Tensor
    padding: Tensor | None
    group: object = None
    layout: str = "zigzag"

    @classmethod
    def of(cls, ids: Tensor, pad_id: int, group=None, layout: str = "zigzag") -> "ContextShard":
        mine = shard(ids, 1, group, layout)
        padding = mine == pad_id
        return cls(mine, shard(torch.arange(ids.shape[1], device=ids.device), 0, group, layout),
                   padding if bool(padding.any()) else None, group, layout)

    def to(self, device) -> "ContextShard":
        return self._replace(ids=self.ids.to(device), positions=self.positions.to(device),
                             padding=None if self.padding is None else self.padding.to(device))


def sequences(ids, pad_id: int):
    """Where a batch's sequences lie, as attention takes it: padded ids (B, T) -> their padding
    mask (B, T), True = padding; a Packed batch or a ContextShard -> itself."""
    return ids if isinstance(ids, (Packed, ContextShard)) else ids == pad_id


def causal_mask(n: int, device) -> Tensor:
    """torch's bool causal mask (True above the diagonal: hidden); fastattn reads it as a flag."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


class Embedding(nn.Module):
    """Token embedding * sqrt(d_model) + sinusoidal positional encoding, then dropout."""

    def __init__(self, vocab: int, d_model: int, max_len: int, dropout: float):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        nn.init.normal_(self.tok.weight, std=d_model**-0.5)  # O(1) after the sqrt(d_model) scale, like the positions
        pos = torch.arange(max_len)[:, None]
        freq = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        self.register_buffer("pe", pe, persistent=False)
        self.drop = nn.Dropout(dropout)
        self.scale = math.sqrt(d_model)

    def forward(self, ids, start: int = 0) -> Tensor:  # (B, T) -> (B, T, E); Packed -> (total, E)
        if isinstance(ids, ContextShard):  # (B, n) ids at their places in the sequence
            return self.drop(self.tok(ids.ids) * self.scale + self.pe[ids.positions])
        if isinstance(ids, Packed):
            if ids.max_seqlen > self.pe.shape[0]:
                raise ValueError(f"sequence length: expected at most max_len={self.pe.shape[0]}, got {ids.max_seqlen}")
            return self.drop(self.tok(ids.ids) * self.scale + self.pe[ids.positions()])
        if start + ids.shape[1] > self.pe.shape[0]:
            raise ValueError(f"sequence length: expected at most max_len={self.pe.shape[0]}, got {start + ids.shape[1]}")
        return self.drop(self.tok(ids) * self.scale + self.pe[start:start + ids.shape[1]])


class FeedForward(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.drop(F.relu(self.linear1(x))))


def greedy(logits: Tensor, pad_id: int) -> Tensor:
    """The most likely token that is not padding: a generated pad_id would read as padding
    when the sequence is fed back whole, so it is never produced. (B, T, V) -> (B, T)."""
    return logits.index_fill(-1, torch.tensor([pad_id], device=logits.device), -math.inf).argmax(-1)


class KVCache:
    """One layer's keys and values, (B, H, capacity, D) allocated at the first write, of which
    the first `length` positions are filled (the same count in every batch row; `seqlens`
    holds it per row on the device, as attention_with_kvcache takes it)."""

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.k = self.v = self.seqlens = None

    def _allocate(self, like: Tensor) -> None:
        if self.k is None:
            B, H, _, D = like.shape
            self.k, self.v = (like.new_empty(B, H, self.capacity, D) for _ in range(2))
            self.seqlens = torch.zeros(B, dtype=torch.int32, device=like.device)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Writes k, v (B, H, n, D) after the filled positions; returns every filled position."""
        self._allocate(k)
        n = k.shape[2]
        if self.length + n > self.capacity:
            raise ValueError(f"cache: expected at most {self.capacity} positions, got {self.length + n}")
        self.k[:, :, self.length:self.length + n] = k
        self.v[:, :, self.length:self.length + n] = v
        self.advance(n)
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """One step's query (B, H, 1, D) over the cache and its own new key, which the fused
        call writes into the cache in place."""
        self._allocate(k)
        out = attention_with_kvcache(q, self.k, self.v, self.seqlens, k_new=k, v_new=v)
        self.advance(k.shape[2])
        return out

    def advance(self, n: int) -> None:
        self.length += n
        self.seqlens += n


def _heads(x: Tensor, num_heads: int) -> Tensor:  # (B, T, E) -> (B, H, T, D)
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def _attend(kind: str, q, k, v, key_padding_mask=None, causal=False) -> Tensor:
    """(B, H, Tq, D) attention of the cached path, on the model's own kind of attention."""
    if kind == "fastattn":
        return fused_attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal)
    mask = None if key_padding_mask is None else sdpa_mask_from_padding(key_padding_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)


def attend(mha: nn.MultiheadAttention, x: Tensor, context: Tensor, seqs_q, seqs_k,
           causal: bool = False) -> Tensor:
    """mha(x, context, context) with the sequences of x and context given as sequences() gives
    them: padding masks, x (B, T, E) and context (B, S, E); or Packed, x (total_q, E) and
    context (total_k, E), on attention_varlen; or a ContextShard: self-attention of this rank's
    x (B, n, E) over the whole sequence, on ring attention."""
    if isinstance(seqs_q, ContextShard):
        return ring_self_attention(mha, x, seqs_q, causal)
    if not isinstance(seqs_q, Packed):
        mask = causal_mask(x.shape[1], x.device) if causal else None
        return mha(x, context, context, key_padding_mask=seqs_k, attn_mask=mask, is_causal=causal,
                   need_weights=False)[0]
    if not isinstance(mha, MultiHeadAttention):
        raise ValueError("packed input: expected a model with attention='fastattn', got 'torch'")
    E, H = mha.embed_dim, mha.num_heads
    if x is context:  # self-attention: one GEMM for q, k and v; (total, H, D) views of it
        q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).unflatten(-1, (3, H, -1)).unbind(1)
    else:
        q = F.linear(x, mha.in_proj_weight[:E], mha.in_proj_bias[:E]).unflatten(-1, (H, -1))
        kv = F.linear(context, mha.in_proj_weight[E:], mha.in_proj_bias[E:])  # one GEMM for k and v
        k, v = kv.unflatten(-1, (2, H, -1)).unbind(1)
    out = attention_varlen(q, k, v, seqs_q.cu_seqlens, seqs_k.cu_seqlens, seqs_q.max_seqlen,
                           seqs_k.max_seqlen, causal=causal, dropout_p=mha.dropout if mha.training else 0.0,
                           backend=mha.backend)  # (total_q, H, D)
    return mha.out_proj(out.flatten(1))  # (total_q, E)


def ring_self_attention(mha: nn.MultiheadAttention, x: Tensor, part: ContextShard, causal: bool) -> Tensor:
    if not isinstance(mha, MultiHeadAttention):
        raise ValueError("context parallelism: expected a model with attention='fastattn', got 'torch'")
    if mha.training and mha.dropout > 0:
        raise ValueError(f"context parallelism: ring attention has no attention dropout, got dropout={mha.dropout}")
    H = mha.num_heads
    q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).unflatten(-1, (3, H, -1)).permute(2, 0, 3, 1, 4)
    out = ring_attention(q, k, v, group=part.group, causal=causal, key_padding_mask=part.padding,
                         layout=part.layout, backend=mha.backend)  # (B, H, n, D)
    return mha.out_proj(out.transpose(1, 2).flatten(2))


def cached_self_attention(mha: nn.MultiheadAttention, kind: str, x: Tensor, cache: KVCache) -> Tensor:
    """mha(x, x, x) for the new positions x (B, n, E) after those in the cache: either a whole
    prompt (empty cache, causal) or one token (which sees every cached key)."""
    if cache.length and x.shape[1] != 1:
        raise ValueError(f"cached step: expected one new token after the prompt, got {x.shape[1]}")
    q, k, v = (_heads(t, mha.num_heads) for t in F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1))
    if kind == "fastattn" and x.shape[1] == 1:
        out = cache.attend(q, k, v)
    else:
        out = _attend(kind, q, *cache.append(k, v), causal=x.shape[1] > 1)
    return mha.out_proj(out.transpose(1, 2).flatten(2))


def cached_cross_attention(mha: nn.MultiheadAttention, kind: str, x: Tensor, memory: tuple[Tensor, Tensor],
                           src_pad: Tensor) -> Tensor:
    """mha(x, context, context) with the context's keys and values projected once, in `memory`."""
    E = mha.embed_dim
    q = _heads(F.linear(x, mha.in_proj_weight[:E], mha.in_proj_bias[:E]), mha.num_heads)
    out = _attend(kind, q, *memory, key_padding_mask=src_pad)
    return mha.out_proj(out.transpose(1, 2).flatten(2))


def project_memory(mha: nn.MultiheadAttention, context: Tensor) -> tuple[Tensor, Tensor]:
    """The context's keys and values (B, H, S, D), projected once for every decoding step."""
    E = mha.embed_dim
    k, v = F.linear(context, mha.in_proj_weight[E:], mha.in_proj_bias[E:]).chunk(2, -1)
    return _heads(k, mha.num_heads), _heads(v, mha.num_heads)


class EncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self_attn = multihead(cfg)
        self.ff = FeedForward(cfg.d_model, cfg.dim_feedforward, cfg.dropout)
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.kind = cfg.attention  # for the cached path

    def forward(self, x: Tensor, seqs, causal: bool = False) -> Tensor:  # (B, S, E) or (total, E)
        x = self.norm1(x + self.drop(attend(self.self_attn, x, x, seqs, seqs, causal)))
        return self.norm2(x + self.drop(self.ff(x)))

    def step(self, x: Tensor, cache: KVCache) -> Tensor:
        """forward() of the causal (decoder-only) layer for new positions, keys cached."""
        x = self.norm1(x + cached_self_attention(self.self_attn, self.kind, x, cache))
        return self.norm2(x + self.ff(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self_attn, self.cross_attn = multihead(cfg), multihead(cfg)
        self.ff = FeedForward(cfg.d_model, cfg.dim_feedforward, cfg.dropout)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.drop = nn.Dropout(cfg.dropout)
        self.kind = cfg.attention  # for the cached path

    def forward(self, x: Tensor, context: Tensor, tgt_seqs, src_seqs) -> Tensor:
        x = self.norm1(x + self.drop(attend(self.self_attn, x, x, tgt_seqs, tgt_seqs, causal=True)))
        x = self.norm2(x + self.drop(attend(self.cross_attn, x, context, tgt_seqs, src_seqs)))
        return self.norm3(x + self.drop(self.ff(x)))

    def step(self, x: Tensor, cache: KVCache, memory: tuple[Tensor, Tensor], src_pad: Tensor) -> Tensor:
        x = self.norm1(x + cached_self_attention(self.self_attn, self.kind, x, cache))
        x = self.norm2(x + cached_cross_attention(self.cross_attn, self.kind, x, memory, src_pad))
        return self.norm3(x + self.ff(x))


class Transformer(nn.Module):
    """Encoder-decoder. forward(src (B, S), tgt_in (B, T)) -> logits (B, T, tgt_vocab), or
    forward(src Packed, tgt_in Packed) -> logits (total_t, tgt_vocab)."""

    def __init__(self, src_vocab: int, tgt_vocab: int, d_model: int = 512, num_heads: int = 8,
                 num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, max_len: int = 512,
                 pad_id: int = 0, attention: str = "fastattn"):
        super().__init__()
        cfg = self.config = TransformerConfig(src_vocab, tgt_vocab, d_model, num_heads,
                                              num_encoder_layers, num_decoder_layers,
                                              dim_feedforward, dropout, max_len, pad_id, attention)
        self.src_embed = Embedding(src_vocab, d_model, max_len, dropout)
        self.tgt_embed = Embedding(tgt_vocab, d_model, max_len, dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(num_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(num_decoder_layers))
        self.generator = nn.Linear(d_model, tgt_vocab)

    def encode(self, src) -> tuple[Tensor, Tensor | Packed]:
        src_seqs = sequences(src, self.config.pad_id)  # (B, S), True = padding; or src, Packed
        x = self.src_embed(src)
        for layer in self.encoder:
            x = layer(x, src_seqs)
        return x, src_seqs  # context (B, S, E) or (total_s, E)

    def forward(self, src, tgt_in) -> Tensor:
        context, src_seqs = self.encode(src)
        tgt_seqs = sequences(tgt_in, self.config.pad_id)
        x = self.tgt_embed(tgt_in)
        for layer in self.decoder:
            x = layer(x, context, tgt_seqs, src_seqs)
        return self.generator(x)  # (B, T, tgt_vocab) or (total_t, tgt_vocab)

    @torch.no_grad()
    def generate(self, src: Tensor, max_len: int, sos_id: int, eos_id: int) -> Tensor:
        """Greedy decoding from <SOS>, one query per step over cached keys. Returns (B, <= max_len)
        ids after <SOS>; a row ends at its <EOS>, pad_id after it."""
        context, src_pad = self.encode(src)
        memory = [project_memory(layer.cross_attn, context) for layer in self.decoder]
        caches = [KVCache(max_len) for _ in self.decoder]
        token = torch.full((src.shape[0], 1), sos_id, dtype=torch.long, device=src.device)
        out, done = [], torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        for t in range(max_len):
            x = self.tgt_embed(token, start=t)
            for layer, cache, mem in zip(self.decoder, caches, memory):
                x = layer.step(x, cache, mem, src_pad)
            token = greedy(self.generator(x[:, -1:]), self.config.pad_id)  # (B, 1)
            out.append(token.masked_fill(done[:, None], self.config.pad_id))
            done |= token[:, 0] == eos_id
            if done.all():
                break
        return torch.cat(out, dim=1)


class TransformerLM(nn.Module):
    """Decoder-only: causal self-attention layers. forward(x (B, T)) -> logits (B, T, vocab),
    forward(x Packed) -> logits (total, vocab), or forward(x ContextShard) -> this rank's logits
    (B, n, vocab)."""

    def __init__(self, vocab: int, d_model: int = 512, num_heads: int = 8, num_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, max_len: int = 512,
                 pad_id: int = 0, attention: str = "fastattn"):
        super().__init__()
        cfg = self.config = LMConfig(vocab, d_model, num_heads, num_layers, dim_feedforward,
                                     dropout, max_len, pad_id, attention)
        self.embed = Embedding(vocab, d_model, max_len, dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(num_layers))
        self.generator = nn.Linear(d_model, vocab)

    def forward(self, x) -> Tensor:
        seqs = sequences(x, self.config.pad_id)
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h, seqs, causal=True)
        return self.generator(h)

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int) -> Tensor:
        """Greedy continuation of equal-length prompts (B, P), keys cached: (B, P + new)."""
        if bool((prompt == self.config.pad_id).any()):
            raise ValueError("prompt: expected equal-length prompts without pad_id tokens")
        caches = [KVCache(prompt.shape[1] + max_new_tokens) for _ in self.layers]
        out, new, start = prompt, prompt, 0
        for _ in range(max_new_tokens):
            h = self.embed(new, start=start)
            for layer, cache in zip(self.layers, caches):
                h = layer.step(h, cache)
            start += new.shape[1]
            new = greedy(self.generator(h[:, -1:]), self.config.pad_id)
            out = torch.cat([out, new], dim=1)
        return out
