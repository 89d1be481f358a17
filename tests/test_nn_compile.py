"""torch.compile(fullgraph=True) and torch.export of torch Transformers after replace_attention, every mechanism.

nn.TransformerEncoder turns a bool src_key_padding_mask into an additive float one, and a causal mask
comes as generate_square_subsequent_mask with is_causal=True: the swapped modules must read both
without branching on tensor data in Python (which breaks the graph). Mask checks that need the data
run inside the graph and raise when the compiled program runs.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastattn
from fastattn.nn import MultiheadAttention

MECHANISMS = {
    "full": {},
    "bigbird": {"block_size": 4, "num_random_blocks": 1},
    "linformer": {"projected_length": 6, "max_seq_len": 16},
    "performer": {"num_features": 8},
}
# Linformer has no causal form
CASES = [(name, masks) for name in MECHANISMS for masks in ("padding", "causal") if (name, masks) != ("linformer", "causal")]
LENGTH = 12
# Dynamo's full-graph capture and AOT autograd are what mask handling can break; Inductor's code generation
# (slow on a CPU) runs in test_inductor_compiles_swapped_encoder only
BACKEND = "aot_eager"


def case_id(value) -> str:
    return value if isinstance(value, str) else str(value)


def swapped(model: nn.Module, name: str) -> nn.Module:
    assert fastattn.replace_attention(model, attention=name, **MECHANISMS[name]) > 0
    return model.eval()


def encoder_inputs(masks: str) -> tuple[tuple, dict]:
    x = torch.randn(2, LENGTH, 16, generator=torch.Generator().manual_seed(1))
    if masks == "padding":
        padding = torch.zeros(2, LENGTH, dtype=torch.bool)
        padding[1, 8:] = True
        return (x,), {"src_key_padding_mask": padding}
    return (x,), {"mask": nn.Transformer.generate_square_subsequent_mask(LENGTH), "is_causal": True}


def transformer_inputs(masks: str) -> tuple[tuple, dict]:
    generator = torch.Generator().manual_seed(2)
    source, target = torch.randn(2, LENGTH, 16, generator=generator), torch.randn(2, LENGTH, 16, generator=generator)
    if masks == "padding":
        padding = torch.zeros(2, LENGTH, dtype=torch.bool)
        padding[0, 9:] = True
        return (source, target), {"src_key_padding_mask": padding, "tgt_key_padding_mask": padding,
                                  "memory_key_padding_mask": padding}
    causal = nn.Transformer.generate_square_subsequent_mask(LENGTH)
    return (source, target), {"src_mask": causal, "src_is_causal": True, "tgt_mask": causal, "tgt_is_causal": True}


def encoder(name: str) -> nn.Module:
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return swapped(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False), name)


def transformer(name: str) -> nn.Module:
    torch.manual_seed(4)
    return swapped(nn.Transformer(16, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                                  dropout=0.0, batch_first=True), name)


MODELS = {"encoder": (encoder, encoder_inputs), "transformer": (transformer, transformer_inputs)}


@pytest.mark.parametrize("model_name", tuple(MODELS))
@pytest.mark.parametrize("name, masks", CASES, ids=case_id)
def test_compiled_swapped_model_matches_eager(model_name, name, masks):
    build, inputs = MODELS[model_name]
    model = build(name)
    args, kwargs = inputs(masks)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    expected = model(*args, **kwargs)
    torch.testing.assert_close(compiled(*args, **kwargs), expected)


@pytest.mark.parametrize("masks", ("padding", "causal"))
def test_inductor_compiles_swapped_encoder(masks):
    model = encoder("performer")
    args, kwargs = encoder_inputs(masks)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(*args, **kwargs), model(*args, **kwargs))


@pytest.mark.parametrize("model_name", tuple(MODELS))
@pytest.mark.parametrize("name, masks", CASES, ids=case_id)
def test_exported_swapped_model_matches_eager(model_name, name, masks):
    build, inputs = MODELS[model_name]
    model = build(name)
    args, kwargs = inputs(masks)
    exported = torch.export.export(model, args, kwargs)
    torch.testing.assert_close(exported.module()(*args, **kwargs), model(*args, **kwargs))


@pytest.mark.parametrize("name", ("bigbird", "performer"))
def test_compiled_module_takes_a_float_causal_mask_without_the_hint(name):
    """Without is_causal the efficient mechanisms still read the float causal mask as causal=True."""
    torch.manual_seed(5)
    module = MultiheadAttention(16, 2, batch_first=True, attention=name, **MECHANISMS[name]).eval()
    x = torch.randn(2, LENGTH, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(LENGTH)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, mask: module(x, x, x, attn_mask=mask, need_weights=False)[0], fullgraph=True,
                             backend=BACKEND)
    expected = module(x, x, x, is_causal=True, need_weights=False)[0]
    torch.testing.assert_close(compiled(x, mask), expected)
    with pytest.raises(RuntimeError, match="attn_mask: .* supports only no mask or the causal mask"):
        compiled(x, mask.T.contiguous())


@pytest.mark.parametrize("name", ("bigbird", "linformer", "performer"))
def test_compiled_module_rejects_float_padding_that_is_not_padding(name):
    torch.manual_seed(6)
    model = encoder(name)
    (x,), _ = encoder_inputs("padding")
    bias = torch.zeros(2, LENGTH)
    bias[0, 3] = -1.0
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    with pytest.raises(RuntimeError, match="key_padding_mask: .* supports a float mask only with values 0"):
        compiled(x, src_key_padding_mask=bias)
    with pytest.raises(ValueError, match="key_padding_mask: .* supports a float mask only with values 0"):
        model(x, src_key_padding_mask=bias)


def test_compiled_full_attention_with_float_bias_matches_eager_and_torch():
    """"full" applies any additive float mask (torch's semantics), compiled too."""
    torch.manual_seed(7)
    theirs = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    ours = MultiheadAttention.from_torch(copy.deepcopy(theirs))
    x = torch.randn(2, LENGTH, 16)
    bias, attn_bias = torch.randn(2, LENGTH), torch.randn(LENGTH, LENGTH)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, b, a: ours(x, x, x, key_padding_mask=b, attn_mask=a, need_weights=False)[0],
                             fullgraph=True, backend=BACKEND)
    expected = theirs(x, x, x, key_padding_mask=bias, attn_mask=attn_bias, need_weights=False)[0]
    torch.testing.assert_close(compiled(x, bias, attn_bias), expected, atol=1e-5, rtol=0)
