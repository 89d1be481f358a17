"""Linformer on the CUDA backend (csrc/cuda/linformer_*): against the float64 reference on a GPU.

GPU tests are marked ``gpu`` (skipped without a GPU; ``make gpu-check`` runs them). Inputs are drawn on the
CPU; the kernel runs on the GPU and the references on the CPU, as in tests/test_cuda_block_sparse.py. The
projection kernel's logic is also checked without a GPU in tests/test_cuda_emulated.py.
"""
from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.testing import check_against_reference
from tests.test_linformer import _inputs
from tests.utils import describe_case


def _cuda(q, k, v, proj_k, proj_v=None, key_padding_mask=None):
    mask = None if key_padding_mask is None else key_padding_mask.cuda()
    out = fastattn.linformer_attention(q.cuda(), k.cuda(), v.cuda(), proj_k.cuda(),
                                       None if proj_v is None else proj_v.cuda(), key_padding_mask=mask,
                                       backend="cuda")
    return out.cpu()


def _reference(q, k, v, proj_k, proj_v=None, key_padding_mask=None):
    return reference.linformer_attention(q, k, v, proj_k, proj_v, key_padding_mask=key_padding_mask)


# (B, H, N, D, kp, dtype, per_head, shared, padding): kp below, at, above and not a multiple of the 64-key
# attention block and of the projection's row tile; N not a multiple of the key chunk; long N (split sums).
CASES = [
    (2, 3, 200, 64, 64, torch.bfloat16, False, False, True),
    (1, 2, 7, 32, 16, torch.float16, True, False, True),
    (2, 2, 63, 64, 32, torch.float32, False, True, True),
    (2, 1, 65, 32, 130, torch.bfloat16, False, False, True),
    (1, 2, 300, 128, 48, torch.float16, True, False, False),
    (1, 2, 300, 128, 100, torch.float32, True, False, True),
    (2, 2, 3000, 64, 256, torch.bfloat16, True, False, True),
    (1, 4, 4096, 32, 70, torch.float16, False, False, False),
    (1, 2, 1000, 64, 33, torch.float32, False, False, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[
    describe_case(B=b, H=h, N=n, D=d, kp=kp, dtype=t, per_head=p, shared=s, padding=pad)
    for b, h, n, d, kp, t, p, s, pad in CASES])
def test_cuda_linformer_matches_reference(case):
    batch, heads, length, dim, kp, dtype, per_head, shared, padding = case
    inputs = _inputs(batch, heads, length, dim, kp, per_head=per_head, shared=shared, padding=padding)
    differentiable = ("q", "k", "v", "proj_k") + (() if shared else ("proj_v",))
    check_against_reference(_cuda, _reference, inputs, dtype, differentiable)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_linformer_is_deterministic(dtype):
    # The sums over the keys are split across CTAs; their partial sums are added in a fixed order.
    inputs = {name: t.to("cuda", dtype) if t.is_floating_point() else t.cuda()
              for name, t in _inputs(2, 2, 5000, 64, 96, padding=True).items()}
    runs = []
    for _ in range(2):
        leaves = {name: t.detach().requires_grad_(t.is_floating_point()) for name, t in inputs.items()}
        out = fastattn.linformer_attention(**leaves, backend="cuda")
        out.backward(torch.ones_like(out))
        runs.append([out] + [t.grad for t in leaves.values() if t.is_floating_point()])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_cuda_linformer_opcheck(dtype):
    inputs = _inputs(1, 2, 70, 32, 20, per_head=True, padding=True)
    q, k, v = (inputs[name].to("cuda", dtype).requires_grad_() for name in ("q", "k", "v"))
    proj_k, proj_v = (inputs[name][..., :70].to("cuda", dtype).requires_grad_() for name in ("proj_k", "proj_v"))
    args = (q, k, v, proj_k, proj_v, inputs["key_padding_mask"].cuda(), 32**-0.5)
    torch.library.opcheck(torch.ops.fastattn.linformer_fwd, args)


@pytest.mark.gpu
def test_cuda_linformer_rejects_unsupported_head_dim_with_a_clear_message():
    q = torch.randn(1, 1, 64, 48, device="cuda", dtype=torch.float16)
    projection = torch.randn(16, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="head dim 32, 64 or 128"):
        torch.ops.fastattn.linformer_fwd(q, q, q, projection, projection, None, 1.0)
