"""fastattn.nn.MultiheadAttention against torch.nn.MultiheadAttention and the float64 references; replace_attention."""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn

import fastattn
from fastattn.nn import MultiheadAttention

# None = automatic backend selection: the tests run the fused kernels of this machine.
BACKEND = None

EFFICIENT = {
    "bigbird": {"block_size": 4, "num_random_blocks": 1, "seed": 3},
    "linformer": {"projected_length": 6, "max_seq_len": 32},
    "performer": {"num_features": 12},
    "performer-relu": {"num_features": 12, "kernel": "relu"},
}


def mechanism(name: str) -> tuple[str, dict]:
    """(attention, options) for an EFFICIENT entry, with the backend under test."""
    return name.split("-")[0], {**EFFICIENT[name], "backend": BACKEND}


def reference_copy(module: MultiheadAttention) -> MultiheadAttention:
    """The same module in float64 running the exact pure-PyTorch references."""
    copied = copy.deepcopy(module).double()
    if copied.attention != "full":
        copied.attention_options["backend"] = "reference"
    return copied


def padding_mask(batch: int, length: int, padded: int) -> torch.Tensor:
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[-1, length - padded:] = True
    return mask


def split_value_heads(module, value: torch.Tensor) -> torch.Tensor:
    """value (B, S, E) -> its projection per head (B, H, S, D), from the public parameters."""
    embed = module.embed_dim
    weight = module.in_proj_weight[2 * embed:] if module._qkv_same_embed_dim else module.v_proj_weight
    bias = None if module.in_proj_bias is None else module.in_proj_bias[2 * embed:]
    projected = nn.functional.linear(value, weight, bias)
    return projected.view(value.shape[0], value.shape[1], module.num_heads, module.head_dim).transpose(1, 2)


# ------------------------------------------------------------------------------------------------
# full attention against torch

TORCH_CONFIGS = {
    "plain": {},
    "kdim5-vdim7": {"kdim": 5, "vdim": 7},
    "add_bias_kv": {"add_bias_kv": True},
    "add_zero_attn": {"add_zero_attn": True},
    "no_bias": {"bias": False},
}


def torch_inputs(config: dict, batch_first: bool, batch=3, query_len=5, key_len=7, embed=16):
    query = torch.randn(batch, query_len, embed)
    key = torch.randn(batch, key_len, config.get("kdim", embed))
    value = torch.randn(batch, key_len, config.get("vdim", embed))
    if not batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    return query, key, value


@pytest.mark.parametrize("batch_first", (True, False), ids=("batch_first", "seq_first"))
@pytest.mark.parametrize("config_name", tuple(TORCH_CONFIGS))
@pytest.mark.parametrize("mask_kind", ("no_mask", "bool_padding", "float_padding", "float_attn_mask", "bool_attn_mask"))
def test_full_matches_torch(batch_first, config_name, mask_kind):
    torch.manual_seed(0)
    config = TORCH_CONFIGS[config_name]
    theirs = nn.MultiheadAttention(16, 4, batch_first=batch_first, **config).eval()
    ours = MultiheadAttention.from_torch(theirs).eval()
    query, key, value = torch_inputs(config, batch_first)
    masks = {}
    if mask_kind.endswith("padding"):
        padding = padding_mask(3, 7, 3)
        masks["key_padding_mask"] = padding if mask_kind == "bool_padding" else torch.zeros(3, 7).masked_fill(
            padding, float("-inf"))
    elif mask_kind == "float_attn_mask":
        masks["attn_mask"] = torch.randn(5, 7)
    elif mask_kind == "bool_attn_mask":
        masks["attn_mask"] = torch.rand(3 * 4, 5, 7) < 0.3
    for need_weights, average in ((True, True), (True, False), (False, True)):
        expected, expected_weights = theirs(query, key, value, need_weights=need_weights,
                                            average_attn_weights=average, **masks)
        actual, weights = ours(query, key, value, need_weights=need_weights, average_attn_weights=average, **masks)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
        if need_weights:
            torch.testing.assert_close(weights, expected_weights, atol=1e-5, rtol=0)
        else:
            assert weights is None


def test_full_matches_torch_unbatched_and_causal():
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(16, 2).eval()
    ours = MultiheadAttention.from_torch(theirs).eval()
    x = torch.randn(6, 16)
    torch.testing.assert_close(ours(x, x, x)[0], theirs(x, x, x)[0], atol=1e-5, rtol=0)
    causal_mask = nn.Transformer.generate_square_subsequent_mask(6)
    expected = theirs(x, x, x, attn_mask=causal_mask, need_weights=False)[0]
    for masks in ({"attn_mask": causal_mask}, {"attn_mask": causal_mask, "is_causal": True}, {"is_causal": True}):
        torch.testing.assert_close(ours(x, x, x, need_weights=False, **masks)[0], expected, atol=1e-5, rtol=0)


def test_full_dropout_is_torch_dropout():
    """Training with dropout: the same random draws give torch's output exactly (need_weights=True path)."""
    theirs = nn.MultiheadAttention(16, 4, dropout=0.5, batch_first=True).train()
    ours = MultiheadAttention.from_torch(theirs)
    assert ours.training
    x = torch.randn(2, 9, 16)
    torch.manual_seed(7)
    expected = theirs(x, x, x)[0]
    torch.manual_seed(7)
    actual = ours(x, x, x)[0]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    without_dropout = ours.eval()(x, x, x)[0]
    assert (actual - without_dropout).abs().max() > 1e-2


@pytest.mark.parametrize("config_name", ("plain", "kdim5-vdim7", "add_bias_kv", "no_bias"))
def test_state_dict_loads_both_ways(config_name):
    config = TORCH_CONFIGS[config_name]
    theirs = nn.MultiheadAttention(16, 4, **config)
    ours = MultiheadAttention(16, 4, **config)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    fresh_torch = nn.MultiheadAttention(16, 4, **config)
    fresh_torch.load_state_dict(ours.state_dict(), strict=True)
    for name, value in theirs.state_dict().items():
        assert torch.equal(fresh_torch.state_dict()[name], value), name
    assert {n for n, _ in ours.named_parameters()} == {n for n, _ in theirs.named_parameters()}


def test_linformer_adds_its_projections_to_the_state_dict():
    theirs = nn.MultiheadAttention(16, 4)
    ours = MultiheadAttention.from_torch(theirs, attention="linformer", projected_length=4, max_seq_len=10)
    assert set(ours.state_dict()) - set(theirs.state_dict()) == {"proj_k", "proj_v"}
    assert tuple(ours.proj_k.shape) == (4, 10)
    shared = MultiheadAttention(16, 4, attention="linformer", projected_length=4, max_seq_len=10, share_kv=True)
    assert set(shared.state_dict()) - set(theirs.state_dict()) == {"proj_k"}
    assert torch.equal(ours.in_proj_weight, theirs.in_proj_weight)


# ------------------------------------------------------------------------------------------------
# efficient mechanisms: kernels (float32, automatic backend) against the float64 references

CASES = (
    # name, causal, padded keys, length
    ("bigbird", False, 0, 19),
    ("bigbird", True, 3, 19),
    ("bigbird", False, 5, 3),
    ("linformer", False, 0, 19),
    ("linformer", False, 4, 19),
    ("performer", False, 3, 19),
    ("performer", True, 0, 19),
    ("performer-relu", True, 3, 19),
)


@pytest.mark.parametrize("name, causal, padded, length", CASES,
                         ids=[f"{n}-N{length}-pad{p}" + ("-causal" if c else "") for n, c, p, length in CASES])
def test_efficient_mechanism_matches_float64_reference(name, causal, padded, length):
    torch.manual_seed(0)
    attention, options = mechanism(name)
    module = MultiheadAttention(32, 4, batch_first=True, attention=attention, **options)
    exact = reference_copy(module)
    x = torch.randn(2, length, 32, requires_grad=True)
    masks = {"key_padding_mask": padding_mask(2, length, padded) if padded else None,
             "attn_mask": nn.Transformer.generate_square_subsequent_mask(length) if causal else None}
    out, _ = module(x, x, x, need_weights=False, **masks)
    x64 = x.detach().double().requires_grad_()
    expected, _ = exact(x64, x64, x64, need_weights=False,
                        **{k: None if v is None else v.double() if v.is_floating_point() else v for k, v in masks.items()})
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=5e-5, rtol=1e-3)
    parameter_grads = {n: p.grad for n, p in module.named_parameters()}
    for name_, parameter in exact.named_parameters():
        torch.testing.assert_close(parameter_grads[name_].double(), parameter.grad, atol=1e-4, rtol=1e-3, msg=name_)


@pytest.mark.parametrize("name, causal", (("bigbird", False), ("bigbird", True), ("linformer", False),
                                          ("performer", False), ("performer", True), ("performer-relu", False)),
                         ids=("bigbird", "bigbird-causal", "linformer", "performer", "performer-causal",
                              "performer-relu"))
def test_weights_are_the_effective_attention(name, causal):
    """The returned weights, applied to the (projected) values, give the module's output; rows sum to 1."""
    torch.manual_seed(1)
    attention, options = mechanism(name)
    module = reference_copy(MultiheadAttention(16, 2, batch_first=True, attention=attention, **options))
    length = 13
    x = torch.randn(2, length, 16, dtype=torch.float64)
    padding = padding_mask(2, length, 4)
    out, weights = module(x, x, x, key_padding_mask=padding, is_causal=causal, average_attn_weights=False)
    values = split_value_heads(module, x)
    if attention == "linformer":
        values = torch.einsum("pn,bhnd->bhpd", module.proj_v[:, :length], values * (~padding)[:, None, :, None])
        assert weights.shape == (2, 2, length, options["projected_length"])
    else:
        assert weights.shape == (2, 2, length, length)
        assert torch.all(weights.masked_select(padding[:, None, None, :].expand_as(weights)) == 0)
    if causal:
        assert torch.all(weights.triu(1) == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, length, dtype=torch.float64))
    merged = torch.matmul(weights, values).transpose(1, 2).reshape(2, length, 16)
    torch.testing.assert_close(module.out_proj(merged), out)
    averaged = module(x, x, x, key_padding_mask=padding, is_causal=causal)[1]
    torch.testing.assert_close(averaged, weights.mean(1))


@pytest.mark.parametrize("name", ("bigbird", "performer"))
def test_causal_mask_forms_are_recognised(name):
    torch.manual_seed(2)
    attention, options = mechanism(name)
    module = reference_copy(MultiheadAttention(16, 2, attention=attention, **options))
    x = torch.randn(11, 2, 16, dtype=torch.float64)
    float_mask = nn.Transformer.generate_square_subsequent_mask(11, dtype=torch.float64)
    bool_mask = torch.ones(11, 11, dtype=torch.bool).triu(1)
    results = [module(x, x, x, need_weights=False, **masks)[0] for masks in (
        {"is_causal": True}, {"attn_mask": float_mask}, {"attn_mask": bool_mask},
        {"attn_mask": float_mask, "is_causal": True})]
    for result in results[1:]:
        torch.testing.assert_close(result, results[0])
    # later tokens do not change earlier outputs
    changed = x.clone()
    changed[7:] = torch.randn_like(changed[7:])
    torch.testing.assert_close(module(changed, changed, changed, is_causal=True)[0][:7], results[0][:7])
    assert not torch.allclose(module(x, x, x, need_weights=False)[0], results[0])


# ------------------------------------------------------------------------------------------------
# errors and warnings

@pytest.mark.parametrize("name", ("bigbird", "linformer", "performer"))
def test_efficient_mechanisms_reject_other_attn_masks(name):
    attention, options = mechanism(name)
    module = MultiheadAttention(16, 2, batch_first=True, attention=attention, **options)
    x = torch.randn(2, 8, 16)
    for mask in (torch.randn(8, 8), torch.rand(8, 8) < 0.5, torch.zeros(4, 8, 8, dtype=torch.bool),
                 nn.Transformer.generate_square_subsequent_mask(8).T):
        with pytest.raises(ValueError, match="supports only no mask or the causal mask"):
            module(x, x, x, attn_mask=mask)
    with pytest.raises(ValueError, match="only with values 0 .keep. and -inf .pad."):
        module(x, x, x, key_padding_mask=torch.full((2, 8), -1.0))


def test_linformer_rejects_causal_and_long_inputs():
    module = MultiheadAttention(16, 2, attention="linformer", projected_length=4, max_seq_len=8)
    x = torch.randn(8, 2, 16)
    for masks in ({"is_causal": True}, {"attn_mask": nn.Transformer.generate_square_subsequent_mask(8)}):
        with pytest.raises(ValueError, match="Linformer attention has no causal form"):
            module(x, x, x, **masks)
    long = torch.randn(9, 2, 16)
    with pytest.raises(ValueError, match="max_seq_len=8, got 9 keys"):
        module(long, long, long)
    with pytest.raises(ValueError, match="max_seq_len: linformer attention needs a positive int, got None"):
        MultiheadAttention(16, 2, attention="linformer")


def test_constructor_errors():
    with pytest.raises(ValueError, match="attention: expected one of"):
        MultiheadAttention(16, 2, attention="sparse")
    with pytest.raises(TypeError, match=r"'performer' attention accepts .* got unexpected \['block_size'\]"):
        MultiheadAttention(16, 2, attention="performer", block_size=4)
    with pytest.raises(TypeError, match="'full' attention accepts"):
        MultiheadAttention(16, 2, backend="reference")
    with pytest.raises(ValueError, match="BigBird attention needs as many keys as queries"):
        MultiheadAttention(16, 2, add_bias_kv=True, attention="bigbird")
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(15, 2)
    with pytest.raises(ValueError, match="kernel: expected one of"):
        MultiheadAttention(16, 2, attention="performer", kernel="cosine")


def test_bigbird_rejects_cross_attention_of_other_length():
    module = MultiheadAttention(16, 2, batch_first=True, attention="bigbird", **mechanism("bigbird")[1])
    with pytest.raises(ValueError, match="BigBird attention needs as many keys as queries, got 5 queries and 7 keys"):
        module(torch.randn(1, 5, 16), torch.randn(1, 7, 16), torch.randn(1, 7, 16))


@pytest.mark.parametrize("attention, options", (("bigbird", {}), ("linformer", {"max_seq_len": 8}), ("performer", {})),
                         ids=("bigbird", "linformer", "performer"))
def test_efficient_mechanisms_warn_that_dropout_is_not_applied(attention, options):
    with pytest.warns(UserWarning, match=f"{attention} attention does not apply attention dropout"):
        MultiheadAttention(16, 2, dropout=0.1, attention=attention, **options)


def test_performer_features_redraw_every_interval_and_identically_across_replicas():
    torch.manual_seed(3)
    module = MultiheadAttention(16, 2, batch_first=True, attention="performer", num_features=8,
                                feature_redraw_interval=2, backend="reference")
    replica = copy.deepcopy(module)
    x = torch.randn(1, 5, 16)
    draws = [module.projection.clone()]
    for _ in range(4):
        module(x, x, x)
        replica(x, x, x)
        draws.append(module.projection.clone())
        assert torch.equal(module.projection, replica.projection)
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[1], draws[2])
    assert not torch.equal(draws[2], draws[3]) and torch.equal(draws[3], draws[4])
    module.eval()
    for _ in range(3):
        module(x, x, x)
    assert torch.equal(module.projection, draws[4])
    assert "projection" not in module.state_dict()


# ------------------------------------------------------------------------------------------------
# replace_attention inside torch's transformer layers

def count_calls(model: nn.Module) -> list[int]:
    """Wrap every fastattn MultiheadAttention's forward on the instance (no hook) and count its calls."""
    calls = [0]
    for module in model.modules():
        if isinstance(module, MultiheadAttention):
            original = module.forward

            def counted(*args, _original=original, **kwargs):
                calls[0] += 1
                return _original(*args, **kwargs)

            module.forward = counted
    return calls


def test_replace_attention_in_encoder_layer_defeats_torch_fast_path():
    """In eval mode without grad, torch's fast path would run its own fused attention on the weights."""
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 9, 16)
    padding = padding_mask(2, 9, 3)
    with torch.no_grad():
        expected = layer(x, src_key_padding_mask=padding)
        assert fastattn.replace_attention(layer) == 1
        calls = count_calls(layer)
        actual = layer(x, src_key_padding_mask=padding)
        assert calls[0] == 1
        # the torch fast path leaves padded positions 0 only when it runs on nested tensors; compare kept rows
        torch.testing.assert_close(actual[~padding], expected[~padding], atol=1e-5, rtol=0)
    performer_layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    performer_layer.load_state_dict(layer.state_dict())
    assert fastattn.replace_attention(performer_layer, attention="performer", num_features=8, backend=BACKEND) == 1
    calls = count_calls(performer_layer)
    with torch.no_grad():
        performer_out = performer_layer(x, src_key_padding_mask=padding)
    assert calls[0] == 1
    assert (performer_out - actual).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_replace_attention_in_encoder_stack_defeats_nested_tensor_path():
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval()
    assert encoder.use_nested_tensor
    x = torch.randn(2, 9, 16)
    padding = padding_mask(2, 9, 3)
    with torch.no_grad():
        expected = encoder(x, src_key_padding_mask=padding)
        assert fastattn.replace_attention(encoder, attention="full") == 2
        assert not encoder.use_nested_tensor
        calls = count_calls(encoder)
        actual = encoder(x, src_key_padding_mask=padding)
    assert calls[0] == 2
    torch.testing.assert_close(actual[~padding], expected[~padding], atol=1e-5, rtol=0)


def test_replace_attention_in_nn_transformer():
    torch.manual_seed(6)
    model = nn.Transformer(16, 2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32, dropout=0.0,
                           batch_first=True).eval()
    source, target = torch.randn(2, 12, 16), torch.randn(2, 8, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(8)
    source_padding = padding_mask(2, 12, 4)
    expected = model(source, target, tgt_mask=causal, src_key_padding_mask=source_padding,
                     memory_key_padding_mask=source_padding)
    swapped = copy.deepcopy(model)
    assert fastattn.replace_attention(swapped) == 6
    calls = count_calls(swapped)
    actual = swapped(source, target, tgt_mask=causal, src_key_padding_mask=source_padding,
                     memory_key_padding_mask=source_padding)
    assert calls[0] == 6
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)

    performer = copy.deepcopy(model)
    assert fastattn.replace_attention(performer, attention="performer", num_features=8, backend=BACKEND) == 6
    out = performer(source, target, tgt_mask=causal, tgt_is_causal=True, src_key_padding_mask=source_padding,
                    memory_key_padding_mask=source_padding)
    changed = target.clone()
    changed[:, 5:] = torch.randn(2, 3, 16)
    out_changed = performer(source, changed, tgt_mask=causal, tgt_is_causal=True, src_key_padding_mask=source_padding,
                            memory_key_padding_mask=source_padding)
    torch.testing.assert_close(out_changed[:, :5], out[:, :5], atol=1e-5, rtol=0)
    assert isinstance(performer.decoder.layers[0].multihead_attn, MultiheadAttention)


def test_replace_attention_in_decoder_layer_keeps_weights_and_mode():
    layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True).train()
    weight = layer.multihead_attn.in_proj_weight.detach().clone()
    assert fastattn.replace_attention(layer, attention="performer", num_features=8) == 2
    assert isinstance(layer.self_attn, MultiheadAttention) and layer.self_attn.training
    assert torch.equal(layer.multihead_attn.in_proj_weight, weight)


def test_replace_attention_keeps_shared_layers_shared():
    shared = nn.MultiheadAttention(16, 2)
    model = nn.ModuleDict({"first": nn.ModuleDict({"attn": shared}), "second": nn.ModuleDict({"attn": shared})})
    assert fastattn.replace_attention(model) == 1
    assert isinstance(model["first"]["attn"], MultiheadAttention)
    assert model["first"]["attn"] is model["second"]["attn"]


def test_replace_attention_needs_a_parent_module():
    with pytest.raises(TypeError, match="use fastattn.nn.MultiheadAttention.from_torch"):
        fastattn.replace_attention(nn.MultiheadAttention(16, 2))
    with pytest.raises(TypeError, match="mha: expected a torch.nn.MultiheadAttention"):
        MultiheadAttention.from_torch(nn.Linear(2, 2))


@pytest.mark.parametrize("name, causal", [(name, causal) for name in ("full", *EFFICIENT) for causal in (False, True)
                                           if not (causal and name == "linformer")],  # no causal Linformer
                         ids=lambda value: {True: "causal", False: "non_causal"}.get(value, value))
def test_nested_tensor_inputs_equal_padded_inputs_with_padding_mask(name, causal):
    torch.manual_seed(10)
    attention, options = ("full", {}) if name == "full" else mechanism(name)
    module = MultiheadAttention(16, 2, batch_first=True, attention=attention, **options).eval()
    lengths = (7, 12, 3)
    padded = torch.randn(3, 12, 16)
    padding = torch.arange(12)[None, :] >= torch.tensor(lengths)[:, None]
    nested = torch.nested.nested_tensor([padded[i, :n] for i, n in enumerate(lengths)])
    expected, _ = module(padded, padded, padded, key_padding_mask=padding, need_weights=False, is_causal=causal)
    actual, weights = module(nested, nested, nested, need_weights=False, is_causal=causal)
    assert actual.is_nested and weights is None
    for i, piece in enumerate(actual.unbind()):
        torch.testing.assert_close(piece, expected[i, :lengths[i]])


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.parametrize("name", ("full", *EFFICIENT))
def test_encoder_built_around_swapped_layers_runs_its_nested_tensor_path(name):
    """The encoder is built after the swap, so use_nested_tensor stays on and its layers receive nested tensors."""
    torch.manual_seed(11)
    attention, options = ("full", {}) if name == "full" else mechanism(name)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    torch_encoder = nn.TransformerEncoder(copy.deepcopy(layer), num_layers=2, enable_nested_tensor=True).eval()
    assert fastattn.replace_attention(layer, attention=attention, **options) == 1
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval()
    assert encoder.use_nested_tensor
    padded_encoder = copy.deepcopy(encoder)
    padded_encoder.use_nested_tensor = False
    x = torch.randn(2, 9, 16)
    padding = padding_mask(2, 9, 3)
    calls = count_calls(encoder)
    with torch.no_grad():
        actual = encoder(x, src_key_padding_mask=padding)
        expected = padded_encoder(x, src_key_padding_mask=padding)
        torch_output = torch_encoder(x, src_key_padding_mask=padding)
    assert calls[0] == 2
    assert torch.all(actual[padding] == 0), "the nested path returns padded positions as zeros"
    torch.testing.assert_close(actual[~padding], expected[~padding], atol=1e-5, rtol=0)
    if name == "full":
        torch.testing.assert_close(actual, torch_output, atol=1e-5, rtol=0)


def test_nested_tensor_inputs_reject_masks_and_mixed_inputs():
    module = MultiheadAttention(16, 2, batch_first=True)
    nested = torch.nested.nested_tensor([torch.randn(3, 16), torch.randn(5, 16)])
    with pytest.raises(ValueError, match="with nested tensors the lengths are the padding"):
        module(nested, nested, nested)
    with pytest.raises(ValueError, match="with nested tensors the lengths are the padding"):
        module(nested, nested, nested, need_weights=False, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected all three nested"):
        module(nested, torch.randn(2, 5, 16), torch.randn(2, 5, 16), need_weights=False)
    with pytest.raises(ValueError, match="need batch_first=True"):
        MultiheadAttention(16, 2)(nested, nested, nested, need_weights=False)


@pytest.mark.parametrize("name", ("full", "bigbird", "performer", "performer-relu"))
def test_decode_reproduces_causal_forward(name):
    """Prompt, then tokens one by one (and several at once): the causal forward's outputs at every position
    (BigBird's blocks of 4: rows 4 and up skip blocks)."""
    torch.manual_seed(8)
    attention, options = ("full", {}) if name == "full" else mechanism(name)
    module = MultiheadAttention(16, 2, batch_first=True, attention=attention, **options).eval()
    x = torch.randn(2, 24, 16)
    expected, _ = module(x, x, x, is_causal=True, need_weights=False)
    outputs, state = module.decode(x[:, :5])
    pieces = [outputs]
    for start, stop in ((5, 6), (6, 7), (7, 9), (9, 12), (12, 19), (19, 20), (20, 24)):
        outputs, state = module.decode(x[:, start:stop], state)
        pieces.append(outputs)
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_performer_decode_matches_causal_forward_at_large_magnitudes(kernel):
    """q, k of std 24 put a query's best feature far below the keys' largest logit: the recurrent state
    takes the causal ops' per-feature stabilisers, so no step's normaliser underflows where the op's does not."""
    torch.manual_seed(3)
    module = MultiheadAttention(32, 1, batch_first=True, attention="performer", num_features=64, kernel=kernel).eval()
    with torch.no_grad():
        module.in_proj_weight[:64] *= 24 / 32**0.5 / module.in_proj_weight[:64].std()  # q, k of std 24
    x = torch.randn(1, 40, 32)
    expected, _ = module(x, x, x, is_causal=True, need_weights=False)
    outputs, state = module.decode(x[:, :3])
    pieces = [outputs]
    for position in range(3, 40):
        outputs, state = module.decode(x[:, position:position + 1], state)
        pieces.append(outputs)
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, atol=1e-4, rtol=1e-3)


def test_decode_rejects_mechanisms_without_incremental_form():
    module = MultiheadAttention(16, 2, batch_first=True, attention="linformer", **mechanism("linformer")[1])
    with pytest.raises(ValueError, match="incremental decoding supports 'full', 'bigbird' and 'performer', not 'linformer'"):
        module.decode(torch.randn(1, 3, 16))


@pytest.mark.parametrize("dtype", (torch.uint8, torch.int64), ids=("uint8", "int64"))
@pytest.mark.parametrize("mask_name", ("key_padding_mask", "attn_mask"))
@pytest.mark.parametrize("attention", ("full", "performer"))
def test_integer_masks_are_rejected_as_torch_does(attention, mask_name, dtype):
    """An integer mask must not become an additive bias of 0 and 1 (the "padded" key would keep its weight)."""
    module = MultiheadAttention(16, 2, batch_first=True, attention=attention)
    x = torch.randn(1, 3, 16)
    mask = torch.tensor([[0, 0, 1]], dtype=dtype) if mask_name == "key_padding_mask" else torch.zeros(3, 3, dtype=dtype)
    with pytest.raises(TypeError, match=rf"{mask_name}: expected a bool or floating-point tensor, got dtype {dtype}"):
        module(x, x, x, **{mask_name: mask})
    with pytest.raises(AssertionError, match="only bool and floating types"):
        nn.MultiheadAttention(16, 2, batch_first=True)(x, x, x, **{mask_name: mask})


SWITCHES = (("full", {}), ("bigbird", EFFICIENT["bigbird"]), ("linformer", EFFICIENT["linformer"]),
            ("performer", EFFICIENT["performer"]))


@pytest.mark.parametrize("before, after", [(a, b) for a in SWITCHES for b in SWITCHES if a[0] != b[0]],
                         ids=lambda switch: switch[0])
def test_replace_attention_switches_mechanisms_of_swapped_layers(before, after):
    torch.manual_seed(9)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 12, 16)
    fresh = copy.deepcopy(layer)
    assert fastattn.replace_attention(fresh, attention=after[0], **after[1]) == 1
    assert fastattn.replace_attention(layer, attention=before[0], **before[1]) == 1
    linformer_involved = "linformer" in (before[0], after[0])
    with pytest.warns(UserWarning, match="Linformer projections") if linformer_involved else contextlib.nullcontext():
        assert fastattn.replace_attention(layer, attention=after[0], **after[1]) == 1
    attention = layer.self_attn
    assert isinstance(attention, MultiheadAttention) and attention.attention == after[0]
    assert not attention.training
    for name, value in fresh.self_attn.state_dict().items():
        if name not in ("proj_k", "proj_v"):
            assert torch.equal(attention.state_dict()[name], value), name
    if after[0] == "performer":  # a random draw per construction: compare with the same features
        attention.projection.copy_(fresh.self_attn.projection)
    if after[0] == "linformer":
        attention.load_state_dict(fresh.self_attn.state_dict())
    torch.testing.assert_close(layer(x), fresh(x))


def test_from_torch_keeps_linformer_projections_of_the_same_shape_and_warns_otherwise():
    linformer = MultiheadAttention(16, 2, attention="linformer", projected_length=6, max_seq_len=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = MultiheadAttention.from_torch(linformer, attention="linformer", projected_length=6, max_seq_len=32)
        MultiheadAttention.from_torch(nn.MultiheadAttention(16, 2), attention="linformer", max_seq_len=32)
    assert torch.equal(same.proj_k, linformer.proj_k) and torch.equal(same.proj_v, linformer.proj_v)
    with pytest.warns(UserWarning, match=r"linformer -> linformer attention: drops the learned Linformer projections \['proj_v'\]"):
        shared = MultiheadAttention.from_torch(linformer, attention="linformer", projected_length=6, max_seq_len=32,
                                               share_kv=True)
    assert torch.equal(shared.proj_k, linformer.proj_k) and shared.proj_v is None
    with pytest.warns(UserWarning, match=r"initialises the Linformer projections \['proj_k', 'proj_v'\] randomly"):
        MultiheadAttention.from_torch(linformer, attention="linformer", projected_length=4, max_seq_len=32)
    with pytest.warns(UserWarning, match=r"full -> linformer attention: initialises"):
        MultiheadAttention.from_torch(MultiheadAttention(16, 2), attention="linformer", max_seq_len=32)
    with pytest.warns(UserWarning, match=r"linformer -> performer attention: drops the learned Linformer projections"):
        performer = MultiheadAttention.from_torch(linformer, attention="performer")
    assert performer.attention == "performer" and "proj_k" not in performer.state_dict()
