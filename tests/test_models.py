"""fastattn.models against transformers (random small configs, no downloads), decoding, and the Transformer."""
from __future__ import annotations

import pytest
import torch

from fastattn.models import BertForPreTraining, BertModel, GPTLMHeadModel, GPTModel, Transformer

transformers = pytest.importorskip("transformers")

# None = automatic backend selection: the tests run the fused kernels of this machine.
BACKEND = None

VOCAB = 40
OPTIONS = {
    "full": {},
    "bigbird": {"block_size": 4, "num_random_blocks": 1, "backend": BACKEND},
    "linformer": {"projected_length": 6, "max_seq_len": 32, "backend": BACKEND},
    "performer": {"num_features": 16, "backend": BACKEND},
}


def bert_config(**overrides):
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=48, max_position_embeddings=32, **overrides)


def gpt2_config(**overrides):
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, **overrides)


def batch_with_padding(side: str, length: int = 14):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (3, length), generator=generator)
    attention_mask = torch.ones(3, length, dtype=torch.long)
    if side == "right":
        attention_mask[1, length - 5:] = 0
        attention_mask[2, length - 1:] = 0
    else:
        attention_mask[1, :5] = 0
        attention_mask[2, :1] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize("hidden_act", ("gelu", "relu"))
def test_bert_for_pretraining_matches_transformers(hidden_act):
    torch.manual_seed(0)
    theirs = transformers.BertForPreTraining(bert_config(hidden_act=hidden_act)).eval()
    ours = BertForPreTraining.from_hf(theirs).eval()
    input_ids, attention_mask = batch_with_padding("right")
    token_type_ids = (torch.arange(14) >= 7).long().expand(3, 14)
    expected = theirs(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    actual = ours(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    torch.testing.assert_close(actual.prediction_logits, expected.prediction_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(actual.seq_relationship_logits, expected.seq_relationship_logits, atol=1e-4, rtol=0)
    labels = torch.where(torch.rand(3, 14) < 0.3, input_ids, -100)
    next_sentence = torch.tensor([0, 1, 0])
    expected_loss = theirs(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                           labels=labels, next_sentence_label=next_sentence).loss
    actual_loss = ours(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, labels=labels,
                       next_sentence_label=next_sentence).loss
    torch.testing.assert_close(actual_loss, expected_loss, atol=1e-4, rtol=0)


def test_bert_model_matches_transformers():
    torch.manual_seed(1)
    theirs = transformers.BertModel(bert_config()).eval()
    ours = BertModel.from_hf(theirs).eval()
    input_ids, attention_mask = batch_with_padding("left")
    expected = theirs(input_ids=input_ids, attention_mask=attention_mask)
    actual = ours(input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, atol=1e-4, rtol=0)
    torch.testing.assert_close(actual["pooler_output"], expected.pooler_output, atol=1e-4, rtol=0)


@pytest.mark.parametrize("side", ("right", "left"))
def test_gpt2_lm_head_matches_transformers(side):
    torch.manual_seed(2)
    theirs = transformers.GPT2LMHeadModel(gpt2_config()).eval()
    ours = GPTLMHeadModel.from_hf(theirs).eval()
    input_ids, attention_mask = batch_with_padding(side)
    expected = theirs(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
    actual = ours(input_ids, attention_mask=attention_mask, labels=input_ids)
    # a left-padded first position sees no key: transformers and fastattn differ there only
    kept = attention_mask.bool()
    torch.testing.assert_close(actual.logits[kept], expected.logits[kept], atol=1e-4, rtol=0)
    if side == "right":
        torch.testing.assert_close(actual.loss, expected.loss, atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:.*does not apply attention dropout")
def test_gpt2_model_matches_transformers_and_loads_into_every_mechanism():
    torch.manual_seed(3)
    theirs = transformers.GPT2Model(gpt2_config(activation_function="gelu")).eval()
    input_ids, _ = batch_with_padding("right")
    expected = theirs(input_ids=input_ids).last_hidden_state
    torch.testing.assert_close(GPTModel.from_hf(theirs).eval()(input_ids).last_hidden_state, expected,
                               atol=1e-4, rtol=0)
    for attention in ("bigbird", "performer"):
        ours = GPTModel.from_hf(theirs, attention=attention, **OPTIONS[attention]).eval()
        assert torch.equal(ours.h[1].attn.in_proj_weight, theirs.h[1].attn.c_attn.weight.T)
        assert ours(input_ids).last_hidden_state.shape == expected.shape


@pytest.mark.filterwarnings("ignore:.*does not apply attention dropout")
def test_bert_from_hf_with_linformer_keeps_weights():
    theirs = transformers.BertModel(bert_config()).eval()
    ours = BertModel.from_hf(theirs, attention="linformer", **OPTIONS["linformer"]).eval()
    assert torch.equal(ours.layers[0].attention.out_proj.weight, theirs.encoder.layer[0].attention.output.dense.weight)
    input_ids, attention_mask = batch_with_padding("right")
    assert torch.isfinite(ours(input_ids, attention_mask).last_hidden_state).all()


def test_from_hf_rejects_unsupported_models():
    with pytest.raises(TypeError, match="expected a transformers BertModel or BertForPreTraining"):
        BertModel.from_hf(transformers.GPT2Model(gpt2_config()))
    with pytest.raises(ValueError, match="only absolute position embeddings"):
        BertModel.from_hf(transformers.BertModel(bert_config(position_embedding_type="relative_key")))
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        GPTModel.from_hf(transformers.GPT2Model(gpt2_config(scale_attn_by_inverse_layer_idx=True)))


# ------------------------------------------------------------------------------------------------
# decoding

def small_gpt(attention: str, seed: int = 0) -> GPTLMHeadModel:
    torch.manual_seed(seed)
    return GPTLMHeadModel(VOCAB, 32, num_layers=2, num_heads=4, max_position_embeddings=48, dropout=0.0,
                          attention_dropout=0.0, attention=attention, attention_options=OPTIONS[attention]).eval()


@pytest.mark.parametrize("attention", ("full", "bigbird", "performer"))
def test_incremental_decoding_equals_the_full_forward(attention):
    """BigBird (blocks of 4: rows 4 and up skip blocks) decodes over its key-value cache too: its causal
    layout is prefix-stable (regression: it recomputed the prefix, and a cache gave other logits)."""
    model = small_gpt(attention)
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    generated = model.generate(prompt, max_new_tokens=12)
    assert generated.shape == (2, 18) and torch.equal(generated[:, :6], prompt)
    with torch.no_grad():
        full_logits = model(generated).logits
        assert torch.equal(full_logits[:, 5:-1].argmax(-1), generated[:, 6:])
        # the cached step outputs are the full forward's, position by position
        outputs = model(generated[:, :6], use_cache=True)
        step_logits = [outputs.logits]
        for position in range(6, 18):
            outputs = model(generated[:, position:position + 1], past_key_values=outputs.past_key_values)
            step_logits.append(outputs.logits)
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full_logits, atol=1e-4, rtol=1e-4)


def test_performer_decoding_state_is_constant_size():
    model = small_gpt("performer")
    prompt = torch.randint(0, VOCAB, (1, 3))
    with torch.no_grad():
        short = model(prompt, use_cache=True).past_key_values
        long = model(torch.randint(0, VOCAB, (1, 30)), use_cache=True).past_key_values
    shapes = [{name: tuple(t.shape) for name, t in state["attention"].items()} for state in short]
    assert shapes == [{name: tuple(t.shape) for name, t in state["attention"].items()} for state in long]


@pytest.mark.parametrize("attention", ("full", "bigbird", "performer"))
def test_generate_serves_left_padded_batches(attention):
    model = small_gpt(attention)
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, VOCAB, (2, 9), generator=generator)
    mask = torch.ones_like(prompt)
    mask[0, :4] = 0
    generated = model.generate(prompt, max_new_tokens=10, attention_mask=mask)
    full_mask = torch.cat([mask, torch.ones(2, 10, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        logits = model(generated, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert torch.equal(logits[:, 8:-1].argmax(-1), generated[:, 9:])
    if attention != "bigbird":  # BigBird's blocks start at the padding, so its row 0 differs without it
        alone = model.generate(prompt[:1, 4:], max_new_tokens=10)
        assert torch.equal(generated[:1, 4:], alone)


def test_gpt_errors():
    with pytest.raises(ValueError, match="Linformer attention has no causal form"):
        GPTModel(VOCAB, 32, num_layers=1, num_heads=4, attention="linformer", attention_options=OPTIONS["linformer"])
    model = small_gpt("full")
    with pytest.raises(ValueError, match="at most 48 positions"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids: expected an integer"):
        model(torch.zeros(1, 4))
    with pytest.raises(TypeError, match="attention_mask: expected a Tensor"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), 2, attention_mask=[[1, 1, 1, 1]])
    past = model(torch.zeros(1, 4, dtype=torch.long), use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(1, 5\) \(past \+ new tokens\)"):
        model(torch.zeros(1, 1, dtype=torch.long), attention_mask=torch.ones(1, 1), past_key_values=past)


# ------------------------------------------------------------------------------------------------
# encoder-decoder Transformer

@pytest.mark.parametrize("attention, decoder_attention", (("full", None), ("bigbird", None), ("performer", None),
                                                          ("linformer", "performer")),
                         ids=("full", "bigbird", "performer", "linformer-encoder"))
def test_transformer_is_causal_in_the_decoder_and_respects_padding(attention, decoder_attention):
    torch.manual_seed(4)
    model = Transformer(VOCAB, 30, d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=48,
                        dropout=0.0, attention=attention, decoder_attention=decoder_attention,
                        attention_options=OPTIONS[attention],
                        decoder_attention_options=OPTIONS[decoder_attention] if decoder_attention else None).eval()
    source = torch.randint(0, VOCAB, (2, 13))
    target = torch.randint(0, 30, (2, 9))
    source_mask = torch.ones(2, 13, dtype=torch.long)
    source_mask[1, 9:] = 0
    out = model(source, target, attention_mask=source_mask)
    assert out.logits.shape == (2, 9, 30) and out.encoder_last_hidden_state.shape == (2, 13, 32)
    changed_target = target.clone()
    changed_target[:, 6:] = (changed_target[:, 6:] + 1) % 30
    changed_source = source.clone()
    changed_source[1, 9:] = (changed_source[1, 9:] + 1) % VOCAB
    changed = model(changed_source, changed_target, attention_mask=source_mask)
    torch.testing.assert_close(changed.logits[:, :6], out.logits[:, :6], atol=1e-5, rtol=0)
    assert (changed.logits[:, 6:] - out.logits[:, 6:]).abs().max() > 1e-4
    torch.testing.assert_close(changed.encoder_last_hidden_state[1, :9], out.encoder_last_hidden_state[1, :9],
                               atol=1e-5, rtol=0)


def test_transformer_rejects_a_linformer_decoder():
    with pytest.raises(ValueError, match="decoder_attention: the decoder self-attention is causal"):
        Transformer(VOCAB, attention="linformer", attention_options=OPTIONS["linformer"])
