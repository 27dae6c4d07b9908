"""attn_implementation="fastattn" in Hugging Face transformers (small random BERT, GPT-2 and Llama)
against attn_implementation="eager" on padded batches, fastattn's on padded and packed ones."""
import inspect
import math

import pytest
import torch

import fastattn
from fastattn.integrations import transformers as hf
from fastattn.integrations import transformers_mask as hf_mask

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def registered():
    fastattn.register_transformers()


def padded_ids(vocab, B, L, left=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, L), generator=gen)
    lengths = torch.tensor([L, L - 3, L // 2, 2][:B])
    keep = torch.arange(L)[None, :] < lengths[:, None]
    if left:
        keep = keep.flip(-1)
    return ids, keep.long()


def spy_on_kernel(monkeypatch):
    calls = []
    real = hf.attention

    def spy(q, k, v, **kw):
        calls.append(kw)
        return real(q, k, v, **kw)

    monkeypatch.setattr(hf, "attention", spy)
    return calls


def load_both(model_cls, config, tmp_path):
    """The same random weights under eager and, through from_pretrained, under fastattn."""
    torch.manual_seed(0)
    eager = model_cls(config).eval()
    eager.save_pretrained(tmp_path)
    ours = model_cls.from_pretrained(tmp_path, attn_implementation="fastattn").eval()
    eager = model_cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert ours.config._attn_implementation == "fastattn"
    return eager, ours


def test_bert_padded(tmp_path, monkeypatch):
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64)
    eager, ours = load_both(transformers.BertModel, config, tmp_path)
    ids, mask = padded_ids(99, 4, 13)
    calls = spy_on_kernel(monkeypatch)
    want = eager(input_ids=ids, attention_mask=mask).last_hidden_state
    got = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()[..., None]
    torch.testing.assert_close(got * valid, want * valid, atol=1e-5, rtol=1e-4)
    assert len(calls) == 2
    for kw in calls:  # padding reached the kernel as (B, S), with no O(N^2) mask
        assert kw["attn_mask"] is None and kw["key_padding_mask"].shape == (4, 13)
        assert kw["causal"] is False


@pytest.mark.parametrize("left", [False, True])
def test_gpt2_padded_and_trained(tmp_path, monkeypatch, left):
    config = transformers.GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    eager, ours = load_both(transformers.GPT2LMHeadModel, config, tmp_path)
    ids, mask = padded_ids(101, 4, 15, left=left)
    calls = spy_on_kernel(monkeypatch)
    want = eager(input_ids=ids, attention_mask=mask).logits
    got = ours(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()[..., None]
    torch.testing.assert_close(got * valid, want * valid, atol=1e-5, rtol=1e-4)
    assert all(kw["attn_mask"] is None and kw["causal"] for kw in calls)

    # Score only predictions made from real tokens: with left padding the first real token's
    # label would be predicted from a padded position, a row that sees no key (eager returns
    # an arbitrary average there, fastattn zeros).
    predicted_from_pad = torch.nn.functional.pad(mask[:, :-1], (1, 0)) == 0
    labels = ids.masked_fill((mask == 0) | predicted_from_pad, -100)
    for model in (eager, ours):
        model.train()
        model.config.attn_pdrop = model.config.resid_pdrop = model.config.embd_pdrop = 0.0
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, p), q in zip(eager.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=2e-5, rtol=1e-4, msg=name)


def test_gpt2_generate_matches_eager(tmp_path):
    config = transformers.GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    eager, ours = load_both(transformers.GPT2LMHeadModel, config, tmp_path)
    ids, mask = padded_ids(101, 3, 9, left=True)
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(**args), eager.generate(**args))



# Padding-free training: sequences packed end to end (DataCollatorWithFlattening) against eager on
# the same sequences padded. LENGTHS also pack into two rows of 12 tokens: [9, 3] and [6, 6].
LENGTHS = [9, 6, 3, 6]
FLASH_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def packed_and_padded(vocab, rows, flash_kwargs):
    """(the packed batch, its cu_seqlens, the padded input_ids and attention_mask)."""
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, vocab, (n,), generator=gen) for n in LENGTHS]
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    row_seqs = [[0, 1, 2, 3]] if rows == 1 else [[0, 2], [1, 3]]
    parts = [collator([{"input_ids": seqs[i]} for i in row]) for row in row_seqs]
    packed = {key: torch.cat([p[key] for p in parts]) for key in ("input_ids", "labels", "position_ids")}
    if flash_kwargs:
        packed.update({key: parts[0][key] for key in FLASH_KWARGS})
    order = [LENGTHS[i] for row in row_seqs for i in row]
    cu_seqlens = torch.tensor([0, *order]).cumsum(0).int()
    ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    mask = (torch.arange(ids.shape[1]) < torch.tensor(LENGTHS)[:, None]).long()
    return packed, cu_seqlens, ids, mask


def spy_on_varlen(monkeypatch):
    calls = []
    real = hf.attention_varlen

    def spy(q, k, v, *args, **kw):
        calls.append(dict(q=q, k=k, args=args, **kw))
        return real(q, k, v, *args, **kw)

    monkeypatch.setattr(hf, "attention_varlen", spy)
    return calls


def count_calls(monkeypatch, name):
    """Calls of `name` in the integration's mask module."""
    calls = []
    real = getattr(hf_mask, name)

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(hf_mask, name, spy)
    return calls


def loss_and_grads(model, **batch):
    model.train()
    loss = model(**batch).loss
    loss.backward()
    return loss, {name: p.grad for name, p in model.named_parameters()}


def assert_same_training(eager, ours, padded, packed):
    want, want_grads = loss_and_grads(eager, **padded)
    got, got_grads = loss_and_grads(ours, **packed)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


CAUSAL_LMS = {
    "gpt2": lambda: (transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0, resid_pdrop=0.0,
        embd_pdrop=0.0, use_cache=False)),
    "llama-gqa": lambda: (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_cache=False)),
    "mistral-windowed": lambda: (transformers.MistralForCausalLM, transformers.MistralConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4, initializer_range=0.3, use_cache=False)),
    "gpt-oss-windowed": lambda: (transformers.GptOssForCausalLM, transformers.GptOssConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1, sliding_window=4,
        initializer_range=0.3, use_cache=False)),
}


# transformers' gpt-oss builds its masks without position_ids, so only the collator's kwargs pack
# it (eager, given packed position_ids alone, lets the sequences see each other).
PACKINGS = [(arch, rows, flash_kwargs) for arch in CAUSAL_LMS for rows, flash_kwargs in [(1, False), (1, True), (2, False)]
            if flash_kwargs or arch != "gpt-oss-windowed"]


@pytest.mark.parametrize("arch,rows,flash_kwargs", PACKINGS)
def test_causal_lm_packed_training(tmp_path, monkeypatch, arch, rows, flash_kwargs):
    model_cls, config = CAUSAL_LMS[arch]()
    eager, ours = load_both(model_cls, config, tmp_path)
    packed, cu_seqlens, ids, mask = packed_and_padded(101, rows, flash_kwargs)
    dense, varlen = spy_on_kernel(monkeypatch), spy_on_varlen(monkeypatch)
    derived = count_calls(monkeypatch, "_varlen_from_starts")
    labels = ids.masked_fill(mask == 0, -100)
    assert_same_training(eager, ours, dict(input_ids=ids, attention_mask=mask, labels=labels), packed)
    assert dense == [] and len(varlen) == 2  # no mask tensor: every layer went to attention_varlen
    kv_heads = getattr(config, "num_key_value_heads", 4)
    for call in varlen:
        assert call["q"].shape == (24, 4, 8) and call["k"].shape == (24, kv_heads, 8)
        assert torch.equal(call["args"][0], cu_seqlens) and torch.equal(call["args"][1], cu_seqlens)
        assert call["args"][2:] == (9, 9) and call["causal"] is True
        assert (call["sinks"] is not None) == (arch == "gpt-oss-windowed")
    # windows of 4 over sequences up to 9 long: every Mistral layer, gpt-oss's first
    windows = {"mistral-windowed": [(3, 0)] * 2, "gpt-oss-windowed": [(3, 0), (-1, -1)]}
    assert [call["window_size"] for call in varlen] == windows.get(arch, [(-1, -1)] * 2)
    assert len(derived) == (0 if flash_kwargs else 1)  # once per forward, not per layer

    create = transformers.masking_utils.create_causal_mask
    no_cache = {"cache" if "cache" in inspect.signature(create).parameters else "past_key_values": None}
    built = create(config=ours.config, inputs_embeds=torch.zeros(rows, 24 // rows, 32), attention_mask=None,
                   position_ids=packed["position_ids"], **no_cache)
    assert isinstance(built, hf.CompactMask) and built.sequence_ids is not None  # no O(N^2) mask was built


@pytest.mark.parametrize("flash_kwargs", [False, True])
def test_bert_packed_training(tmp_path, monkeypatch, flash_kwargs):
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    eager, ours = load_both(transformers.BertForMaskedLM, config, tmp_path)
    packed, cu_seqlens, ids, mask = packed_and_padded(99, 1, flash_kwargs)
    dense, varlen = spy_on_kernel(monkeypatch), spy_on_varlen(monkeypatch)
    # The collator's labels: every token but each sequence's first.
    labels = ids.masked_fill((mask == 0) | (torch.arange(ids.shape[1]) == 0), -100)
    assert_same_training(eager, ours, dict(input_ids=ids, attention_mask=mask, labels=labels), packed)
    assert dense == [] and len(varlen) == 2
    for call in varlen:
        assert torch.equal(call["args"][0], cu_seqlens) and call["args"][2:] == (9, 9)
        assert call["causal"] is False


def test_packed_flash_kwargs_incomplete(tmp_path):
    model_cls, config = CAUSAL_LMS["gpt2"]()
    _, ours = load_both(model_cls, config, tmp_path)
    packed, *_ = packed_and_padded(101, 1, flash_kwargs=True)
    del packed["max_length_q"], packed["max_length_k"]
    with pytest.raises(ValueError, match="got None for max_length_q, max_length_k"):
        ours(**packed)


# Every keyword transformers' attention calls pass that changes the result is honoured or raises
# (fastattn.integrations.transformers lists them; a survey of every family in transformers 5.24).
class _Attention(torch.nn.Module):
    is_causal = True


def call_forward(module=None, S=6, mask=None, **kw):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, S, 8, generator=gen) for _ in range(3))
    return hf.fastattn_attention_forward(module or _Attention(), q, k, v, mask, **kw)[0]


@pytest.mark.parametrize("name", ["sinks", "indices", "block_indices"])
def test_unsupported_keywords_raise(name):
    value = torch.zeros(4)
    with pytest.raises(ValueError, match=rf"fastattn: {name} .* not supported"):
        call_forward(**{name: value})
    call_forward(**{name: None})  # unset: nothing to honour


def test_sinks_on_the_module_raise_even_without_s_aux():
    module = _Attention()
    module.sinks = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="_Attention.sinks .* came without s_aux"):
        call_forward(module)


def test_unknown_keywords_raise_and_neutral_ones_change_nothing():
    with pytest.raises(ValueError, match="unknown attention keyword temperature=0.5"):
        call_forward(temperature=0.5)
    with pytest.raises(ValueError, match="output_attentions=True"):
        call_forward(output_attentions=True)
    neutral = dict(use_cache=True, output_hidden_states=True, output_router_logits=True, num_items_in_batch=7,
                   logits_to_keep=1, deterministic=True, encoder_hidden_states=None, output_attentions=False,
                   position_ids=torch.arange(6)[None].expand(2, -1))
    assert torch.equal(call_forward(**neutral), call_forward())


def test_sliding_window_needs_its_mask():
    with pytest.raises(ValueError, match="sliding_window=4 with 6 keys and no 4-D mask"):
        call_forward(sliding_window=4)
    assert torch.equal(call_forward(sliding_window=6), call_forward())  # a window wider than the keys
    i = torch.arange(6)
    window = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 4)  # what transformers' mask holds
    got = call_forward(sliding_window=4, mask=window[None, None].expand(2, 1, 6, 6))
    torch.testing.assert_close(got, call_forward(mask=window[None, None].expand(2, 1, 6, 6)))


def modern_config(cls, **kw):
    """A tiny random config of a model family with sliding windows of 4 (over 13 tokens) on some
    layers, weights large enough that windows, softcaps and sinks change the logits."""
    return cls(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, sliding_window=4, initializer_range=0.3, **kw)


MODERN = {  # every layer windowed (Mistral) or alternate layers (the others: layer_types or max_window_layers)
    "mistral": lambda: (transformers.MistralForCausalLM, modern_config(transformers.MistralConfig)),
    "qwen2": lambda: (transformers.Qwen2ForCausalLM, modern_config(
        transformers.Qwen2Config, use_sliding_window=True, max_window_layers=1)),
    "gemma2": lambda: (transformers.Gemma2ForCausalLM, modern_config(
        transformers.Gemma2Config, head_dim=8, query_pre_attn_scalar=8, attn_logit_softcapping=1.5)),
    "gemma3": lambda: (transformers.Gemma3ForCausalLM, modern_config(
        transformers.Gemma3TextConfig, head_dim=8, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"])),
    "gpt-oss": lambda: (transformers.GptOssForCausalLM, modern_config(
        transformers.GptOssConfig, head_dim=8, num_local_experts=2, num_experts_per_tok=1)),
}


def load_modern(arch, tmp_path):
    """Both models, gpt-oss's sinks drawn at random (its init leaves them near zero)."""
    model_cls, config = MODERN[arch]()
    torch.manual_seed(1)
    with torch.no_grad():
        init = model_cls(config)
        for name, p in init.named_parameters():
            if name.endswith(".sinks"):
                p.copy_(torch.randn_like(p))
    init.save_pretrained(tmp_path)
    eager = model_cls.from_pretrained(tmp_path, attn_implementation="eager")
    return eager, model_cls.from_pretrained(tmp_path, attn_implementation="fastattn")


def assert_score_mods_reached_the_kernel(arch, calls):
    """No 4-D mask; the window as window_size on the windowed layers, softcap and sinks as theirs."""
    assert calls and all(kw["attn_mask"] is None for kw in calls)
    windows = {kw["window_size"] for kw in calls}
    assert (3, 0) in windows and windows <= {(3, 0), (-1, -1)}
    assert all(kw["softcap"] == (1.5 if arch == "gemma2" else 0.0) for kw in calls)
    assert all((kw["sinks"] is not None) == (arch == "gpt-oss") for kw in calls)


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
@pytest.mark.parametrize("arch", MODERN)
def test_modern_models_train_as_eager(tmp_path, monkeypatch, arch, left):
    eager, ours = load_modern(arch, tmp_path)
    ids, mask = padded_ids(101, 3, 13, left=left)
    predicted_from_pad = torch.nn.functional.pad(mask[:, :-1], (1, 0)) == 0  # see test_gpt2_padded_and_trained
    labels = ids.masked_fill((mask == 0) | predicted_from_pad, -100)
    calls = spy_on_kernel(monkeypatch)
    outputs = []
    for model in (eager, ours):
        out = model.train()(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        outputs.append(out)
    valid = mask.bool()[..., None]
    torch.testing.assert_close(outputs[1].logits * valid, outputs[0].logits * valid, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outputs[1].loss, outputs[0].loss, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), ours.parameters()):  # gpt-oss's sinks included
        torch.testing.assert_close(q.grad, p.grad, atol=2e-5, rtol=1e-4, msg=name)
    assert_score_mods_reached_the_kernel(arch, calls)


@pytest.mark.parametrize("arch", MODERN)
def test_modern_models_generate_as_eager(tmp_path, monkeypatch, arch):
    """Left-padded prompts decoded past the window, from a cache: bottom-right alignment, no 4-D mask."""
    eager, ours = load_modern(arch, tmp_path)
    ids, mask = padded_ids(101, 3, 9, left=True)
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = eager.eval().generate(**args)
    calls = spy_on_kernel(monkeypatch)
    assert torch.equal(ours.eval().generate(**args), want)
    assert_score_mods_reached_the_kernel(arch, calls)
    decoding = [kw for kw in calls if kw["align"] == "bottom_right"]
    assert len(decoding) >= 7 * 2 and all(kw["causal"] for kw in decoding)


def test_the_mask_s_window_applies_whatever_the_keyword_says():
    """Eager applies the layer's mask and ignores sliding_window (FlashAttention's keyword), so fastattn
    applies the mask's window too: BLT passes none, T5Gemma one less than its mask holds."""
    window = hf.CompactMask(causal=True, keys=6, kv_length=6, window=4)
    i = torch.arange(6)
    seen = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 4)
    want = call_forward(mask=seen[None, None].expand(2, 1, 6, 6))
    for keyword in (None, 3, 4):
        torch.testing.assert_close(call_forward(mask=window, sliding_window=keyword), want)


def test_masks_the_kernel_cannot_take_stay_4d():
    """A chunked mask (Llama 4) and a static cache's tensor offset: SDPA's 4-D mask, as before."""
    from transformers.masking_utils import causal_mask_function, chunked_causal_mask_function
    chunked = hf.fastattn_mask(2, 6, 6, mask_function=chunked_causal_mask_function(3, torch.zeros(2, dtype=int)),
                               allow_is_causal_skip=False)
    assert chunked.shape == (2, 1, 6, 6)
    static = hf.fastattn_mask(2, 1, 8, q_offset=torch.tensor(5), mask_function=causal_mask_function,
                              attention_mask=torch.ones(2, 6, dtype=torch.bool), allow_is_causal_skip=False)
    assert static.shape == (2, 1, 1, 8)
    cached = hf.fastattn_mask(2, 1, 8, q_offset=5, mask_function=causal_mask_function,
                              attention_mask=torch.ones(2, 6, dtype=torch.bool))
    assert (cached.causal, cached.keys, cached.kv_length, cached.padding) == (True, 6, 8, None)  # slots 6, 7: empty


def test_t5_position_bias_trains_as_eager(tmp_path):
    """T5's learned relative position bias gets its gradient (from the saved lse), padded batches."""
    config = transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, dropout_rate=0.0,
                                   decoder_start_token_id=0, pad_token_id=0)
    eager, ours = load_both(transformers.T5ForConditionalGeneration, config, tmp_path)
    ids, mask = padded_ids(99, 3, 11)
    labels = padded_ids(99, 3, 7, seed=1)[0]
    outputs = [model.train()(input_ids=ids, attention_mask=mask, labels=labels) for model in (eager, ours)]
    torch.testing.assert_close(outputs[1].logits, outputs[0].logits, atol=1e-5, rtol=1e-4)
    for out in outputs:
        out.loss.backward()
    for (name, p), q in zip(eager.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=2e-5, rtol=1e-4, msg=name)
    assert ours.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad.abs().sum() > 0


def test_a_learned_bias_with_dropout_refuses_its_backward():
    bias = torch.randn(1, 4, 6, 6, requires_grad=True)
    out = call_forward(position_bias=bias, dropout=0.1)
    with pytest.raises(ValueError, match="_Attention's position_bias or float attention mask is learned"):
        out.sum().backward()
    call_forward(position_bias=bias).sum().backward()  # without dropout it has its gradient
    assert bias.grad.abs().sum() > 0


# The root causes the every-family sweep (tests/test_transformers_sweep.py) found, one test each.
def tiny(config_cls, **kw):
    return config_cls(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, **kw)


@pytest.mark.parametrize("model_cls,config", [
    ("BloomForCausalLM", lambda: transformers.BloomConfig(vocab_size=99, hidden_size=32, n_layer=2, n_head=4)),
    ("GPTNeoForCausalLM", lambda: transformers.GPTNeoConfig(vocab_size=99, hidden_size=32, num_layers=2,
                                                             num_heads=4, attention_types=[[["global"], 2]])),
    ("MambaForCausalLM", lambda: transformers.MambaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2)),
    ("GitForCausalLM", lambda: transformers.GitConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=4, intermediate_size=64,
                                                       vision_config=dict(hidden_size=32, num_hidden_layers=1,
                                                                          num_attention_heads=4, image_size=32,
                                                                          patch_size=16, intermediate_size=64))),
])
def test_models_that_never_call_the_attention_interface_are_refused_at_load(tmp_path, model_cls, config):
    """Their attention is their own code (or they have none): fastattn would never run."""
    model_cls = getattr(transformers, model_cls)
    model_cls(config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"fastattn: {model_cls.__name__} cannot run attn_implementation='fastattn'"):
        model_cls.from_pretrained(tmp_path, attn_implementation="fastattn")
    eager = model_cls.from_pretrained(tmp_path, attn_implementation="eager")
    try:  # transformers itself declines to switch a model whose modules hold their own attention
        eager.set_attn_implementation("fastattn")
    except ValueError as e:
        assert str(e).startswith(f"fastattn: {model_cls.__name__} cannot run")
    assert eager.config._attn_implementation == "eager"


def test_causality_comes_from_the_mask_not_the_module():
    """A decoder's self-attention module may say is_causal=False (shared with its encoder) while its mask
    is causal (NLLB-MoE, Pegasus-X, BigBird-Pegasus)."""
    module = torch.nn.Module()
    module.is_causal = False
    causal = hf.CompactMask(causal=True, keys=6, kv_length=6)
    i = torch.arange(6)
    torch.testing.assert_close(call_forward(module, mask=causal),
                               call_forward(module, mask=(i[None, :] <= i[:, None])[None, None].expand(2, 1, 6, 6)))


def test_keys_the_mask_does_not_cover_raise():
    """DeepSeek V4 appends compressed entries after the keys its mask covers: never dropped silently."""
    covers_six = hf.CompactMask(causal=True, keys=6, kv_length=6)
    with pytest.raises(ValueError, match="_Attention attends to 8 keys, but its mask covers 6"):
        call_forward(S=8, mask=covers_six)
    static_cache = hf.CompactMask(causal=True, keys=6, kv_length=8)  # slots 6 and 7: empty, seen by no query
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=gen) for _ in range(3))
    k8, v8 = (torch.cat([t, torch.full((2, 4, 2, 8), math.nan)], dim=2) for t in (k, v))
    got = hf.fastattn_attention_forward(_Attention(), q, k8, v8, static_cache)[0]
    torch.testing.assert_close(got, hf.fastattn_attention_forward(_Attention(), q, k, v, None)[0])


class _ReworksItsMask(torch.nn.Module):
    def forward(self, mask):
        return mask[:, :, :, :3]


def test_a_model_using_the_compact_mask_as_a_tensor_is_refused_by_name():
    mask = hf.CompactMask(causal=True, keys=6, kv_length=6)
    with pytest.raises(hf_mask.MaskUsedAsTensor, match="fastattn: _ReworksItsMask uses the attention mask as a tensor"):
        _ReworksItsMask()(mask)
    for use in (lambda m: m.dtype, lambda m: torch.cat([m, m]), lambda m: torch.zeros(2) + m, lambda m: ~m):
        with pytest.raises(hf_mask.MaskUsedAsTensor):
            use(mask)
    assert not hasattr(mask, "not_a_tensor_attribute")


def test_a_model_that_asks_for_its_mask_materialized_gets_sdpa_s():
    """Falcon (ALiBi), Doge and T5Gemma 2 ask create_causal_mask for a tensor to rework
    (allow_is_causal_skip=False); they get SDPA's 4-D mask."""
    from transformers.masking_utils import causal_mask_function
    keep = torch.ones(2, 6, dtype=torch.bool)
    assert isinstance(hf.fastattn_mask(2, 6, 6, mask_function=causal_mask_function, attention_mask=keep), hf.CompactMask)
    mask = hf.fastattn_mask(2, 6, 6, mask_function=causal_mask_function, attention_mask=keep,
                            allow_is_causal_skip=False)
    assert mask.shape == (2, 1, 6, 6) and torch.equal(mask[0, 0], torch.ones(6, 6, dtype=torch.bool).tril())


def test_falcon_with_alibi_matches_eager(tmp_path):
    config = transformers.FalconConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       alibi=True, new_decoder_architecture=False, multi_query=False,
                                       initializer_range=0.3)
    try:
        eager, ours = load_both(transformers.FalconForCausalLM, config, tmp_path)
    except ValueError as e:  # older transformers (5.17): Falcon computes attention in its own code, refused at load
        assert str(e).startswith("fastattn: FalconForCausalLM cannot run attn_implementation='fastattn'")
        return
    ids, mask = padded_ids(99, 3, 11)
    valid = mask.bool()[..., None]
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits * valid,
                                   eager(input_ids=ids, attention_mask=mask).logits * valid, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("packed", [False, True])
def test_mla_value_head_dim_differs(tmp_path, packed):
    """DeepSeek V3's multi-head latent attention: V's head dim (8) below Q's and K's (12), padded and packed."""
    config = transformers.DeepseekV3Config(
        vocab_size=99, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
        qk_nope_head_dim=8, v_head_dim=8, initializer_range=0.3, use_cache=False)
    eager, ours = load_both(transformers.DeepseekV3ForCausalLM, config, tmp_path)
    batch, cu_seqlens, ids, mask = packed_and_padded(99, 1, flash_kwargs=True)
    labels = ids.masked_fill(mask == 0, -100)
    padded = dict(input_ids=ids, attention_mask=mask, labels=labels)
    assert_same_training(eager, ours, padded, batch if packed else padded)


def test_modernbert_local_layers_train_packed(tmp_path, monkeypatch):
    """ModernBERT's local layers (a bidirectional window of 2 either side) run packed with their window,
    as its global layers do: before, they took a 4-D mask and the collator's cu_seq_lens went unused.
    (Its attention sees no position_ids, so without the collator's kwargs nothing tells packed sequences
    apart, for eager either.)"""
    config = transformers.ModernBertConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, global_attn_every_n_layers=2, local_attention=4,
                                           pad_token_id=0, initializer_range=0.3)
    eager, ours = load_both(transformers.ModernBertForMaskedLM, config, tmp_path)
    packed, cu_seqlens, ids, mask = packed_and_padded(99, 1, flash_kwargs=True)
    varlen, dense = spy_on_varlen(monkeypatch), spy_on_kernel(monkeypatch)
    labels = ids.masked_fill((mask == 0) | (torch.arange(ids.shape[1]) == 0), -100)
    assert_same_training(eager, ours, dict(input_ids=ids, attention_mask=mask, labels=labels), packed)
    assert dense == [] and sorted(call["window_size"] for call in varlen) == [(-1, -1), (2, 2)]
