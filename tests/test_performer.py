"""Performer attention on the CPU backend (csrc/cpu/performer.cpp) against fastattn.reference."""
from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.ops import performer as performer_ops
from fastattn.testing import check_against_reference
from tests.utils import (CPU_DTYPE_IDS, CPU_DTYPES, allow_bf16_products, cpu_has_bf16_units, describe_case,
                         run_with_thread_counts)


def _inputs(batch, heads, length, dim, features, *, per_head=False, padding=False, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=generator, dtype=dtype) for _ in range(3))
    if per_head:
        projection = torch.stack([fastattn.random_features(features, dim, generator=generator, dtype=dtype)
                                  for _ in range(heads)])
    else:
        projection = fastattn.random_features(features, dim, generator=generator, dtype=dtype)
    inputs = {"q": q, "k": k, "v": v, "projection": projection}
    if padding:
        mask = torch.rand(batch, length, generator=generator) < 0.3
        mask[0, : length // 2] = True  # the first queries of batch 0 see no key when causal
        inputs["key_padding_mask"] = mask
    return inputs


def _cpu(kernel, causal):
    def run(q, k, v, projection, key_padding_mask=None, scale=None):
        return fastattn.performer_attention(q, k, v, projection, kernel=kernel, causal=causal,
                                            key_padding_mask=key_padding_mask, scale=scale, backend="cpu")
    return run


def _reference(kernel, causal):
    def run(q, k, v, projection, key_padding_mask=None, scale=None):
        return reference.performer_attention(q, k, v, projection, kernel=kernel, causal=causal,
                                             key_padding_mask=key_padding_mask, scale=scale)
    return run


# (B, H, N, D, m, per_head, padding)
SHAPES = [
    (2, 3, 1, 32, 16, False, False),
    (1, 2, 7, 32, 24, True, True),
    (2, 2, 63, 64, 64, False, True),
    (1, 2, 64, 64, 40, True, False),
    (2, 1, 65, 32, 16, False, True),
    (1, 2, 200, 128, 32, False, False),
    (1, 1, 1000, 16, 32, True, True),
    (1, 1, 70, 256, 20, False, True),
    (1, 2, 45, 33, 17, False, True),  # odd D and m: bf16 products over them read zero pads
]
MODES = [("softmax", False), ("softmax", True), ("relu", False), ("relu", True)]


@pytest.mark.parametrize("dtype, bf16_products", CPU_DTYPES, ids=CPU_DTYPE_IDS)
@pytest.mark.parametrize("kernel,causal", MODES, ids=[describe_case(k=k, causal=c) for k, c in MODES])
@pytest.mark.parametrize("shape", SHAPES, ids=[
    describe_case(B=b, H=h, N=n, D=d, m=m, per_head=p, padding=pad)
    for b, h, n, d, m, p, pad in SHAPES
])
def test_matches_reference(shape, kernel, causal, dtype, bf16_products, monkeypatch):
    allow_bf16_products(monkeypatch, bf16_products)
    batch, heads, length, dim, features, per_head, padding = shape
    inputs = _inputs(batch, heads, length, dim, features, per_head=per_head, padding=padding)
    # With one key the output is v whatever q and k are: their gradients are zero up to cancellation noise,
    # which the tolerance rule (relative to a zero reference) cannot bound; test_single_key_gradients covers them.
    differentiable = ("v",) if length == 1 else ("q", "k", "v")
    if kernel == "relu" and dtype == torch.bfloat16:
        # relu's derivative jumps at 0: rounding the inputs to bfloat16 can flip it for a logit near 0, an error
        # no kernel can avoid. Inputs representable in bfloat16, scaled by a power of two (sqrt(scale) = 1/4:
        # the default 1/D^(1/4) is not one for most D, and the kernel would round x sqrt(scale) or
        # W sqrt(scale) to bfloat16), leave the kernel only its float32 sums.
        inputs = {name: value.to(dtype).double() if value.is_floating_point() else value
                  for name, value in inputs.items()}
        inputs["scale"] = 1 / 16
    check_against_reference(_cpu(kernel, causal), _reference(kernel, causal), inputs, dtype, differentiable)


@pytest.mark.skipif(not cpu_has_bf16_units(), reason="one bfloat16 path only on a CPU without bf16 units")
@pytest.mark.parametrize("causal", [False, True], ids=["non-causal", "causal"])
def test_bf16_products_switch_changes_the_path(causal, monkeypatch):
    inputs = _inputs(1, 2, 100, 32, 24, padding=True, dtype=torch.float32)
    q, k, v = (inputs[name].bfloat16().requires_grad_() for name in ("q", "k", "v"))
    results = []
    for allowed in (True, False):
        allow_bf16_products(monkeypatch, allowed)
        out = _cpu("softmax", causal)(q, k, v, inputs["projection"], inputs["key_padding_mask"])
        results.append([out, *torch.autograd.grad(out, [q, k, v], torch.ones_like(out))])
    for with_bf16, with_float32 in zip(*results):
        assert not torch.equal(with_bf16, with_float32), "bf16 products round the features and states to bfloat16"


@pytest.mark.parametrize("kernel,causal", MODES, ids=[describe_case(k=k, causal=c) for k, c in MODES])
def test_single_key_gradients(kernel, causal):
    inputs = _inputs(2, 3, 1, 32, 16, dtype=torch.float32)
    q, k, v = (inputs[name].requires_grad_() for name in ("q", "k", "v"))
    out = _cpu(kernel, causal)(q, k, v, inputs["projection"])
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    torch.testing.assert_close(out, v.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v.grad, grad_out, rtol=1e-6, atol=1e-6)
    for grad in (q.grad, k.grad):
        torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-4)


GRADCHECK_CASES = [(kernel, causal, padding) for kernel, causal in MODES for padding in (False, True)]


@pytest.mark.parametrize("kernel,causal,padding", GRADCHECK_CASES,
                         ids=[describe_case(k=k, causal=c, padding=p) for k, c, p in GRADCHECK_CASES])
def test_gradcheck(kernel, causal, padding):
    # 70 rows span two causal chunks of the kernel (64 rows each).
    inputs = _inputs(1, 2, 70, 4, 6, per_head=True, padding=padding)
    q, k, v = (inputs[name].requires_grad_() for name in ("q", "k", "v"))
    fn = _cpu(kernel, causal)
    assert torch.autograd.gradcheck(
        lambda q, k, v: fn(q, k, v, inputs["projection"], inputs.get("key_padding_mask")), (q, k, v),
        eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True,
    )


@pytest.mark.parametrize("kernel,causal", MODES, ids=[describe_case(k=k, causal=c) for k, c in MODES])
def test_opcheck(kernel, causal):
    inputs = _inputs(2, 2, 70, 16, 24, padding=True, dtype=torch.float32)
    q, k, v = (inputs[name].requires_grad_() for name in ("q", "k", "v"))
    torch.library.opcheck(torch.ops.fastattn.performer_fwd.default,
                          (q, k, v, inputs["projection"], kernel, causal, inputs["key_padding_mask"], 0.25))


@pytest.mark.parametrize("causal", [False, True], ids=["global", "causal"])
def test_compile_fullgraph_matches_eager(causal):
    # The op's differentiable call, which both the CPU and CUDA backends use (backend selection is outside it).
    inputs = _inputs(1, 2, 80, 16, 24, padding=True, dtype=torch.float32)

    def fn(q, k, v, projection, key_padding_mask):
        return performer_ops.performer_attention(q, k, v, projection, kernel="softmax", causal=causal,
                                                 key_padding_mask=key_padding_mask, scale=0.25)

    def loss_and_grads(function):
        q, k, v = (inputs[name].clone().requires_grad_() for name in ("q", "k", "v"))
        out = function(q, k, v, inputs["projection"], inputs["key_padding_mask"])
        out.square().sum().backward()
        return out.detach(), q.grad, k.grad, v.grad

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    for eager, traced in zip(loss_and_grads(fn), loss_and_grads(compiled)):
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("position", [0, 40, 63, 64, 100])
def test_causal_outputs_ignore_later_keys(kernel, position):
    inputs = _inputs(1, 2, 130, 16, 32, dtype=torch.float32)
    fn = _cpu(kernel, True)
    out = fn(inputs["q"], inputs["k"], inputs["v"], inputs["projection"])
    k, v = inputs["k"].clone(), inputs["v"].clone()
    # Larger keys raise the running maximum of the logits after `position`: earlier outputs must not move.
    k[:, :, position + 1:] *= 3.0
    v[:, :, position + 1:] = torch.randn_like(v[:, :, position + 1:]) * 10
    perturbed = fn(inputs["q"], k, v, inputs["projection"])
    noise = 4 * torch.finfo(torch.float32).eps * out.abs().max().item()
    torch.testing.assert_close(perturbed[:, :, : position + 1], out[:, :, : position + 1], rtol=0, atol=noise)
    assert not torch.allclose(perturbed[:, :, position + 1:], out[:, :, position + 1:])


@pytest.mark.parametrize("kernel,causal", MODES, ids=[describe_case(k=k, causal=c) for k, c in MODES])
def test_padded_keys_change_nothing(kernel, causal):
    inputs = _inputs(2, 2, 90, 16, 24, padding=True, dtype=torch.float32)
    mask = inputs["key_padding_mask"]
    fn = _cpu(kernel, causal)

    def run(k, v):
        q = inputs["q"].clone().requires_grad_()
        out = fn(q, k, v, inputs["projection"], mask)
        out.sum().backward()
        return out.detach(), q.grad

    padded = mask[:, None, :, None]
    k = torch.where(padded, torch.randn_like(inputs["k"]) * 20, inputs["k"])
    v = torch.where(padded, torch.randn_like(inputs["v"]) * 20, inputs["v"])
    for changed, original in zip(run(k, v), run(inputs["k"], inputs["v"])):
        torch.testing.assert_close(changed, original, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True], ids=["global", "causal"])
def test_rows_that_see_no_key_give_zeros(causal):
    inputs = _inputs(2, 2, 70, 16, 24, dtype=torch.float32)
    mask = torch.zeros(2, 70, dtype=torch.bool)
    mask[0] = True  # batch 0: every key padded
    mask[1, :30] = True  # batch 1: when causal, the first 30 queries see no key
    q, k, v = (inputs[name].requires_grad_() for name in ("q", "k", "v"))
    out = _cpu("softmax", causal)(q, k, v, inputs["projection"], mask)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert (out[0] == 0).all() and (q.grad[0] == 0).all() and (k.grad[0] == 0).all() and (v.grad[0] == 0).all()
    if causal:
        assert (out[1, :, :30] == 0).all() and (q.grad[1, :, :30] == 0).all()


# The causal backward runs a head's two directions in one task (the reverse one reading the running maxima
# the forward one recorded) with at least two heads per thread, in two tasks otherwise (the reverse one
# finding the maxima itself): with 2 heads, 1 thread and 2 or more threads take the two ways, which must
# give the same bits. The non-causal backward splits each head's sum over its 3 query tiles into parts,
# whose number must not follow the number of threads.
@pytest.mark.parametrize("dtype, bf16_products", CPU_DTYPES, ids=CPU_DTYPE_IDS)
@pytest.mark.parametrize("kernel,causal", MODES, ids=[describe_case(k=k, causal=c) for k, c in MODES])
def test_backward_same_bits_whatever_the_thread_count(kernel, causal, dtype, bf16_products, monkeypatch):
    allow_bf16_products(monkeypatch, bf16_products)
    inputs = _inputs(1, 2, 150, 32, 40, padding=True, dtype=torch.float32)

    def outputs_and_grads():
        q, k, v = (inputs[name].to(dtype).clone().requires_grad_() for name in ("q", "k", "v"))
        out = _cpu(kernel, causal)(q, k, v, inputs["projection"].to(dtype), inputs["key_padding_mask"])
        out.float().square().sum().backward()
        return out, q.grad, k.grad, v.grad

    results = run_with_thread_counts(outputs_and_grads, (1, max(torch.get_num_threads(), 2)))
    for first, again in zip(*results):
        assert torch.equal(first, again)


def _keys_that_jump(length_factor):
    # Keys 0-20 are `length_factor` times too long: their logits lie near -|x|^2 / 2, about -2 length_factor^2.
    # Key 21, an ordinary one, raises the features' running maxima by about as much in the middle of a
    # sub-block of the CPU kernel (rows 16-31). Rows 16-20 weigh their keys against the sub-block's final
    # maxima only in the features whose maximum rises little; the others are summed pair by pair.
    inputs = _inputs(1, 2, 48, 16, 8)
    inputs["k"][:, :, :21] *= length_factor
    return inputs


@pytest.mark.parametrize("dtype, bf16_products", CPU_DTYPES, ids=CPU_DTYPE_IDS)
def test_causal_feature_maxima_that_jump_within_a_sub_block(dtype, bf16_products, monkeypatch):
    allow_bf16_products(monkeypatch, bf16_products)
    check_against_reference(_cpu("softmax", True), _reference("softmax", True), _keys_that_jump(5), dtype)


def test_causal_feature_maxima_that_jump_beyond_float32s_range():
    # A rise of about 200: factored, the weights of rows 16-20 would be exp(200), inf in float32.
    inputs = _keys_that_jump(10)
    names = ("q", "k", "v")
    kernel_leaves = [inputs[name].float().requires_grad_() for name in names]
    reference_leaves = [inputs[name].clone().requires_grad_() for name in names]
    out = _cpu("softmax", True)(*kernel_leaves, inputs["projection"].float())
    expected = _reference("softmax", True)(*reference_leaves, inputs["projection"])
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    # Logits near -200 round by up to 1.5e-5 in float32: gradients to 1e-4 of their largest entry.
    for name, got, want in zip(names, kernel_leaves, reference_leaves):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4 * want.grad.abs().max().item(),
                                   msg=lambda text, name=name: f"grad {name}: {text}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kernel,causal", MODES, ids=[describe_case(k=k, causal=c) for k, c in MODES])
def test_large_inputs_stay_finite(kernel, causal, dtype):
    inputs = _inputs(1, 2, 130, 64, 64, padding=True, dtype=torch.float32)
    q, k, v = ((inputs[name] * 4).to(dtype).requires_grad_() for name in ("q", "k", "v"))
    out = _cpu(kernel, causal)(q, k, v, inputs["projection"], inputs["key_padding_mask"])
    out.float().square().sum().backward()
    for name, value in (("out", out), ("grad q", q.grad), ("grad k", k.grad), ("grad v", v.grad)):
        assert torch.isfinite(value).all(), f"{name} has non-finite values"


def test_approximates_softmax_attention_better_with_more_features():
    # Small logits (q and k of norm about 2): FAVOR+'s variance grows like exp(|q|^2 + |k|^2) scaled.
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 256, 16, generator=generator) for _ in range(3))
    q, k = q * 0.5, k * 0.5
    exact = reference.full_attention(q.double(), k.double(), v.double())
    errors = []
    for features in (64, 256, 1024):
        projection = fastattn.random_features(features, 16, generator=generator)
        out = fastattn.performer_attention(q, k, v, projection, backend="cpu").double()
        errors.append(((out - exact).norm() / exact.norm()).item())
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.5 * errors[0], errors


def test_projection_gets_no_gradient():
    inputs = _inputs(1, 2, 20, 16, 8, dtype=torch.float32)
    projection = inputs["projection"].requires_grad_()
    q = inputs["q"].requires_grad_()
    fastattn.performer_attention(q, inputs["k"], inputs["v"], projection, backend="cpu").sum().backward()
    assert q.grad is not None and projection.grad is None


@pytest.mark.parametrize("projection_shape,message", [
    ((8, 32), "projection: expected D = 16"),
    ((3, 8, 16), "projection: expected shape"),
    ((8,), "projection: expected shape"),
], ids=["wrong-head-dim", "wrong-heads", "wrong-rank"])
def test_bad_projection_is_rejected(projection_shape, message):
    inputs = _inputs(1, 2, 20, 16, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        fastattn.performer_attention(inputs["q"], inputs["k"], inputs["v"], torch.randn(projection_shape), backend="cpu")


def test_bad_kernel_name_is_rejected():
    inputs = _inputs(1, 2, 20, 16, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="kernel: expected"):
        fastattn.performer_attention(inputs["q"], inputs["k"], inputs["v"], inputs["projection"], kernel="gelu",
                                     backend="cpu")
    with pytest.raises(ValueError, match="kernel: expected 'softmax' or 'relu', got 'gelu'"):
        torch.ops.fastattn.performer_fwd(inputs["q"], inputs["k"], inputs["v"], inputs["projection"], "gelu", False,
                                         None, 0.25)


def test_compiled_op_rejects_projection_that_does_not_fit():
    inputs = _inputs(1, 2, 20, 16, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"projection: expected shape \(m, 16\)"):
        torch.ops.fastattn.performer_fwd(inputs["q"], inputs["k"], inputs["v"], torch.randn(8, 12), "softmax", False,
                                         None, 0.25)
