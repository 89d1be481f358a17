"""Triton Linformer attention against the float64 reference: outputs and gradients of q, k, v and both projections.

On the CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the
shapes are tiny; the GPU tests (marker ``gpu``, run by ``make gpu-check``) use realistic ones.
Grouped-query attention (k, v with fewer heads than q) is checked against the reference with k and v
repeated over each group of query heads.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

import fastattn  # noqa: E402
from fastattn import reference  # noqa: E402
from fastattn.backends import BACKENDS  # noqa: E402
from fastattn.testing import check_against_reference  # noqa: E402
from fastattn.triton_kernels import IMPLEMENTATIONS  # noqa: E402
from fastattn.triton_kernels import linformer as triton_linformer  # noqa: E402
from tests.utils import RecordingLaunch, assert_gradients_match_finite_differences, describe_case  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton_device = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRETED, reason="Triton needs a GPU or TRITON_INTERPRET=1"
)
DIFFERENTIABLE = ("q", "k", "v", "proj_k", "proj_v")


def _inputs(batch, heads, kv_heads, query_len, key_len, head_dim, kp, *, per_head, padding, seed, device=DEVICE,
            std=1.0):
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "q": torch.randn(batch, heads, query_len, head_dim, generator=generator, dtype=torch.float64) * std,
        "k": torch.randn(batch, kv_heads, key_len, head_dim, generator=generator, dtype=torch.float64) * std,
        "v": torch.randn(batch, kv_heads, key_len, head_dim, generator=generator, dtype=torch.float64),
    }
    shape = (heads, kp, key_len) if per_head else (kp, key_len)
    inputs["proj_k"] = torch.randn(shape, generator=generator, dtype=torch.float64) / key_len**0.5
    inputs["proj_v"] = torch.randn(kp, key_len, generator=generator, dtype=torch.float64) / key_len**0.5
    if padding:
        # Batch 0 pads its tail; the last batch pads every key (its K' and V' are zero).
        mask = torch.zeros(batch, key_len, dtype=torch.bool)
        mask[0, key_len - max(1, key_len // 3):] = True
        if batch > 1:
            mask[-1] = True
        inputs["key_padding_mask"] = mask
    return {name: value.to(device) for name, value in inputs.items()}


def _triton(q, k, v, proj_k, proj_v, key_padding_mask=None):
    return triton_linformer.linformer_attention(q, k, v, proj_k, proj_v, key_padding_mask=key_padding_mask,
                                                scale=q.shape[-1] ** -0.5)


def _reference(q, k, v, proj_k, proj_v, key_padding_mask=None):
    group = q.shape[1] // k.shape[1]
    return reference.linformer_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), proj_k,
                                         proj_v, key_padding_mask=key_padding_mask)


# (B, H, Hkv, Nq, Nk, D, kp, per_head, padding, dtype)
CASES = [
    (1, 2, 2, 40, 40, 32, 8, False, False, torch.float32),
    (2, 2, 2, 37, 70, 64, 40, True, True, torch.float32),  # kp over two tiles, Nq != Nk
    (1, 1, 1, 5, 3, 128, 1, False, False, torch.float32),
    (2, 4, 2, 33, 33, 32, 20, True, True, torch.float32),  # grouped-query attention
    (1, 3, 1, 30, 50, 32, 17, False, False, torch.float16),
    (2, 2, 2, 64, 64, 64, 16, True, True, torch.float16),
]


@needs_triton_device
@pytest.mark.parametrize(
    "batch, heads, kv_heads, query_len, key_len, head_dim, kp, per_head, padding, dtype",
    CASES,
    ids=[describe_case(B=b, H=h, Hkv=hkv, Nq=nq, Nk=nk, D=d, kp=kp, per_head=ph, padding=p, dtype=t)
         for b, h, hkv, nq, nk, d, kp, ph, p, t in CASES],
)
def test_matches_reference(batch, heads, kv_heads, query_len, key_len, head_dim, kp, per_head, padding, dtype):
    inputs = _inputs(batch, heads, kv_heads, query_len, key_len, head_dim, kp, per_head=per_head, padding=padding,
                     seed=query_len)
    check_against_reference(_triton, _reference, inputs, dtype, differentiable=DIFFERENTIABLE)


@needs_triton_device
def test_public_api_slices_projections_and_matches_reference():
    """backend="triton" through fastattn.linformer_attention: projections longer than Nk, proj_v defaulted."""
    inputs = _inputs(1, 2, 2, 24, 24, 32, 6, per_head=False, padding=False, seed=3)
    inputs["proj_k"] = torch.cat([inputs["proj_k"], torch.randn(6, 5, dtype=torch.float64).to(DEVICE)], dim=1)
    del inputs["proj_v"]

    def kernel(q, k, v, proj_k):
        return fastattn.linformer_attention(q, k, v, proj_k, backend="triton")

    def ground_truth(q, k, v, proj_k):
        return reference.linformer_attention(q, k, v, proj_k)

    check_against_reference(kernel, ground_truth, inputs, torch.float32, differentiable=("q", "k", "v", "proj_k"))


@needs_triton_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_saturated_softmax_rows_give_exactly_zero_dq(dtype):
    """kp = 1: every row's softmax is exactly 1, so the true dq is exactly 0 (issue 10, item 4)."""
    inputs = _inputs(1, 2, 2, 32, 32, 32, 1, per_head=False, padding=False, seed=4, std=4.0)
    q = inputs["q"].to(dtype).requires_grad_()
    out = _triton(q, *(inputs[name].to(dtype) for name in ("k", "v", "proj_k", "proj_v")))
    out.backward(torch.randn_like(out))
    assert torch.equal(q.grad, torch.zeros_like(q.grad))


@needs_triton_device
def test_nearly_saturated_rows_match_reference():
    """Large scores (std 4, kp = 4): rows close to one-hot, where dS = P (dP - D) cancels."""
    inputs = _inputs(1, 2, 2, 32, 32, 32, 4, per_head=False, padding=False, seed=5, std=4.0)
    check_against_reference(_triton, _reference, inputs, torch.float16, differentiable=DIFFERENTIABLE)


@needs_triton_device
def test_custom_scale_and_strided_inputs():
    """q, k, v with non-contiguous batch/head/sequence strides, a strided projection and a custom scale."""
    generator = torch.Generator().manual_seed(3)
    packed = torch.randn(1, 30, 3, 2, 32, generator=generator, dtype=torch.float64)
    inputs = {name: packed[:, :, i].transpose(1, 2).to(DEVICE) for i, name in enumerate("qkv")}
    assert inputs["q"].stride(-1) == 1 and not inputs["q"].is_contiguous()
    inputs["proj_k"] = torch.randn(7, 40, generator=generator, dtype=torch.float64)[:, :30].to(DEVICE)
    inputs["proj_v"] = torch.randn(2, 7, 30, generator=generator, dtype=torch.float64).to(DEVICE)

    def kernel(q, k, v, proj_k, proj_v):
        return triton_linformer.linformer_attention(q, k, v, proj_k, proj_v, key_padding_mask=None, scale=0.3)

    def ground_truth(q, k, v, proj_k, proj_v):
        return reference.linformer_attention(q, k, v, proj_k, proj_v, scale=0.3)

    check_against_reference(kernel, ground_truth, inputs, torch.float32, differentiable=DIFFERENTIABLE)


@needs_triton_device
@pytest.mark.parametrize("kv_heads, per_head, padding", [(2, True, True), (1, False, False)],
                         ids=["H2-Hkv2-per_head-padding", "H2-Hkv1"])
def test_float64_gradients_match_finite_differences(kv_heads, per_head, padding):
    """<grad, u> against central differences of the forward along random signed directions u, every input.

    Not torch.autograd.gradcheck: its full mode is far too slow in the interpreter, and its fast mode
    draws all-positive directions, along which attention is nearly invariant in k.
    """
    inputs = _inputs(2, 2, kv_heads, 20, 26, 32, 5, per_head=per_head, padding=padding, seed=6)
    key_padding_mask = inputs.pop("key_padding_mask", None)
    names = list(inputs)
    leaves = [inputs[name].requires_grad_() for name in names]

    def attention(*args):
        return triton_linformer.linformer_attention(*args, key_padding_mask=key_padding_mask, scale=0.3)

    assert_gradients_match_finite_differences(attention, leaves, names)


@needs_triton_device
def test_padded_keys_get_zero_gradients_and_fully_padded_rows_give_zero_projections():
    inputs = _inputs(2, 2, 2, 16, 20, 32, 6, per_head=True, padding=True, seed=7)
    q, k, v = (inputs[name].float().requires_grad_() for name in "qkv")
    mask = inputs["key_padding_mask"]
    out, lse, k_proj, v_proj = triton_linformer.linformer_fwd(q, k, v, inputs["proj_k"].float(),
                                                              inputs["proj_v"].float(), mask, 0.25)
    assert torch.equal(k_proj[1], torch.zeros_like(k_proj[1])) and torch.equal(v_proj[1], torch.zeros_like(v_proj[1]))
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isfinite(lse).all()
    out.backward(torch.randn_like(out))
    padded = mask[:, None, :, None].expand_as(k)
    assert torch.equal(k.grad[padded], torch.zeros_like(k.grad[padded]))
    assert torch.equal(v.grad[padded], torch.zeros_like(v.grad[padded]))


@needs_triton_device
def test_opcheck_forward_and_backward_ops():
    inputs = _inputs(1, 4, 2, 20, 24, 32, 5, per_head=True, padding=True, seed=8)
    q, k, v, proj_k, proj_v = (inputs[name].float().requires_grad_() for name in DIFFERENTIABLE)
    mask = inputs["key_padding_mask"]
    torch.library.opcheck(torch.ops.fastattn.triton_linformer_fwd, (q, k, v, proj_k, proj_v, mask, 0.25))
    out, lse, k_proj, v_proj = torch.ops.fastattn.triton_linformer_fwd(q, k, v, proj_k, proj_v, mask, 0.25)
    detached = [t.detach() for t in (q, k, v, proj_k, proj_v)]
    torch.library.opcheck(
        torch.ops.fastattn.triton_linformer_bwd,
        (torch.randn_like(out), *detached, out.detach(), lse, k_proj, v_proj, mask, 0.25),
        test_utils=("test_schema", "test_faketensor"),
    )


@needs_triton_device
def test_torch_compile_fullgraph_matches_eager():
    inputs = _inputs(1, 2, 1, 24, 24, 32, 6, per_head=False, padding=True, seed=9)
    mask = inputs.pop("key_padding_mask")

    def attention(q, k, v, proj_k, proj_v):
        return triton_linformer.linformer_attention(q, k, v, proj_k, proj_v, key_padding_mask=mask, scale=0.2)

    compiled = torch.compile(attention, fullgraph=True)
    grad_out = torch.randn(1, 2, 24, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    results = []
    for fn in (attention, compiled):
        leaves = [inputs[name].float().clone().requires_grad_() for name in DIFFERENTIABLE]
        out = fn(*leaves)
        out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in leaves])
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)


def test_registered_as_triton_linformer_implementation():
    assert IMPLEMENTATIONS["linformer"] is triton_linformer.linformer_attention


def test_backend_serves_linformer_on_cpu_only_in_the_interpreter(monkeypatch):
    q = torch.zeros(1, 2, 32, 64)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert BACKENDS["triton"].not_supported_reasons("linformer", q) == []
    monkeypatch.delenv("TRITON_INTERPRET")
    assert BACKENDS["triton"].not_supported_reasons("linformer", q) == [
        "runs CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 before importing triton"
    ]


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((1, 2, 8, 48), (1, 2, 8, 48), (4, 8)), r"q: expected head dim in \(32, 64, 128\), got 48"),
        (((1, 3, 8, 32), (1, 2, 8, 32), (4, 8)),
         r"k: expected Hkv heads dividing H=3 \(the heads of q; grouped-query attention\), got Hkv=2"),
        (((1, 2, 8, 32), (1, 2, 8, 32), (4, 9)), r"proj_k: expected shape \(kp, 8\) or \(2, kp, 8\), got \(4, 9\)"),
        (((1, 2, 8, 32), (1, 2, 8, 32), (3, 4, 8)), r"proj_k: expected shape \(kp, 8\) or \(2, kp, 8\)"),
    ],
    ids=["D48", "H3-Hkv2", "projection-length", "projection-heads"],
)
def test_op_rejects_bad_shapes(shapes, match):
    q_shape, k_shape, projection_shape = shapes
    q, k = torch.zeros(q_shape), torch.zeros(k_shape)
    projection = torch.zeros(projection_shape)
    with pytest.raises(ValueError, match=match):
        triton_linformer.linformer_fwd(q, k, k, projection, projection, None, 1.0)



def test_launch_grids_fit_cuda_limits_for_many_batch_heads(monkeypatch):
    """B * H = 65536: more than grid axes 1 and 2 hold (65535), so B * H goes on axis 0.

    The launches are recorded, not run: 65536 interpreted programs per kernel take many minutes. The
    decoding of a program id into (tile, batch * head) is exercised by every other test.
    """
    grids = []
    for name in ("linformer_fwd_kernel_project", "linformer_fwd_kernel", "linformer_bwd_preprocess_kernel",
                 "linformer_bwd_kernel_dkvp", "linformer_bwd_kernel_dq", "linformer_bwd_kernel_dkdv",
                 "linformer_bwd_kernel_dproj"):
        monkeypatch.setattr(triton_linformer, name, RecordingLaunch(grids))
    q = torch.zeros(1, 1, 5, 32).expand(1024, 64, 5, 32)
    projection = torch.zeros(4, 5)
    out, lse, k_proj, v_proj = triton_linformer.linformer_fwd(q, q, q, projection, projection, None, 0.2)
    triton_linformer.linformer_bwd(out, q, q, q, projection, projection, out, lse, k_proj, v_proj, None, 0.2)
    assert len(grids) == 8
    for grid in grids:
        assert grid[0] <= 2**31 - 1 and all(extent <= 65535 for extent in grid[1:]), grid


# ---- GPU: realistic shapes (run by make gpu-check) ----

# Kept few (each dtype / head dim compiles its kernels once): make gpu-check runs every GPU test in 150 s.
GPU_CASES = [
    (2, 16, 16, 4096, 64, 256, False, False, torch.bfloat16),
    (2, 16, 4, 4096, 128, 256, True, True, torch.float16),
    (2, 8, 8, 1000, 64, 64, False, True, torch.float32),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "batch, heads, kv_heads, seq_len, head_dim, kp, per_head, padding, dtype",
    GPU_CASES,
    ids=[describe_case(B=b, H=h, Hkv=hkv, N=n, D=d, kp=kp, per_head=ph, padding=p, dtype=t)
         for b, h, hkv, n, d, kp, ph, p, t in GPU_CASES],
)
def test_gpu_matches_reference(batch, heads, kv_heads, seq_len, head_dim, kp, per_head, padding, dtype):
    inputs = _inputs(batch, heads, kv_heads, seq_len, seq_len, head_dim, kp, per_head=per_head, padding=padding,
                     seed=11, device="cuda")
    check_against_reference(_triton, _reference, inputs, dtype, differentiable=DIFFERENTIABLE)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    inputs = _inputs(2, 16, 16, 4096, 4096, 64, 256, per_head=False, padding=True, seed=12, device="cuda")
    leaves = [inputs[name].to(torch.bfloat16).requires_grad_() for name in DIFFERENTIABLE]
    grad_out = torch.randn(2, 16, 4096, 64, device="cuda", dtype=torch.bfloat16)
    grads = []
    for _ in range(2):
        out = triton_linformer.linformer_attention(*leaves, key_padding_mask=inputs["key_padding_mask"], scale=0.125)
        grads.append(torch.autograd.grad(out, leaves, grad_out))
    for first, second in zip(*grads):
        assert torch.equal(first, second)
