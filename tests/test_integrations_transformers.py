"""fastattn behind transformers' attention registry, on tiny random-config models (no downloads).

Exact mechanisms (BigBird with a layout that lists every block; a sparse layout against eager given the
same layout as a 4-D mask) are compared with attn_implementation="eager" in float64, outputs and
gradients; decoding over the cache is compared with decoding without it and with one forward over the
final sequence. Comparisons with eager run in float32: eager's softmax runs in float32, where
float64's most negative mask value becomes -inf, so a left-padded row (that sees no key) gives NaN.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastattn  # noqa: E402
from fastattn.integrations import transformers as integration  # noqa: E402
from tests.utils import describe_case  # noqa: E402

VOCAB, BLOCK = 64, 16
# With 8 random blocks per row the causal layout lists every block of up to 10 blocks (exact); with 1 it
# is sparse from row 4 on (row i lists 0, i - 1, i and one of 1 .. i - 2): from token 32 with blocks of 8.
integration.register("test_bigbird_every_block", "bigbird", block_size=BLOCK, num_random_blocks=8)
integration.register("test_bigbird_sparse", "bigbird", block_size=8, num_random_blocks=1, seed=3)
integration.register("test_performer", "performer", num_features=64, seed=5)


def _sparse_layout_mask(seq_len: int) -> torch.Tensor:
    """A shared block mask with every diagonal block and a third of the rest (prefix-stable: row i is
    drawn from i alone)."""
    blocks = -(-seq_len // BLOCK)
    rows = []
    for row in range(blocks):
        generator = torch.Generator().manual_seed(row)
        rows.append(torch.rand(blocks, generator=generator) < 0.35)
    mask = torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.bool)
    mask.fill_diagonal_(True)
    return mask


integration.register("test_block_sparse", "block_sparse",
                     layout=lambda seq_len, num_heads: fastattn.BlockLayout.from_dense(_sparse_layout_mask(seq_len),
                                                                                       BLOCK))


def _config(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                  num_attention_heads=4, max_position_embeddings=128)
    if family == "llama":
        return transformers.LlamaConfig(**common, num_key_value_heads=2)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, num_key_value_heads=2)
    if family == "mistral":
        return transformers.MistralConfig(**common, num_key_value_heads=1, sliding_window=4096)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    raise AssertionError(family)


def _model(family: str, attn_implementation: str, dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    config = _config(family)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                          dtype=dtype)
    return model.eval()


def _batch(length: int, padding: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, length), generator=generator)
    mask = torch.ones(2, length, dtype=torch.long)
    if padding == "left":
        mask[0, :7] = 0
    elif padding == "right":
        mask[0, -9:] = 0
    return ids, mask


def _forward_backward(model, ids, mask, position_ids=None):
    model.zero_grad()
    logits = model(ids, attention_mask=mask, position_ids=position_ids).logits
    keep = mask.bool()
    (logits[keep].square().sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), keep, grads


def _position_ids(mask):
    # left padding: positions count from each row's first token (what generate does)
    return (mask.cumsum(-1) - 1).clamp(min=0)


EAGER_TOLERANCE = dict(rtol=1e-4, atol=1e-5)
FAMILIES = ["llama", "qwen2", "mistral", "gpt2"]
EXACT = [(family, padding) for family in FAMILIES for padding in ("left", "right")]


@pytest.mark.parametrize("family, padding", EXACT, ids=[describe_case(**{f: True}, padding=p) for f, p in EXACT])
def test_bigbird_listing_every_block_equals_eager_forward_and_backward(family, padding):
    ids, mask = _batch(40, padding)
    position_ids = _position_ids(mask)
    eager = _forward_backward(_model(family, "eager", torch.float32), ids, mask, position_ids)
    fast = _forward_backward(_model(family, "test_bigbird_every_block", torch.float32), ids, mask, position_ids)
    keep = eager[1]
    torch.testing.assert_close(fast[0][keep], eager[0][keep], **EAGER_TOLERANCE)
    assert eager[2].keys() == fast[2].keys()
    for name in eager[2]:
        torch.testing.assert_close(fast[2][name], eager[2][name], **EAGER_TOLERANCE, msg=name)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_sparse_layout_equals_eager_given_the_layout_as_a_4d_mask(padding):
    length = 45
    ids, mask = _batch(length, padding)
    position_ids = _position_ids(mask)
    blocks = _sparse_layout_mask(length).repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:length, :length]
    allowed = blocks & torch.ones(length, length, dtype=torch.bool).tril() & mask.bool()[:, None, None, :]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    eager_model = _model("llama", "eager", torch.float32)
    eager_model.zero_grad()
    eager_logits = eager_model(ids, attention_mask=additive, position_ids=position_ids).logits
    keep = mask.bool()
    eager_logits[keep].square().sum().backward()
    fast = _forward_backward(_model("llama", "test_block_sparse", torch.float32), ids, mask, position_ids)
    torch.testing.assert_close(fast[0][keep], eager_logits.detach()[keep], **EAGER_TOLERANCE)
    for name, parameter in eager_model.named_parameters():
        torch.testing.assert_close(fast[2][name], parameter.grad, **EAGER_TOLERANCE, msg=name)


def _generate(model, ids, mask, use_cache):
    return model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=use_cache,
                          pad_token_id=0, output_logits=True, return_dict_in_generate=True)


GENERATE = [(family, implementation) for family in ("llama", "gpt2")
            for implementation in ("test_bigbird_sparse", "test_performer")] + [("llama", "test_block_sparse")]


@pytest.mark.parametrize("family, implementation", GENERATE,
                         ids=[describe_case(**{f: True, i: True}) for f, i in GENERATE])
def test_generate_with_and_without_cache_agree(family, implementation):
    """The prompt ends in sparse rows and decoding crosses a block boundary."""
    model = _model(family, implementation)
    ids, mask = _batch(45, "left")
    cached = _generate(model, ids, mask, use_cache=True)
    uncached = _generate(model, ids, mask, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step, (with_cache, without) in enumerate(zip(cached.logits, uncached.logits)):
        torch.testing.assert_close(with_cache, without, rtol=1e-9, atol=1e-9, msg=f"step {step}")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_sparse_bigbird_decoding_equals_one_forward_over_the_final_sequence(family):
    """Regression (issue 12): a token's output depended on the total length, so decoding disagreed with a
    forward over the final sequence (2.9-3.4 off in logits)."""
    model = _model(family, "test_bigbird_sparse")
    ids, mask = _batch(45, "left")
    generated = _generate(model, ids, mask, use_cache=True)
    sequence = generated.sequences
    full_mask = torch.cat([mask, torch.ones(2, sequence.shape[1] - ids.shape[1], dtype=mask.dtype)], dim=1)
    logits = model(sequence, attention_mask=full_mask, position_ids=_position_ids(full_mask)).logits
    for step, step_logits in enumerate(generated.logits):
        torch.testing.assert_close(step_logits, logits[:, ids.shape[1] - 1 + step].to(step_logits.dtype),
                                   rtol=1e-9, atol=1e-9, msg=f"step {step}")


@pytest.mark.parametrize("implementation", ["test_bigbird_sparse", "test_performer"])
def test_chunked_prefill_over_the_cache_equals_one_forward(implementation):
    model = _model("llama", implementation)
    ids, mask = _batch(50, "none")
    full = model(ids).logits
    cache = transformers.DynamicCache()
    first = model(ids[:, :29], past_key_values=cache, use_cache=True).logits
    second = model(ids[:, 29:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, rtol=1e-9, atol=1e-9)


def test_performer_features_come_from_seed_and_layer_and_add_no_state():
    eager = _model("llama", "eager")
    fast = _model("llama", "test_performer")
    assert eager.state_dict().keys() == fast.state_dict().keys()
    ids, mask = _batch(30, "right")
    first = fast(ids, attention_mask=mask).logits
    again = _model("llama", "test_performer")(ids, attention_mask=mask).logits
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    integration.register("test_performer_other_seed", "performer", num_features=64, seed=6)
    fast.set_attn_implementation("test_performer_other_seed")
    assert not torch.allclose(fast(ids, attention_mask=mask).logits, first)


def test_importing_fastattn_does_not_import_transformers():
    code = "import sys, fastattn, fastattn.integrations; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_registered_names():
    for name in ("fastattn_bigbird", "fastattn_block_sparse", "fastattn_performer"):
        assert name in transformers.AttentionInterface._global_mapping
        assert name in transformers.AttentionMaskInterface._global_mapping


def test_block_sparse_without_a_layout_factory_says_how_to_register_one():
    model = _model("llama", "fastattn_block_sparse")
    with pytest.raises(ValueError, match="layout factory"):
        model(_batch(20, "none")[0])


def test_dropout_warns_once_and_is_not_applied():
    torch.manual_seed(0)
    config = _config("llama")
    config.attention_dropout = 0.5
    integration.register("test_bigbird_dropout", "bigbird", block_size=BLOCK)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="test_bigbird_dropout").train()
    ids = _batch(20, "none")[0]
    with pytest.warns(UserWarning, match="does not apply attention dropout"):
        first = model(ids).logits
    second = model(ids).logits
    torch.testing.assert_close(first, second)


def test_custom_4d_mask_raises_and_points_to_sdpa():
    model = _model("llama", "fastattn_bigbird")
    ids = _batch(20, "none")[0]
    custom = torch.ones(2, 1, 20, 20, dtype=torch.bool)  # bidirectional, not causal
    with pytest.raises(ValueError, match='causal \\+ padding masks only.*attn_implementation="sdpa"'):
        model(ids, attention_mask=custom)


def test_sliding_window_shorter_than_the_sequence_raises():
    torch.manual_seed(0)
    config = _config("mistral")
    config.sliding_window = 8
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="fastattn_bigbird").eval()
    with pytest.raises(ValueError, match="sliding window"):
        model(_batch(20, "none")[0])


def test_packed_sequences_raise_and_counting_positions_do_not():
    model = _model("llama", "test_bigbird_every_block")
    ids = _batch(20, "none")[0]
    counting = torch.arange(20).expand(2, 20)
    # transformers looks for packing only without a cache (a training forward)
    torch.testing.assert_close(model(ids, position_ids=counting, use_cache=False).logits, model(ids).logits,
                               rtol=0, atol=0)
    packed = torch.cat([torch.arange(8), torch.arange(12)]).expand(2, 20)
    with pytest.raises(ValueError, match="packed sequences"):
        model(ids, position_ids=packed, use_cache=False)


def test_static_cache_raises():
    model = _model("llama", "fastattn_bigbird")
    with pytest.raises(ValueError, match="static \\(pre-allocated\\) cache"):
        model.generate(_batch(10, "none")[0], max_new_tokens=2, do_sample=False, pad_token_id=0,
                       cache_implementation="static")


def test_head_mask_raises():
    model = _model("gpt2", "fastattn_bigbird")
    with pytest.raises(ValueError, match="head_mask"):
        model(_batch(20, "none")[0], head_mask=torch.ones(2, 4))


@pytest.mark.parametrize("argument", ["softcap", "s_aux"])
def test_softcapping_and_attention_sinks_raise(argument):
    model = _model("llama", "fastattn_bigbird")
    attention = transformers.AttentionInterface._global_mapping["fastattn_bigbird"]
    q = torch.zeros(1, 4, 5, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=argument):
        attention(model.model.layers[0].self_attn, q, q, q, None, **{argument: torch.ones(4)})


def test_models_that_bypass_the_registry_name_fastattn_models():
    for family in ("Bert", "Roberta"):
        config = getattr(transformers, f"{family}Config")(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=64)
        with pytest.raises(ValueError, match="fastattn.models.BertModel.from_hf"):
            getattr(transformers, f"{family}Model")._from_config(config, attn_implementation="fastattn_bigbird")
    config = transformers.ModernBertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=64, pad_token_id=0,
                                           bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    model = transformers.ModernBertModel._from_config(config, attn_implementation="fastattn_performer")
    with pytest.raises(ValueError, match="fastattn.models.BertModel.from_hf"):
        model(_batch(10, "none")[0])


def test_register_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mechanism"):
        integration.register("x", "linformer")
    with pytest.raises(TypeError, match="unknown \\['block'\\]"):
        integration.register("x", "bigbird", block=16)
    with pytest.raises(TypeError, match="layout"):
        integration.register("x", "block_sparse", layout=3)
