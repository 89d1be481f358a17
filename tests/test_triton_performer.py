"""Triton Performer attention against the float64 reference: outputs and gradients of q, k and v.

On the CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the
shapes are tiny; the GPU tests (marker ``gpu``, run by ``make gpu-check``) use realistic ones.
Grouped-query attention (k, v with fewer heads than q) is checked against the reference with k and v
repeated over each group of query heads.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

pytest.importorskip("triton")

import fastattn  # noqa: E402
from fastattn import reference  # noqa: E402
from fastattn.backends import BACKENDS  # noqa: E402
from fastattn.testing import check_against_reference  # noqa: E402
from fastattn.triton_kernels import IMPLEMENTATIONS  # noqa: E402
from fastattn.triton_kernels import performer as triton_performer  # noqa: E402
from tests.utils import (  # noqa: E402
    RecordingLaunch,
    assert_gradients_match_finite_differences,
    assert_nan_queries_reach_only_what_they_read,
    describe_case,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton_device = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRETED, reason="Triton needs a GPU or TRITON_INTERPRET=1"
)


def _inputs(batch, heads, kv_heads, length, head_dim, features, *, per_head, padding, seed, device=DEVICE,
            key_len=None):
    generator = torch.Generator().manual_seed(seed)
    key_len = length if key_len is None else key_len
    inputs = {
        "q": torch.randn(batch, heads, length, head_dim, generator=generator, dtype=torch.float64),
        "k": torch.randn(batch, kv_heads, key_len, head_dim, generator=generator, dtype=torch.float64),
        "v": torch.randn(batch, kv_heads, key_len, head_dim, generator=generator, dtype=torch.float64),
    }
    if per_head:
        inputs["projection"] = torch.stack([
            fastattn.random_features(features, head_dim, generator=generator, dtype=torch.float64)
            for _ in range(heads)
        ])
    else:
        inputs["projection"] = fastattn.random_features(features, head_dim, generator=generator, dtype=torch.float64)
    if padding:
        # Batch 0 pads its first keys (causal queries before them see nothing) and its tail; the last
        # batch pads every key, so all of its rows see nothing.
        mask = torch.zeros(batch, key_len, dtype=torch.bool)
        mask[0, : max(1, key_len // 5)] = True
        mask[0, key_len - key_len // 4:] = True
        if batch > 1:
            mask[-1] = True
        inputs["key_padding_mask"] = mask
    return {name: value.to(device) for name, value in inputs.items()}


def _triton(kernel, causal, scale=None):
    def run(q, k, v, projection, key_padding_mask=None):
        return triton_performer.performer_attention(
            q, k, v, projection, kernel=kernel, causal=causal, key_padding_mask=key_padding_mask,
            scale=q.shape[-1] ** -0.5 if scale is None else scale,
        )
    return run


def _reference(kernel, causal, scale=None):
    def run(q, k, v, projection, key_padding_mask=None):
        group = q.shape[1] // k.shape[1]
        return reference.performer_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                             projection, kernel=kernel, causal=causal,
                                             key_padding_mask=key_padding_mask, scale=scale)
    return run


def _check(inputs, kernel, causal, dtype, scale=None):
    if kernel == "relu" and dtype != torch.float32:
        # relu's derivative jumps at 0: rounding the inputs to 16 bits can flip it for a logit near 0, an
        # error no kernel can avoid. Inputs representable in the dtype leave the kernel only its own rounding.
        inputs = {name: value.to(dtype).double() if value.is_floating_point() else value
                  for name, value in inputs.items()}
    check_against_reference(_triton(kernel, causal, scale), _reference(kernel, causal, scale), inputs, dtype)


# (B, H, Hkv, N, D, m, per_head, padding, kernel, causal, dtype)
CASES = [
    (1, 2, 2, 40, 32, 20, False, False, "softmax", False, torch.float32),
    (2, 2, 2, 70, 64, 40, True, True, "softmax", False, torch.float32),  # two feature tiles
    (2, 4, 2, 33, 32, 16, True, True, "softmax", False, torch.float32),  # grouped-query attention
    (1, 1, 1, 5, 128, 24, False, False, "softmax", False, torch.float32),
    (2, 2, 1, 50, 32, 33, False, True, "relu", False, torch.float32),
    (2, 2, 2, 64, 64, 64, True, True, "softmax", False, torch.float16),
    (1, 2, 2, 45, 32, 24, False, False, "relu", False, torch.float16),
    (1, 2, 2, 40, 32, 20, False, False, "softmax", True, torch.float32),
    (2, 2, 2, 70, 64, 40, True, True, "softmax", True, torch.float32),  # three chunks, two feature tiles
    (2, 4, 2, 33, 32, 16, True, True, "softmax", True, torch.float32),
    (1, 1, 1, 5, 128, 24, False, False, "softmax", True, torch.float32),
    (2, 2, 1, 50, 32, 33, False, True, "relu", True, torch.float32),
    (2, 2, 2, 100, 64, 64, True, True, "softmax", True, torch.float16),
    (1, 2, 2, 45, 32, 24, False, False, "relu", True, torch.float16),
]


@needs_triton_device
@pytest.mark.parametrize(
    "batch, heads, kv_heads, length, head_dim, features, per_head, padding, kernel, causal, dtype",
    CASES,
    ids=[describe_case(B=b, H=h, Hkv=hkv, N=n, D=d, m=m, per_head=ph, padding=p, **{kernel: True}, causal=c, dtype=t)
         for b, h, hkv, n, d, m, ph, p, kernel, c, t in CASES],
)
def test_matches_reference(batch, heads, kv_heads, length, head_dim, features, per_head, padding, kernel, causal,
                           dtype):
    inputs = _inputs(batch, heads, kv_heads, length, head_dim, features, per_head=per_head, padding=padding,
                     seed=length)
    _check(inputs, kernel, causal, dtype)


@needs_triton_device
def test_public_api_with_different_query_and_key_lengths():
    inputs = _inputs(2, 2, 2, 30, 32, 20, per_head=False, padding=True, seed=3, key_len=45)

    def kernel(q, k, v, projection, key_padding_mask):
        return fastattn.performer_attention(q, k, v, projection, key_padding_mask=key_padding_mask, backend="triton")

    check_against_reference(kernel, _reference("softmax", False), inputs, torch.float32)


@needs_triton_device
def test_custom_scale_and_strided_inputs():
    """q, k, v with non-contiguous batch/head/sequence strides (unit last stride) and a custom scale."""
    generator = torch.Generator().manual_seed(3)
    packed = torch.randn(1, 30, 3, 2, 32, generator=generator, dtype=torch.float64)
    inputs = {name: packed[:, :, i].transpose(1, 2).to(DEVICE) for i, name in enumerate("qkv")}
    assert inputs["q"].stride(-1) == 1 and not inputs["q"].is_contiguous()
    inputs["projection"] = torch.randn(20, 64, generator=generator, dtype=torch.float64)[:, ::2].to(DEVICE)
    _check(inputs, "softmax", False, torch.float32, scale=0.3)


@needs_triton_device
def test_large_inputs_stay_within_tolerance():
    """std 4 queries and keys: key features spread over many orders of magnitude, some underflow to 0."""
    inputs = _inputs(1, 2, 2, 32, 32, 64, per_head=False, padding=False, seed=10)
    inputs["q"], inputs["k"] = inputs["q"] * 4, inputs["k"] * 4
    _check(inputs, "softmax", False, torch.float32)


@contextlib.contextmanager
def _subnormals_flushed():
    """Subnormal float32 results flushed to zero, as Triton's exponentials give them on NVIDIA GPUs
    (pytorch/pytorch#125557). The interpreter computes with numpy, which keeps subnormals unless the CPU
    is told to flush them.
    """
    flushed = DEVICE == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flushed:
            torch.set_flush_denormal(False)


LARGE_MAGNITUDE_CASES = [(seed, padding) for padding in (False, True) for seed in range(4)]


def _check_large_magnitudes(seed, padding, causal):
    """std 16 queries and keys, float32, subnormals flushed: outputs within the tolerance rule, every
    normaliser of a row that sees a key >= 1, finite gradients."""
    inputs = _inputs(1, 2, 2, 100, 32, 64, per_head=False, padding=padding, seed=seed)
    inputs["q"], inputs["k"] = inputs["q"] * 16, inputs["k"] * 16
    kernel = _triton("softmax", causal)

    def flushed_kernel(*args, **kwargs):
        with _subnormals_flushed():
            return kernel(*args, **kwargs)

    check_against_reference(flushed_kernel, _reference("softmax", causal), inputs, torch.float32, backward=False)
    q, k, v = (inputs[name].float().requires_grad_() for name in "qkv")
    with _subnormals_flushed():
        out, normaliser, _, _ = triton_performer.performer_fwd(q, k, v, inputs["projection"].float(), "softmax", causal,
                                                              inputs.get("key_padding_mask"), 32**-0.5)
        out.backward(torch.randn_like(out))
    seen = normaliser > 0
    assert seen.any() and normaliser[seen].min() >= 1
    for name, leaf in zip("qkv", (q, k, v)):
        assert torch.isfinite(leaf.grad).all(), f"grad of {name} has non-finite values"


@needs_triton_device
@pytest.mark.parametrize("seed, padding", LARGE_MAGNITUDE_CASES,
                         ids=[describe_case(seed=seed, padding=padding) for seed, padding in LARGE_MAGNITUDE_CASES])
def test_non_causal_normalisers_never_underflow_at_large_magnitudes(seed, padding):
    """std 16 queries and keys (issue 10, item 2): a query's best features meet keys far below the largest
    key logit. One key stabiliser for all features left such normalisers tiny or subnormal, 0 once
    flushed, and the outputs of 7 of these 8 cases far outside the tolerance rule. Per-feature key
    stabilisers keep every normaliser >= 1.

    The gradients are only checked to be finite: the float32 reference's own gradients overflow there,
    so the rule cannot judge them (``test_large_inputs_stay_within_tolerance`` applies it at std 4).
    """
    _check_large_magnitudes(seed, padding, causal=False)


@needs_triton_device
@pytest.mark.parametrize("seed, padding", LARGE_MAGNITUDE_CASES,
                         ids=[describe_case(seed=seed, padding=padding) for seed, padding in LARGE_MAGNITUDE_CASES])
def test_causal_normalisers_never_underflow_at_large_magnitudes(seed, padding):
    """Causal, std 16 queries and keys (issue 10, item 2): with each key's running maximum M_j as its
    stabiliser, a query's best features could meet its keys far below it, and its normaliser underflowed.
    The per-feature running maxima as stabilisers keep every normaliser >= 1."""
    _check_large_magnitudes(seed, padding, causal=True)


@needs_triton_device
def test_causal_gradients_stay_finite_at_very_large_magnitudes():
    """std 30 queries and keys (issue 10, item 2): every normaliser is >= 1 (the scalar stabilisers left
    some subnormal, and 1 / den overflowed float32 in the backward), and dq, dk, dv are finite."""
    generator = torch.Generator().manual_seed(3)
    q, k = (30 * torch.randn(1, 2, 48, 32, generator=generator) for _ in range(2))
    v, projection = torch.randn(1, 2, 48, 32, generator=generator), torch.randn(64, 32, generator=generator)
    q, k, v = (t.to(DEVICE).requires_grad_() for t in (q, k, v))
    out, normaliser, _, _ = triton_performer.performer_fwd(q, k, v, projection.to(DEVICE), "softmax", True, None,
                                                          32**-0.5)
    assert normaliser.min() >= 1
    assert torch.isfinite(out).all()
    out.backward(torch.randn_like(out))
    for name, leaf in zip("qkv", (q, k, v)):
        assert torch.isfinite(leaf.grad).all(), f"grad of {name} has non-finite values"


FINITE_DIFFERENCE_CASES = [("softmax", False, 2, True), ("relu", False, 1, False), ("softmax", True, 1, True),
                           ("relu", True, 2, True)]


@needs_triton_device
@pytest.mark.parametrize(
    "kernel, causal, kv_heads, padding",
    FINITE_DIFFERENCE_CASES,
    ids=[describe_case(B=2, H=2, Hkv=hkv, N=24, D=32, m=20, **{kernel: True}, causal=c, padding=p)
         for kernel, c, hkv, p in FINITE_DIFFERENCE_CASES],
)
def test_float64_gradients_match_finite_differences(kernel, causal, kv_heads, padding):
    """<grad, u> against central differences of the forward along random signed directions u.

    Not torch.autograd.gradcheck: its full mode is far too slow in the interpreter, and its fast mode
    draws all-positive directions only.
    """
    inputs = _inputs(2, 2, kv_heads, 24, 32, 20, per_head=True, padding=padding, seed=6)
    key_padding_mask = inputs.get("key_padding_mask")
    projection = inputs["projection"]

    def attention(q, k, v):
        return triton_performer.performer_attention(q, k, v, projection, kernel=kernel, causal=causal,
                                                    key_padding_mask=key_padding_mask, scale=0.3)

    leaves = [inputs[name].requires_grad_() for name in "qkv"]
    assert_gradients_match_finite_differences(attention, leaves, "qkv")


@needs_triton_device
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_later_keys_and_values_never_change_earlier_outputs(kernel):
    """Causal: changing keys and values after position i leaves outputs <= i unchanged (to float32 rounding).

    Position 40 is inside the second chunk. The first key after it is x = w_0 / sqrt(scale), whose
    FAVOR+ logit |w_0|^2 / 2 exceeds every earlier key logit by far more than float32's exponent range
    (the projection is scaled by 4): a stabiliser that looked ahead would flush the earlier keys'
    features to 0 and zero the earlier outputs.
    """
    inputs = _inputs(1, 2, 2, 80, 32, 24, per_head=False, padding=False, seed=14)
    q, k, v = (inputs[name].float() for name in "qkv")
    projection = 4 * inputs["projection"].float()
    scale = q.shape[-1] ** -0.5
    position = 40
    k_changed, v_changed = k.clone(), v.clone()
    k_changed[:, :, position + 1:] = torch.randn_like(k[:, :, position + 1:])
    k_changed[:, :, position + 1] = projection[0] / scale**0.5
    v_changed[:, :, position + 1:] = torch.randn_like(v[:, :, position + 1:])
    before = _triton(kernel, True)(q, k, v, projection)
    after = _triton(kernel, True)(q, k_changed, v_changed, projection)
    assert not torch.allclose(before[:, :, position + 1:], after[:, :, position + 1:])
    torch.testing.assert_close(after[:, :, : position + 1], before[:, :, : position + 1], rtol=1e-6, atol=1e-6)


@needs_triton_device
@pytest.mark.parametrize("causal", [False, True], ids=["non-causal", "causal"])
def test_fully_padded_rows_give_zeros_and_zero_gradients(causal):
    inputs = _inputs(2, 2, 2, 24, 32, 20, per_head=False, padding=True, seed=13)
    q, k, v = (inputs[name].float().requires_grad_() for name in "qkv")
    mask = inputs["key_padding_mask"]
    out, normaliser, _, _ = triton_performer.performer_fwd(q, k, v, inputs["projection"].float(), "softmax", causal,
                                                          mask, 0.2)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(normaliser[1], torch.zeros_like(normaliser[1]))
    out.backward(torch.randn_like(out))
    for grad in (q.grad[1], k.grad[1], v.grad[1]):
        assert torch.equal(grad, torch.zeros_like(grad))
    padded = mask[:, None, :, None].expand_as(k)
    assert torch.equal(k.grad[padded], torch.zeros_like(k.grad[padded]))
    assert torch.equal(v.grad[padded], torch.zeros_like(v.grad[padded]))


@needs_triton_device
@pytest.mark.parametrize("kernel, causal", [("softmax", False), ("relu", True)], ids=["softmax", "relu-causal"])
def test_opcheck_forward_and_backward_ops(kernel, causal):
    inputs = _inputs(1, 4, 2, 20, 32, 20, per_head=True, padding=True, seed=8)
    q, k, v = (inputs[name].float().requires_grad_() for name in "qkv")
    projection, mask = inputs["projection"].float(), inputs["key_padding_mask"]
    args = (projection, kernel, causal, mask, 0.25)
    torch.library.opcheck(torch.ops.fastattn.triton_performer_fwd, (q, k, v, *args))
    out, normaliser, key_stabiliser, state = torch.ops.fastattn.triton_performer_fwd(q, k, v, *args)
    torch.library.opcheck(
        torch.ops.fastattn.triton_performer_bwd,
        (torch.randn_like(out), q.detach(), k.detach(), v.detach(), projection, out.detach(), normaliser,
         key_stabiliser, state, kernel, causal, mask, 0.25),
        test_utils=("test_schema", "test_faketensor"),
    )


@needs_triton_device
def test_torch_compile_fullgraph_matches_eager():
    inputs = _inputs(1, 2, 1, 24, 32, 20, per_head=False, padding=True, seed=9)
    mask, projection = inputs["key_padding_mask"], inputs["projection"].float()

    def attention(q, k, v):
        return triton_performer.performer_attention(q, k, v, projection, kernel="softmax", causal=True,
                                                    key_padding_mask=mask, scale=0.2)

    compiled = torch.compile(attention, fullgraph=True)
    grad_out = torch.randn(1, 2, 24, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    results = []
    for fn in (attention, compiled):
        leaves = [inputs[name].float().clone().requires_grad_() for name in "qkv"]
        out = fn(*leaves)
        out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in leaves])
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)


def test_registered_as_triton_performer_implementation():
    assert IMPLEMENTATIONS["performer"] is triton_performer.performer_attention


def test_backend_serves_performer_on_cpu_only_in_the_interpreter(monkeypatch):
    q = torch.zeros(1, 2, 32, 64)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert BACKENDS["triton"].not_supported_reasons("performer", q, kernel="relu", causal=True) == []
    monkeypatch.delenv("TRITON_INTERPRET")
    assert BACKENDS["triton"].not_supported_reasons("performer", q, kernel="relu", causal=True) == [
        "runs CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 before importing triton"
    ]


@pytest.mark.parametrize(
    "q_shape, k_shape, projection_shape, kernel, causal, match",
    [
        ((1, 2, 8, 48), (1, 2, 8, 48), (4, 48), "softmax", False, r"q: expected head dim in \(32, 64, 128\), got 48"),
        ((1, 3, 8, 32), (1, 2, 8, 32), (4, 32), "softmax", False,
         r"k: expected Hkv heads dividing H=3 \(the heads of q; grouped-query attention\), got Hkv=2"),
        ((1, 2, 8, 32), (1, 2, 8, 32), (4, 16), "softmax", False, r"projection: expected shape \(m, 32\)"),
        ((1, 2, 8, 32), (1, 2, 8, 32), (4, 32), "gelu", False, r"kernel: expected one of \('softmax', 'relu'\)"),
        ((1, 2, 8, 32), (1, 2, 9, 32), (4, 32), "softmax", True, r"causal: expected Nq == Nk, got Nq=8 and Nk=9"),
    ],
    ids=["D48", "H3-Hkv2", "projection-dim", "kernel-gelu", "causal-lengths"],
)
def test_op_rejects_bad_arguments(q_shape, k_shape, projection_shape, kernel, causal, match):
    q, k = torch.zeros(q_shape), torch.zeros(k_shape)
    with pytest.raises(ValueError, match=match):
        triton_performer.performer_fwd(q, k, k, torch.zeros(projection_shape), kernel, causal, None, 1.0)



@pytest.mark.parametrize("causal", [False, True], ids=["global", "causal"])
def test_launch_grids_fit_cuda_limits_for_many_batch_heads(monkeypatch, causal):
    """B * H = 65536: more than grid axes 1 and 2 hold (65535), so B * H goes on axis 0.

    The launches are recorded, not run: 65536 interpreted programs per kernel take many minutes. The
    decoding of a program id into (tile, batch * head) is exercised by every other test.
    """
    grids = []
    for name in ("performer_fwd_kernel_causal_key_max", "performer_fwd_kernel_causal_query_stabiliser",
                 "performer_fwd_kernel_key_max",
                 "performer_fwd_kernel_query_stabiliser", "performer_fwd_kernel_state", "performer_fwd_kernel",
                 "performer_bwd_kernel_dq", "performer_bwd_kernel_dstate", "performer_bwd_kernel_dkdv",
                 "performer_fwd_kernel_causal", "performer_bwd_kernel_causal_dq", "performer_bwd_kernel_causal_dkdv"):
        monkeypatch.setattr(triton_performer, name, RecordingLaunch(grids))
    q = torch.zeros(1, 1, 5, 32).expand(1024, 64, 5, 32)
    projection = torch.zeros(16, 32)
    out, normaliser, key_stabiliser, state = triton_performer.performer_fwd(q, q, q, projection, "softmax", causal,
                                                                            None, 0.2)
    triton_performer.performer_bwd(out, q, q, q, projection, out, normaliser, key_stabiliser, state, "softmax",
                                   causal, None, 0.2)
    # Softmax: the query stabilisers (each pass) and the key stabilisers (the forward; causal: each pass)
    # are kernels too.
    assert len(grids) == (7 if causal else 8)
    for grid in grids:
        assert grid[0] <= 2**31 - 1 and all(extent <= 65535 for extent in grid[1:]), grid


# ---- GPU: realistic shapes (run by make gpu-check) ----

# Kept few (each dtype / head dim compiles its kernels once) and the causal references at N <= 2048 (the
# reference materialises (N, N) float64 matrices): make gpu-check runs every GPU test in 150 s.
GPU_CASES = [
    (2, 16, 16, 4096, 64, 256, False, False, "softmax", False, torch.bfloat16),
    (2, 16, 4, 4096, 128, 256, True, True, "softmax", False, torch.float16),
    (2, 16, 16, 2048, 64, 256, False, True, "softmax", True, torch.bfloat16),
    (2, 8, 2, 1024, 128, 256, True, True, "softmax", True, torch.float16),
    (2, 8, 8, 1000, 32, 100, False, True, "relu", True, torch.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "batch, heads, kv_heads, length, head_dim, features, per_head, padding, kernel, causal, dtype",
    GPU_CASES,
    ids=[describe_case(B=b, H=h, Hkv=hkv, N=n, D=d, m=m, per_head=ph, padding=p, **{kernel: True}, causal=c, dtype=t)
         for b, h, hkv, n, d, m, ph, p, kernel, c, t in GPU_CASES],
)
def test_gpu_matches_reference(batch, heads, kv_heads, length, head_dim, features, per_head, padding, kernel, causal,
                               dtype):
    inputs = _inputs(batch, heads, kv_heads, length, head_dim, features, per_head=per_head, padding=padding,
                     seed=11, device="cuda")
    _check(inputs, kernel, causal, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["non-causal", "causal"])
def test_gpu_backward_is_deterministic(causal):
    inputs = _inputs(2, 16, 16, 2048, 64, 256, per_head=False, padding=True, seed=12, device="cuda")
    leaves = [inputs[name].to(torch.bfloat16).requires_grad_() for name in "qkv"]
    grad_out = torch.randn(2, 16, 2048, 64, device="cuda", dtype=torch.bfloat16)
    grads = []
    for _ in range(2):
        out = triton_performer.performer_attention(*leaves, inputs["projection"], kernel="softmax", causal=causal,
                                                   key_padding_mask=inputs["key_padding_mask"], scale=0.125)
        grads.append(torch.autograd.grad(out, leaves, grad_out))
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@needs_triton_device
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True], ids=["global", "causal"])
def test_nan_in_a_query_reaches_only_what_it_reads(causal, kernel):
    # Causal: the gradients of padded keys were NaN (0 weights times a suffix state made NaN by the query).
    projection = fastattn.random_features(16, 32, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    assert_nan_queries_reach_only_what_they_read(
        lambda q, k, v, mask: fastattn.performer_attention(q, k, v, projection, kernel=kernel, causal=causal,
                                                           key_padding_mask=mask, backend="triton"),
        causal=causal, dtype=torch.float32, device=DEVICE)


@needs_triton_device
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True], ids=["global", "causal"])
def test_nan_in_q_or_k_reaches_the_rows_that_read_it(causal, kernel):
    # relu(NaN) was 0 (tl.maximum): a NaN in q or k vanished from the outputs.
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 32, generator=generator) for _ in range(3))
    q[0, 0, 5, 3] = float("nan")
    k[0, 1, 9, 2] = float("nan")
    projection = fastattn.random_features(16, 32, generator=generator)
    out = fastattn.performer_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), projection.to(DEVICE), kernel=kernel,
                                       causal=causal, backend="triton").cpu()
    expected = torch.zeros(1, 2, 24, dtype=torch.bool)
    expected[0, 0, 5] = True
    expected[0, 1, 9 if causal else 0:] = True
    assert torch.equal(torch.isnan(out).any(-1), expected)
    assert torch.equal(torch.isnan(out).all(-1), expected)
