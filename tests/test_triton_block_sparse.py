"""Triton block-sparse attention against the float64 reference: outputs and gradients of q, k, v.

On the CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the
shapes are tiny; the GPU tests (marker ``gpu``, run by ``make gpu-check``) use realistic ones.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

import fastattn  # noqa: E402
from fastattn import reference  # noqa: E402
from fastattn.backends import BACKENDS  # noqa: E402
from fastattn.layout import BlockLayout, bigbird_layout  # noqa: E402
from fastattn.triton_kernels import IMPLEMENTATIONS  # noqa: E402
from fastattn.triton_kernels import block_sparse as triton_block_sparse  # noqa: E402
from fastattn.testing import check_against_reference  # noqa: E402
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


def _random_layout(num_heads: int, query_blocks: int, key_blocks: int, block_size: int, seed: int) -> BlockLayout:
    """A random layout that keeps the diagonal (so causal rows see their own block) and one empty row."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(num_heads, query_blocks, key_blocks, generator=generator) < 0.5
    diagonal = torch.arange(min(query_blocks, key_blocks))
    mask[:, diagonal, diagonal] = True
    if query_blocks > 2:
        mask[:, 1, :] = False
    return BlockLayout.from_dense(mask, block_size)


def _inputs(batch, heads, query_len, key_len, head_dim, *, padding, seed, device="cpu", kv_heads=None):
    """q with ``heads`` heads; k and v with ``kv_heads`` (grouped-query attention), ``heads`` by default."""
    kv_heads = heads if kv_heads is None else kv_heads
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "q": torch.randn(batch, heads, query_len, head_dim, generator=generator, dtype=torch.float64),
        "k": torch.randn(batch, kv_heads, key_len, head_dim, generator=generator, dtype=torch.float64),
        "v": torch.randn(batch, kv_heads, key_len, head_dim, generator=generator, dtype=torch.float64),
    }
    inputs = {name: value.to(device) for name, value in inputs.items()}
    if padding:
        # Batch 0 pads its tail; the last batch pads every key, so all of its rows see nothing.
        mask = torch.zeros(batch, key_len, dtype=torch.bool)
        mask[0, key_len - max(1, key_len // 4):] = True
        if batch > 1:
            mask[-1] = True
        inputs["key_padding_mask"] = mask.to(device)
    return inputs


def _check(inputs, layout, *, causal, dtype, scale=None):
    def kernel(q, k, v, key_padding_mask=None):
        return fastattn.block_sparse_attention(q, k, v, layout, causal=causal, key_padding_mask=key_padding_mask,
                                               scale=scale, backend="triton")

    def ground_truth(q, k, v, key_padding_mask=None):
        return reference.block_sparse_attention(q, k, v, layout, causal=causal, key_padding_mask=key_padding_mask,
                                                scale=scale)

    check_against_reference(kernel, ground_truth, inputs, dtype)


# (B, H, Nq, Nk, D, block, layout, causal, padding, dtype): "bigbird" is per head, "shared" one layout for
# all heads, "random" per head with an empty row (rows that see no key).
CASES = [
    (1, 2, 64, 64, 32, 16, "bigbird", False, False, torch.float32),
    (1, 2, 72, 72, 32, 16, "bigbird", True, False, torch.float32),
    (1, 2, 50, 50, 64, 32, "shared", False, True, torch.float32),
    (2, 2, 80, 80, 32, 16, "random", True, True, torch.float32),
    (1, 1, 10, 10, 32, 16, "shared", True, False, torch.float32),
    (1, 1, 40, 40, 128, 32, "bigbird", False, False, torch.float32),
    (1, 2, 40, 72, 32, 16, "random", False, False, torch.float32),
    (1, 2, 72, 72, 64, 16, "bigbird", False, True, torch.float16),
    (2, 2, 56, 56, 32, 16, "random", True, True, torch.float16),
    (1, 1, 96, 96, 64, 32, "bigbird", True, False, torch.float16),
]


def _layout(kind, heads, query_len, key_len, block_size, causal, seed):
    if kind == "random":
        return _random_layout(heads, -(-query_len // block_size), -(-key_len // block_size), block_size, seed)
    return bigbird_layout(query_len, block_size=block_size, num_heads=heads if kind == "bigbird" else 1,
                          num_random_blocks=1, seed=seed, causal=causal)


@needs_triton_device
@pytest.mark.parametrize(
    "batch, heads, query_len, key_len, head_dim, block_size, kind, causal, padding, dtype",
    CASES,
    ids=[describe_case(B=b, H=h, Nq=nq, Nk=nk, D=d, block=bs, **{kind: True}, causal=c, padding=p, dtype=t)
         for b, h, nq, nk, d, bs, kind, c, p, t in CASES],
)
def test_matches_reference(batch, heads, query_len, key_len, head_dim, block_size, kind, causal, padding, dtype):
    layout = _layout(kind, heads, query_len, key_len, block_size, causal, seed=query_len)
    inputs = _inputs(batch, heads, query_len, key_len, head_dim, padding=padding, seed=1, device=DEVICE)
    _check(inputs, layout, causal=causal, dtype=dtype)


# Grouped-query attention, (H, Hkv, block, layout, causal, padding, dtype): k and v keep Hkv heads into
# the kernels, dK/dV sum each group's query heads (each with its own layout head when the layout is per head).
GQA_CASES = [
    (4, 2, 16, "random", False, False, torch.float32),
    (4, 2, 16, "bigbird", True, True, torch.float32),
    (4, 1, 16, "shared", False, True, torch.float32),
    (4, 1, 16, "random", True, True, torch.float32),
    (4, 2, 32, "bigbird", True, True, torch.float16),
]


@needs_triton_device
@pytest.mark.parametrize(
    "heads, kv_heads, block_size, kind, causal, padding, dtype", GQA_CASES,
    ids=[describe_case(B=2, H=h, Hkv=hkv, N=50, D=32, block=bs, **{kind: True}, causal=c, padding=p, dtype=t)
         for h, hkv, bs, kind, c, p, t in GQA_CASES],
)
def test_grouped_query_attention_matches_reference(heads, kv_heads, block_size, kind, causal, padding, dtype):
    layout = _layout(kind, heads, 50, 50, block_size, causal, seed=50)
    inputs = _inputs(2, heads, 50, 50, 32, padding=padding, seed=3, device=DEVICE, kv_heads=kv_heads)
    _check(inputs, layout, causal=causal, dtype=dtype)


@needs_triton_device
def test_triton_backend_passes_grouped_heads_to_the_kernels(monkeypatch):
    """The public op hands k and v over with their Hkv heads (not repeated to H)."""
    seen = []
    original = triton_block_sparse.block_sparse_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append(k.shape[1])
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setitem(IMPLEMENTATIONS, "block_sparse", spy)
    layout = _layout("shared", 4, 32, 32, 16, False, seed=0)
    inputs = _inputs(1, 4, 32, 32, 32, padding=False, seed=0, kv_heads=2)
    fastattn.block_sparse_attention(*(inputs[n].float() for n in "qkv"), layout, backend="triton")
    assert seen == [2]


@needs_triton_device
@pytest.mark.parametrize("kv_heads", [3, 8])
def test_raw_ops_reject_kv_heads_that_do_not_divide_the_query_heads(kv_heads):
    layout = _layout("shared", 4, 32, 32, 16, False, seed=0)
    q = torch.zeros(1, 4, 32, 32, device=DEVICE)
    k = torch.zeros(1, kv_heads, 32, 32, device=DEVICE)
    with pytest.raises(ValueError, match=rf"k: expected Hkv heads dividing H=4 .*got Hkv={kv_heads}"):
        triton_block_sparse.block_sparse_fwd(q, k, k, *layout.csr(DEVICE), 16, False, None, 1.0)


# Tiles smaller than the block: each program covers part of a block and walks blocks in slices.
SUBTILE_CASES = [
    (1, 2, 150, 150, 32, 64, "bigbird", True, True, torch.float32),
    (1, 2, 72, 72, 64, 32, "random", False, False, torch.float16),
    (1, 2, 100, 100, 32, 64, "random", True, False, torch.float32),
]


@needs_triton_device
@pytest.mark.parametrize(
    "batch, heads, query_len, key_len, head_dim, block_size, kind, causal, padding, dtype",
    SUBTILE_CASES,
    ids=[describe_case(B=b, H=h, Nq=nq, Nk=nk, D=d, block=bs, **{kind: True}, causal=c, padding=p, dtype=t)
         for b, h, nq, nk, d, bs, kind, c, p, t in SUBTILE_CASES],
)
def test_tiles_smaller_than_block_match_reference(monkeypatch, batch, heads, query_len, key_len, head_dim,
                                                  block_size, kind, causal, padding, dtype):
    monkeypatch.setattr(triton_block_sparse, "_tiles",
                        lambda kernel, block, dim, dtype: {"BM": 16, "BN": 32, "num_warps": 4, "num_stages": 2})
    layout = _layout(kind, heads, query_len, key_len, block_size, causal, seed=query_len)
    inputs = _inputs(batch, heads, query_len, key_len, head_dim, padding=padding, seed=2, device=DEVICE)
    _check(inputs, layout, causal=causal, dtype=dtype)


@needs_triton_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_block_128_with_default_tiles_matches_reference(dtype):
    layout = bigbird_layout(300, block_size=128, num_heads=1, num_random_blocks=0, causal=True)
    inputs = _inputs(1, 1, 300, 300, 32, padding=True, seed=4, device=DEVICE)
    _check(inputs, layout, causal=True, dtype=dtype)


@needs_triton_device
def test_custom_scale_and_strided_inputs():
    """q, k, v with non-contiguous batch/head/sequence strides (unit last stride) and a custom scale."""
    layout = bigbird_layout(48, block_size=16, num_heads=2, num_random_blocks=1)
    generator = torch.Generator().manual_seed(3)
    packed = torch.randn(1, 48, 3, 2, 32, generator=generator, dtype=torch.float64)
    inputs = {name: packed[:, :, i].transpose(1, 2).to(DEVICE) for i, name in enumerate("qkv")}
    assert inputs["q"].stride(-1) == 1 and not inputs["q"].is_contiguous()
    _check(inputs, layout, causal=False, dtype=torch.float32, scale=0.3)


# (B, Hkv, layout, causal, padding), H = 2: Hkv = 1 is grouped-query attention.
FINITE_DIFFERENCE_CASES = [(1, 2, "bigbird", False, False), (2, 2, "random", True, True), (1, 1, "bigbird", True, True)]


@needs_triton_device
@pytest.mark.parametrize(
    "batch, kv_heads, kind, causal, padding",
    FINITE_DIFFERENCE_CASES,
    ids=[describe_case(B=b, H=2, Hkv=hkv, N=40, D=32, block=16, **{kind: True}, causal=c, padding=p)
         for b, hkv, kind, c, p in FINITE_DIFFERENCE_CASES],
)
def test_float64_gradients_match_finite_differences(batch, kv_heads, kind, causal, padding):
    """<grad, u> against central differences of the forward along random signed directions u.

    Not torch.autograd.gradcheck: its full mode is far too slow in the interpreter, and its fast mode
    draws all-positive directions, along which attention is nearly invariant in k (a uniform shift of
    the keys shifts each row of scores by a constant), so it misses even a 5% error in grad k.
    """
    layout = _layout(kind, 2, 40, 40, 16, causal, seed=40)
    inputs = _inputs(batch, 2, 40, 40, 32, padding=padding, seed=6, device=DEVICE, kv_heads=kv_heads)
    key_padding_mask = inputs.get("key_padding_mask")

    def attention(q, k, v):
        return triton_block_sparse.block_sparse_attention(q, k, v, layout, causal=causal,
                                                          key_padding_mask=key_padding_mask, scale=0.3)

    leaves = [inputs[name].requires_grad_() for name in "qkv"]
    assert_gradients_match_finite_differences(attention, leaves, "qkv")


@needs_triton_device
def test_rows_that_see_no_key_give_zeros_and_infinite_lse():
    layout = bigbird_layout(32, block_size=16, num_heads=1, num_random_blocks=0)
    q, k, v = (torch.randn(2, 1, 32, 32, device=DEVICE) for _ in range(3))
    padding = torch.zeros(2, 32, dtype=torch.bool, device=DEVICE)
    padding[1] = True
    padding[0, :5] = True
    out, lse = triton_block_sparse.block_sparse_fwd(q, k, v, *layout.csr(DEVICE), 16, True, padding, 0.2)
    # With causal masking, rows 0..4 of batch 0 only see padded keys.
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[0, :, :5], torch.zeros_like(out[0, :, :5]))
    assert torch.isinf(lse[1]).all() and (lse[1] > 0).all() and torch.isinf(lse[0, :, :5]).all()
    assert torch.isfinite(lse[0, :, 5:]).all()


@needs_triton_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_rows_that_see_one_key_get_exactly_zero_dq(dtype):
    """A softmax over one key is 1 whatever the query: dq is exactly 0 (the float64 reference's too).

    Causal row 0 sees key 0 only; in batch 1 every key but key 7 is padding. dS = P (dP - delta) with
    P = 1 leaves the rounding of dP - delta (4.8e-7 in float32 before the fix).
    """
    layout = bigbird_layout(32, block_size=16, num_heads=1, num_random_blocks=0, causal=True)
    generator = torch.Generator().manual_seed(11)
    q, k, v, grad_out = (torch.randn(2, 2, 32, 32, generator=generator).to(DEVICE, dtype) for _ in range(4))
    padding = torch.ones(2, 32, dtype=torch.bool, device=DEVICE)
    padding[0] = False
    padding[1, 7] = False
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = triton_block_sparse.block_sparse_attention(*leaves, layout, causal=True, key_padding_mask=padding, scale=0.3)
    grad_q, = torch.autograd.grad(out, leaves[0], grad_out)
    assert torch.equal(grad_q[0, :, 0], torch.zeros_like(grad_q[0, :, 0])), grad_q[0, :, 0].abs().max()
    assert torch.equal(grad_q[1, :, 7:], torch.zeros_like(grad_q[1, :, 7:])), grad_q[1, :, 7:].abs().max()
    assert grad_q[0, :, 1:].abs().min(dim=-1).values.gt(0).any()


@needs_triton_device
def test_opcheck_forward_and_backward_ops():
    layout = bigbird_layout(40, block_size=16, num_heads=2, num_random_blocks=1)
    q, k, v = (torch.randn(1, 2, 40, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    padding = torch.zeros(1, 40, dtype=torch.bool, device=DEVICE)
    padding[0, 35:] = True
    csr = layout.csr(DEVICE)
    torch.library.opcheck(torch.ops.fastattn.triton_block_sparse_fwd, (q, k, v, *csr, 16, True, padding, 0.25))
    out, lse = torch.ops.fastattn.triton_block_sparse_fwd(q, k, v, *csr, 16, True, padding, 0.25)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.fastattn.triton_block_sparse_bwd,
        (grad_out, q.detach(), k.detach(), v.detach(), out.detach(), lse, *csr, 16, True, padding, 0.25),
        test_utils=("test_schema", "test_faketensor"),
    )


@needs_triton_device
def test_torch_compile_fullgraph_matches_eager():
    layout = bigbird_layout(48, block_size=16, num_heads=2, num_random_blocks=1, causal=True)

    def attention(q, k, v, key_padding_mask):
        return triton_block_sparse.block_sparse_attention(q, k, v, layout, causal=True,
                                                          key_padding_mask=key_padding_mask, scale=0.2)

    compiled = torch.compile(attention, fullgraph=True)
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 48, 32, generator=generator).to(DEVICE) for _ in range(3))
    padding = torch.zeros(1, 48, dtype=torch.bool, device=DEVICE)
    padding[0, 40:] = True
    grad_out = torch.randn(1, 2, 48, 32, generator=generator).to(DEVICE)
    results = []
    for fn in (attention, compiled):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, padding)
        out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in leaves])
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)


def test_registered_as_triton_block_sparse_implementation():
    assert IMPLEMENTATIONS["block_sparse"] is triton_block_sparse.block_sparse_attention


def test_backend_runs_on_cpu_only_in_the_interpreter(monkeypatch):
    q = torch.zeros(1, 2, 32, 64)
    triton_backend = BACKENDS["triton"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_backend.not_supported_reasons("block_sparse", q, block_size=32) == []
    monkeypatch.delenv("TRITON_INTERPRET")
    reasons = triton_backend.not_supported_reasons("block_sparse", q, block_size=32)
    assert reasons == ["runs CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 before importing triton"]


@pytest.mark.parametrize(
    "block_size, head_dim, dtype, expected",
    [
        (8, 64, torch.float32, "block_size must be 16, 32, 64 or 128, got 8"),
        (32, 48, torch.float32, "head dim 48 not supported (supports (32, 64, 128))"),
        (32, 64, torch.float64, "dtype float64 not supported (supports float16, bfloat16, float32)"),
    ],
    ids=["block8", "D48", "float64"],
)
def test_backend_declines_with_reason(monkeypatch, block_size, head_dim, dtype, expected):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.zeros(1, 2, 32, head_dim, dtype=dtype)
    assert BACKENDS["triton"].not_supported_reasons("block_sparse", q, block_size=block_size) == [expected]


def test_op_rejects_unsupported_head_dim():
    layout = bigbird_layout(32, block_size=16)
    q = torch.zeros(1, 1, 32, 48)
    with pytest.raises(ValueError, match="head dim in \\(32, 64, 128\\), got 48"):
        triton_block_sparse.block_sparse_fwd(q, q, q, *layout.csr("cpu"), 16, False, None, 1.0)


def _band_layout():
    """3 x 3 blocks of 16, each query block listing itself and its neighbours: 7 entries per CSR."""
    return BlockLayout.from_dense(torch.ones(3, 3, dtype=torch.bool).triu(-1).tril(1), 16)


def _corrupt(csr_part, position, value):
    bad = csr_part.clone()
    bad.view(-1)[position] = value
    return bad


# (name, CSR tensor to corrupt (row_offsets, col_indices, col_offsets, row_indices), flat position, value,
# expected message): a layout of 3 x 3 blocks (window of 3), 7 entries per CSR.
BAD_CSR_CASES = [
    ("negative-index", 1, 2, -1, "col_indices: expected block indices in \\[0, 3\\), got -1 for head 0"),
    ("index-past-last-block", 3, 0, 3, "row_indices: expected block indices in \\[0, 3\\), got 3 for head 0"),
    ("offset-past-nnz", 0, 3, 8, "row_offsets: last offset 8 of head 0 exceeds the 7 entries of col_indices"),
    ("decreasing-offsets", 2, 1, 6, "col_offsets: expected non-decreasing offsets, got 6 then 5 for head 0"),
    ("offsets-not-from-zero", 0, 0, 1, "row_offsets: expected each head's offsets to start at 0, got 1"),
]


@needs_triton_device
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("name, part, position, value, message", BAD_CSR_CASES, ids=[c[0] for c in BAD_CSR_CASES])
def test_raw_ops_reject_csr_values_that_would_read_out_of_bounds(direction, name, part, position, value, message):
    csr = list(_band_layout().csr(DEVICE))
    assert [t.numel() for t in csr] == [4, 7, 4, 7]
    csr[part] = _corrupt(csr[part], position, value)
    q = torch.randn(1, 1, 48, 32, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        if direction == "fwd":
            torch.ops.fastattn.triton_block_sparse_fwd(q, q, q, *csr, 16, False, None, 0.2)
        else:
            lse = torch.zeros(1, 1, 48, device=DEVICE)
            torch.ops.fastattn.triton_block_sparse_bwd(q, q, q, q, q, lse, *csr, 16, False, None, 0.2)


@needs_triton_device
def test_layout_changed_in_place_after_a_call_is_checked_again():
    """Values are validated once per CSR tensor and version: an in-place change is seen."""
    csr = [t.clone() for t in _band_layout().csr(DEVICE)]
    q = torch.randn(1, 1, 48, 32, device=DEVICE)
    torch.ops.fastattn.triton_block_sparse_fwd(q, q, q, *csr, 16, False, None, 0.2)
    csr[1][0, 0] = 1 << 20
    with pytest.raises(ValueError, match="col_indices: expected block indices in \\[0, 3\\), got 1048576"):
        torch.ops.fastattn.triton_block_sparse_fwd(q, q, q, *csr, 16, False, None, 0.2)


@needs_triton_device
@pytest.mark.parametrize(
    "part, replacement, message",
    [
        (3, torch.zeros(1, 6, dtype=torch.int32), None),
        (3, torch.zeros(2, 7, dtype=torch.int32), "row_indices: expected 1 heads \\(as col_offsets\\), got 2"),
        (1, torch.zeros(7, dtype=torch.int32), "col_indices: expected a contiguous 2-dim tensor, got shape \\(7,\\)"),
        (2, torch.zeros(1, 5, dtype=torch.int32), "col_offsets: expected shape \\(1 or 1, 4\\) for 3 blocks, got \\(1, 5\\)"),
        (3, torch.zeros(1, 7, dtype=torch.int64), "row_indices: expected dtype int32, got torch.int64"),
    ],
    ids=["row-indices-shorter-than-nnz", "row-indices-heads", "col-indices-rank", "col-offsets-length", "row-indices-dtype"],
)
def test_raw_ops_reject_csr_shapes(part, replacement, message):
    csr = list(_band_layout().csr(DEVICE))
    csr[part] = replacement.to(DEVICE)
    q = torch.randn(1, 1, 48, 32, device=DEVICE)
    # A row_indices shorter than col_offsets' last offset is a value error of the offsets.
    message = message or "col_offsets: last offset 7 of head 0 exceeds the 6 entries of row_indices"
    with pytest.raises((ValueError, TypeError), match=message):
        torch.ops.fastattn.triton_block_sparse_fwd(q, q, q, *csr, 16, False, None, 0.2)


def test_launch_grids_fit_cuda_limits_for_many_batch_heads(monkeypatch):
    """B * H = 65536 programs per tile: more than grid axes 1 and 2 hold (65535), so B * H goes on axis 0.

    The launches are recorded, not run: 65536 interpreted programs take many minutes. The decoding of
    a program id into (tile, batch * head) is exercised by every other test (several tiles and heads).
    """
    grids = []
    for name in ("block_sparse_fwd_kernel", "block_sparse_bwd_preprocess_kernel", "block_sparse_bwd_kernel_dkdv",
                 "block_sparse_bwd_kernel_dq"):
        monkeypatch.setattr(triton_block_sparse, name, RecordingLaunch(grids))
    layout = bigbird_layout(40, block_size=16, num_heads=1, num_random_blocks=0)
    q = torch.zeros(1024, 64, 40, 32).expand(1024, 64, 40, 32)
    out, lse = triton_block_sparse.block_sparse_fwd(q, q, q, *layout.csr("cpu"), 16, False, None, 0.2)
    triton_block_sparse.block_sparse_bwd(out, q, q, q, out, lse, *layout.csr("cpu"), 16, False, None, 0.2)
    assert len(grids) == 4
    for grid in grids:
        assert grid[0] <= 2**31 - 1 and all(extent <= 65535 for extent in grid[1:]), grid
        assert grid[0] * (grid[1] if len(grid) > 1 else 1) == 3 * 1024 * 64, grid


# ---- GPU: realistic shapes (run by make gpu-check) ----

# (B, H, Hkv, N, D, causal, padding, dtype)
GPU_CASES = [
    (2, 16, 16, 4096, 64, False, False, torch.bfloat16),
    (2, 16, 16, 4096, 128, True, False, torch.float16),
    (2, 16, 16, 4096, 64, True, True, torch.float16),
    (2, 16, 16, 4096, 128, False, True, torch.bfloat16),
    (2, 16, 16, 1000, 64, True, True, torch.float32),
    (2, 16, 4, 4096, 128, True, True, torch.bfloat16),
    (2, 16, 1, 2048, 64, False, True, torch.float16),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "batch, heads, kv_heads, seq_len, head_dim, causal, padding, dtype",
    GPU_CASES,
    ids=[describe_case(B=b, H=h, Hkv=hkv, N=n, D=d, causal=c, padding=p, dtype=t)
         for b, h, hkv, n, d, c, p, t in GPU_CASES],
)
def test_gpu_bigbird_matches_reference(batch, heads, kv_heads, seq_len, head_dim, causal, padding, dtype):
    layout = bigbird_layout(seq_len, block_size=64, num_heads=heads, num_random_blocks=3, causal=causal)
    inputs = _inputs(batch, heads, seq_len, seq_len, head_dim, padding=padding, seed=7, device="cuda",
                     kv_heads=kv_heads)
    _check(inputs, layout, causal=causal, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_gpu_block_sizes_match_reference(block_size):
    layout = bigbird_layout(1000, block_size=block_size, num_heads=4, num_random_blocks=2, causal=True)
    inputs = _inputs(2, 4, 1000, 1000, 128, padding=True, seed=8, device="cuda")
    _check(inputs, layout, causal=True, dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_heads", [8, 2], ids=["Hkv8", "Hkv2"])
def test_gpu_backward_is_deterministic(kv_heads):
    layout = bigbird_layout(2048, block_size=64, num_heads=8, num_random_blocks=3)
    q = torch.randn(2, 8, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    grad_out = torch.randn_like(q)
    grads = []
    for _ in range(2):
        out = triton_block_sparse.block_sparse_attention(q, k, v, layout, causal=False, key_padding_mask=None,
                                                         scale=0.125)
        grads.append(torch.autograd.grad(out, (q, k, v), grad_out))
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@needs_triton_device
@pytest.mark.parametrize("causal", [False, True], ids=["global", "causal"])
def test_nan_in_a_query_reaches_only_what_it_reads(causal):
    # dK and dV of padded keys were NaN: dS^T Q added 0 times a NaN query that sees no key.
    layout = BlockLayout.from_dense(torch.ones(3, 3, dtype=torch.bool), 16)
    assert_nan_queries_reach_only_what_they_read(
        lambda q, k, v, mask: fastattn.block_sparse_attention(q, k, v, layout, causal=causal, key_padding_mask=mask,
                                                              backend="triton"),
        causal=causal, dtype=torch.float32, device=DEVICE)
