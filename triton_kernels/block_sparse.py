"""Block-sparse (BigBird) attention in Triton: FlashAttention-2 forward and backward over a block CSR.

Every program owns a tile of rows inside one layout block and walks the list of blocks that the layout
gives that block, read from the CSR index tensors inside the kernel, in tiles of BM x BN (each
dividing the block size; see ``_tiles``):

- forward: one program per (query tile, batch * head) loops over its block's row of ``col_indices``
  with an online softmax in registers and saves the output and the natural log-sum-exp per row (+inf
  for a row that sees no key, whose output is 0);
- backward: a preprocess computes D = rowsum(dO * O); one program per (key tile, batch * kv head) loops
  over the transposed CSR (``col_offsets``/``row_indices``) for dK and dV, one program per (query
  tile, batch * head) loops over the CSR for dQ. Each gradient tile is written by exactly one
  program, so the backward is deterministic and needs no atomics.

With ``causal`` key tiles past a query tile's last row are skipped (so are listed blocks above the
diagonal) and the diagonal is masked element-wise; lengths need not be multiples of the block size
(every load is masked). Layouts are shared by all heads (CSR head stride 0) or given per query head.
k and v may have fewer heads than q (grouped-query attention: query head h reads key/value head
h // (H / Hkv)): the forward and dQ read the shared head, and each dK/dV program owns a key tile of one
key/value head and sums its group's query heads in order (still one writer per tile). The launches are wrapped
in ``torch.library`` custom ops (``fastattn::triton_block_sparse_fwd`` / ``_bwd``) with fake kernels and
an autograd formula, so ``torch.compile(fullgraph=True)`` keeps them in the graph.
"""
from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..layout import BlockLayout
from ..ops.block_sparse import backward_through, block_sparse_bwd_fake, block_sparse_fwd_fake, setup_context
from ..ops.common import accumulation_dtype, new_output

__all__ = ["block_sparse_attention", "SUPPORTED_BLOCK_SIZES", "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES"]

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
SUPPORTED_HEAD_DIMS = (32, 64, 128)
# float64 is for gradcheck (in the interpreter): it accumulates and saves lse in float64.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Programs are numbered on grid axis 0 (tile fastest, then batch * head), whose limit is 2^31 - 1; the
# other axes stop at 65535.
MAX_PROGRAMS = 2**31 - 1


@triton.jit
def _tile_and_batch_head(length, TILE: tl.constexpr):
    """(tile, batch * head) of this program: axis 0 numbers both, tile fastest, so that programs that run
    together share one head's keys and values in L2."""
    i_prog = tl.program_id(0)
    tiles = tl.cdiv(length, TILE)
    return i_prog % tiles, i_prog // tiles


@triton.jit
def block_sparse_fwd_kernel(
    q, k, v, o, lse, row_offsets, col_indices, key_padding_mask,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_row_h, stride_col_h, stride_pad_b,
    H, GROUP, Nq, Nk, scale,
    CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr,
):
    i_m, i_bh = _tile_and_batch_head(Nq, BM)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    i_qb = i_m * BM // BLOCK

    o_m = i_m * BM + tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    o_d = tl.arange(0, D)
    m_m = o_m < Nq

    p_q = q + i_b * stride_qb + i_h * stride_qh + o_m.to(tl.int64)[:, None] * stride_qn + o_d[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)
    i_hk = i_h // GROUP  # grouped-query attention: GROUP query heads read one key/value head
    p_k_base = k + i_b * stride_kb + i_hk * stride_kh
    p_v_base = v + i_b * stride_vb + i_hk * stride_vh

    b_m = tl.full([BM], float("-inf"), dtype=ACC)
    b_l = tl.zeros([BM], dtype=ACC)
    b_acc = tl.zeros([BM, D], dtype=ACC)

    p_row = row_offsets + i_h * stride_row_h + i_qb
    i_start = tl.load(p_row)
    i_end = tl.load(p_row + 1)
    TILES = BLOCK // BN  # key tiles per layout block
    # One flat loop over (listed key block, key tile) pairs, so that the pipeliner overlaps the loads of
    # the next tiles (and of the next listed block) with this tile's compute. With causal, keys past
    # this tile's last query are masked out of the loads (listed blocks above the diagonal read nothing).
    i_k_end = Nk
    if CAUSAL:
        i_k_end = tl.minimum(Nk, i_m * BM + BM)
    p_cols = col_indices + i_h * stride_col_h
    for i_it in range(i_start * TILES, i_end * TILES):
        i_kb = tl.load(p_cols + i_it // TILES)
        o_k = i_kb * BLOCK + (i_it % TILES) * BN + o_n
        m_k = o_k < i_k_end
        if HAS_PADDING:
            b_pad = tl.load(key_padding_mask + i_b * stride_pad_b + o_k, mask=m_k, other=1)
            m_k = m_k & (b_pad == 0)
        o_k64 = o_k.to(tl.int64)
        b_k = tl.load(p_k_base + o_k64[:, None] * stride_kn + o_d[None, :], mask=m_k[:, None], other=0.0)
        b_v = tl.load(p_v_base + o_k64[:, None] * stride_vn + o_d[None, :], mask=m_k[:, None], other=0.0)

        # [BM, D] @ [D, BN] -> [BM, BN]. Natural units, scaled as the backward scales: where the softmax
        # saturates on one key, p = exp(s - max) = 1 and lse = max exactly, so that the backward
        # recomputes p == 1 there and knows the row's gradient is 0 (see _softmax_grad).
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * scale
        m_s = m_k[None, :]
        if CAUSAL:
            m_s = m_s & (o_m[:, None] >= o_k[None, :])
        b_s = tl.where(m_s, b_s, float("-inf"))

        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        # A row that has seen no key yet keeps a max of -inf; subtracting 0 keeps exp at 0, not NaN.
        b_m_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_p = tl.exp(b_s - b_m_shift[:, None])
        b_alpha = tl.exp(b_m - b_m_shift)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        # [BM, BN] @ [BN, D] -> [BM, D]
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
        b_m = b_m_new

    m_seen = b_l > 0
    b_o = b_acc / tl.where(m_seen, b_l, 1.0)[:, None]
    b_lse = tl.where(m_seen, b_m + tl.log(tl.where(m_seen, b_l, 1.0)), float("inf"))

    p_o = o + i_b * stride_ob + i_h * stride_oh + o_m.to(tl.int64)[:, None] * stride_on + o_d[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_m[:, None])
    tl.store(lse + i_bh.to(tl.int64) * Nq + o_m, b_lse, mask=m_m)


@triton.jit
def _softmax_grad(b_p, b_dp, b_delta):
    """dS = P * (dP - delta). A probability of exactly 1 is a softmax saturated on one key (the only key
    its row sees, or the others below half an ulp in total): its exact gradient is below the rounding
    of dP - delta (two sums rounded apart), so it is 0, as the CPU kernel and the reference's own
    cancellation give it."""
    return tl.where(b_p == 1.0, 0.0, b_p * (b_dp - b_delta))


@triton.jit
def block_sparse_bwd_preprocess_kernel(
    o, do, delta,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    H, Nq,
    BM: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr,
):
    i_qb, i_bh = _tile_and_batch_head(Nq, BM)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_m = i_qb * BM + tl.arange(0, BM)
    o_d = tl.arange(0, D)
    m_m = o_m < Nq
    o_m64 = o_m.to(tl.int64)
    p_o = o + i_b * stride_ob + i_h * stride_oh + o_m64[:, None] * stride_on + o_d[None, :]
    p_do = do + i_b * stride_dob + i_h * stride_doh + o_m64[:, None] * stride_don + o_d[None, :]
    b_o = tl.load(p_o, mask=m_m[:, None], other=0.0).to(ACC)
    b_do = tl.load(p_do, mask=m_m[:, None], other=0.0).to(ACC)
    tl.store(delta + i_bh.to(tl.int64) * Nq + o_m, tl.sum(b_o * b_do, 1), mask=m_m)


@triton.jit
def block_sparse_bwd_kernel_dkdv(
    q, k, v, do, lse, delta, dk, dv, col_offsets, row_indices, key_padding_mask,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_colo_h, stride_rowi_h, stride_pad_b,
    H, GROUP, Nq, Nk, scale,
    CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr,
):
    # One program per (key tile, batch * key/value head): with grouped-query attention it sums the
    # GROUP query heads that read this key/value head, in head order, so dK/dV stay deterministic
    # without atomics (each query head walks its own layout head's transposed CSR).
    H_KV = H // GROUP
    i_n, i_bhk = _tile_and_batch_head(Nk, BN)
    i_b, i_hk = (i_bhk // H_KV).to(tl.int64), (i_bhk % H_KV).to(tl.int64)
    i_kb = i_n * BN // BLOCK

    o_k = i_n * BN + tl.arange(0, BN)
    o_m_block = tl.arange(0, BM)
    o_d = tl.arange(0, D)
    m_k_in = o_k < Nk
    m_k = m_k_in
    if HAS_PADDING:
        b_pad = tl.load(key_padding_mask + i_b * stride_pad_b + o_k, mask=m_k_in, other=1)
        m_k = m_k & (b_pad == 0)
    o_k64 = o_k.to(tl.int64)
    b_k = tl.load(k + i_b * stride_kb + i_hk * stride_kh + o_k64[:, None] * stride_kn + o_d[None, :],
                  mask=m_k_in[:, None], other=0.0)
    b_v = tl.load(v + i_b * stride_vb + i_hk * stride_vh + o_k64[:, None] * stride_vn + o_d[None, :],
                  mask=m_k_in[:, None], other=0.0)

    b_dk = tl.zeros([BN, D], dtype=ACC)
    b_dv = tl.zeros([BN, D], dtype=ACC)

    TILES = BLOCK // BM  # query tiles per layout block
    # With causal, queries before this key tile's first key see none of its keys: they are masked out
    # of the loads.
    i_q_first = 0
    if CAUSAL:
        i_q_first = i_n * BN
    for i_g in range(0, GROUP):
        i_h = i_hk * GROUP + i_g
        p_q_base = q + i_b * stride_qb + i_h * stride_qh
        p_do_base = do + i_b * stride_dob + i_h * stride_doh
        p_lse_base = lse + (i_b * H + i_h) * Nq
        p_delta_base = delta + (i_b * H + i_h) * Nq
        p_col = col_offsets + i_h * stride_colo_h + i_kb
        i_start = tl.load(p_col)
        i_end = tl.load(p_col + 1)
        p_rows = row_indices + i_h * stride_rowi_h
        # One flat loop over (listed query block, query tile) pairs (see the forward).
        for i_it in range(i_start * TILES, i_end * TILES):
            i_qb = tl.load(p_rows + i_it // TILES)
            o_m = i_qb * BLOCK + (i_it % TILES) * BM + o_m_block
            m_m = (o_m < Nq) & (o_m >= i_q_first)
            o_m64 = o_m.to(tl.int64)
            b_q = tl.load(p_q_base + o_m64[:, None] * stride_qn + o_d[None, :], mask=m_m[:, None], other=0.0)
            b_do = tl.load(p_do_base + o_m64[:, None] * stride_don + o_d[None, :], mask=m_m[:, None], other=0.0)
            b_lse = tl.load(p_lse_base + o_m, mask=m_m, other=float("inf"))
            b_delta = tl.load(p_delta_base + o_m, mask=m_m, other=0.0)

            # [BN, D] @ [D, BM] -> [BN, BM]
            b_sT = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION) * scale
            m_sT = m_k[:, None] & m_m[None, :]
            if CAUSAL:
                m_sT = m_sT & (o_k[:, None] <= o_m[None, :])
            # lse is +inf for rows that see no key: their probabilities vanish.
            b_pT = tl.where(m_sT, tl.exp(b_sT - b_lse[None, :]), 0.0)
            # [BN, BM] @ [BM, D] -> [BN, D]
            b_dv += tl.dot(b_pT.to(b_do.dtype), b_do, input_precision=DOT_PRECISION)
            # [BN, D] @ [D, BM] -> [BN, BM]
            b_dpT = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)
            b_dsT = _softmax_grad(b_pT, b_dpT, b_delta[None, :])
            # [BN, BM] @ [BM, D] -> [BN, D]
            b_dk += tl.dot(b_dsT.to(b_q.dtype), b_q, input_precision=DOT_PRECISION)

    p_dk = dk + i_b * stride_dkb + i_hk * stride_dkh + o_k64[:, None] * stride_dkn + o_d[None, :]
    p_dv = dv + i_b * stride_dvb + i_hk * stride_dvh + o_k64[:, None] * stride_dvn + o_d[None, :]
    if HAS_PADDING:
        # Padded keys get 0: their P^T and dS^T are 0, but dS^T Q adds 0 times a NaN query that sees no key (all
        # its keys padded, not causal), and dS^T = P^T (dP^T - delta) is NaN where a NaN query that sees keys makes
        # delta NaN.
        b_dk = tl.where(m_k[:, None], b_dk, 0.0)
        b_dv = tl.where(m_k[:, None], b_dv, 0.0)
    tl.store(p_dk, (b_dk * scale).to(dk.dtype.element_ty), mask=m_k_in[:, None])
    tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_k_in[:, None])


@triton.jit
def block_sparse_bwd_kernel_dq(
    q, k, v, do, lse, delta, dq, row_offsets, col_indices, key_padding_mask,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_row_h, stride_col_h, stride_pad_b,
    H, GROUP, Nq, Nk, scale,
    CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr,
):
    i_m, i_bh = _tile_and_batch_head(Nq, BM)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    i_qb = i_m * BM // BLOCK

    o_m = i_m * BM + tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    o_d = tl.arange(0, D)
    m_m = o_m < Nq
    o_m64 = o_m.to(tl.int64)

    b_q = tl.load(q + i_b * stride_qb + i_h * stride_qh + o_m64[:, None] * stride_qn + o_d[None, :],
                  mask=m_m[:, None], other=0.0)
    b_do = tl.load(do + i_b * stride_dob + i_h * stride_doh + o_m64[:, None] * stride_don + o_d[None, :],
                   mask=m_m[:, None], other=0.0)
    b_lse = tl.load(lse + i_bh.to(tl.int64) * Nq + o_m, mask=m_m, other=float("inf"))
    b_delta = tl.load(delta + i_bh.to(tl.int64) * Nq + o_m, mask=m_m, other=0.0)
    i_hk = i_h // GROUP  # grouped-query attention: GROUP query heads read one key/value head
    p_k_base = k + i_b * stride_kb + i_hk * stride_kh
    p_v_base = v + i_b * stride_vb + i_hk * stride_vh

    b_dq = tl.zeros([BM, D], dtype=ACC)

    p_row = row_offsets + i_h * stride_row_h + i_qb
    i_start = tl.load(p_row)
    i_end = tl.load(p_row + 1)
    TILES = BLOCK // BN  # key tiles per layout block
    # One flat loop over (listed key block, key tile) pairs, so that the pipeliner overlaps the loads of
    # the next tiles (and of the next listed block) with this tile's compute. With causal, keys past
    # this tile's last query are masked out of the loads (listed blocks above the diagonal read nothing).
    i_k_end = Nk
    if CAUSAL:
        i_k_end = tl.minimum(Nk, i_m * BM + BM)
    p_cols = col_indices + i_h * stride_col_h
    for i_it in range(i_start * TILES, i_end * TILES):
        i_kb = tl.load(p_cols + i_it // TILES)
        o_k = i_kb * BLOCK + (i_it % TILES) * BN + o_n
        m_k = o_k < i_k_end
        if HAS_PADDING:
            b_pad = tl.load(key_padding_mask + i_b * stride_pad_b + o_k, mask=m_k, other=1)
            m_k = m_k & (b_pad == 0)
        o_k64 = o_k.to(tl.int64)
        b_k = tl.load(p_k_base + o_k64[:, None] * stride_kn + o_d[None, :], mask=m_k[:, None], other=0.0)
        b_v = tl.load(p_v_base + o_k64[:, None] * stride_vn + o_d[None, :], mask=m_k[:, None], other=0.0)

        # [BM, D] @ [D, BN] -> [BM, BN]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * scale
        m_s = m_k[None, :]
        if CAUSAL:
            m_s = m_s & (o_m[:, None] >= o_k[None, :])
        b_p = tl.where(m_s, tl.exp(b_s - b_lse[:, None]), 0.0)
        # [BM, D] @ [D, BN] -> [BM, BN]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)
        b_ds = _softmax_grad(b_p, b_dp, b_delta[:, None])
        # [BM, BN] @ [BN, D] -> [BM, D]
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)

    p_dq = dq + i_b * stride_dqb + i_h * stride_dqh + o_m64[:, None] * stride_dqn + o_d[None, :]
    tl.store(p_dq, (b_dq * scale).to(dq.dtype.element_ty), mask=m_m[:, None])


def _tiles(kernel: str, block_size: int, head_dim: int, dtype: torch.dtype) -> dict:
    """BM x BN tiles (each dividing block_size) and launch options of one kernel.

    The forward and dQ keep a tall query tile and walk each listed key block in narrower slices; dK/dV
    keep a tall key tile and walk each query block in slices. This keeps the fp32 accumulators and the
    score tile in registers up to block 128 and D = 128. One warp per 16 rows of the tile that the
    dots' M dimension runs over (the query tile; dK/dV: the key tile), as mma gives each warp 16 rows:
    more warps would idle on small tiles, fewer would spill on tall ones (block 128, D = 64 on 4 warps
    sat at 255 registers with spills on sm_80). Three stages: the flat loops load two tiles ahead
    (sm_90 keeps three buffers, sm_80 two; see the static check's table).
    ``make gpu-static-check`` compiles every choice for sm_80 and sm_90 and fails on spills.
    """
    if kernel not in ("fwd", "dq", "dkdv"):
        raise ValueError(f"kernel: expected 'fwd', 'dq' or 'dkdv', got {kernel!r}")
    if dtype in (torch.float32, torch.float64):
        # IEEE float32/float64 dots run on the FMA units, not the tensor cores, and hold their operands
        # in registers: small tiles on 8 warps, two stages (compute-bound anyway). They still spill a
        # little on sm_90 (see static_check_variants).
        tile_m, tile_n = {"fwd": (32, 32), "dq": (16, 64), "dkdv": (32, 32)}[kernel]
        return {"BM": min(block_size, tile_m), "BN": min(block_size, tile_n), "num_warps": 8, "num_stages": 2}
    if kernel == "fwd":
        tile_m, tile_n = min(block_size, 128), min(block_size, 64)
    elif kernel == "dq":
        tile_m, tile_n = min(block_size, 128 if head_dim <= 64 else 64), min(block_size, 32)
    else:
        tile_m, tile_n = min(block_size, 32), min(block_size, 128 if head_dim <= 64 else 64)
    rows = tile_n if kernel == "dkdv" else tile_m
    num_warps = min(8, rows // 16)
    if kernel == "dkdv" and head_dim == 128 and rows >= 32:
        # Two fp32 accumulators and the K and V tiles stay resident: 4 warps spill at D = 128 (sm_80 with
        # 64-row key tiles, sm_90 with 32).
        num_warps = 8
    return {"BM": tile_m, "BN": tile_n, "num_warps": num_warps, "num_stages": 3}


def _dot_precision(dtype: torch.dtype) -> str:
    # TF32 would round float32 inputs to 10 mantissa bits: far outside the float32 tolerance.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


_TRITON_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def _csr_head_stride(index: Tensor) -> int:
    """Stride over heads of a CSR tensor; 0 when one layout is shared by every head."""
    return 0 if index.shape[0] == 1 else index.stride(0)


def _padding_arguments(key_padding_mask: Tensor | None, q: Tensor) -> tuple[Tensor, int]:
    if key_padding_mask is None:
        return q.new_empty(1, dtype=torch.uint8), 0
    mask = key_padding_mask.contiguous().view(torch.uint8)
    return mask, mask.stride(0)


def _grid(length: int, tile: int, batch: int, heads: int) -> tuple[int]:
    programs = triton.cdiv(length, tile) * batch * heads
    if programs > MAX_PROGRAMS:
        raise ValueError(f"q: expected at most {MAX_PROGRAMS} programs of {tile} rows, got "
                         f"{triton.cdiv(length, tile)} tiles x B={batch} x H={heads}")
    return (programs,)


def _check_csr_shapes(offsets_name: str, offsets: Tensor, indices_name: str, indices: Tensor, heads: int,
                      blocks: int, device: torch.device) -> None:
    for name, t in ((offsets_name, offsets), (indices_name, indices)):
        if t.dtype != torch.int32:
            raise TypeError(f"{name}: expected dtype int32, got {t.dtype}")
        if t.dim() != 2 or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous 2-dim tensor, got shape {tuple(t.shape)} and strides "
                             f"{t.stride()}")
        if t.device != device:
            raise ValueError(f"{name}: expected device {device}, got {t.device}")
    if offsets.shape[0] not in (1, heads) or offsets.shape[1] != blocks + 1:
        raise ValueError(f"{offsets_name}: expected shape (1 or {heads}, {blocks + 1}) for {blocks} blocks, "
                         f"got {tuple(offsets.shape)}")
    if indices.shape[0] != offsets.shape[0]:
        raise ValueError(f"{indices_name}: expected {offsets.shape[0]} heads (as {offsets_name}), "
                         f"got {indices.shape[0]}")


def _check_csr_values(offsets_name: str, offsets: Tensor, indices_name: str, indices: Tensor, bound: int) -> None:
    """Offsets start at 0, never decrease and stay within the indices; listed indices lie in [0, bound)."""
    offsets, indices = offsets.cpu(), indices.cpu()
    capacity = indices.shape[1]
    for head in range(offsets.shape[0]):
        row = offsets[head]
        if row[0] != 0:
            raise ValueError(f"{offsets_name}: expected each head's offsets to start at 0, got {int(row[0])} "
                             f"for head {head}")
        steps = (row[1:] < row[:-1]).nonzero()
        if len(steps):
            i = int(steps[0])
            raise ValueError(f"{offsets_name}: expected non-decreasing offsets, got {int(row[i])} then "
                             f"{int(row[i + 1])} for head {head}")
        listed = int(row[-1])
        if listed > capacity:
            raise ValueError(f"{offsets_name}: last offset {listed} of head {head} exceeds the {capacity} "
                             f"entries of {indices_name}")
        values = indices[head, :listed]
        bad = ((values < 0) | (values >= bound)).nonzero()
        if len(bad):
            raise ValueError(f"{indices_name}: expected block indices in [0, {bound}), got "
                             f"{int(values[int(bad[0])])} for head {head}")


# Validating a layout's index values costs a copy to the host (a device sync), so it is done once per
# set of CSR tensors and their versions (an in-place change bumps the version and revalidates).
# Inference tensors keep no version: they are validated on every call.
_VALIDATED_CSR: dict[tuple, tuple] = {}


def _check_layout(row_offsets: Tensor, col_indices: Tensor, col_offsets: Tensor, row_indices: Tensor,
                  query_blocks: int, key_blocks: int) -> None:
    csr = (row_offsets, col_indices, col_offsets, row_indices)
    cacheable = not any(t.is_inference() for t in csr)
    key = tuple(id(t) for t in csr) + (query_blocks, key_blocks)
    versions = tuple(t._version for t in csr) if cacheable else None
    known = _VALIDATED_CSR.get(key)
    if cacheable and known is not None and known[1] == versions and all(r() is t for r, t in zip(known[0], csr)):
        return
    _check_csr_values("row_offsets", row_offsets, "col_indices", col_indices, key_blocks)
    _check_csr_values("col_offsets", col_offsets, "row_indices", row_indices, query_blocks)
    if cacheable:
        def forget(_, key=key):
            _VALIDATED_CSR.pop(key, None)
        _VALIDATED_CSR[key] = (tuple(weakref.ref(t, forget) for t in csr), versions)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """The checks of q, k, v that every Triton op shares: shapes (k, v with Hkv heads dividing H), one dtype
    and device, unit last stride, a supported head dim."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q, k, v: expected (B, H, N, D) with v shaped like k, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k: expected shape ({q.shape[0]}, Hkv, Nk, {q.shape[3]}) to match q, "
                         f"got {tuple(k.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"k: expected Hkv heads dividing H={q.shape[1]} (the heads of q; grouped-query "
                         f"attention), got Hkv={k.shape[1]}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v: expected one dtype of {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: expected one device, got {q.device}, {k.device}, {v.device}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError(f"q, k, v: expected unit stride in the last dim, got strides {q.stride()}, "
                         f"{k.stride()}, {v.stride()}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: expected head dim in {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}")


def _check_arguments(q: Tensor, k: Tensor, v: Tensor, row_offsets: Tensor, col_indices: Tensor, col_offsets: Tensor,
                     row_indices: Tensor, block_size: int, causal: bool, key_padding_mask: Tensor | None) -> None:
    _check_qkv(q, k, v)
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size: expected one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal: expected Nq == Nk, got Nq={q.shape[2]} and Nk={k.shape[2]}")
    query_blocks, key_blocks = triton.cdiv(q.shape[2], block_size), triton.cdiv(k.shape[2], block_size)
    _check_csr_shapes("row_offsets", row_offsets, "col_indices", col_indices, q.shape[1], query_blocks, q.device)
    _check_csr_shapes("col_offsets", col_offsets, "row_indices", row_indices, q.shape[1], key_blocks, q.device)
    if col_offsets.shape[0] != row_offsets.shape[0]:
        raise ValueError(f"col_offsets: expected {row_offsets.shape[0]} heads (as row_offsets), "
                         f"got {col_offsets.shape[0]}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool or key_padding_mask.device != q.device
                                         or tuple(key_padding_mask.shape) != (q.shape[0], k.shape[2])):
        raise ValueError(f"key_padding_mask: expected bool of shape ({q.shape[0]}, {k.shape[2]}) on {q.device}, "
                         f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)} on {key_padding_mask.device}")
    _check_layout(row_offsets, col_indices, col_offsets, row_indices, query_blocks, key_blocks)


@torch.library.custom_op("fastattn::triton_block_sparse_fwd", mutates_args=())
def block_sparse_fwd(q: Tensor, k: Tensor, v: Tensor, row_offsets: Tensor, col_indices: Tensor,
                     col_offsets: Tensor, row_indices: Tensor, block_size: int, causal: bool,
                     key_padding_mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """Output (B, H, Nq, D) and log-sum-exp (B, H, Nq), float32 (float64 for float64 inputs), +inf where a row sees no key."""
    _check_arguments(q, k, v, row_offsets, col_indices, col_offsets, row_indices, block_size, causal,
                     key_padding_mask)
    batch, heads, query_len, head_dim = q.shape
    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output((batch, heads, query_len), accumulation_dtype(q.dtype), q.device)
    padding, stride_pad_b = _padding_arguments(key_padding_mask, q)
    tiles = _tiles("fwd", block_size, head_dim, q.dtype)
    block_sparse_fwd_kernel[_grid(query_len, tiles["BM"], batch, heads)](
        q, k, v, out, lse, row_offsets, col_indices, padding,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        _csr_head_stride(row_offsets), _csr_head_stride(col_indices), stride_pad_b,
        heads, heads // k.shape[1], query_len, k.shape[2], scale,
        CAUSAL=causal, HAS_PADDING=key_padding_mask is not None, DOT_PRECISION=_dot_precision(q.dtype),
        BLOCK=block_size, D=head_dim, ACC=_TRITON_DTYPES[accumulation_dtype(q.dtype)], **tiles,
    )
    return out, lse


block_sparse_fwd.register_fake(block_sparse_fwd_fake)


@torch.library.custom_op("fastattn::triton_block_sparse_bwd", mutates_args=())
def block_sparse_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                     row_offsets: Tensor, col_indices: Tensor, col_offsets: Tensor, row_indices: Tensor,
                     block_size: int, causal: bool, key_padding_mask: Tensor | None,
                     scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of q, k, v; deterministic (every gradient tile is written by one program, no atomics)."""
    _check_arguments(q, k, v, row_offsets, col_indices, col_offsets, row_indices, block_size, causal,
                     key_padding_mask)
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    out = out if out.stride(-1) == 1 else out.contiguous()
    batch, heads, query_len, head_dim = q.shape
    key_len, group = k.shape[2], heads // k.shape[1]
    grad_q = new_output(q.shape, q.dtype, q.device)
    grad_k = new_output(k.shape, k.dtype, k.device)
    grad_v = new_output(v.shape, v.dtype, v.device)
    delta = torch.empty((batch, heads, query_len), dtype=accumulation_dtype(q.dtype), device=q.device)
    lse = lse.contiguous()
    padding, stride_pad_b = _padding_arguments(key_padding_mask, q)
    flags = dict(CAUSAL=causal, HAS_PADDING=key_padding_mask is not None, DOT_PRECISION=_dot_precision(q.dtype),
                 BLOCK=block_size, D=head_dim, ACC=_TRITON_DTYPES[accumulation_dtype(q.dtype)])
    dkdv_tiles, dq_tiles = (_tiles(kernel, block_size, head_dim, q.dtype) for kernel in ("dkdv", "dq"))

    block_sparse_bwd_preprocess_kernel[_grid(query_len, dq_tiles["BM"], batch, heads)](
        out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], heads, query_len,
        BM=dq_tiles["BM"], D=head_dim, ACC=flags["ACC"],
    )
    # Causal rows that see no key (their keys padded up to them: lse +inf) enter dK as 0, since dS^T Q would add 0
    # times such a NaN query to the later keys of their block. Here, not in the kernel, where the mask cost
    # register spills.
    rows_may_see_no_key = causal and key_padding_mask is not None
    queries = q.masked_fill((lse == float("inf")).unsqueeze(-1), 0.0) if rows_may_see_no_key else q
    block_sparse_bwd_kernel_dkdv[_grid(key_len, dkdv_tiles["BN"], batch, k.shape[1])](
        queries, k, v, grad_out, lse, delta, grad_k, grad_v, col_offsets, row_indices, padding,
        *queries.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3],
        *grad_k.stride()[:3], *grad_v.stride()[:3],
        _csr_head_stride(col_offsets), _csr_head_stride(row_indices), stride_pad_b,
        heads, group, query_len, key_len, scale, **flags, **dkdv_tiles,
    )
    block_sparse_bwd_kernel_dq[_grid(query_len, dq_tiles["BM"], batch, heads)](
        q, k, v, grad_out, lse, delta, grad_q, row_offsets, col_indices, padding,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *grad_q.stride()[:3],
        _csr_head_stride(row_offsets), _csr_head_stride(col_indices), stride_pad_b,
        heads, group, query_len, key_len, scale, **flags, **dq_tiles,
    )
    return grad_q, grad_k, grad_v


block_sparse_bwd.register_fake(block_sparse_bwd_fake)
block_sparse_fwd.register_autograd(backward_through(block_sparse_bwd), setup_context=setup_context)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, *, causal: bool,
                           key_padding_mask: Tensor | None, scale: float) -> Tensor:
    """Differentiable block-sparse attention through the Triton kernels (the "triton" backend's call)."""
    out, _ = block_sparse_fwd(q, k, v, *layout.csr(q.device), layout.block_size, causal, key_padding_mask, scale)
    return out


def static_check_variants():
    """Every launch the wrappers can make on a GPU, for ``scripts/gpu_static_check.py``.

    One (label, launch, is_default) per block size x head dim x dtype x causal x padding: ``launch()``
    runs the forward and backward wrappers on small CPU tensors whose sizes (B = H = 2, lengths of two
    blocks, multiples of 16) specialise the kernels as real calls do; the checker records the launches.
    Every variant is one the wrappers choose (``_tiles``). float16/bfloat16 variants are passed as
    default, so that a spill fails the check. float32 variants are passed as non-default so that their
    spills are reported, not failed: Triton's IEEE float32 dots (FMA units) keep a head-dim row of
    each operand per thread, and at every tile and warp count tried ptxas spills some of them on
    sm_90 (8 to 600 bytes, most at D = 128). Known gap: split the QK^T product over D to fix it.
    Grouped-query attention (k, v with one head for two query heads: GROUP = 2, not specialised away as
    GROUP = 1 is) nests dK/dV's loop in a loop over the group: one "-gqa" variant per block size x head
    dim x low-precision dtype, with causal and padding (the most registers).
    """
    for block_size in SUPPORTED_BLOCK_SIZES:
        layout = BlockLayout.from_dense(torch.ones(2, 2, 2, dtype=torch.bool), block_size)
        for head_dim in SUPPORTED_HEAD_DIMS:
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                for causal in (False, True):
                    for padding in (False, True):
                        label = (f"block{block_size}-D{head_dim}-{str(dtype).replace('torch.', '')}"
                                 f"{'-causal' if causal else ''}{'-padding' if padding else ''}")
                        yield (label, _static_check_launch(layout, head_dim, dtype, causal, padding, 2),
                               dtype != torch.float32)
                if dtype != torch.float32:
                    label = f"block{block_size}-D{head_dim}-{str(dtype).replace('torch.', '')}-causal-padding-gqa"
                    yield label, _static_check_launch(layout, head_dim, dtype, True, True, 1), True


def _static_check_launch(layout: BlockLayout, head_dim: int, dtype: torch.dtype, causal: bool, padding: bool,
                         kv_heads: int):
    def launch():
        length = 2 * layout.block_size
        q = torch.zeros(2, 2, length, head_dim, dtype=dtype)
        kv = torch.zeros(2, kv_heads, length, head_dim, dtype=dtype)
        mask = torch.zeros(2, length, dtype=torch.bool) if padding else None
        csr = layout.csr("cpu")
        out, lse = block_sparse_fwd(q, kv, kv, *csr, layout.block_size, causal, mask, head_dim ** -0.5)
        block_sparse_bwd(q, q, kv, kv, q, lse, *csr, layout.block_size, causal, mask, head_dim ** -0.5)
    return launch
