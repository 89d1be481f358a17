"""CUDA block-sparse kernels (csrc/cuda): against the float64 reference on a GPU, and what runs without one.

GPU tests are marked ``gpu`` (skipped without a GPU; ``make gpu-check`` runs them). Inputs are drawn on
the CPU; the kernel runs on the GPU and the references run on the CPU, so the tolerance rule of
fastattn.testing.check_against_reference compares like with like.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastattn
from fastattn import backends
from fastattn.reference import block_sparse_attention as reference_block_sparse
from fastattn.testing import check_against_reference
from tests.utils import block_sparse_case_id, random_block_layout, random_padding

ROOT = Path(__file__).resolve().parent.parent


def _on_gpu(fn):
    """fn run on CUDA copies of its float inputs, its output brought back, so autograd links both devices."""
    def run(q, k, v):
        return fn(q.cuda(), k.cuda(), v.cuda()).cpu()
    return run


def _check(batch, heads, query_len, key_len, head_dim, block_size, dtype, causal, padded, per_head, seed=0):
    layout = random_block_layout(heads, query_len, key_len, block_size, per_head, seed)
    padding = random_padding(batch, key_len, seed) if padded else None
    padding_gpu = None if padding is None else padding.cuda()
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "q": torch.randn(batch, heads, query_len, head_dim, generator=generator, dtype=torch.float64),
        "k": torch.randn(batch, heads, key_len, head_dim, generator=generator, dtype=torch.float64),
        "v": torch.randn(batch, heads, key_len, head_dim, generator=generator, dtype=torch.float64),
    }
    kernel = _on_gpu(lambda q, k, v: fastattn.block_sparse_attention(
        q, k, v, layout, causal=causal, key_padding_mask=padding_gpu, backend="cuda"))

    def reference(q, k, v):
        return reference_block_sparse(q, k, v, layout, causal=causal, key_padding_mask=padding)

    check_against_reference(kernel, reference, inputs, dtype, seed=seed)


# (B, H, Nq, Nk, D, block_size, dtype, causal, padded, per_head)
GPU_CASES = [
    (2, 3, 200, 200, 64, 64, torch.bfloat16, False, False, True),
    (2, 3, 200, 200, 64, 64, torch.float16, True, False, True),
    (1, 2, 256, 256, 32, 32, torch.float16, False, True, False),
    (2, 2, 300, 300, 128, 128, torch.bfloat16, True, True, True),
    (1, 4, 1000, 1000, 64, 32, torch.bfloat16, True, False, True),
    (2, 2, 20, 20, 64, 32, torch.float16, False, False, False),
    (2, 2, 20, 20, 32, 128, torch.bfloat16, True, True, False),
    (1, 2, 150, 260, 64, 32, torch.bfloat16, False, True, True),
    (1, 2, 512, 512, 128, 32, torch.float16, False, False, True),
    (1, 4, 1024, 1024, 128, 128, torch.float16, True, False, False),
    (1, 4, 2048, 2048, 64, 64, torch.bfloat16, False, True, True),
    (1, 2, 333, 333, 32, 64, torch.float32, False, True, True),
    (2, 2, 257, 257, 128, 64, torch.float32, True, False, True),
    (1, 3, 190, 190, 64, 128, torch.float32, True, True, False),
    (1, 2, 100, 300, 128, 32, torch.float32, False, False, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[block_sparse_case_id(case) for case in GPU_CASES])
def test_cuda_matches_reference(case):
    _check(*case)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
def test_cuda_rows_that_see_no_key_give_zeros_and_zero_gradients(dtype):
    batch, heads, length, head_dim, block_size = 2, 2, 160, 64, 32
    layout = random_block_layout(heads, length, length, block_size, True, seed=3)
    padding = torch.zeros(batch, length, dtype=torch.bool, device="cuda")
    padding[1] = True
    q, k, v = (torch.randn(batch, heads, length, head_dim, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    out = fastattn.block_sparse_attention(q, k, v, layout, key_padding_mask=padding, backend="cuda")
    out.backward(torch.randn_like(out))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        assert torch.isfinite(tensor.grad).all(), f"grad of {name} is not finite"
        assert torch.equal(tensor.grad[1], torch.zeros_like(tensor.grad[1])), f"grad of {name}[1] is not zero"
    _, lse = torch.ops.fastattn.block_sparse_fwd(q.detach(), k.detach(), v.detach(), *layout.csr("cuda"), block_size,
                                                 False, padding, head_dim**-0.5)
    assert lse.dtype == torch.float32 and torch.isinf(lse[1]).all() and (lse[1] > 0).all()


@pytest.mark.gpu
def test_cuda_accepts_strided_inputs():
    layout = random_block_layout(4, 192, 192, 64, True, seed=5)
    packed = torch.randn(2, 192, 3, 4, 64, device="cuda", dtype=torch.float16)
    q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, N, D) views, rows 3*4*64 apart
    out = fastattn.block_sparse_attention(q, k, v, layout, backend="cuda")
    expected = reference_block_sparse(q.double(), k.double(), v.double(), layout)
    assert (out.double() - expected).abs().max().item() < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
def test_cuda_opcheck(dtype):
    layout = random_block_layout(2, 96, 96, 32, True, seed=7)
    q, k, v = (torch.randn(1, 2, 96, 32, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    padding = torch.zeros(1, 96, dtype=torch.bool, device="cuda")
    padding[0, -5:] = True
    args = (q, k, v, *layout.csr("cuda"), 32, True, padding, 32**-0.5)
    torch.library.opcheck(torch.ops.fastattn.block_sparse_fwd, args)


@pytest.mark.gpu
def test_cuda_rejects_unsupported_head_dim_with_a_clear_message():
    layout = random_block_layout(1, 64, 64, 64, False, seed=0)
    q = torch.randn(1, 1, 64, 48, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="head dim 32, 64 or 128"):
        torch.ops.fastattn.block_sparse_fwd(q, q, q, *layout.csr("cuda"), 64, False, None, 1.0)


# CPU-runnable checks: what the registry and the built extension say about CUDA on any machine.

def test_cuda_backend_declines_cpu_tensors_with_a_reason():
    q = torch.empty(1, 2, 64, 64)
    reasons = backends.BACKENDS["cuda"].not_supported_reasons("block_sparse", q, block_size=64, causal=False)
    assert any("device cpu not supported" in reason for reason in reasons), reasons
    with pytest.raises(backends.BackendNotSupportedError, match="backend 'cuda' cannot run block_sparse"):
        backends.select("block_sparse", q, "cuda", block_size=64, causal=False)


@pytest.mark.parametrize("block_size", [16, 48, 256], ids=lambda b: f"block{b}")
def test_cuda_backend_declines_block_sizes_it_has_no_kernel_for(block_size):
    q = torch.empty(1, 2, 64, 64)
    reasons = backends.BACKENDS["cuda"].not_supported_reasons("block_sparse", q, block_size=block_size)
    assert f"block_size must be 32, 64 or 128, got {block_size}" in reasons


def test_built_extension_reports_cuda_exactly_when_cuda_kernels_are_registered():
    error = backends.compiled_extension_error()
    if error is not None:
        pytest.skip(error)
    import fastattn._C as built

    registered = torch._C._dispatch_has_kernel_for_dispatch_key("fastattn::block_sparse_fwd", "CUDA")
    assert ("cuda" in built.compiled_backends) == registered, (built.compiled_backends, registered)
    for op in ("block_sparse_bwd", "linformer_fwd", "linformer_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn::{op}", "CUDA") == registered, op
    if registered:
        assert built.cuda_archs, "a CUDA build names its architectures"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: make gpu-check would run in full")
def test_gpu_check_without_a_gpu_says_so_and_fails(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "no NVIDIA GPU" in output, output
    assert "Traceback" not in output, output
    assert "no NVIDIA GPU" in (tmp_path / "summary.txt").read_text()
