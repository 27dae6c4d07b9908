"""The Transformer of the notes: the same model on fastattn and on torch.nn.MultiheadAttention
computes the same thing (logits, loss, gradients, training curves, greedy decodes), KV-cached
generation equals recomputation, and packed batches give the padded batch's logits."""
import pytest
import torch
import torch.nn.functional as F

from fastattn.models import Packed, Transformer, TransformerLM, greedy

PAD, SOS, EOS = 0, 1, 2
SMALL = dict(d_model=32, num_heads=4, dim_feedforward=64, max_len=64, pad_id=PAD)


def seq2seq_batch(B=6, vocab=20, gen=None):
    """A right-padded source of varying length, and the copy task's teacher-forced target."""
    src = torch.randint(3, vocab, (B, 12), generator=gen)
    src_len = torch.randint(1, 13, (B,), generator=gen)
    src[torch.arange(12)[None] >= src_len[:, None]] = PAD
    tgt = src[:, :10]
    tgt_in = torch.cat([torch.full((B, 1), SOS), tgt[:, :-1]], dim=1)
    return src, tgt_in, tgt


def pair(cls, **kw):
    """The same weights under attention="torch" and attention="fastattn"."""
    torch.manual_seed(0)
    ref = cls(**kw, attention="torch")
    ours = cls(**kw, attention="fastattn")
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def seq2seq_loss(model, src, tgt_in, tgt):
    logits = model(src, tgt_in)
    return logits, F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=PAD)


def test_transformer_logits_loss_and_gradients_match():
    ref, ours = pair(Transformer, src_vocab=20, tgt_vocab=22, num_encoder_layers=2,
                     num_decoder_layers=2, dropout=0.0, **SMALL)
    src, tgt_in, tgt = seq2seq_batch(gen=torch.Generator().manual_seed(1))
    (l_ref, loss_ref), (l_ours, loss_ours) = seq2seq_loss(ref, src, tgt_in, tgt), seq2seq_loss(ours, src, tgt_in, tgt)
    torch.testing.assert_close(l_ours, l_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_ours, loss_ref, atol=1e-6, rtol=1e-6)
    loss_ref.backward()
    loss_ours.backward()
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_lm_logits_and_gradients_match():
    ref, ours = pair(TransformerLM, vocab=30, num_layers=2, dropout=0.0, **SMALL)
    x = torch.randint(3, 30, (4, 17))
    x[1, 12:] = PAD  # right padding
    y_ref, y_ours = ref(x), ours(x)
    torch.testing.assert_close(y_ours, y_ref, atol=1e-5, rtol=1e-5)
    y_ref.square().mean().backward()
    y_ours.square().mean().backward()
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_training_curves_match():
    ref, ours = pair(Transformer, src_vocab=20, tgt_vocab=22, num_encoder_layers=2,
                     num_decoder_layers=2, dropout=0.0, **SMALL)
    curves = []
    for model in (ref, ours):
        gen = torch.Generator().manual_seed(5)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        curve = []
        for _ in range(32):
            loss = seq2seq_loss(model, *seq2seq_batch(gen=gen))[1]
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves.append(torch.tensor(curve))
    assert curves[0][-1] < curves[0][0] * 0.85  # it learns
    assert (curves[0] - curves[1]).abs().max() < 1e-3


def test_greedy_decoding_identical_and_cached_equals_recomputed():
    ref, ours = pair(Transformer, src_vocab=20, tgt_vocab=22, num_encoder_layers=2,
                     num_decoder_layers=2, dropout=0.1, **SMALL)
    ref.eval(), ours.eval()
    src = seq2seq_batch(gen=torch.Generator().manual_seed(2))[0]
    out_ref = ref.generate(src, max_len=9, sos_id=SOS, eos_id=EOS)
    out = ours.generate(src, max_len=9, sos_id=SOS, eos_id=EOS)
    assert torch.equal(out, out_ref)
    for model, cached in ((ref, out_ref), (ours, out)):  # recompute every step from scratch
        tgt = torch.full((src.shape[0], 1), SOS)
        with torch.no_grad():
            for _ in range(cached.shape[1]):
                tgt = torch.cat([tgt, greedy(model(src, tgt)[:, -1:], PAD)], dim=1)
        done = torch.cumsum(tgt[:, 1:] == EOS, dim=1) - (tgt[:, 1:] == EOS).long() > 0
        assert torch.equal(tgt[:, 1:].masked_fill(done, PAD), cached)


def test_lm_cached_generation_equals_recomputation():
    ref, ours = pair(TransformerLM, vocab=30, num_layers=2, dropout=0.0, **SMALL)
    prompt = torch.randint(3, 30, (3, 5))
    outs = []
    for model in (ref, ours):
        model.eval()
        cached = model.generate(prompt, max_new_tokens=8)
        x = prompt
        with torch.no_grad():
            for _ in range(8):
                x = torch.cat([x, greedy(model(x)[:, -1:], PAD)], dim=1)
        assert torch.equal(cached, x)
        outs.append(cached)
    assert torch.equal(*outs)


def test_packed_logits_equal_padded_at_real_tokens():
    """Packed (no padding, positions restarting per sequence) = padded, at every real token."""
    torch.manual_seed(0)
    model = Transformer(20, 22, num_encoder_layers=2, num_decoder_layers=2, dropout=0.0, **SMALL)
    src, tgt_in, _ = seq2seq_batch(gen=torch.Generator().manual_seed(6))
    tgt_in[2, 4:] = PAD  # a target shorter than the batch's longest
    logits = model(Packed.from_padded(src, src == PAD), Packed.from_padded(tgt_in, tgt_in == PAD))
    torch.testing.assert_close(logits, model(src, tgt_in)[tgt_in != PAD], atol=1e-5, rtol=1e-5)

    lm = TransformerLM(30, num_layers=2, dropout=0.0, **SMALL)
    x = torch.randint(3, 30, (4, 17))
    x[1, 12:], x[3, 3:] = PAD, PAD
    torch.testing.assert_close(lm(Packed.from_padded(x, x == PAD)), lm(x)[x != PAD], atol=1e-5, rtol=1e-5)


def test_packed_input_needs_fastattn():
    ref, _ = pair(TransformerLM, vocab=30, num_layers=1, dropout=0.0, **SMALL)
    x = torch.randint(3, 30, (2, 5))
    with pytest.raises(ValueError, match="packed input.*attention='fastattn'"):
        ref(Packed.from_padded(x, x == PAD))


def test_bad_attention_kind():
    with pytest.raises(ValueError, match="attention.*'flash'"):
        TransformerLM(10, attention="flash", **{k: v for k, v in SMALL.items() if k != "pad_id"})
