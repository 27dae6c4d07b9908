"""attn_implementation="fastattn" in Hugging Face transformers (small random BERT, GPT-2 and Llama)
against attn_implementation="eager" on padded batches, fastattn's on padded and packed ones."""
import pytest
import torch

import fastattn
from fastattn.integrations import transformers as hf

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
    calls = []
    real = getattr(hf, name)

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(hf, name, spy)
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
}


@pytest.mark.parametrize("arch", CAUSAL_LMS)
@pytest.mark.parametrize("rows,flash_kwargs", [(1, False), (1, True), (2, False)])
def test_causal_lm_packed_training(tmp_path, monkeypatch, arch, rows, flash_kwargs):
    model_cls, config = CAUSAL_LMS[arch]()
    eager, ours = load_both(model_cls, config, tmp_path)
    packed, cu_seqlens, ids, mask = packed_and_padded(101, rows, flash_kwargs)
    dense, varlen = spy_on_kernel(monkeypatch), spy_on_varlen(monkeypatch)
    derived = count_calls(monkeypatch, "_varlen_from_positions")
    labels = ids.masked_fill(mask == 0, -100)
    assert_same_training(eager, ours, dict(input_ids=ids, attention_mask=mask, labels=labels), packed)
    assert dense == [] and len(varlen) == 2  # no mask tensor: every layer went to attention_varlen
    kv_heads = 2 if arch == "llama-gqa" else 4
    for call in varlen:
        assert call["q"].shape == (24, 4, 8) and call["k"].shape == (24, kv_heads, 8)
        assert torch.equal(call["args"][0], cu_seqlens) and torch.equal(call["args"][1], cu_seqlens)
        assert call["args"][2:] == (9, 9) and call["causal"] is True
    assert len(derived) == (0 if flash_kwargs else 1)  # once per forward, not per layer

    built = transformers.masking_utils.create_causal_mask(
        config=ours.config, inputs_embeds=torch.zeros(rows, 24 // rows, 32), attention_mask=None, cache=None,
        position_ids=packed["position_ids"])
    assert isinstance(built, hf.PackedSequences)  # no O(N^2) mask was built


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


@pytest.mark.parametrize("name", ["softcap", "s_aux", "sinks", "indices", "block_indices"])
def test_unsupported_keywords_raise(name):
    value = 30.0 if name == "softcap" else torch.zeros(4)
    with pytest.raises(ValueError, match=rf"fastattn: {name} .* not supported"):
        call_forward(**{name: value})
    call_forward(**{name: None})  # unset: nothing to honour


def test_sinks_on_the_module_raise_even_without_s_aux():
    module = _Attention()
    module.sinks = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="_Attention.sinks"):
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


def test_gpt_oss_sinks_raise(tmp_path):
    config = transformers.GptOssConfig(vocab_size=101, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       num_local_experts=2, num_experts_per_tok=1, sliding_window=4)
    _, ours = load_both(transformers.GptOssForCausalLM, config, tmp_path)
    ids, mask = padded_ids(101, 2, 9)
    with pytest.raises(ValueError, match="s_aux .*attention sinks.* not supported"):
        ours(input_ids=ids, attention_mask=mask)


def test_gemma2_softcap_raises(tmp_path):
    config = transformers.Gemma2Config(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4)
    _, ours = load_both(transformers.Gemma2ForCausalLM, config, tmp_path)
    ids, mask = padded_ids(101, 2, 9)
    with pytest.raises(ValueError, match="softcap .*softcapping.* not supported"):
        ours(input_ids=ids, attention_mask=mask)


WINDOWED = {  # sliding windows of 4 over 13 tokens, some layers full: the window comes in the mask
    "mistral": lambda: (transformers.MistralForCausalLM, transformers.MistralConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4)),
    "qwen2": lambda: (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "gemma3": lambda: (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"])),
}


@pytest.mark.parametrize("arch", WINDOWED)
def test_sliding_window_models_match_eager(tmp_path, arch):
    model_cls, config = WINDOWED[arch]()
    eager, ours = load_both(model_cls, config, tmp_path)
    ids, mask = padded_ids(101, 3, 13)
    valid = mask.bool()[..., None]
    want = eager(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits * valid, want * valid,
                               atol=1e-5, rtol=1e-4)
    args = dict(input_ids=ids[:1, :6], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(**args), eager.generate(**args))  # past the window, from a cache


def test_t5_position_bias_matches_eager(tmp_path):
    config = transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, dropout_rate=0.0,
                                   decoder_start_token_id=0, pad_token_id=0)
    eager, ours = load_both(transformers.T5ForConditionalGeneration, config, tmp_path)
    ids, mask = padded_ids(99, 3, 11)
    labels = padded_ids(99, 3, 7, seed=1)[0]
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=mask, labels=labels)
        got = ours(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-4)
    loss = ours.train()(input_ids=ids, attention_mask=mask, labels=labels).loss  # a forward is fine
    with pytest.raises(ValueError, match="position_bias .* needs its gradient"):  # the bias is learned
        loss.backward()
