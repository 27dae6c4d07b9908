"""attn_implementation="fastattn" against "eager" over every model family of the installed
transformers that has a causal-LM, seq2seq-LM or masked-LM head, on tiny random models.

    python tests/transformers_sweep.py [--only TYPE ...] [--json OUT] [--table docs/transformers-families.md]

A target is (model_type, head kind, model class). Each is built by one generic builder
(tiny_config: the family's default config, shrunk), saved, and loaded twice through
from_pretrained, under "eager" and "fastattn"; check() compares, in fp32, logits (a right-padded
batch of two, left-padded for decoder-only models, a batch of one with and without padding), every
parameter's gradient of a cross entropy, and greedy generation (tokens and scores). Outcomes:
  pass         all checks agree, or where one differs, SDPA (transformers' default) sides with fastattn:
               transformers' own two references disagree (the detail says so; Moshi's eager in 5.17
               has no causal mask without an attention_mask)
  refused      fastattn raised its ValueError("fastattn: ...") at load or the first forward (or
               at a later check, whose name then leads the detail: "grad: fastattn: ...")
  mismatch     a result differs beyond tolerance (the detail says what SDPA makes of it)
  crash        any other exception under fastattn
  no-fastattn  agreed, but fastattn's attention function was never called
  unbuildable  the builder could not make or run the tiny model under eager (a builder problem)
"""
from __future__ import annotations

import os

os.environ.setdefault("FASTATTN_POISON", "1")  # as tests/conftest.py: unwritten kernel outputs are NaN

import argparse
import collections
import contextlib
import dataclasses
import io
import json
import re
import sys
import tempfile
import time
import traceback
import warnings
from typing import NamedTuple

import torch

import fastattn

VOCAB = 128           # every vocabulary; special token ids above it are moved into [FREE, VOCAB)
FREE = 100            # random input ids are drawn below this, avoiding special ids
HIDDEN, HEADS, HEAD_DIM, FFN = 64, 4, 16, 64
INIT = 0.2            # initializer_range: large enough that a masking error shows in the logits
LENGTHS = (12, 8)     # the padded batch
DEC_LEN = 6           # decoder inputs of encoder-decoder models
ATOL, RTOL, GRAD_TOL = 1e-4, 1e-3, 1e-3

KINDS = {"causal": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
         "seq2seq": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
         "masked": "MODEL_FOR_MASKED_LM_MAPPING_NAMES"}


class Target(NamedTuple):
    model_type: str   # a CONFIG_MAPPING key, or "key+variant" for a hand-made variant (VARIANTS)
    kind: str         # causal, seq2seq or masked: which auto mapping listed it
    class_name: str


@dataclasses.dataclass
class Outcome:
    status: str
    detail: str = ""
    seconds: float = 0.0


# ----------------------------------------------------------------------------------- targets

# Hand-made variants: the family's tiny config plus these overrides (on the config, or on its
# text_config where it has one), for code paths that the defaults leave unexercised.
VARIANTS = {
    "mistral+window4": ("causal", {"sliding_window": 4}),
    "qwen2+window4": ("causal", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1,
                                  "layer_types": ["full_attention", "sliding_attention"]}),
    "gemma2+softcap": ("causal", {"sliding_window": 4, "attn_logit_softcapping": 2.0}),
    "gemma3_text+window4": ("causal", {"sliding_window": 4,
                                       "layer_types": ["sliding_attention", "full_attention"]}),
    "gpt_oss+window4": ("causal", {"sliding_window": 4}),
    "falcon+alibi": ("causal", {"alibi": True}),
    "cohere2+window4": ("causal", {"sliding_window": 4}),
}


def targets() -> list[Target]:
    from transformers.models.auto import modeling_auto

    found = [Target(t, kind, cls) for kind, mapping in KINDS.items()
             for t, cls in getattr(modeling_auto, mapping).items()]
    classes = {(t.model_type, t.kind): t.class_name for t in found}
    for name, (kind, _) in VARIANTS.items():
        found.append(Target(name, kind, classes[name.split("+")[0], kind]))
    return found


# ----------------------------------------------------------------------------------- builder

# What the generic builder cannot guess, by family, and why ("a.b" sets sub-config a's b; a key the
# config lacks goes to its text_config).
OVERRIDES: dict[str, dict] = {
    # Dbrx's default attn_config lacks the rope_theta and clip_qkv its attention reads
    "dbrx": {"attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8.0},
    "blt": {"use_cache": False},  # its cache fails to build from the composite config (transformers 5.25)
    # Defaults with no attention layer at all: make the second layer an attention one
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    # Sliding-window layers' head_dim must be their qk_nope_head_dim (16 once shrunk) + qk_rope_head_dim (8)
    "dots3_note": {"text_config.head_dim": 24},
    "dots3_note_text": {"head_dim": 24},
    # Its default rope_parameters is {}, which its rotary embedding cannot read
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0,
                                                                   "mrope_section": [2, 3, 3]}}},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},  # its default layer_types is None
    # Its to_dict lists each layer as two blocks, (attention, "mlp"), and doubles the layer counts
    "dory": {"num_hidden_layers": 6, "n_input_layers": 2, "n_recurrent_layers": 2, "n_output_layers": 2,
             "layer_types": ["sliding_attention", "mlp", "sliding_attention", "mlp", "full_attention", "mlp"]},
    # The QSA indexer's sizes default to None
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
                       "indexer_compress_ratio": 4},
    "qwen4_exp": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
                  "indexer_compress_ratio": 4},
    "xmod": {"default_language": "en_XX"},  # else its adapters need lang_ids
    # num_hidden_layers is num_layers_per_stack * H_cycles * (L_cycles + 1)
    "hrm_text": {"num_layers_per_stack": 1, "H_cycles": 1, "L_cycles": 1, "L_bp_cycles": [1], "num_hidden_layers": 2},
    # Attention runs on the concatenated input and original embeddings: twice hidden_size. Zamba's shared
    # attention block needs two hybrid layers to tie: (mamba, mamba, hybrid) + period 2, offset 1
    "zamba": {"num_hidden_layers": 5, "layers_block_type": None, "attention_hidden_size": 128,
              "attention_head_dim": 32},
    "zamba2": {"attention_hidden_size": 128, "attention_head_dim": 32},
    "xlstm": {"qk_dim_factor": 1.0},  # its cache assumes equal query and value head dims
    "esm": {"pad_token_id": 1, "mask_token_id": 3},  # default None, which its embeddings compare ids with
    # Axial position embeddings: dims summing to hidden_size, a shape whose product is max_position_embeddings
    "reformer": {"axial_pos_embds_dim": [32, 32], "axial_pos_shape": [8, 16], "local_attn_chunk_length": 4,
                 "lsh_attn_chunk_length": 4, "num_buckets": 4},
    # Its NoNorm (no normalisation) lets INIT-sized activations grow until the softmax saturates, where the
    # gradients of the scores are rounding noise
    "mobilebert": {"initializer_range": 0.05},
    # A hard top-k cut on the MLP's activations (activation_sparsity_pattern) turns rounding into jumps
    "gemma3n_text": {"activation_sparsity_pattern": [0.0, 0.0, 0.0]},
    "gemma3n": {"activation_sparsity_pattern": [0.0, 0.0, 0.0]},
    "musicgen": {"decoder.num_codebooks": 1},  # else input_ids are (batch * codebooks, length)
    "musicgen_melody": {"decoder.num_codebooks": 1},
}


# Families no tiny model of which can run on its own, with why.
UNBUILDABLE = {
    "gemma4_assistant": "a speculative-decoding drafter: every layer reads the target model's shared KV states",
    "gemma4_unified_assistant": "a speculative-decoding drafter: every layer reads the target model's shared KV states",
    "voxtral_realtime": "its decoder needs audio input_features: there is no text-only forward",
}


def _layer_choice(d: dict, n: int) -> list[int]:
    """Indices of the layers to keep out of n: at least 2, at least one layer of each value of
    every per-layer list (layer_types, mlp_layer_types...), index list (mlp_only_layers...) and
    per-layer override (per_layer_config), and the layers that kept ones read (kv_source_layers)."""
    indexed, sources = _index_lists(d, n), _source_lists(d, n)
    columns = [[v[i] == i for i in range(n)] if k in sources else v
               for k, v in d.items() if isinstance(v, list) and len(v) == n and k not in indexed]
    columns += [[i in v for i in range(n)] for v in indexed.values()]
    if isinstance(d.get("per_layer_config"), dict):  # heterogeneous layers: {"05": {"head_dim": 512}}
        overrides = {int(k): v for k, v in d["per_layer_config"].items()}
        columns.append([overrides.get(i) for i in range(n)])
    keep, seen = [], set()
    for i in range(n):
        new = {(c, repr(col[i])) for c, col in enumerate(columns)} - seen
        if new:
            keep.append(i)
            seen |= new
    keep += [i for i in range(n) if i not in keep][:max(0, 2 - len(keep))]
    keep += [v[i] for v in sources.values() for i in keep]
    return sorted(set(keep))


def _source_lists(d: dict, n: int) -> dict:
    """Per-layer lists of the layer each one reads (kv_source_layers: itself, or one before)."""
    return {k: v for k, v in d.items() if isinstance(k, str) and isinstance(v, list) and len(v) == n
            and all(type(j) is int and 0 <= j <= i for i, j in enumerate(v))
            and sum(j == i for i, j in enumerate(v)) > n // 2}


def _index_lists(d: dict, n: int) -> dict:
    """Lists of distinct layer indices (moe_layers, full_attn_idxs...)."""
    return {k: v for k, v in d.items()
            if isinstance(k, str) and re.search(r"layers|idxs|indices|ids|indexes", k) and isinstance(v, list)
            and v and len(set(v)) == len(v) and all(type(i) is int and 0 <= i < n for i in v)}


_LAYER_COUNT = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _shrink_layers(d: dict) -> None:
    """Keeps _layer_choice's layers: in the layer count and every per-layer or layer-index list."""
    counts = [d[k] for k in _LAYER_COUNT if type(d.get(k)) is int]
    counts += [len(v) for k, v in d.items() if k in ("layer_types", "layers_block_type") and isinstance(v, list)]
    if not counts or counts[0] <= 2:  # NemotronH's count is the length of its layers_block_type
        return
    n = counts[0]
    keep = _layer_choice(d, n)
    indexed, sources = _index_lists(d, n), _source_lists(d, n)
    for k, v in list(d.items()):
        if k in sources:
            d[k] = [keep.index(v[i]) for i in keep]
        elif k in indexed:
            d[k] = [keep.index(i) for i in v if i in keep]
        elif isinstance(v, list) and len(v) == n:
            d[k] = [v[i] for i in keep]
    for k in _LAYER_COUNT:
        if d.get(k) == n:
            d[k] = len(keep)
    if isinstance(d.get("per_layer_config"), dict):
        width = len(next(iter(d["per_layer_config"]), "0"))
        d["per_layer_config"] = {f"{keep.index(int(k)):0{width}d}": _shrink_override(v, d)
                                 for k, v in d["per_layer_config"].items() if int(k) in keep}


def _shrink_override(layer: dict, d: dict) -> dict:
    """A layer's overrides, shrunk; a size that differs from the config's stays different
    (gemma4's full-attention layers have twice the head_dim of the others)."""
    new = {}
    for k, v in layer.items():
        base, small = d.get(k), _int_rule(k, v, d) if type(v) is int else None
        if small is not None and type(base) is int and v != base:
            shrunk_base = _int_rule(k, base, d)
            if small == shrunk_base:
                small = 2 * small if v > base else max(1, small // 2)
        new[k] = v if small is None else small
    return new


def _int_rule(key: str, value: int, d: dict):
    """The tiny value of an int setting, or None to leave it."""
    heads = next((d[k] for k in ("num_attention_heads", "n_head", "num_heads", "n_heads")
                  if isinstance(d.get(k), int)), HEADS)
    rules = [
        (r"^num_kv_shared_layers$", lambda v: 0),
        (r"^(num_dense_layers|first_k_dense_replace|num_nextn_predict_layers|max_window_layers)$", lambda v: min(v, 1)),
        (r"(encoder|decoder)_layers$|^num_\w*layers$|^\w+_num_hidden_layers$", lambda v: min(v, 2)),
        (r"^(index_num_heads|index_n_heads|indexer_n_heads)$", lambda v: min(v, 2)),  # sparse attention's indexers
        (r"(key_value_heads|kv_heads|^num_kv_heads|kv_n_heads|num_query_groups)$",
         lambda v: v if v <= 1 else 2 if v < heads else HEADS),
        (r"(^num_attention_heads|^n_head|^num_heads|^n_heads|attention_heads)$|_num_heads$", lambda v: min(v, HEADS)),
        (r"^(qk_rope_head_dim|qk_nope_head_dim)$", lambda v: 8),
        (r"^v_head_dim$", lambda v: 8 if "qk_nope_head_dim" in d else HEAD_DIM),  # MLA: v's differs from qk's
        (r"^qk_head_dim$", lambda v: 16),
        (r"^head_dim$", lambda v: 8 if v == d.get("qk_rope_head_dim") else HEAD_DIM),  # MLA: rope's head dim
        (r"^rotary_dim$", lambda v: HEAD_DIM // 2),
        (r"^(q_lora_rank|kv_lora_rank|o_lora_rank)$", lambda v: 32),
        (r"(head_dim|^d_kv|attention_head_size|^kv_channels|^dim_head|^d_head|head_size)$", lambda v: HEAD_DIM),
        (r"(intermediate_size|ffn_dim|^d_ff$|^n_inner$|^d_inner$|feed_forward_size|ffn_hidden_size|^dim_ff$|^dff$)",
         lambda v: FFN),
        (r"(^hidden_size\w*|^d_model|^n_embd|^embed_dim|^dim|^hidden_dim|^emb_dim|^word_embed_proj_dim"
         r"|^true_hidden_size|^embedding_size|^embedding_dim|^d_latents|_hidden_size)$", lambda v: HIDDEN),
        (r"vocab_size|_vocab$", lambda v: min(v, VOCAB)),
        (r"(max_\w*position_embeddings|^n_positions$|^n_ctx$|max_\w*positions$|^max_seq_len$)", lambda v: min(v, 128)),
        (r"^(num_experts|n_routed_experts|num_local_experts|moe_num_experts)$", lambda v: min(v, 4)),
        (r"(num_experts_per_tok|^top_k$|^moe_topk$|^moe_top_k$|num_experts_per_token|^top_k_experts$|^moe_k$)",
         lambda v: min(v, 2)),
        (r"^(n_group|topk_group|num_expert_group)$", lambda v: 1),
        (r"^(n_shared_experts|num_shared_experts|moe_num_shared_experts)$", lambda v: min(v, 1)),
        (r"^sliding_window$", lambda v: min(v, 64)),
        (r"^attention_window$", lambda v: min(v, 4)),  # Longformer's local attention, to whose multiple it pads
        (r"(_period|every_n_layers|_interval|sparse_step|_step|sliding_window_pattern)$", lambda v: min(v, 2)),
        (r"_offset$", lambda v: min(v, 1)),
        (r"dropout|drop$", lambda v: 0),
        (r"^num_filters$", lambda v: 1),  # convolutional audio tokenizers' width, which doubles per stage
        (r"^num_blocks$", lambda v: min(v, 2)),
        (r"(_dim|_size|_channels?|_width)$",  # anything else big
         lambda v: HIDDEN if v > HIDDEN and not re.search("chunk|kernel", key) else None),
    ]
    for pattern, rule in rules:
        if re.search(pattern, key):
            return rule(value)
    return None


def _float_rule(key: str, value: float):
    if re.search(r"dropout|drop$|pdrop|drop_prob|jitter", key):
        return 0.0
    if re.search(r"^(initializer_range|init_std|embed_init_std|initializer_std|embedding_initializer_range)$", key):
        return max(value, INIT)
    return None


_NONE_FILL = {"vocab_size": VOCAB, "head_dim": HEAD_DIM, "num_key_value_heads": 2, "num_experts_per_tok": 2,
              "n_routed_experts": 4, "n_shared_experts": 1}
_TOKEN_KEY = re.compile(r"(token_id|token_index|token_ids|_index|_id)$")


def _shrink(d: dict, ids: dict) -> dict:
    """A tiny copy of a config's to_dict(): ints and floats by name (_int_rule, _float_rule), layers
    and per-layer lists (_shrink_layers), special token ids moved under VOCAB (ids: old -> new),
    recursing into sub-configs and other dicts."""
    original, d = d, dict(d)
    _shrink_layers(d)
    for k, v in d.items():
        if not isinstance(k, str) or k == "per_layer_config":  # id2label's; _shrink_layers did it
            continue
        if isinstance(v, dict):
            d[k] = _shrink(v, ids)
        elif isinstance(v, bool) or v is None:
            continue
        elif _TOKEN_KEY.search(k) and isinstance(v, (int, list)):
            d[k] = _token(v, ids)
        elif isinstance(v, int) and k not in _LAYER_COUNT:  # those: _shrink_layers
            new = _int_rule(k, v, original)
            d[k] = v if new is None else new
        elif isinstance(v, list) and v and all(type(i) is int for i in v):  # per layer, per stage
            d[k] = [i if (new := _int_rule(k, i, original)) is None else new for i in v]
        elif isinstance(v, float):
            new = _float_rule(k, v)
            d[k] = v if new is None else new
    for k, v in _NONE_FILL.items():  # defaults left to checkpoints, which the models cannot do without
        if k in d and d[k] is None:
            d[k] = v
    _fix_ssm(d)
    if isinstance(d.get("depths"), list):  # blocks per stage of a convolutional encoder
        d["depths"] = [1] * len(d["depths"])
    if "mrope_section" in d and isinstance(d["mrope_section"], list):
        d["mrope_section"] = _rescale(d["mrope_section"], HEAD_DIM // 2)
    return d


_SSM_HEADS = (("mamba_n_heads", "mamba_d_head"), ("mamba_num_heads", "mamba_head_dim"),
              ("n_mamba_heads", "mamba_headdim"), ("num_heads", "head_dim"))


def _fix_ssm(d: dict) -> None:
    """Mamba-2 style layers: heads * head_dim must be expand * hidden_size; small states."""
    expand = next((k for k in ("mamba_expand", "expand") if isinstance(d.get(k), int)), None)
    if expand is None or not isinstance(d.get("hidden_size"), int):
        return
    inner = d[expand] * d["hidden_size"]
    for heads, dim in _SSM_HEADS:
        mamba = heads != "num_heads" or "state_size" in d  # Mamba2Config's heads are plain num_heads
        if mamba and isinstance(d.get(heads), int) and isinstance(d.get(dim), int):
            d[dim], d[heads] = HEAD_DIM, inner // HEAD_DIM
            break
    for k in ("mamba_d_state", "state_size", "ssm_state_size"):
        if isinstance(d.get(k), int):
            d[k] = 16
    for k in ("n_groups", "mamba_n_groups", "mamba_ngroups"):
        if isinstance(d.get(k), int):
            d[k] = 1
    for k in ("time_step_rank", "mamba_dt_rank"):
        if isinstance(d.get(k), int):
            d[k] = 8
    if isinstance(d.get("mamba_d_ssm"), int):
        d["mamba_d_ssm"] = inner


def _token(v, ids: dict):
    if isinstance(v, list):
        return [_token(i, ids) for i in v]
    if not isinstance(v, int) or isinstance(v, bool) or v < VOCAB:
        return v
    return ids.setdefault(v, VOCAB - 1 - len(ids))


def _rescale(sections: list[int], total: int) -> list[int]:
    new = [max(1, s * total // sum(sections)) for s in sections]
    new[-1] += total - sum(new)
    return new


def _base(model_type: str) -> tuple[str, dict]:
    if "+" in model_type:
        return model_type.split("+")[0], VARIANTS[model_type][1]
    return model_type, {}


def tiny_config(model_type: str):
    """The family's default config, shrunk (see _shrink), with OVERRIDES and a variant's settings."""
    from transformers import CONFIG_MAPPING

    base, variant = _base(model_type)
    cls = CONFIG_MAPPING[base]
    d = _shrink(cls().to_dict(), {})
    for k, v in {**OVERRIDES.get(base, {}), **variant}.items():
        _set(d, k, v)
    return cls(**{k: v for k, v in d.items() if k not in ("transformers_version", "model_type")})


def _set(d: dict, key: str, value) -> None:
    """Sets `key` ("a.b" for a nested one) on d, or on its text_config where it has one."""
    if "." in key:
        head, rest = key.split(".", 1)
        return _set(d[head], rest, value)
    target = d["text_config"] if key not in d and isinstance(d.get("text_config"), dict) else d
    target[key] = value


def model_class(target: Target):
    import transformers

    return getattr(transformers, target.class_name)


def model_config(target: Target):
    """tiny_config, or the sub-config the class takes (a text_config, as the auto classes do; a decoder)."""
    config = tiny_config(target.model_type)
    wanted = getattr(model_class(target), "config_class", None)
    if wanted is not None and not isinstance(config, wanted):
        config = next((v for v in vars(config).values() if isinstance(v, wanted)), config)
    if target.kind == "causal" and hasattr(config, "is_decoder"):  # BERT-likes are causal only as decoders
        config.is_decoder = True
    return config


def build(target: Target, path: str) -> None:
    """The tiny model, with fixed random weights, saved to path."""
    config = model_config(target)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_class(target)(config)
    _randomise(model)
    model.save_pretrained(path)


def _randomise(model) -> None:
    """Gives a random value to what initialises to a constant that hides attention errors:
    learnable sinks (init ~0) and all-zero matrices (zero-initialised output projections)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks") or (p.dim() >= 2 and not p.any()):
                p.copy_(torch.randn(p.shape, generator=gen) * INIT)


# ----------------------------------------------------------------------------------- inputs

def special_ids(config) -> set[int]:
    found = set()

    def walk(d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v)
            elif isinstance(k, str) and _TOKEN_KEY.search(k):
                found.update(i for i in (v if isinstance(v, list) else [v]) if type(i) is int)

    walk(config.to_dict())
    return found


@dataclasses.dataclass
class Inputs:
    ids: torch.Tensor          # (2, L) random ordinary tokens, right-padded to LENGTHS
    mask: torch.Tensor         # 1 = real token
    left_ids: torch.Tensor     # the same rows, left-padded
    left_mask: torch.Tensor
    dec: torch.Tensor | None   # decoder_input_ids (2, DEC_LEN) of an encoder-decoder, else None
    targets: torch.Tensor      # what the loss predicts: next tokens, the tokens themselves, decoder targets
    next_token: bool           # a decoder-only model's loss: the next tokens
    pad: int


def make_inputs(config, kind: str) -> Inputs:
    gen = torch.Generator().manual_seed(2)
    text = config.get_text_config()
    vocab = min(FREE, getattr(text, "vocab_size", None) or FREE)
    allowed = torch.tensor(sorted(set(range(vocab)) - special_ids(config)))
    draw = lambda *shape: allowed[torch.randint(len(allowed), shape, generator=gen)]
    L = max(LENGTHS)
    mask = (torch.arange(L)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    pad = getattr(text, "pad_token_id", None)
    pad = (pad[0] if isinstance(pad, list) else pad) if pad is not None else 0
    ids = draw(2, L).masked_fill(mask == 0, pad)
    left_ids, left_mask = ids.clone(), mask.flip(-1)
    for row, n in enumerate(LENGTHS):
        left_ids[row] = torch.cat([ids[row, n:], ids[row, :n]])
    dec = draw(2, DEC_LEN) if config.is_encoder_decoder else None
    targets = draw(2, DEC_LEN) if dec is not None else ids
    return Inputs(ids, mask, left_ids, left_mask, dec, targets, kind != "masked", pad)


# ----------------------------------------------------------------------------------- stages
# Each stage runs one model on the inputs and returns what must agree between eager and fastattn.

def _logits(model, inputs: Inputs, ids, mask):
    kwargs = {"input_ids": ids}
    if mask is not None:
        kwargs["attention_mask"] = mask
    if inputs.dec is not None:
        kwargs["decoder_input_ids"] = inputs.dec[:ids.shape[0]]
    out = model(**kwargs)
    return out.logits if hasattr(out, "logits") else out[0]


def _valid(logits, mask):
    """The logits at real tokens (all of them for a decoder's, which has no padding)."""
    if mask is None or logits.shape[:2] != mask.shape:
        return logits
    return logits[mask.bool()]


def stage_padded(model, inputs):
    model.eval()
    with torch.no_grad():
        return _valid(_logits(model, inputs, inputs.ids, inputs.mask), inputs.mask)


def stage_left_padded(model, inputs):
    """Decoder-only models: right padding hides behind the causal mask, left padding does not."""
    model.eval()
    with torch.no_grad():
        return _valid(_logits(model, inputs, inputs.left_ids, inputs.left_mask), inputs.left_mask)


def _padding_leaks(model, inputs) -> bool:
    """Whether eager's real tokens' logits depend on what the left padding holds (BLT pools bytes into
    patches across it): then no implementation's left-padded result is a reference for another's,
    since they may differ where a row sees no key (fastattn's zeros, eager's average)."""
    other = inputs.left_ids.masked_fill(inputs.left_mask == 0, 1 if inputs.pad != 1 else 2)
    moved = dataclasses.replace(inputs, left_ids=other)
    try:
        return compare("left-padded", stage_left_padded(model, moved), stage_left_padded(model, inputs)) is not None
    except Exception:  # eager cannot run it: the stage is skipped below, and said so
        return False


def stage_single(model, inputs):
    model.eval()
    with torch.no_grad():
        return _logits(model, inputs, inputs.ids[:1], None)


def stage_single_padded(model, inputs):
    model.eval()
    with torch.no_grad():
        return _valid(_logits(model, inputs, inputs.ids[1:], inputs.mask[1:]), inputs.mask[1:])


def stage_grad(model, inputs):
    """Every parameter's gradient of a cross entropy over the positions predicted from real tokens."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    logits = _logits(model, inputs, inputs.ids, inputs.mask).float()
    if inputs.dec is not None:  # the decoder's, unpadded
        scored, targets = logits, inputs.targets
    elif inputs.next_token:
        keep = (inputs.mask[:, 1:] * inputs.mask[:, :-1]).bool()
        scored, targets = logits[:, :-1][keep], inputs.targets[:, 1:][keep]
    else:
        keep = inputs.mask.bool()
        scored, targets = logits[keep], inputs.targets[keep]
    loss = torch.nn.functional.cross_entropy(scored.reshape(-1, scored.shape[-1]), targets.reshape(-1))
    loss.backward()
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def stage_generate(model, inputs):
    """Greedy tokens and their scores, from a left-padded prompt (the right-padded one of an encoder)."""
    model.eval()
    ids, mask = (inputs.ids, inputs.mask) if inputs.dec is not None else (inputs.left_ids, inputs.left_mask)
    extra = {}
    if model.generation_config.decoder_start_token_id is None:  # a tiny T5's has none; MusicGen pads with it
        extra["decoder_start_token_id"] = inputs.pad
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                             pad_token_id=inputs.pad, return_dict_in_generate=True, output_scores=True, **extra)
    return out.sequences, out.scores


STAGES = {"padded": stage_padded, "left-padded": stage_left_padded, "single": stage_single,
          "single-padded": stage_single_padded, "grad": stage_grad, "generate": stage_generate}


def _stages(target: Target, model) -> list[str]:
    generates = target.kind != "masked" and model.can_generate()
    decoder_only = generates and not model.config.is_encoder_decoder
    return [s for s in STAGES if (s != "generate" or generates) and (s != "left-padded" or decoder_only)]


# ----------------------------------------------------------------------------------- comparison

def compare(stage: str, got, want) -> str | None:
    """None where they agree, else what differs."""
    if stage == "grad":
        return _compare_grads(got, want)
    if stage == "generate":
        return _compare_generated(got, want)
    if got.shape != want.shape:
        return f"{stage}: logits of shape {tuple(got.shape)}, eager's {tuple(want.shape)}"
    if not torch.allclose(got, want, atol=ATOL, rtol=RTOL):
        err = (got - want).abs().nan_to_num(float("inf")).max().item()
        return f"{stage}: logits differ by up to {err:.3g}"
    return None


def _compare_grads(got: dict, want: dict) -> str | None:
    """Relative norm errors; a norm below 1e-4 of the largest counts as that (a key bias's gradient is
    zero but for rounding: softmax ignores what a query adds to all its scores)."""
    floor = 1e-4 * max((b.norm().item() for b in want.values() if b is not None), default=0.0)
    worst, name = 0.0, None
    for key, b in want.items():
        a = got.get(key)
        if a is None and b is None:
            continue
        if a is None or b is None:
            return f"grad: {key} has a gradient under {'eager' if a is None else 'fastattn'} only"
        err = (a - b).norm().item() / max(b.norm().item(), floor, 1e-30)
        if not err <= worst:  # NaN counts as worst
            worst, name = err, key
        if err != err:
            break
    return None if worst <= GRAD_TOL else f"grad: {name} off by {worst:.3g} (relative norm)"


def _compare_generated(got, want) -> str | None:
    """The same tokens, and the same scores for every step up to the first difference; a
    difference is no error where eager's scores nearly tie between the two tokens."""
    (seq, scores), (want_seq, want_scores) = got, want
    if seq.shape[0] != want_seq.shape[0]:
        return f"generate: {seq.shape[0]} sequences, eager's {want_seq.shape[0]}"
    start = want_seq.shape[1] - len(want_scores)
    for step, (a, b) in enumerate(zip(scores, want_scores)):
        if not torch.allclose(a, b, atol=ATOL, rtol=RTOL):
            err = (a - b).abs().nan_to_num(float("inf")).max().item()
            return f"generate: step {step}'s scores differ by up to {err:.3g}"
        t = start + step
        if t < seq.shape[1] and t < want_seq.shape[1] and not torch.equal(seq[:, t], want_seq[:, t]):
            row = (seq[:, t] != want_seq[:, t]).nonzero()[0, 0]
            if (b[row, want_seq[row, t]] - b[row, seq[row, t]]).abs() < 10 * ATOL:
                return None  # a near-tie: what follows may differ
            return f"generate: step {step}, token {seq[row, t].item()}, eager's {want_seq[row, t].item()}"
    if not torch.equal(seq, want_seq):
        return f"generate: tokens {seq.tolist()}, eager's {want_seq.tolist()}"
    return None


# ----------------------------------------------------------------------------------- check

def _describe(e: BaseException) -> str:
    """Type, first line of the message and innermost frame."""
    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" @ {os.path.basename(frame.filename)}:{frame.lineno}" if frame else ""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}{where}"


def _refusal(e: BaseException) -> str | None:
    """fastattn's refusal message (first line) where e is one, or was raised from one."""
    while e is not None:
        if isinstance(e, ValueError) and str(e).startswith("fastattn:"):
            return str(e).splitlines()[0]
        e = e.__cause__
    return None


@contextlib.contextmanager
def _spy(calls: list):
    """Counts the calls of the attention function registered as "fastattn"."""
    from transformers import AttentionInterface

    real = AttentionInterface._global_mapping["fastattn"]

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    AttentionInterface.register("fastattn", spy)
    try:
        yield
    finally:
        AttentionInterface.register("fastattn", real)


def load(target: Target, path: str, attn: str):
    torch.manual_seed(0)  # anything from_pretrained initialises rather than loads, the same for both
    return model_class(target).from_pretrained(path, attn_implementation=attn, dtype=torch.float32)


def check(target: Target) -> Outcome:
    start = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            tempfile.TemporaryDirectory() as path:  # some models print()
        warnings.simplefilter("ignore")
        status, detail = _check(target, path)
    return Outcome(status, detail, round(time.perf_counter() - start, 3))


def _check(target: Target, path: str) -> tuple[str, str]:
    base = _base(target.model_type)[0]
    if base in UNBUILDABLE:
        return "unbuildable", UNBUILDABLE[base]
    try:  # the tiny model, and what eager makes of it
        build(target, path)
        eager = load(target, path, "eager")
        inputs = make_inputs(eager.config, target.kind)
        stages = _stages(target, eager)
        want = {"padded": stage_padded(eager, inputs)}
    except Exception as e:
        return "unbuildable", _describe(e)
    notes = []
    if "left-padded" in stages and _padding_leaks(eager, inputs):
        stages = [s for s in stages if s not in ("left-padded", "generate")]
        notes.append("left-padded and generate skipped: eager's real tokens see what the padding holds")
    for stage in stages[1:]:
        try:
            want[stage] = STAGES[stage](eager, inputs)
        except Exception as e:  # a check eager cannot run: skipped, and said so
            notes.append(f"{stage} skipped (eager: {_describe(e)})")
    del eager
    calls = []
    with _spy(calls):
        try:
            ours = load(target, path, "fastattn")
        except Exception as e:
            return ("refused", _refusal(e)) if _refusal(e) else ("crash", f"load: {_describe(e)}")
        got, failures = _run(ours, inputs, want)
    for status in ("crash", "mismatch", "refused"):
        found = [f for f in failures if f[1] == status]
        if found:
            sdpa = _sdpa_note(target, path, inputs, [f[0] for f in found], want, got) if status == "mismatch" else ""
            if sdpa == SDPA_SIDES_WITH_FASTATTN:  # transformers' two references disagree: its default decides
                notes.append(f"eager differs from sdpa, which fastattn equals ({'; '.join(f[2] for f in found)})")
                break
            return status, "; ".join(f[2] for f in found) + sdpa + _notes(notes)
    if not calls:
        return "no-fastattn", "fastattn's attention function was never called" + _notes(notes)
    return "pass", "; ".join(notes)


def _run(ours, inputs: Inputs, want: dict) -> tuple[dict, list]:
    """fastattn's results, and its failures: (stage, crash | mismatch | refused, detail)."""
    got, failures = {}, []
    for stage in want:
        try:
            got[stage] = STAGES[stage](ours, inputs)
        except Exception as e:
            refusal = _refusal(e)
            if refusal and stage == "padded":  # at the first forward: nothing more to check
                return got, [(stage, "refused", refusal)]
            failures.append((stage, "refused" if refusal else "crash", f"{stage}: {refusal or _describe(e)}"))
            continue
        problem = compare(stage, got[stage], want[stage])
        if problem:
            failures.append((stage, "mismatch", problem))
    return got, failures


def _sdpa_note(target: Target, path: str, inputs: Inputs, stages: list, want: dict, got: dict) -> str:
    """What SDPA makes of the stages where fastattn and eager differ: where SDPA sides with fastattn,
    the model's result depends on what an implementation does with padding (fully padded rows)."""
    try:
        sdpa = load(target, path, "sdpa")
        results = {stage: STAGES[stage](sdpa, inputs) for stage in stages}
    except Exception as e:
        return f" (sdpa: {_describe(e)})"
    agree = lambda ref: all(compare(s, results[s], ref[s]) is None for s in stages if s in ref)
    return " (sdpa agrees with eager)" if agree(want) else SDPA_SIDES_WITH_FASTATTN if agree(got) else \
        " (sdpa agrees with neither)"


SDPA_SIDES_WITH_FASTATTN = " (sdpa agrees with fastattn)"


def _notes(notes: list[str]) -> str:
    return "".join(f"; {n}" for n in notes)


# ----------------------------------------------------------------------------------- CLI

def setup() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    fastattn.register_transformers()


REFUSALS = [
    "Refused, by what each would need:",
    "- *its attention modules compute attention in their own code* (or pick them from a table without "
    "fastattn): the model ported to transformers' attention interface, as transformers requires for 'sdpa'.",
    "- *no attention layer*: attention-free (Mamba, RWKV, FNet): nothing to fuse.",
    "- *indices*: sparse attention over top-k selected keys per query (a gather in the kernel).",
    "- *per-token attention sinks*: a sink logit per query row, not per head.",
    "- *attends to N keys, but its mask covers M*: keys the model appends past its mask (DeepSeek V4's "
    "compressed entries) with their own bias blocks.",
    "- *uses the attention mask as a tensor*: the model reworks the mask in its own code (a MoE router "
    "reading it, a bias added to it) after asking for it without materializing it.",
    "- *learned and needs its gradient* (at the backward only): a learned float bias together with a "
    "window, softcapping or dropout; forward and inference run.",
]


def write_table(path: str, rows: list[tuple[Target, Outcome]]) -> None:
    import transformers

    counts = collections.Counter(o.status for _, o in rows)
    lines = [f"# attn_implementation=\"fastattn\" across transformers {transformers.__version__}", "",
             "Generated by `python tests/transformers_sweep.py --table docs/transformers-families.md`: tiny "
             "random models, fastattn against eager (logits padded and not, every gradient, greedy generation); "
             "`tests/test_transformers_sweep.py` fails on any other outcome than pass or refused. "
             + ", ".join(f"{n} {status}" for status, n in counts.most_common()) + ".", "",
             *REFUSALS, "", "| family | head | class | outcome | reason or note |", "|---|---|---|---|---|"]
    for t, o in rows:
        lines.append(f"| {t.model_type} | {t.kind} | {t.class_name} | {o.status} | {o.detail.replace('|', '/')} |")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="TYPE", help="model types (or type+variant) to check")
    parser.add_argument("--json", metavar="OUT", help="write the outcomes as JSON")
    parser.add_argument("--table", metavar="PATH", help="write a markdown table of the outcomes")
    args = parser.parse_args(argv)
    setup()
    chosen = [t for t in targets() if not args.only or t.model_type in args.only]
    rows, start = [], time.perf_counter()
    for t in chosen:
        outcome = check(t)
        rows.append((t, outcome))
        print(f"{outcome.seconds:6.2f}s {outcome.status:11s} {t.model_type:28s} {t.kind:8s} {outcome.detail}"[:300],
              flush=True)
    total = time.perf_counter() - start
    counts = {}
    for _, o in rows:
        counts[o.status] = counts.get(o.status, 0) + 1
    print(f"\n{len(rows)} targets in {total:.1f}s: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    print("slowest: " + ", ".join(f"{t.model_type}/{t.kind} {o.seconds:.2f}s"
                                  for t, o in sorted(rows, key=lambda r: -r[1].seconds)[:10]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**t._asdict(), **dataclasses.asdict(o)} for t, o in rows], f, indent=1)
    if args.table:
        write_table(args.table, rows)
    return 0 if all(o.status in ("pass", "refused", "unbuildable") for _, o in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
