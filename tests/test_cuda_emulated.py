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
from fastattn.reference import full_attention as reference_full
from fastattn.reference import performer_attention as reference_performer
from fastattn.testing import assert_within_tolerance, check_against_reference
from tests.utils import (
    assert_nan_queries_reach_only_what_they_read,
    block_sparse_case_id,
    describe_case,
    random_block_layout,
    random_padding,
)

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
    lib.emulated_linformer_projection.argtypes = (
        [integer] + [pointer] * 4 + [integer] * 2 + [pointer] + [integer] * 6 + [pointer] * 4)
    lib.emulated_linformer_projection.restype = None
    lib.emulated_performer.argtypes = (
        [integer] + [pointer] * 4 + [integer, pointer] + [integer] * 8 + [ctypes.c_float, ctypes.c_bool, ctypes.c_bool]
        + [pointer] * 13)
    lib.emulated_performer.restype = None
    lib.emulated_shared_memory_overruns.restype = integer
    lib.emulated_block_sparse_shape.argtypes = [integer] * 4 + [pointer]
    lib.emulated_block_sparse_shape.restype = None
    return lib


@pytest.fixture(autouse=True)
def _kernels_stay_within_their_shared_memory(request):
    """Each test's kernels write no shared memory past the bytes their launch requests (their traits')."""
    if "library" not in request.fixturenames:
        yield
        return
    lib = request.getfixturevalue("library")
    before = lib.emulated_shared_memory_overruns()
    yield
    assert lib.emulated_shared_memory_overruns() == before, "a kernel wrote shared memory past its launch's request"


def _emulated_attention(lib, layout: fastattn.BlockLayout | None, causal: bool, padding, scale: float,
                        block_size: int | None = None):
    """The block-sparse kernels as an autograd function (layout None: the dense layout, no CSR)."""
    if layout is None:
        csr, layout_heads, nnz_max = (None,) * 4, 1, 0
    else:
        csr, layout_heads, block_size = layout.csr("cpu"), layout.num_heads, layout.block_size
        nnz_max = csr[1].shape[1]
    padding_pointer = None if padding is None else padding.contiguous().data_ptr()

    def call(q, k, v, out, lse, grad_out=None, grad_q=None, grad_k=None, grad_v=None, delta=None):
        batch, heads, query_len, head_dim = q.shape
        lib.emulated_block_sparse(
            DTYPE_CODES[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
            *(None if t is None else t.data_ptr() for t in csr), layout_heads, nnz_max, padding_pointer, batch, heads,
            query_len, k.shape[2], head_dim, block_size, causal, scale,
            *(None if t is None else t.data_ptr() for t in (grad_out, grad_q, grad_k, grad_v, delta)))

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


# (B, H, Nq, Nk, D, block_size, dtype, causal, padded, per_head): every (dtype, head dim, block size) of the
# tensor cores, so every shape the launch templates choose runs in each dtype (test_emulated_cases_cover_...);
# ragged lengths, Nq != Nk, blocks larger than a tile, shared and per-head layouts. Lengths that end inside a
# CTA leave warps with one m16 tile of rows or none (N200 at block 128: 72 rows in the second CTA).
CASES = [
    (1, 2, 100, 100, 32, 32, torch.float16, True, True, True),
    (2, 2, 70, 70, 64, 64, torch.bfloat16, False, False, False),
    (1, 1, 150, 150, 64, 128, torch.float16, True, False, True),
    (1, 2, 40, 90, 128, 32, torch.bfloat16, False, True, True),
    (1, 2, 130, 130, 128, 64, torch.float16, True, False, True),
    (1, 2, 20, 20, 32, 64, torch.bfloat16, True, True, False),
    (1, 2, 100, 100, 32, 64, torch.float32, True, True, True),
    (1, 1, 50, 70, 128, 32, torch.float32, False, False, False),
    (1, 2, 90, 90, 32, 64, torch.float16, False, True, True),
    (1, 1, 200, 200, 32, 128, torch.float16, True, True, False),
    (1, 2, 80, 80, 64, 32, torch.float16, True, False, True),
    (1, 2, 120, 120, 64, 64, torch.float16, True, True, True),
    (1, 1, 100, 100, 128, 32, torch.float16, True, True, False),
    (1, 2, 144, 144, 128, 128, torch.float16, True, True, True),
    (1, 2, 50, 50, 32, 32, torch.bfloat16, False, True, True),
    (1, 1, 160, 130, 32, 128, torch.bfloat16, False, False, True),
    (1, 2, 70, 70, 64, 32, torch.bfloat16, True, True, False),
    (1, 2, 260, 260, 64, 128, torch.bfloat16, True, True, True),
    (2, 1, 100, 100, 128, 64, torch.bfloat16, True, True, True),
    (1, 1, 136, 200, 128, 128, torch.bfloat16, False, True, False),
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


# (dtype, D, block_size): one m16 tile per warp, and two in CTAs of 64 and of 128 rows (at D 128 dQ runs 64-row
# CTAs and dK/dV one tile per warp); float32 (SIMT).
NO_KEY_CASES = [(torch.float16, 32, 32), (torch.bfloat16, 64, 64), (torch.float16, 128, 128), (torch.float32, 32, 32)]


@pytest.mark.parametrize("case", NO_KEY_CASES,
                         ids=[describe_case(dtype=c[0], D=c[1], block=c[2]) for c in NO_KEY_CASES])
def test_emulated_rows_that_see_no_key_give_zeros_and_zero_gradients(library, case):
    dtype, head_dim, block_size = case
    batch, heads, length = 2, 1, 100
    layout = random_block_layout(heads, length, length, block_size, True, seed=2)
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[1] = True
    q, k, v = (torch.randn(batch, heads, length, head_dim, dtype=dtype) for _ in range(3))
    q[1, 0, 3, 1] = float("nan")  # a row that sees no key gives 0 and no gradient, whatever its query holds
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = _emulated_attention(library, layout, False, padding, head_dim**-0.5)(q, k, v)
    out.backward(torch.randn_like(out))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(out[0]).all()
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        assert torch.isfinite(tensor.grad[0]).all(), f"grad of {name}[0] is not finite"
        assert torch.equal(tensor.grad[1], torch.zeros_like(tensor.grad[1])), f"grad of {name}[1] is not zero"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)  # mma and SIMT kernels
@pytest.mark.parametrize("causal", [False, True], ids=["global", "causal"])
def test_emulated_nan_in_a_query_reaches_only_what_it_reads(library, causal, dtype):
    # dK and dV of padded keys were NaN (dS^T Q adds 0 times a NaN query); causal, so were those of the later
    # unpadded keys in the tile of a NaN query that sees no key.
    layout = fastattn.BlockLayout.from_dense(torch.ones(2, 2, dtype=torch.bool), 32)
    assert_nan_queries_reach_only_what_they_read(
        lambda q, k, v, mask: _emulated_attention(library, layout, causal, mask, 32**-0.5)(q, k, v),
        causal=causal, dtype=dtype)


# (B, H, Nq, kp, D, block_size, dtype): attention over Linformer's kp projected keys, which runs the
# block-sparse kernels with the dense layout (no CSR); kp not a multiple of the block, and below one block.
DENSE_CASES = [
    (1, 2, 100, 70, 64, 64, torch.float16),
    (2, 1, 40, 20, 32, 64, torch.bfloat16),
    (1, 2, 50, 40, 128, 64, torch.float32),
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=[describe_case(B=c[0], H=c[1], Nq=c[2], kp=c[3], D=c[4], block=c[5],
                                                                 dtype=c[6]) for c in DENSE_CASES])
def test_emulated_dense_layout_matches_reference(library, case):
    batch, heads, query_len, key_len, head_dim, block_size, dtype = case
    generator = torch.Generator().manual_seed(4)
    inputs = {
        "q": torch.randn(batch, heads, query_len, head_dim, generator=generator, dtype=torch.float64),
        "k": torch.randn(batch, heads, key_len, head_dim, generator=generator, dtype=torch.float64),
        "v": torch.randn(batch, heads, key_len, head_dim, generator=generator, dtype=torch.float64),
    }
    scale = head_dim**-0.5
    kernel = _emulated_attention(library, None, False, None, scale, block_size)
    check_against_reference(kernel, lambda q, k, v: reference_full(q, k, v, scale=scale), inputs,
                            dtype, seed=4)


BLOCK_SIZES = (32, 64, 128)
KERNELS = {0: "forward", 1: "dQ", 2: "dK/dV"}


def _shape(lib, dtype, head_dim, block_size, kernel) -> tuple[int, int, int]:
    shape = (ctypes.c_int * 3)()
    lib.emulated_block_sparse_shape(DTYPE_CODES[dtype], head_dim, block_size, kernel, shape)
    return tuple(shape)


def test_emulated_cases_cover_every_tensor_core_shape(library):
    """Every shape the launch templates choose (rows per CTA, columns per step, m16 tiles per warp), for every
    kernel, head dim and 16-bit dtype, runs in a case of that dtype, a causal case and a padded case."""
    runs = [dict(dtype=c[6], head_dim=c[4], block=c[5], causal=c[7], padded=c[8]) for c in CASES]
    runs += [dict(dtype=c[6], head_dim=c[4], block=c[5], causal=False, padded=False) for c in DENSE_CASES]
    runs = [run for run in runs if run["dtype"] != torch.float32]
    missing = []
    for kernel, name in KERNELS.items():
        for head_dim in (32, 64, 128):
            for dtype in (torch.float16, torch.bfloat16):
                for block_size in BLOCK_SIZES:
                    shape = _shape(library, dtype, head_dim, block_size, kernel)
                    covering = [run for run in runs if run["head_dim"] == head_dim
                                and _shape(library, run["dtype"], head_dim, run["block"], kernel) == shape]
                    for need, found in (("its dtype", any(run["dtype"] == dtype for run in covering)),
                                        ("causal", any(run["causal"] for run in covering)),
                                        ("padding", any(run["padded"] for run in covering))):
                        if not found:
                            missing.append(f"{name} D{head_dim} {shape} (block {block_size}, {dtype}): "
                                           f"no case with {need}")
    assert not missing, "\n".join(sorted(set(missing)))


def test_emulated_shapes_give_warps_more_rows_where_the_block_allows(library):
    """Blocks of 64 and 128 run two m16 tiles per warp (CTAs of 128 rows at block 128 in the forward), except
    dK/dV at D 128 (two tiles' accumulators do not fit in registers); blocks of 32 one tile in 2 warps."""
    for dtype in (torch.float16, torch.bfloat16):
        for head_dim in (32, 64, 128):
            assert _shape(library, dtype, head_dim, 128, 0)[::2] == (128, 2)
            for kernel in KERNELS:
                assert _shape(library, dtype, head_dim, 32, kernel) == (32, 32, 1)
                for block_size in (64, 128):
                    rows, columns, row_tiles = _shape(library, dtype, head_dim, block_size, kernel)
                    assert block_size % rows == 0 and block_size % columns == 0
                    assert row_tiles == (1 if (kernel, head_dim) == (2, 128) else 2)


def _emulated_linformer_projection(lib, k, v, proj_k, proj_v, key_len, padding, keys_per_split):
    """K' = P_k K and V' = P_v V by the projection kernels; proj_* hold (heads?, kp, row stride >= Nk)."""
    batch, heads, _, head_dim = k.shape
    projected_len, row_stride = proj_k.shape[-2:]
    splits = -(-key_len // keys_per_split)
    partials = [torch.full((splits, batch, heads, projected_len, head_dim), float("nan")) for _ in range(2)]
    results = [torch.full((batch, heads, projected_len, head_dim), float("nan")) for _ in range(2)]
    tensors = [t.contiguous() for t in (k, v, proj_k, proj_v)]
    lib.emulated_linformer_projection(
        DTYPE_CODES[k.dtype], *(t.data_ptr() for t in tensors), 1 if proj_k.dim() == 2 else heads, row_stride,
        None if padding is None else padding.contiguous().data_ptr(), batch, heads, key_len, head_dim, projected_len,
        keys_per_split, *(t.data_ptr() for t in partials + results))
    return (partials[0][0], partials[1][0]) if splits == 1 else tuple(results)


# (B, H, Nk, D, kp, dtype, padded, per_head, keys_per_split): kp below, at and above a row tile (64 rows on
# tensor cores, 32 in float32) and not a multiple of it; lengths that end inside a key chunk and inside a
# 16-byte copy; one split and several (the fixed-order sum).
LINFORMER_PROJECTION_CASES = [
    (1, 2, 100, 64, 40, torch.float16, True, False, 32),
    (2, 1, 77, 32, 64, torch.bfloat16, False, True, 1024),
    (1, 2, 203, 128, 70, torch.bfloat16, True, True, 64),
    (1, 1, 45, 64, 130, torch.float16, False, False, 1024),
    (2, 2, 90, 32, 33, torch.float32, True, True, 32),
    (1, 1, 70, 128, 20, torch.float32, False, False, 1024),
]


def _linformer_projection_id(case) -> str:
    batch, heads, key_len, head_dim, projected_len, dtype, padded, per_head, keys_per_split = case
    return describe_case(B=batch, H=heads, N=key_len, D=head_dim, kp=projected_len, dtype=dtype, padded=padded,
                         per_head=per_head, split=keys_per_split)


@pytest.mark.parametrize("case", LINFORMER_PROJECTION_CASES,
                         ids=[_linformer_projection_id(case) for case in LINFORMER_PROJECTION_CASES])
def test_emulated_linformer_projection_matches_reference(library, case):
    batch, heads, key_len, head_dim, projected_len, dtype, padded, per_head, keys_per_split = case
    generator = torch.Generator().manual_seed(3)
    k, v = (torch.randn(batch, heads, key_len, head_dim, generator=generator, dtype=torch.float64) for _ in range(2))
    padding = random_padding(batch, key_len, seed=3) if padded else None
    if padding is not None:  # padded keys are zeroed before the projection, NaN included
        k[padding[:, None, :, None].expand_as(k)] = float("nan")
    # Projections sliced from longer ones (as the public op slices (kp, N) to Nk): the columns past Nk hold
    # NaN, which the kernels must not read; the row stride keeps rows 16-byte aligned.
    row_stride = -(-(key_len + 5) // 8) * 8
    shape = ((heads,) if per_head else ()) + (projected_len, row_stride)
    proj_k, proj_v = (torch.randn(shape, generator=generator, dtype=torch.float64) / key_len**0.5 for _ in range(2))
    for projection in (proj_k, proj_v):
        projection[..., key_len:] = float("nan")

    def reference(dtype_):
        keys, values = k.to(dtype_), v.to(dtype_)
        if padding is not None:
            keys, values = (t.masked_fill(padding[:, None, :, None], 0) for t in (keys, values))
        return [p[..., :key_len].to(dtype_) @ t for p, t in ((proj_k, keys), (proj_v, values))]

    actual = _emulated_linformer_projection(library, k.to(dtype), v.to(dtype), proj_k.to(dtype), proj_v.to(dtype),
                                            key_len, padding, keys_per_split)
    for name, result, exact, low in zip(("k_proj", "v_proj"), actual, reference(torch.float64), reference(dtype)):
        assert_within_tolerance(name, result, exact, low, dtype)


def _emulated_performer(lib, projection, kernel: str, padding, scale: float, keys_per_split: int,
                        queries_per_split: int, causal: bool = False, saved_by_forward: dict | None = None):
    """The Performer kernels as an autograd function of (q, k, v); projection: float32 as the host code of
    csrc/cuda/performer_api.cpp passes it. The saved tensors and workspaces are poisoned with NaN.
    ``saved_by_forward``, when given, receives the forward's saved normaliser, key_stabiliser and state."""
    weights = projection.to(torch.float32).contiguous()
    proj_heads = 1 if weights.dim() == 2 else weights.shape[0]
    features = weights.shape[-2]
    padding_pointer = None if padding is None else padding.contiguous().data_ptr()

    def nan(*shape):
        return torch.full(shape, float("nan"), dtype=torch.float32)

    def call(q, k, v, out, saved, grad_out=None, grads=(None,) * 3, workspaces=(None,) * 3):
        batch, heads, query_len, head_dim = q.shape
        key_len = k.shape[2]
        key_splits = -(-key_len // keys_per_split)
        key_workspaces = (nan(key_splits, batch, heads, features), nan(key_splits, batch, heads, features, head_dim + 1))
        lib.emulated_performer(
            DTYPE_CODES[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(), weights.data_ptr(), proj_heads,
            padding_pointer, batch, heads, query_len, key_len, head_dim, features, keys_per_split, queries_per_split,
            scale**0.5, kernel == "softmax", causal, out.data_ptr(), *(t.data_ptr() for t in saved),
            *(t.data_ptr() for t in key_workspaces),
            *(None if t is None else t.data_ptr() for t in (grad_out, *grads, *workspaces)))

    class Emulated(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            q, k, v = (t.contiguous() for t in (q, k, v))
            batch, heads, query_len, head_dim = q.shape
            out = torch.full_like(q, float("nan"))
            stabilisers = k.shape[2] if causal else features
            saved = (nan(batch, heads, query_len), nan(batch, heads, stabilisers),
                     nan(batch, heads, features, head_dim + 1))
            call(q, k, v, out, saved)
            if saved_by_forward is not None:
                saved_by_forward.update(zip(("normaliser", "key_stabiliser", "state"), saved))
            ctx.save_for_backward(q, k, v, out, *saved)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            q, k, v, out, *saved = ctx.saved_tensors
            batch, heads, query_len, head_dim = q.shape
            grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
            query_splits = -(-query_len // queries_per_split)
            workspaces = (nan(batch, heads, query_len, 3), nan(batch, heads, features, head_dim + 1),
                          nan(query_splits, batch, heads, features, head_dim + 1))
            call(q, k, v, out, saved, grad_out.to(q.dtype).contiguous(), grads, workspaces)
            return tuple(grads)

    return Emulated.apply


# (B, H, Nq, Nk, D, m, dtype, kernel, padded, per_head, split): every head dim and dtype; m below, at, above
# and not a multiple of the 64-feature tile; lengths that end inside a 32-row tile; Nq != Nk; one split of the
# keys (and queries) and several (the fixed-order sums).
PERFORMER_CASES = [
    (1, 2, 70, 70, 32, 16, torch.float16, "softmax", True, False, 32),
    (2, 1, 40, 90, 64, 64, torch.bfloat16, "softmax", False, True, 1024),
    (1, 2, 50, 45, 128, 80, torch.float32, "softmax", True, True, 32),
    (1, 1, 33, 64, 64, 144, torch.float32, "relu", True, False, 64),
    (1, 2, 20, 20, 128, 32, torch.float16, "relu", False, True, 1024),
    (1, 1, 65, 65, 32, 64, torch.bfloat16, "relu", True, False, 32),
]


def _performer_id(case) -> str:
    batch, heads, query_len, key_len, head_dim, features, dtype, kernel, padded, per_head, split = case
    return describe_case(B=batch, H=heads, Nq=query_len, Nk=key_len, D=head_dim, m=features, dtype=dtype,
                         kernel=kernel, padded=padded, per_head=per_head, split=split)


def _performer_inputs(batch, heads, query_len, key_len, head_dim, features, per_head, seed, std=1.0):
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "q": std * torch.randn(batch, heads, query_len, head_dim, generator=generator, dtype=torch.float64),
        "k": std * torch.randn(batch, heads, key_len, head_dim, generator=generator, dtype=torch.float64),
        "v": torch.randn(batch, heads, key_len, head_dim, generator=generator, dtype=torch.float64),
    }
    draw = lambda: fastattn.random_features(features, head_dim, generator=generator, dtype=torch.float64)
    projection = torch.stack([draw() for _ in range(heads)]) if per_head else draw()
    return inputs, projection


@pytest.mark.parametrize("case", PERFORMER_CASES, ids=[_performer_id(case) for case in PERFORMER_CASES])
def test_emulated_performer_matches_reference(library, case):
    batch, heads, query_len, key_len, head_dim, features, dtype, kernel, padded, per_head, split = case
    inputs, projection = _performer_inputs(batch, heads, query_len, key_len, head_dim, features, per_head, seed=5)
    padding = random_padding(batch, key_len, seed=5) if padded else None
    scale = head_dim**-0.5
    # The kernels read the projection in float32; the reference multiplies it in the dtype it runs in.
    emulated = _emulated_performer(library, projection, kernel, padding, scale, split, split)

    def reference(q, k, v):
        return reference_performer(q, k, v, projection.to(q.dtype), kernel=kernel, key_padding_mask=padding,
                                   scale=scale)

    check_against_reference(emulated, reference, inputs, dtype, seed=5)


def test_emulated_performer_large_logits_keep_their_normalisers(library):
    """At std 16 a scalar key stabiliser lets the normalisers underflow (csrc/cpu/performer.cpp's header); per-feature
    stabilisers keep every normaliser >= 1, so every output matches the float64 reference."""
    inputs, projection = _performer_inputs(1, 2, 100, 100, 32, 64, False, seed=7, std=16.0)
    scale = 32**-0.5
    emulated = _emulated_performer(library, projection, "softmax", None, scale, 32, 64)
    out = emulated(*(inputs[name].float() for name in ("q", "k", "v")))
    expected = reference_performer(*(inputs[name] for name in ("q", "k", "v")), projection, scale=scale)
    assert torch.isfinite(out).all()
    assert (out.double() - expected).abs().max().item() < 1e-3 * expected.abs().max().item()


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_emulated_performer_rows_that_see_no_key_give_zeros_and_zero_gradients(library, kernel):
    batch, heads, length, head_dim, features = 2, 1, 40, 32, 16
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[1] = True
    inputs, projection = _performer_inputs(batch, heads, length, length, head_dim, features, False, seed=6)
    q, k, v = (inputs[name].float() for name in ("q", "k", "v"))
    q[1, 0, 3, 1] = float("nan")  # a row that sees no key gives 0 and no gradient, whatever its query holds
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = _emulated_performer(library, projection, kernel, padding, head_dim**-0.5, 32, 32)(q, k, v)
    out.backward(torch.randn_like(out))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(out[0]).all()
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        assert torch.equal(tensor.grad[1], torch.zeros_like(tensor.grad[1])), f"grad of {name}[1] is not zero"


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True], ids=["global", "causal"])
def test_emulated_performer_nan_in_a_query_reaches_only_what_it_reads(library, causal, kernel):
    projection = fastattn.random_features(16, 32, generator=torch.Generator().manual_seed(6))
    assert_nan_queries_reach_only_what_they_read(
        lambda q, k, v, mask: _emulated_performer(library, projection, kernel, mask, 32**-0.5, 32, 32,
                                                  causal=causal)(q, k, v),
        causal=causal, dtype=torch.float32)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True], ids=["global", "causal"])
def test_emulated_performer_nan_in_q_or_k_reaches_the_rows_that_read_it(library, causal, kernel):
    # relu(NaN) was 0 (fmaxf): a NaN in q or k vanished from the outputs.
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 32, generator=generator) for _ in range(3))
    q[0, 0, 5, 3] = float("nan")
    k[0, 1, 9, 2] = float("nan")
    projection = fastattn.random_features(16, 32, generator=generator)
    out = _emulated_performer(library, projection, kernel, None, 32**-0.5, 32, 32, causal=causal)(q, k, v)
    expected = torch.zeros(1, 2, 40, dtype=torch.bool)
    expected[0, 0, 5] = True
    expected[0, 1, 9 if causal else 0:] = True
    assert torch.equal(torch.isnan(out).any(-1), expected)
    assert torch.equal(torch.isnan(out).all(-1), expected)


# (B, H, N, D, m, dtype, kernel, padded, per_head): causal; N within one 32-row chunk and across several, ragged;
# m below, at and above the 64-feature tile (several tiles' shares). relu in float32 here: its gradient jumps where
# a logit crosses 0, and rounding q to 16 bits moves some logits across it (B1-H1-N50-D128-m16 in float16: the
# kernel is 3.6e-4 from the float64 reference of the rounded inputs, 7.7e-2 from that of the unrounded ones).
# dden = -(dnum . out) uses the saved out (as the CPU kernel and FlashAttention's delta do): for the first query,
# which sees one key, dnum . v_0 + dden cancels to rounding of out, relative to 1 / den; with relu and m = 16 (a
# small den) that was 5.8x the float32 reference's error on dq (D = 128), so relu runs with m >= 32 here.
PERFORMER_CAUSAL_CASES = [
    (1, 2, 70, 32, 16, torch.float16, "softmax", True, False),
    (2, 1, 45, 64, 80, torch.bfloat16, "softmax", False, True),
    (1, 2, 100, 128, 64, torch.float32, "softmax", True, True),
    (1, 1, 20, 64, 32, torch.float32, "softmax", False, False),
    (1, 2, 66, 32, 144, torch.float32, "relu", True, False),
    (1, 1, 50, 128, 32, torch.float32, "relu", False, True),
]


@pytest.mark.parametrize("case", PERFORMER_CAUSAL_CASES, ids=[
    describe_case(B=b, H=h, N=n, D=d, m=m, dtype=t, kernel=kern, padded=pad, per_head=ph)
    for b, h, n, d, m, t, kern, pad, ph in PERFORMER_CAUSAL_CASES])
def test_emulated_causal_performer_matches_reference(library, case):
    batch, heads, length, head_dim, features, dtype, kernel, padded, per_head = case
    inputs, projection = _performer_inputs(batch, heads, length, length, head_dim, features, per_head, seed=8)
    padding = random_padding(batch, length, seed=8) if padded else None
    scale = head_dim**-0.5
    emulated = _emulated_performer(library, projection, kernel, padding, scale, 32, 32, causal=True)

    def reference(q, k, v):
        return reference_performer(q, k, v, projection.to(q.dtype), kernel=kernel, causal=True,
                                   key_padding_mask=padding, scale=scale)

    check_against_reference(emulated, reference, inputs, dtype, seed=8)


def test_emulated_causal_performer_later_keys_leave_earlier_outputs_unchanged(library):
    inputs, projection = _performer_inputs(1, 2, 70, 70, 32, 32, False, seed=9)
    emulated = _emulated_performer(library, projection, "softmax", None, 32**-0.5, 32, 32, causal=True)
    q, k, v = (inputs[name].float() for name in ("q", "k", "v"))
    first = emulated(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 40:] = 10 * torch.randn_like(k2[:, :, 40:])  # larger logits: the running maximum grows after key 40
    v2[:, :, 40:] = torch.randn_like(v2[:, :, 40:])
    second = emulated(q, k2, v2)
    torch.testing.assert_close(second[:, :, :40], first[:, :, :40], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(second[:, :, 40:], first[:, :, 40:])


CAUSAL_LARGE_MAGNITUDE_CASES = [(seed, padded) for padded in (False, True) for seed in range(3)]


@pytest.mark.parametrize("seed, padded", CAUSAL_LARGE_MAGNITUDE_CASES,
                         ids=[describe_case(seed=seed, padded=padded) for seed, padded in CAUSAL_LARGE_MAGNITUDE_CASES])
def test_emulated_causal_performer_normalisers_never_underflow_at_large_magnitudes(library, seed, padded):
    """Causal, q and k of std 16 (issue 13): with one running maximum over all features as the keys' stabiliser,
    a query's best features met its keys far below it and its float32 normaliser underflowed (rows came out
    zero). The per-feature running maxima keep every normaliser of a row that sees a key >= 1 (to rounding), so
    the outputs pass the tolerance rule. The gradients are only checked to be finite: at std 16 the rule cannot
    judge them (fastattn.testing.gradient_rule_exclusion)."""
    inputs, projection = _performer_inputs(1, 2, 100, 100, 32, 64, False, seed=seed, std=16.0)
    padding = random_padding(1, 100, seed=seed) if padded else None
    scale = 32**-0.5
    saved = {}
    emulated = _emulated_performer(library, projection, "softmax", padding, scale, 32, 32, causal=True,
                                   saved_by_forward=saved)

    def reference(q, k, v):
        return reference_performer(q, k, v, projection.to(q.dtype), causal=True, key_padding_mask=padding,
                                   scale=scale)

    check_against_reference(emulated, reference, inputs, torch.float32, backward=False)
    q, k, v = (inputs[name].float().requires_grad_() for name in ("q", "k", "v"))
    out = emulated(q, k, v)
    out.backward(torch.randn_like(out))
    normaliser = saved["normaliser"]
    seen = normaliser > 0
    assert seen.any() and normaliser[seen].min() >= 1 - 1e-6, f"smallest normaliser {normaliser[seen].min():.3e}"
    for name, leaf in (("q", q), ("k", k), ("v", v)):
        assert torch.isfinite(leaf.grad).all(), f"grad of {name} has non-finite values"


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_emulated_performer_nan_key_reaches_the_outputs_that_see_it(library, causal):
    """NaN in an unpadded key reaches every output that sees the key (all, or those from it on when causal);
    NaN in a padded key reaches none."""
    inputs, projection = _performer_inputs(1, 1, 70, 70, 32, 32, False, seed=10)
    q, k, v = (inputs[name].float() for name in ("q", "k", "v"))
    k[0, 0, 40, 3] = float("nan")
    padding = torch.zeros(1, 70, dtype=torch.bool)
    out = _emulated_performer(library, projection, "softmax", padding, 32**-0.5, 32, 32, causal=causal)(q, k, v)
    if causal:
        assert torch.isfinite(out[0, 0, :40]).all() and torch.isnan(out[0, 0, 40:]).all(dim=-1).all()
    else:
        assert torch.isnan(out).all(dim=-1).all()
    padding[0, 40] = True
    out = _emulated_performer(library, projection, "softmax", padding, 32**-0.5, 32, 32, causal=causal)(q, k, v)
    assert torch.isfinite(out).all()
