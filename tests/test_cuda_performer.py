"""Performer on the CUDA backend (csrc/cuda/performer_*): against the float64 reference on a GPU.

GPU tests are marked ``gpu`` (skipped without a GPU; ``make gpu-check`` runs them). Inputs are drawn on the
CPU; the kernel runs on the GPU and the references on the CPU, as in tests/test_cuda_linformer.py. The kernels'
logic is also checked without a GPU in tests/test_cuda_emulated.py.
"""
from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.testing import check_against_reference
from tests.test_performer import _inputs
from tests.utils import describe_case


def _cuda(kernel, causal=False):
    def run(q, k, v, projection, key_padding_mask=None):
        mask = None if key_padding_mask is None else key_padding_mask.cuda()
        out = fastattn.performer_attention(q.cuda(), k.cuda(), v.cuda(), projection.cuda(), kernel=kernel,
                                           causal=causal, key_padding_mask=mask, backend="cuda")
        return out.cpu()
    return run


def _reference(kernel, causal=False):
    def run(q, k, v, projection, key_padding_mask=None):
        return reference.performer_attention(q, k, v, projection, kernel=kernel, causal=causal,
                                             key_padding_mask=key_padding_mask)
    return run


# (B, H, N, D, m, dtype, kernel, per_head, padding): every head dim and dtype; m below, at, above and not a
# multiple of the 64-feature tile, and the largest (512); N not a multiple of the 32-row tile; long N (split sums).
CASES = [
    (2, 3, 200, 64, 64, torch.bfloat16, "softmax", False, True),
    (1, 2, 7, 32, 16, torch.float16, "softmax", True, True),
    (2, 2, 63, 64, 80, torch.float32, "softmax", False, True),
    (1, 2, 300, 128, 256, torch.float16, "softmax", True, False),
    (1, 2, 300, 128, 512, torch.float32, "softmax", False, True),
    (2, 2, 3000, 64, 256, torch.bfloat16, "softmax", True, True),
    (1, 4, 4096, 32, 144, torch.float16, "relu", False, False),
    (2, 2, 100, 64, 64, torch.bfloat16, "relu", True, True),
    (1, 2, 1000, 128, 32, torch.float32, "relu", False, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[
    describe_case(B=b, H=h, N=n, D=d, m=m, dtype=t, kernel=kern, per_head=p, padding=pad)
    for b, h, n, d, m, t, kern, p, pad in CASES])
def test_cuda_performer_matches_reference(case):
    batch, heads, length, dim, features, dtype, kernel, per_head, padding = case
    inputs = _inputs(batch, heads, length, dim, features, per_head=per_head, padding=padding)
    check_against_reference(_cuda(kernel), _reference(kernel), inputs, dtype)


# (B, H, N, D, m, dtype, kernel, per_head, padding), causal: N within one 32-position chunk and across many;
# m within one 64-feature tile and across several (the tiles' shares). padding leaves the first queries of
# batch 0 without a key (tests/test_performer._inputs).
CAUSAL_CASES = [
    (2, 2, 200, 64, 64, torch.bfloat16, "softmax", False, True),
    (1, 2, 20, 32, 16, torch.float16, "softmax", True, True),
    (1, 2, 300, 128, 256, torch.float32, "softmax", True, False),
    (2, 2, 2000, 64, 128, torch.float16, "softmax", False, True),
    (1, 2, 150, 64, 80, torch.float32, "relu", False, True),
    (1, 1, 1000, 32, 144, torch.bfloat16, "relu", True, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CAUSAL_CASES, ids=[
    describe_case(B=b, H=h, N=n, D=d, m=m, dtype=t, kernel=kern, per_head=p, padding=pad, causal=True)
    for b, h, n, d, m, t, kern, p, pad in CAUSAL_CASES])
def test_cuda_causal_performer_matches_reference(case):
    batch, heads, length, dim, features, dtype, kernel, per_head, padding = case
    inputs = _inputs(batch, heads, length, dim, features, per_head=per_head, padding=padding)
    check_against_reference(_cuda(kernel, True), _reference(kernel, True), inputs, dtype)


@pytest.mark.gpu
def test_cuda_causal_performer_later_keys_leave_earlier_outputs_unchanged():
    inputs = {name: t.float() for name, t in _inputs(1, 2, 300, 64, 64).items()}
    first = _cuda("softmax", True)(**inputs)
    changed = dict(inputs, k=inputs["k"].clone(), v=inputs["v"].clone())
    changed["k"][:, :, 150:] *= 10  # larger logits: the running maximum grows after key 150
    changed["v"][:, :, 150:] = torch.randn_like(changed["v"][:, :, 150:])
    second = _cuda("softmax", True)(**changed)
    torch.testing.assert_close(second[:, :, :150], first[:, :, :150], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_cuda_performer_large_logits_keep_their_normalisers():
    # std 16: a scalar key stabiliser lets normalisers underflow (csrc/cpu/performer.cpp's header); per-feature
    # ones do not.
    # The float32 reference underflows there, so the tolerance rule would measure little: the float64 one must match.
    inputs = _inputs(1, 2, 100, 32, 64)
    q, k = inputs["q"] * 16, inputs["k"] * 16
    out = _cuda("softmax")(q.float(), k.float(), inputs["v"].float(), inputs["projection"].float())
    expected = _reference("softmax")(q, k, inputs["v"], inputs["projection"])
    assert torch.isfinite(out).all()
    assert (out.double() - expected).abs().max().item() < 1e-3 * expected.abs().max().item()


CAUSAL_LARGE_MAGNITUDE_CASES = [(seed, padding) for padding in (False, True) for seed in range(3)]


@pytest.mark.gpu
@pytest.mark.parametrize("seed, padding", CAUSAL_LARGE_MAGNITUDE_CASES,
                         ids=[describe_case(seed=seed, padding=padding) for seed, padding in CAUSAL_LARGE_MAGNITUDE_CASES])
def test_cuda_causal_performer_normalisers_never_underflow_at_large_magnitudes(seed, padding):
    """Causal, q and k of std 16 (issue 13): one running maximum over all features let the float32 normalisers
    underflow; the per-feature running maxima keep every normaliser of a query that sees a key >= 1 (to
    rounding), on the GPU too, where subnormals flush to zero. Gradients: only finite (the rule cannot judge
    them at std 16, fastattn.testing.gradient_rule_exclusion)."""
    inputs = _inputs(1, 2, 100, 32, 64, padding=padding, seed=seed)
    inputs["q"], inputs["k"] = inputs["q"] * 16, inputs["k"] * 16
    check_against_reference(_cuda("softmax", True), _reference("softmax", True), inputs, torch.float32, backward=False)
    q, k, v = (inputs[name].float().cuda().requires_grad_() for name in ("q", "k", "v"))
    mask = inputs.get("key_padding_mask")
    mask = None if mask is None else mask.cuda()
    projection = inputs["projection"].float().cuda()
    _, normaliser, _, _ = torch.ops.fastattn.performer_fwd(q.detach(), k.detach(), v.detach(), projection, "softmax",
                                                           True, mask, 32**-0.5)
    seen = normaliser > 0
    assert seen.any() and normaliser[seen].min().item() >= 1 - 1e-6
    out = fastattn.performer_attention(q, k, v, projection, causal=True, key_padding_mask=mask, backend="cuda")
    out.backward(torch.randn_like(out))
    for name, leaf in (("q", q), ("k", k), ("v", v)):
        assert torch.isfinite(leaf.grad).all(), f"grad of {name} has non-finite values"


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_performer_is_deterministic(dtype, causal):
    # The state and its gradient are split over the keys and queries across CTAs; the splits are added in order.
    inputs = {name: t.to("cuda", dtype) if t.is_floating_point() else t.cuda()
              for name, t in _inputs(2, 2, 5000, 64, 128, padding=True).items()}
    runs = []
    for _ in range(2):
        leaves = {name: t.detach().requires_grad_(name in ("q", "k", "v")) for name, t in inputs.items()}
        out = fastattn.performer_attention(**leaves, causal=causal, backend="cuda")
        out.backward(torch.ones_like(out))
        runs.append([out] + [leaves[name].grad for name in ("q", "k", "v")])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_cuda_performer_opcheck(kernel, causal):
    inputs = _inputs(1, 2, 70, 32, 48, per_head=True, padding=True)
    q, k, v = (inputs[name].to("cuda", torch.float16).requires_grad_() for name in ("q", "k", "v"))
    args = (q, k, v, inputs["projection"].cuda(), kernel, causal, inputs["key_padding_mask"].cuda(), 32**-0.5)
    torch.library.opcheck(torch.ops.fastattn.performer_fwd, args)


@pytest.mark.gpu
def test_cuda_performer_rejects_unsupported_arguments_with_clear_messages():
    inputs = _inputs(1, 1, 64, 32, 16)
    q, k, v, projection = (inputs[name].to("cuda", torch.float16) for name in ("q", "k", "v", "projection"))
    with pytest.raises(ValueError, match="causal: expected Nq == Nk"):
        torch.ops.fastattn.performer_fwd(q, k[:, :, :32], v[:, :, :32], projection, "softmax", True, None, 1.0)
    with pytest.raises(ValueError, match="multiple of 16 up to 512"):
        torch.ops.fastattn.performer_fwd(q, k, v, projection[:10], "softmax", False, None, 1.0)
    with pytest.raises(ValueError, match="head dim 32, 64 or 128"):
        wide = torch.randn(1, 1, 64, 48, device="cuda", dtype=torch.float16)
        torch.ops.fastattn.performer_fwd(wide, wide, wide, torch.randn(16, 48, device="cuda"), "softmax", False,
                                         None, 1.0)
