"""The CUDA kernels of csrc/cuda, compiled for the CPU, against the float64 reference (no GPU needed).

g++ compiles csrc/cuda's kernel headers unchanged except for the sm80 collectives (ldmatrix, mma,
cp.async, shuffles), which tests/cuda_emulation implements on the CPU from the PTX ISA's fragment
layouts, with one OS thread per CUDA thread. This checks the kernels' logic (tiling, CSR walks,
masks, online softmax, fragment bookkeeping, the backward) where no GPU is available; it does not
check the PTX itself, timing, or memory ordering, which only `make gpu-check` on a GPU does.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import fastattn
from fastattn.reference import block_sparse_attention as reference_block_sparse
from fastattn.testing import check_against_reference
from tests.utils import block_sparse_case_id, random_block_layout, random_padding

ROOT = Path(__file__).resolve().parent.parent
EMULATION = ROOT / "tests" / "cuda_emulation"
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def _cuda_include() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    if shutil.which("nvcc"):
        home = subprocess.run(["bash", str(ROOT / "scripts" / "cuda_home.sh")], capture_output=True, text=True)
        candidates.insert(0, home.stdout.strip())
    for home in filter(None, candidates):
        if (Path(home) / "include" / "cuda_fp16.h").exists():
            return Path(home) / "include"
    return None


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    include = _cuda_include()
    if shutil.which("g++") is None or include is None:
        pytest.skip("needs g++ and the CUDA toolkit's headers (cuda_fp16.h) to compile the kernels for the CPU")
    target = tmp_path_factory.mktemp("cuda_emulation") / "emulated_kernels.so"
    command = ["g++", "-O1", "-std=c++20", "-shared", "-fPIC", "-pthread", f"-I{include}", f"-I{ROOT / 'csrc' / 'cuda'}",
               "-include", str(EMULATION / "cuda_shim.h"),
               f'-DFASTATTN_SM80_EMULATION="{EMULATION / "sm80_emulation.h"}"',
               str(EMULATION / "emulated_kernels.cpp"), "-o", str(target)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"compiling the kernels for the CPU failed:\n{result.stderr[-4000:]}"
    lib = ctypes.CDLL(str(target))
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    lib.emulated_block_sparse.argtypes = (
        [integer] + [pointer] * 9 + [integer, integer, pointer] + [integer] * 6 + [ctypes.c_bool, ctypes.c_float]
        + [pointer] * 5)
    lib.emulated_block_sparse.restype = None
    return lib


def _emulated_attention(lib, layout: fastattn.BlockLayout, causal: bool, padding, scale: float):
    row_offsets, col_indices, col_offsets, row_indices = layout.csr("cpu")
    padding_pointer = None if padding is None else padding.contiguous().data_ptr()

    def call(q, k, v, out, lse, grad_out=None, grad_q=None, grad_k=None, grad_v=None, delta=None):
        batch, heads, query_len, head_dim = q.shape
        lib.emulated_block_sparse(
            DTYPE_CODES[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
            row_offsets.data_ptr(), col_indices.data_ptr(), col_offsets.data_ptr(), row_indices.data_ptr(),
            layout.num_heads, col_indices.shape[1], padding_pointer, batch, heads, query_len, k.shape[2], head_dim,
            layout.block_size, causal, scale, *(None if t is None else t.data_ptr()
                                                for t in (grad_out, grad_q, grad_k, grad_v, delta)))

    class Emulated(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            q, k, v = (t.contiguous() for t in (q, k, v))
            out = torch.full_like(q, float("nan"))
            lse = torch.full(q.shape[:3], float("nan"), dtype=torch.float32)
            call(q, k, v, out, lse)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            q, k, v, out, lse = ctx.saved_tensors
            grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
            delta = torch.full(q.shape[:3], float("nan"), dtype=torch.float32)
            call(q, k, v, out, lse, grad_out.contiguous(), *grads, delta)
            return tuple(grads)

    return Emulated.apply


# (B, H, Nq, Nk, D, block_size, dtype, causal, padded, per_head): each tile variant of the launch
# templates, ragged lengths, Nq != Nk, blocks larger than a tile, shared and per-head layouts.
CASES = [
    (1, 2, 100, 100, 32, 32, torch.float16, True, True, True),
    (2, 2, 70, 70, 64, 64, torch.bfloat16, False, False, False),
    (1, 1, 150, 150, 64, 128, torch.float16, True, False, True),
    (1, 2, 40, 90, 128, 32, torch.bfloat16, False, True, True),
    (1, 2, 130, 130, 128, 64, torch.float16, True, False, True),
    (1, 2, 20, 20, 32, 64, torch.bfloat16, True, True, False),
    (1, 2, 100, 100, 32, 64, torch.float32, True, True, True),
    (1, 1, 50, 70, 128, 32, torch.float32, False, False, False),
]


@pytest.mark.parametrize("case", CASES, ids=[block_sparse_case_id(case) for case in CASES])
def test_emulated_cuda_kernels_match_reference(library, case):
    batch, heads, query_len, key_len, head_dim, block_size, dtype, causal, padded, per_head = case
    layout = random_block_layout(heads, query_len, key_len, block_size, per_head, seed=1)
    padding = random_padding(batch, key_len, seed=1) if padded else None
    scale = head_dim**-0.5
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "q": torch.randn(batch, heads, query_len, head_dim, generator=generator, dtype=torch.float64),
        "k": torch.randn(batch, heads, key_len, head_dim, generator=generator, dtype=torch.float64),
        "v": torch.randn(batch, heads, key_len, head_dim, generator=generator, dtype=torch.float64),
    }
    kernel = _emulated_attention(library, layout, causal, padding, scale)

    def reference(q, k, v):
        return reference_block_sparse(q, k, v, layout, causal=causal, key_padding_mask=padding, scale=scale)

    check_against_reference(kernel, reference, inputs, dtype, seed=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
def test_emulated_rows_that_see_no_key_give_zeros_and_zero_gradients(library, dtype):
    batch, heads, length, head_dim, block_size = 2, 1, 64, 32, 32
    layout = random_block_layout(heads, length, length, block_size, True, seed=2)
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[1] = True
    q, k, v = (torch.randn(batch, heads, length, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))
    out = _emulated_attention(library, layout, False, padding, head_dim**-0.5)(q, k, v)
    out.backward(torch.randn_like(out))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(out[0]).all()
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        assert torch.equal(tensor.grad[1], torch.zeros_like(tensor.grad[1])), f"grad of {name}[1] is not zero"
