"""attn_implementation="fastattn" in Hugging Face transformers (small random BERT and GPT-2)
against attn_implementation="eager" on padded batches."""
import pytest
import torch

import fastattn

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
    real = fastattn.hf.attention

    def spy(q, k, v, **kw):
        calls.append(kw)
        return real(q, k, v, **kw)

    monkeypatch.setattr(fastattn.hf, "attention", spy)
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
