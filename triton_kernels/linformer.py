"""Linformer attention in Triton: sequence projection of K and V, then softmax attention over kp keys.

Forward (``fastattn::triton_linformer_fwd``):

- ``linformer_fwd_kernel_project``: K' = P_k K and V' = P_v V in one pass over K and V (padded keys
  read as zeros). The sum over the sequence is split across programs, one (kp tile, split, batch * head)
  each; every program writes its own partial (kp, D) sums and the splits are then added in a fixed
  order, so the result is deterministic (no atomics).
- ``linformer_fwd_kernel``: one program per (query tile, batch * head) walks the kp projected keys in
  tiles with an online softmax (exp2, log2(e) folded into the scale) and saves the output and the
  natural log-sum-exp per row (every row sees kp >= 1 keys, so it is finite).

Backward (``fastattn::triton_linformer_bwd``):

- ``linformer_bwd_preprocess_kernel``: per row the max m and the sum l of the scores' exponentials,
  and D = rowsum(dO * O); P is then exp2(s - m) / l (see the kernel for why not exp(s - lse));
- ``linformer_bwd_kernel_dkvp``: dK' = scale dS^T Q and dV' = P^T dO, split over query tiles like the
  projection (partials, then a fixed-order sum);
- ``linformer_bwd_kernel_dq``: dQ = scale dS K', one program per query tile;
- ``linformer_bwd_kernel_dkdv``: dK = P_k^T dK' and dV = P_v^T dV', one program per (key tile, batch *
  kv head) summing over the query heads of its group (grouped-query attention) in order; zero on padding;
- ``linformer_bwd_kernel_dproj``: dP = sum over batch (and over heads when the projection is shared)
  of dK' K^T, one program per (key tile, kp tile, projection head).

Every backward kernel recomputes the scores as the preprocess did (same operands, same tile shapes),
so a softmax row saturated on one key gets p == 1 exactly, and dS = P (dP - D) is set to exactly 0
there (its true value is below the rounding of dP - D, two dot products rounded apart). Grouped-query
attention: k and v may have Hkv heads with H % Hkv == 0; query head h reads kv head h // (H / Hkv), and
K', V' are kept per query head (the op's schema: (B, H, kp, D)).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops.common import accumulation_dtype, new_output
from ..ops.linformer import backward_through, linformer_bwd_fake, linformer_fwd_fake, setup_context
from .block_sparse import (SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, _TRITON_DTYPES, _check_qkv, _dot_precision, _grid,
                           _padding_arguments, _tile_and_batch_head)

__all__ = ["linformer_attention", "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES"]


LOG2E = math.log2(math.e)
LN2 = tl.constexpr(math.log(2.0))
# Grid axes 1 and 2 (B * H is on axis 0, or numbered with the tiles on it: block_sparse._grid).
MAX_GRID_AXIS = 65535
# Programs aimed at by the split sums over the sequence: enough to fill a large GPU, few enough that
# the partial sums stay small next to K and V.
TARGET_PROGRAMS = 512


@triton.jit
def linformer_fwd_kernel_project(
    k, v, proj_k, proj_v, k_part, v_part, key_padding_mask,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pkh, stride_pkp, stride_pkn,
    stride_pvh, stride_pvp, stride_pvn,
    stride_pad_b,
    H, GROUP, Nk, KP, CHUNK, SPLITS,
    HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BP: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr,
):
    i_bh, i_p, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    i_hkv = i_h // GROUP

    o_p = i_p * BP + tl.arange(0, BP)
    o_n = tl.arange(0, BN)
    o_d = tl.arange(0, D)
    m_p = o_p < KP
    o_p64 = o_p.to(tl.int64)

    p_k_base = k + i_b * stride_kb + i_hkv * stride_kh
    p_v_base = v + i_b * stride_vb + i_hkv * stride_vh
    p_pk_base = proj_k + i_h * stride_pkh + o_p64[:, None] * stride_pkp
    p_pv_base = proj_v + i_h * stride_pvh + o_p64[:, None] * stride_pvp

    b_kp = tl.zeros([BP, D], dtype=ACC)
    b_vp = tl.zeros([BP, D], dtype=ACC)
    i_first = i_s * CHUNK
    for i_n in range(i_first, tl.minimum(i_first + CHUNK, Nk), BN):
        o_k = i_n + o_n
        m_k = o_k < Nk
        m_kv = m_k
        if HAS_PADDING:
            b_pad = tl.load(key_padding_mask + i_b * stride_pad_b + o_k, mask=m_k, other=1)
            m_kv = m_k & (b_pad == 0)
        o_k64 = o_k.to(tl.int64)
        b_k = tl.load(p_k_base + o_k64[:, None] * stride_kn + o_d[None, :], mask=m_kv[:, None], other=0.0)
        b_v = tl.load(p_v_base + o_k64[:, None] * stride_vn + o_d[None, :], mask=m_kv[:, None], other=0.0)
        m_pk = m_p[:, None] & m_k[None, :]
        b_pk = tl.load(p_pk_base + o_k64[None, :] * stride_pkn, mask=m_pk, other=0.0)
        b_pv = tl.load(p_pv_base + o_k64[None, :] * stride_pvn, mask=m_pk, other=0.0)
        # [BP, BN] @ [BN, D] -> [BP, D]
        b_kp += tl.dot(b_pk, b_k, input_precision=DOT_PRECISION)
        b_vp += tl.dot(b_pv, b_v, input_precision=DOT_PRECISION)

    o_part = ((i_bh.to(tl.int64) * SPLITS + i_s) * KP + o_p64)[:, None] * D + o_d[None, :]
    tl.store(k_part + o_part, b_kp, mask=m_p[:, None])
    tl.store(v_part + o_part, b_vp, mask=m_p[:, None])


@triton.jit
def linformer_fwd_kernel(
    q, k_proj, v_proj, o, lse,
    stride_qb, stride_qh, stride_qn,
    stride_ob, stride_oh, stride_on,
    H, Nq, KP, scale_log2,
    DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr,
):
    i_m, i_bh = _tile_and_batch_head(Nq, BM)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)

    o_m = i_m * BM + tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    o_d = tl.arange(0, D)
    m_m = o_m < Nq

    p_q = q + i_b * stride_qb + i_h * stride_qh + o_m.to(tl.int64)[:, None] * stride_qn + o_d[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)
    # K' and V' are contiguous (B * H, KP, D), in the dtype of q.
    p_kp_base = k_proj + i_bh.to(tl.int64) * KP * D
    p_vp_base = v_proj + i_bh.to(tl.int64) * KP * D

    b_m = tl.full([BM], float("-inf"), dtype=ACC)
    b_l = tl.zeros([BM], dtype=ACC)
    b_acc = tl.zeros([BM, D], dtype=ACC)
    for i_n in range(0, KP, BN):
        o_p = i_n + o_n
        m_p = o_p < KP
        o_kd = o_p.to(tl.int64)[:, None] * D + o_d[None, :]
        b_k = tl.load(p_kp_base + o_kd, mask=m_p[:, None], other=0.0).to(b_q.dtype)
        b_v = tl.load(p_vp_base + o_kd, mask=m_p[:, None], other=0.0).to(b_q.dtype)
        # [BM, D] @ [D, BN] -> [BM, BN], in log2 units
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * scale_log2
        b_s = tl.where(m_p[None, :], b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.exp2(b_s - b_m_new[:, None])
        b_alpha = tl.exp2(b_m - b_m_new)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        # [BM, BN] @ [BN, D] -> [BM, D]
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
        b_m = b_m_new

    # kp >= 1, so every row sees a key and l >= 1.
    p_o = o + i_b * stride_ob + i_h * stride_oh + o_m.to(tl.int64)[:, None] * stride_on + o_d[None, :]
    tl.store(p_o, (b_acc / b_l[:, None]).to(o.dtype.element_ty), mask=m_m[:, None])
    tl.store(lse + i_bh.to(tl.int64) * Nq + o_m, (b_m + tl.log2(b_l)) * LN2, mask=m_m)


@triton.jit
def linformer_bwd_preprocess_kernel(
    q, k_proj, o, do, row_max, row_sum, delta,
    stride_qb, stride_qh, stride_qn,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    H, Nq, KP, scale_log2,
    DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr,
):
    """Per row: the max m and the sum l of exp2(s - m) of the scores (log2 units), and D = rowsum(dO * O).

    The backward takes P = exp2(s - m) / l rather than exp2(s - lse): lse rounds at the magnitude of the
    largest score, and that rounding would scale a whole row of P (and so of dS) by a relative error far
    above the float32 reference's when the scores are large.
    """
    i_m, i_bh = _tile_and_batch_head(Nq, BM)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)

    o_m = i_m * BM + tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    o_d = tl.arange(0, D)
    m_m = o_m < Nq
    o_m64 = o_m.to(tl.int64)

    b_q = tl.load(q + i_b * stride_qb + i_h * stride_qh + o_m64[:, None] * stride_qn + o_d[None, :],
                  mask=m_m[:, None], other=0.0)
    p_kp_base = k_proj + i_bh.to(tl.int64) * KP * D
    b_m = tl.full([BM], float("-inf"), dtype=ACC)
    b_l = tl.zeros([BM], dtype=ACC)
    for i_n in range(0, KP, BN):
        o_p = i_n + o_n
        m_p = o_p < KP
        b_k = tl.load(p_kp_base + o_p.to(tl.int64)[:, None] * D + o_d[None, :], mask=m_p[:, None],
                      other=0.0).to(b_q.dtype)
        # [BM, D] @ [D, BN] -> [BM, BN], in log2 units
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * scale_log2
        b_s = tl.where(m_p[None, :], b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_l = b_l * tl.exp2(b_m - b_m_new) + tl.sum(tl.exp2(b_s - b_m_new[:, None]), 1)
        b_m = b_m_new

    b_o = tl.load(o + i_b * stride_ob + i_h * stride_oh + o_m64[:, None] * stride_on + o_d[None, :],
                  mask=m_m[:, None], other=0.0).to(ACC)
    b_do = tl.load(do + i_b * stride_dob + i_h * stride_doh + o_m64[:, None] * stride_don + o_d[None, :],
                   mask=m_m[:, None], other=0.0).to(ACC)
    o_row = i_bh.to(tl.int64) * Nq + o_m
    tl.store(row_max + o_row, b_m, mask=m_m)
    tl.store(row_sum + o_row, b_l, mask=m_m)
    tl.store(delta + o_row, tl.sum(b_o * b_do, 1), mask=m_m)


@triton.jit
def _linformer_scores(b_q, b_do, b_k, b_v, b_m, b_l, b_delta, m_s, scale_log2, DOT_PRECISION: tl.constexpr):
    """P and dS / scale of a [BM, BN] tile, the scores recomputed exactly as the preprocess computed them."""
    # [BM, D] @ [D, BN] -> [BM, BN], in log2 units
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * scale_log2
    b_p = tl.where(m_s, tl.exp2(b_s - b_m[:, None]) / b_l[:, None], 0.0)
    # [BM, D] @ [D, BN] -> [BM, BN]
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)
    b_ds = tl.where(b_p == 1.0, 0.0, b_p * (b_dp - b_delta[:, None]))
    return b_p, b_ds


@triton.jit
def linformer_bwd_kernel_dkvp(
    q, do, k_proj, v_proj, row_max, row_sum, delta, dk_part, dv_part,
    stride_qb, stride_qh, stride_qn,
    stride_dob, stride_doh, stride_don,
    H, Nq, KP, CHUNK, SPLITS, scale, scale_log2,
    DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr,
):
    i_bh, i_p, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)

    o_p = i_p * BN + tl.arange(0, BN)
    o_m_tile = tl.arange(0, BM)
    o_d = tl.arange(0, D)
    m_p = o_p < KP
    o_p64 = o_p.to(tl.int64)

    p_q_base = q + i_b * stride_qb + i_h * stride_qh
    p_do_base = do + i_b * stride_dob + i_h * stride_doh
    o_kd = o_p64[:, None] * D + o_d[None, :]
    b_k = tl.load(k_proj + i_bh.to(tl.int64) * KP * D + o_kd, mask=m_p[:, None], other=0.0)
    b_v = tl.load(v_proj + i_bh.to(tl.int64) * KP * D + o_kd, mask=m_p[:, None], other=0.0)

    b_dk = tl.zeros([BN, D], dtype=ACC)
    b_dv = tl.zeros([BN, D], dtype=ACC)
    i_first = i_s * CHUNK
    for i_m in range(i_first, tl.minimum(i_first + CHUNK, Nq), BM):
        o_m = i_m + o_m_tile
        m_m = o_m < Nq
        o_m64 = o_m.to(tl.int64)
        b_q = tl.load(p_q_base + o_m64[:, None] * stride_qn + o_d[None, :], mask=m_m[:, None], other=0.0)
        b_do = tl.load(p_do_base + o_m64[:, None] * stride_don + o_d[None, :], mask=m_m[:, None], other=0.0)
        b_m = tl.load(row_max + i_bh.to(tl.int64) * Nq + o_m, mask=m_m, other=0.0)
        b_l = tl.load(row_sum + i_bh.to(tl.int64) * Nq + o_m, mask=m_m, other=1.0)
        b_delta = tl.load(delta + i_bh.to(tl.int64) * Nq + o_m, mask=m_m, other=0.0)
        b_p, b_ds = _linformer_scores(b_q, b_do, b_k.to(b_q.dtype), b_v.to(b_q.dtype), b_m, b_l, b_delta,
                                      m_m[:, None] & m_p[None, :], scale_log2, DOT_PRECISION)
        # [BN, BM] @ [BM, D] -> [BN, D]
        b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=DOT_PRECISION)
        b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q, input_precision=DOT_PRECISION)

    o_part = ((i_bh.to(tl.int64) * SPLITS + i_s) * KP + o_p64)[:, None] * D + o_d[None, :]
    tl.store(dk_part + o_part, b_dk * scale, mask=m_p[:, None])
    tl.store(dv_part + o_part, b_dv, mask=m_p[:, None])


@triton.jit
def linformer_bwd_kernel_dq(
    q, do, k_proj, v_proj, row_max, row_sum, delta, dq,
    stride_qb, stride_qh, stride_qn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    H, Nq, KP, scale, scale_log2,
    DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr,
):
    i_m, i_bh = _tile_and_batch_head(Nq, BM)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)

    o_m = i_m * BM + tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    o_d = tl.arange(0, D)
    m_m = o_m < Nq
    o_m64 = o_m.to(tl.int64)

    b_q = tl.load(q + i_b * stride_qb + i_h * stride_qh + o_m64[:, None] * stride_qn + o_d[None, :],
                  mask=m_m[:, None], other=0.0)
    b_do = tl.load(do + i_b * stride_dob + i_h * stride_doh + o_m64[:, None] * stride_don + o_d[None, :],
                   mask=m_m[:, None], other=0.0)
    b_m = tl.load(row_max + i_bh.to(tl.int64) * Nq + o_m, mask=m_m, other=0.0)
    b_l = tl.load(row_sum + i_bh.to(tl.int64) * Nq + o_m, mask=m_m, other=1.0)
    b_delta = tl.load(delta + i_bh.to(tl.int64) * Nq + o_m, mask=m_m, other=0.0)
    p_kp_base = k_proj + i_bh.to(tl.int64) * KP * D
    p_vp_base = v_proj + i_bh.to(tl.int64) * KP * D

    b_dq = tl.zeros([BM, D], dtype=ACC)
    for i_n in range(0, KP, BN):
        o_p = i_n + o_n
        m_p = o_p < KP
        o_kd = o_p.to(tl.int64)[:, None] * D + o_d[None, :]
        b_k = tl.load(p_kp_base + o_kd, mask=m_p[:, None], other=0.0).to(b_q.dtype)
        b_v = tl.load(p_vp_base + o_kd, mask=m_p[:, None], other=0.0).to(b_q.dtype)
        _, b_ds = _linformer_scores(b_q, b_do, b_k, b_v, b_m, b_l, b_delta, m_m[:, None] & m_p[None, :], scale_log2,
                                    DOT_PRECISION)
        # [BM, BN] @ [BN, D] -> [BM, D]
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)

    p_dq = dq + i_b * stride_dqb + i_h * stride_dqh + o_m64[:, None] * stride_dqn + o_d[None, :]
    tl.store(p_dq, (b_dq * scale).to(dq.dtype.element_ty), mask=m_m[:, None])


@triton.jit
def linformer_bwd_kernel_dkdv(
    dk_proj, dv_proj, proj_k, proj_v, dk, dv, key_padding_mask,
    stride_pkh, stride_pkp, stride_pkn,
    stride_pvh, stride_pvp, stride_pvn,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_pad_b,
    HKV, GROUP, Nk, KP,
    HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BP: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr,
):
    i_n, i_bh = _tile_and_batch_head(Nk, BN)
    i_b, i_hkv = (i_bh // HKV).to(tl.int64), (i_bh % HKV).to(tl.int64)

    o_k = i_n * BN + tl.arange(0, BN)
    o_p_tile = tl.arange(0, BP)
    o_d = tl.arange(0, D)
    m_k = o_k < Nk
    m_kv = m_k
    if HAS_PADDING:
        b_pad = tl.load(key_padding_mask + i_b * stride_pad_b + o_k, mask=m_k, other=1)
        m_kv = m_k & (b_pad == 0)
    o_k64 = o_k.to(tl.int64)

    b_dk = tl.zeros([BN, D], dtype=ACC)
    b_dv = tl.zeros([BN, D], dtype=ACC)
    # The query heads of this kv head, in order: the group sum is deterministic.
    for i_g in range(0, GROUP):
        i_h = i_hkv * GROUP + i_g
        i_bh_q = i_b * HKV * GROUP + i_h
        for i_p in range(0, KP, BP):
            o_p = i_p + o_p_tile
            m_p = o_p < KP
            o_p64 = o_p.to(tl.int64)
            m_pk = m_p[:, None] & m_k[None, :]
            b_pk = tl.load(proj_k + i_h * stride_pkh + o_p64[:, None] * stride_pkp + o_k64[None, :] * stride_pkn,
                           mask=m_pk, other=0.0)
            b_pv = tl.load(proj_v + i_h * stride_pvh + o_p64[:, None] * stride_pvp + o_k64[None, :] * stride_pvn,
                           mask=m_pk, other=0.0)
            o_kd = (i_bh_q * KP + o_p64)[:, None] * D + o_d[None, :]
            b_dkp = tl.load(dk_proj + o_kd, mask=m_p[:, None], other=0.0).to(b_pk.dtype)
            b_dvp = tl.load(dv_proj + o_kd, mask=m_p[:, None], other=0.0).to(b_pv.dtype)
            # [BN, BP] @ [BP, D] -> [BN, D]
            b_dk += tl.dot(tl.trans(b_pk), b_dkp, input_precision=DOT_PRECISION)
            b_dv += tl.dot(tl.trans(b_pv), b_dvp, input_precision=DOT_PRECISION)

    # Padded keys were read as zeros: they get no gradient.
    b_dk = tl.where(m_kv[:, None], b_dk, 0.0)
    b_dv = tl.where(m_kv[:, None], b_dv, 0.0)
    p_dk = dk + i_b * stride_dkb + i_hkv * stride_dkh + o_k64[:, None] * stride_dkn + o_d[None, :]
    p_dv = dv + i_b * stride_dvb + i_hkv * stride_dvh + o_k64[:, None] * stride_dvn + o_d[None, :]
    tl.store(p_dk, b_dk.to(dk.dtype.element_ty), mask=m_k[:, None])
    tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_k[:, None])


@triton.jit
def linformer_bwd_kernel_dproj(
    x, dx_proj, dproj, key_padding_mask,
    stride_xb, stride_xh, stride_xn,
    stride_dph, stride_dpp,
    stride_pad_b,
    B, H, GROUP, Nk, KP, HEADS_PER_PROGRAM,
    HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BP: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr,
):
    i_n, i_p, i_hp = tl.program_id(0), tl.program_id(1), tl.program_id(2)

    o_k = i_n * BN + tl.arange(0, BN)
    o_p = i_p * BP + tl.arange(0, BP)
    o_d = tl.arange(0, D)
    m_k = o_k < Nk
    m_p = o_p < KP
    o_k64 = o_k.to(tl.int64)
    o_p64 = o_p.to(tl.int64)

    b_dp = tl.zeros([BP, BN], dtype=ACC)
    # A per-head projection (HEADS_PER_PROGRAM = 1) sums over the batch, a shared one over the batch and
    # every head, in a fixed order.
    # Pointers advance by one batch per iteration (64-bit pointer arithmetic, no int32 products).
    p_x_batch = x
    p_pad_batch = key_padding_mask
    for i_b in range(0, B):
        m_kv = m_k
        if HAS_PADDING:
            b_pad = tl.load(p_pad_batch + o_k, mask=m_k, other=1)
            m_kv = m_k & (b_pad == 0)
        for i_j in range(0, HEADS_PER_PROGRAM):
            i_h = (i_hp * HEADS_PER_PROGRAM + i_j).to(tl.int64)
            p_x = p_x_batch + (i_h // GROUP) * stride_xh
            b_x = tl.load(p_x + o_k64[:, None] * stride_xn + o_d[None, :], mask=m_kv[:, None], other=0.0)
            o_pd = ((i_b * H + i_h) * KP + o_p64)[:, None] * D + o_d[None, :]
            b_dxp = tl.load(dx_proj + o_pd, mask=m_p[:, None], other=0.0).to(b_x.dtype)
            # [BP, D] @ [D, BN] -> [BP, BN]
            b_dp += tl.dot(b_dxp, tl.trans(b_x), input_precision=DOT_PRECISION)
        p_x_batch += stride_xb
        p_pad_batch += stride_pad_b

    p_dp = dproj + i_hp.to(tl.int64) * stride_dph + o_p64[:, None] * stride_dpp + o_k64[None, :]
    tl.store(p_dp, b_dp.to(dproj.dtype.element_ty), mask=m_p[:, None] & m_k[None, :])


def _tiles(kp: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Query tile BM, projected-key tile BN (>= 16 for tl.dot, at most kp rounded up), key tile BK of the
    kernels that walk the sequence of K and V, and launch options.

    Sized so that ptxas (Triton 3.6, sm_80 and sm_90; ``make gpu-static-check``) reports no register spills.
    """
    tile_n = max(16, min(64, triton.next_power_of_2(kp)))
    if dtype in (torch.float32, torch.float64):
        # IEEE float32/float64 dots run on the FMA units and need far more registers than tensor cores.
        return {"BM": 32 if head_dim <= 64 else 16, "BN": min(tile_n, 32 if head_dim <= 64 else 16), "BK": 32,
                "num_warps": 8, "num_stages": 2, "dkdv_warps": 8}
    tile_m = 128 if head_dim <= 64 else 64
    # dK/dV walks 32-key tiles: at D = 64 ptxas caps it below 128 registers and spills on 8 warps.
    return {"BM": tile_m, "BN": tile_n, "BK": 32, "num_warps": 8 if tile_m * head_dim >= 128 * 64 else 4,
            "num_stages": 2, "dkdv_warps": 4 if head_dim <= 64 else 8}


def _attention_tiles(tiles: dict) -> dict:
    """The tiles and options of the kernels that walk the projected keys (all but BK and dK/dV's warps)."""
    return {name: value for name, value in tiles.items() if name not in ("BK", "dkdv_warps")}


def _in_input_dtype(k_proj: Tensor, v_proj: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """K' and V' (saved in the accumulation dtype) in q's dtype for the attention kernels: the dots take
    them in that dtype anyway, and loading them without a conversion lets the pipeliner stage them in
    shared memory. Every kernel reads the same copies, so the scores are recomputed bit for bit."""
    return k_proj.to(q.dtype), v_proj.to(q.dtype)


def _split(length: int, tile: int, programs_per_split: int) -> tuple[int, int]:
    """(rows per split, splits) of a sum over ``length`` rows walked in ``tile``s: about TARGET_PROGRAMS programs."""
    tiles = triton.cdiv(length, tile)
    splits = max(1, min(tiles, TARGET_PROGRAMS // max(1, programs_per_split)))
    chunk = triton.cdiv(tiles, splits) * tile
    return chunk, triton.cdiv(length, chunk)


def _projection_strides(projection: Tensor) -> tuple[int, int, int]:
    """(head, row, column) strides of a (kp, N) or (H, kp, N) projection; head stride 0 when shared."""
    return (0 if projection.dim() == 2 else projection.stride(0)), projection.stride(-2), projection.stride(-1)


def _check_arguments(q: Tensor, k: Tensor, v: Tensor, proj_k: Tensor, proj_v: Tensor,
                     key_padding_mask: Tensor | None, scale: float) -> None:
    _check_qkv(q, k, v)
    batch, heads, query_len, head_dim = q.shape
    if query_len == 0 or k.shape[2] == 0:
        raise ValueError(f"q, k: expected non-empty sequences, got Nq={query_len} and Nk={k.shape[2]}")
    for name, projection in (("proj_k", proj_k), ("proj_v", proj_v)):
        if projection.dtype != q.dtype or projection.device != q.device:
            raise TypeError(f"{name}: expected dtype {q.dtype} on {q.device} (those of q), "
                            f"got {projection.dtype} on {projection.device}")
        if (projection.dim() not in (2, 3) or (projection.dim() == 3 and projection.shape[0] != heads)
                or projection.shape[-1] != k.shape[2] or projection.shape[-2] == 0):
            raise ValueError(f"{name}: expected shape (kp, {k.shape[2]}) or ({heads}, kp, {k.shape[2]}), "
                             f"got {tuple(projection.shape)}")
    if proj_v.shape[-2] != proj_k.shape[-2]:
        raise ValueError(f"proj_v: expected kp = {proj_k.shape[-2]} (that of proj_k), got shape {tuple(proj_v.shape)}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a positive finite float, got {scale}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool or key_padding_mask.device != q.device
                                         or tuple(key_padding_mask.shape) != (batch, k.shape[2])):
        raise ValueError(f"key_padding_mask: expected bool of shape ({batch}, {k.shape[2]}) on {q.device}, "
                         f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)} on {key_padding_mask.device}")


def _launch_flags(q: Tensor) -> dict:
    return {"DOT_PRECISION": _dot_precision(q.dtype), "D": q.shape[-1],
            "ACC": _TRITON_DTYPES[accumulation_dtype(q.dtype)]}


@torch.library.custom_op("fastattn::triton_linformer_fwd", mutates_args=())
def linformer_fwd(q: Tensor, k: Tensor, v: Tensor, proj_k: Tensor, proj_v: Tensor, key_padding_mask: Tensor | None,
                  scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Output (B, H, Nq, D); log2-sum-exp of the scores in log2 units (B, H, Nq); K' and V' (B, H, kp, D).

    The statistics are float32 (float64 for float64 inputs).
    """
    _check_arguments(q, k, v, proj_k, proj_v, key_padding_mask, scale)
    batch, heads, query_len, head_dim = q.shape
    key_len, kp = k.shape[2], proj_k.shape[-2]
    acc = accumulation_dtype(q.dtype)
    flags = _launch_flags(q)
    tiles = _tiles(kp, head_dim, q.dtype)
    padding, stride_pad_b = _padding_arguments(key_padding_mask, q)

    attention_tiles = _attention_tiles(tiles)
    kp_tiles = triton.cdiv(kp, tiles["BN"])
    chunk, splits = _split(key_len, tiles["BK"], kp_tiles * batch * heads)
    if splits > MAX_GRID_AXIS:
        raise ValueError(f"k: Nk={key_len} needs {splits} splits, more than a grid axis holds ({MAX_GRID_AXIS})")
    k_part = torch.empty((batch * heads, splits, kp, head_dim), dtype=acc, device=q.device)
    v_part = torch.empty_like(k_part)
    linformer_fwd_kernel_project[(batch * heads, kp_tiles, splits)](
        k, v, proj_k, proj_v, k_part, v_part, padding,
        *k.stride()[:3], *v.stride()[:3], *_projection_strides(proj_k), *_projection_strides(proj_v), stride_pad_b,
        heads, heads // k.shape[1], key_len, kp, chunk, splits,
        HAS_PADDING=key_padding_mask is not None, BP=tiles["BN"], BN=tiles["BK"], **flags,
        num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
    )
    # The splits added in a fixed order: deterministic.
    k_proj = k_part.sum(1).view(batch, heads, kp, head_dim)
    v_proj = v_part.sum(1).view(batch, heads, kp, head_dim)

    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output((batch, heads, query_len), acc, q.device)
    linformer_fwd_kernel[_grid(query_len, tiles["BM"], batch, heads)](
        q, *_in_input_dtype(k_proj, v_proj, q), out, lse, *q.stride()[:3], *out.stride()[:3],
        heads, query_len, kp, scale * LOG2E, **flags, **attention_tiles,
    )
    return out, lse, k_proj, v_proj


linformer_fwd.register_fake(linformer_fwd_fake)


@torch.library.custom_op("fastattn::triton_linformer_bwd", mutates_args=())
def linformer_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, proj_k: Tensor, proj_v: Tensor, out: Tensor,
                  lse: Tensor, k_proj: Tensor, v_proj: Tensor, key_padding_mask: Tensor | None,
                  scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of q, k, v, proj_k, proj_v; deterministic (partial sums added in a fixed order, no atomics)."""
    _check_arguments(q, k, v, proj_k, proj_v, key_padding_mask, scale)
    batch, heads, query_len, head_dim = q.shape
    kv_heads, key_len, kp = k.shape[1], k.shape[2], proj_k.shape[-2]
    acc = accumulation_dtype(q.dtype)
    projected_shape = (batch, heads, kp, head_dim)
    for name, tensor, shape in (("lse", lse, (batch, heads, query_len)), ("k_proj", k_proj, projected_shape),
                                ("v_proj", v_proj, projected_shape)):
        if tuple(tensor.shape) != shape or tensor.dtype != acc:
            raise ValueError(f"{name}: expected shape {shape} and dtype {acc}, got {tuple(tensor.shape)} and {tensor.dtype}")
    for name, tensor in (("grad_out", grad_out), ("out", out)):
        if tensor.shape != q.shape or tensor.dtype != q.dtype:
            raise ValueError(f"{name}: expected shape {tuple(q.shape)} and dtype {q.dtype}, "
                             f"got {tuple(tensor.shape)} and {tensor.dtype}")
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    out = out if out.stride(-1) == 1 else out.contiguous()
    lse, k_proj, v_proj = lse.contiguous(), k_proj.contiguous(), v_proj.contiguous()
    flags = _launch_flags(q)
    tiles = _tiles(kp, head_dim, q.dtype)
    padding, stride_pad_b = _padding_arguments(key_padding_mask, q)

    row_max, row_sum, delta = torch.empty((3, batch, heads, query_len), dtype=acc, device=q.device)
    attention_tiles = _attention_tiles(tiles)
    keys, values = _in_input_dtype(k_proj, v_proj, q)
    linformer_bwd_preprocess_kernel[_grid(query_len, tiles["BM"], batch, heads)](
        q, keys, out, grad_out, row_max, row_sum, delta, *q.stride()[:3], *out.stride()[:3],
        *grad_out.stride()[:3], heads, query_len, kp, scale * LOG2E, **flags, **attention_tiles,
    )
    kp_tiles = triton.cdiv(kp, tiles["BN"])
    chunk, splits = _split(query_len, tiles["BM"], kp_tiles * batch * heads)
    if splits > MAX_GRID_AXIS:
        raise ValueError(f"q: Nq={query_len} needs {splits} splits, more than a grid axis holds ({MAX_GRID_AXIS})")
    dk_part = torch.empty((batch * heads, splits, kp, head_dim), dtype=acc, device=q.device)
    dv_part = torch.empty_like(dk_part)
    linformer_bwd_kernel_dkvp[(batch * heads, kp_tiles, splits)](
        q, grad_out, keys, values, row_max, row_sum, delta, dk_part, dv_part, *q.stride()[:3], *grad_out.stride()[:3],
        heads, query_len, kp, chunk, splits, scale, scale * LOG2E, **flags, **attention_tiles,
    )
    dk_proj, dv_proj = dk_part.sum(1), dv_part.sum(1)

    grad_q = new_output(q.shape, q.dtype, q.device)
    linformer_bwd_kernel_dq[_grid(query_len, tiles["BM"], batch, heads)](
        q, grad_out, keys, values, row_max, row_sum, delta, grad_q, *q.stride()[:3], *grad_out.stride()[:3],
        *grad_q.stride()[:3], heads, query_len, kp, scale, scale * LOG2E, **flags, **attention_tiles,
    )

    grad_k = new_output(k.shape, k.dtype, k.device)
    grad_v = new_output(v.shape, v.dtype, v.device)
    key_tile = tiles["BK"]
    linformer_bwd_kernel_dkdv[_grid(key_len, key_tile, batch, kv_heads)](
        dk_proj, dv_proj, proj_k, proj_v, grad_k, grad_v, padding,
        *_projection_strides(proj_k), *_projection_strides(proj_v), *grad_k.stride()[:3], *grad_v.stride()[:3],
        stride_pad_b, kv_heads, heads // kv_heads, key_len, kp,
        HAS_PADDING=key_padding_mask is not None, BP=tiles["BN"], BN=key_tile, **flags,
        num_warps=tiles["dkdv_warps"], num_stages=tiles["num_stages"],
    )

    grads = []
    for x, dx_proj, projection in ((k, dk_proj, proj_k), (v, dv_proj, proj_v)):
        grad_projection = new_output(projection.shape, projection.dtype, projection.device)
        projection_heads = heads if projection.dim() == 3 else 1
        linformer_bwd_kernel_dproj[(triton.cdiv(key_len, key_tile), kp_tiles, projection_heads)](
            x, dx_proj, grad_projection, padding, *x.stride()[:3],
            grad_projection.stride(0) if projection.dim() == 3 else 0, grad_projection.stride(-2), stride_pad_b,
            batch, heads, heads // kv_heads, key_len, kp, heads // projection_heads,
            HAS_PADDING=key_padding_mask is not None, BP=tiles["BN"], BN=key_tile, **flags,
            num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
        )
        grads.append(grad_projection)
    return grad_q, grad_k, grad_v, grads[0], grads[1]


linformer_bwd.register_fake(linformer_bwd_fake)
linformer_fwd.register_autograd(backward_through(linformer_bwd), setup_context=setup_context)


def linformer_attention(q: Tensor, k: Tensor, v: Tensor, proj_k: Tensor, proj_v: Tensor, *,
                        key_padding_mask: Tensor | None, scale: float) -> Tensor:
    """Differentiable Linformer attention through the Triton kernels (the "triton" backend's call)."""
    out, _, _, _ = linformer_fwd(q, k, v, proj_k, proj_v, key_padding_mask, scale)
    return out


def static_check_variants():
    """The launches ``scripts/gpu_static_check.py`` compiles for sm_80 and sm_90: (label, launch, is_default).

    Registers grow with the head dim and the tile, so the check compiles every head dim in float16, and
    bfloat16 and float32 at the largest head dim (D = 128), with and without padding, with the largest
    projected-key tile (kp >= 64; ``_tiles``), plus the smallest tile (kp = 16) at D = 128: each variant
    costs about ten compiles per target, and CI's time budget is shared with the other mechanisms.
    ``launch()`` runs the forward and backward wrappers on small CPU tensors (B = H = 2, N = 256) whose
    sizes specialise the kernels as real calls do. Every variant is one the wrappers choose: all default.
    """
    cases = [(256, head_dim, torch.float16, padding) for head_dim in SUPPORTED_HEAD_DIMS for padding in (False, True)]
    cases += [(256, 128, dtype, padding) for dtype in (torch.bfloat16, torch.float32) for padding in (False, True)]
    cases += [(16, 128, dtype, True) for dtype in (torch.float16, torch.float32)]
    for kp, head_dim, dtype, padding in cases:
        label = f"kp{kp}-D{head_dim}-{str(dtype).replace('torch.', '')}{'-padding' if padding else ''}"
        yield label, _static_check_launch(kp, head_dim, dtype, padding), True


def _static_check_launch(kp: int, head_dim: int, dtype: torch.dtype, padding: bool):
    def launch():
        length = 256
        q = torch.zeros(2, 2, length, head_dim, dtype=dtype)
        projection = torch.zeros(kp, length, dtype=dtype)
        mask = torch.zeros(2, length, dtype=torch.bool) if padding else None
        out, lse, k_proj, v_proj = linformer_fwd(q, q, q, projection, projection, mask, head_dim ** -0.5)
        linformer_bwd(q, q, q, q, projection, projection, out, lse, k_proj, v_proj, mask, head_dim ** -0.5)
    return launch
