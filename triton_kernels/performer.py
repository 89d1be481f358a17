"""Performer attention in Triton: FAVOR+ ("softmax") or relu random features computed inside the kernels.

Features of a row x (scaled by sqrt(scale)) are logits l(x) = W x - |x|^2 / 2 (softmax) turned into
exp(logits - stabiliser), or relu(W x) + eps (relu), computed per (rows, feature tile) from the
projection W and never stored: no (N, m) feature matrix and no (N, m, D) prefix tensor exist. The
stabilisers are constants that cancel in the outputs (and are constants for autograd); a query's
|x|^2 / 2 cancels too, so it is left out of query logits. Exponentials that underflow give 0.

- Non-causal: each feature f has its own key stabiliser s_f, its largest logit over the unpadded keys,
  and query i the features exp(a_f - c_i) with a_f = (l_f(q_i) - max_g l_g(q_i)) + (s_f - max_g s_g)
  and c_i = max_f a_f (``_query_logits``). Features are at most 1; every key feature is 1 at some key
  and every query has a feature 1, so a normaliser is 0 (no unpadded key) or >= 1. One scalar key stabiliser
  (the max over keys and features) underflowed the normalisers at large |q|, |k|: a query's best
  features met keys far below that max (issue 10).
- Causal (as in csrc/cpu/performer.cpp): each feature f has a running key stabiliser
  s_f(j), its largest logit over the unpadded keys up to j, and M_j = max_f s_f(j). Query i weighs key
  j <= i through feature f by exp(A_if + (l_f(k_j) - M_i)) with A_if = (l_f(q_i) - max_g l_g(q_i)) - c_i
  and c_i = max_f [(l_f(q_i) - max_g l_g(q_i)) + (s_f(i) - M_i)] (``_query_exponent``): every weight is at
  most 1 and the best feature on the key that set s_f(i) weighs exactly 1, so a normaliser is 0 or >= 1,
  and a later key never changes an earlier output. Each key's largest logit M_j alone as its stabiliser
  underflowed the normalisers at large |q|, |k| as the scalar one did (issue 10).

Non-causal forward (``fastattn::triton_performer_fwd``):

- ``performer_fwd_kernel_key_max``: the key stabilisers s, one program per (feature tile, split of the
  keys, batch * head), each split writing its own maxima, then reduced (softmax only);
- ``performer_fwd_kernel_query_stabiliser``: max_g l_g(q) and c of every query (softmax only; the
  backward recomputes them);
- ``performer_fwd_kernel_state``: the (m, D + 1) state phi(K)^T [V | 1], one program per (feature tile,
  split of the keys, batch * head), each split writing its own partial sums, then added in a fixed order;
- ``performer_fwd_kernel``: outputs phi(Q) state[:, :D] / phi(Q) state[:, D], one program per query tile,
  walking the feature tiles; saves the normaliser (0 where a query sees no key; its output is 0).

Causal: ``performer_fwd_kernel_causal_key_max`` (one program per (feature tile, batch * head)) walks the
keys in chunks of BC = 16, carrying the running maxima s; it writes each tile's max of s_f(j) for every
key (reduced over the tiles to M) and s after every chunk. ``performer_fwd_kernel_causal_query_stabiliser``
(one program per chunk) continues s over its chunk for max_g l_g(q) and c of its queries. Every causal
pass recomputes these (softmax only). Then ``performer_fwd_kernel_causal``, ``performer_bwd_kernel_causal_dq``
/ ``_dkdv``: one program per (feature tile, batch * head) walks the chunks: the earlier chunks through a
running fp32 state sum_j exp(l_f(k_j) - sigma_f) [v_j | 1] (m tile, D + 1) held in registers, sigma the
maxima after its last chunk, which query i reads with exp(A_if + (sigma_f - M_i)); the current chunk's
pairs exactly, a (BC, BC, BF) block of weights (factoring them through the chunk's own maxima would let
a later key change an earlier row). Each program writes its feature tile's share of [numerator |
normaliser] (forward), of dlogits(Q) W (dq, forward over the chunks) or of [dV | dlogits(K) W | sum
dlogits(K)] (dk, dv: backward over the chunks with a suffix state of the later queries' weights times
[dnum | dden], against the maxima after the key's chunk); the shares are then added over feature tiles
(and over the query heads of a group) in a fixed order.

Non-causal backward: ``performer_bwd_kernel_dq`` (dphi(Q) = [dnum | dden] state^T), ``performer_bwd_kernel_dstate``
(d state = phi(Q)^T [dnum | dden], split like the state) and ``performer_bwd_kernel_dkdv`` (dV = phi(K) d state,
dphi(K) = [V | 1] d state^T), with dnum = dO / den and dden = -(dO . O) / den, written in scaled terms
that stay finite wherever the forward is (see ``_query_shares``). dK and dV sum the query heads of a
group (grouped-query attention) inside one program, in order: deterministic, no atomics.

Running sums and states are float32 (float64 for float64 inputs). The logits W x (and, causal, dO . v)
are products in the inputs' dtype; every other product of features, states or gradients takes float32
operands (tf32 for float16/bfloat16 inputs): a float16 feature far below its stabiliser would be
subnormal, and a state, which sums over every key, could overflow float16.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops.common import accumulation_dtype, new_output
from ..ops.performer import backward_through, performer_bwd_fake, performer_fwd_fake, setup_context
from ..reference import RELU_KERNEL_EPSILON
from .block_sparse import (SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, _TRITON_DTYPES, _check_qkv, _dot_precision, _grid,
                           _padding_arguments, _tile_and_batch_head)
from .linformer import MAX_GRID_AXIS, _split

__all__ = ["performer_attention", "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES", "KERNELS"]

KERNELS = ("softmax", "relu")
EPSILON = tl.constexpr(RELU_KERNEL_EPSILON)


@triton.jit
def _dot_nt(b_a, b_b, DOT_PRECISION: tl.constexpr):
    """a @ b^T for [rows, D] a and [cols, D] b: a contraction over the head dim.

    At D = 128 the causal dK/dV kernel spills (ptxas, sm_80 and sm_90), most in float32 whose IEEE dots
    run on the FMA units with whole rows of both operands in each thread's registers, so the
    contraction is split into two dots over the even and the odd columns.
    """
    if b_a.shape[1] >= 128:
        b_a_even, b_a_odd = tl.split(tl.reshape(b_a, [b_a.shape[0], b_a.shape[1] // 2, 2]))
        b_b_even, b_b_odd = tl.split(tl.reshape(b_b, [b_b.shape[0], b_b.shape[1] // 2, 2]))
        b_even = tl.dot(b_a_even, tl.trans(b_b_even), input_precision=DOT_PRECISION)
        return tl.dot(b_a_odd, tl.trans(b_b_odd), acc=b_even, input_precision=DOT_PRECISION)
    return tl.dot(b_a, tl.trans(b_b), input_precision=DOT_PRECISION)


@triton.jit
def _logits(b_x, p_w_base, o_f, m_f, stride_wm, o_d, sqrt_scale, DOT_PRECISION: tl.constexpr):
    """W x for a [rows, D] tile x and the feature tile o_f: [rows, BF], x scaled by sqrt(scale)."""
    b_w = tl.load(p_w_base + o_f.to(tl.int64)[:, None] * stride_wm + o_d[None, :], mask=m_f[:, None], other=0.0)
    # [rows, D] @ [D, BF] -> [rows, BF]
    return tl.dot(b_x, tl.trans(b_w), input_precision=DOT_PRECISION) * sqrt_scale


@triton.jit
def _features(b_wx, b_shift, m_rows, m_f, SOFTMAX: tl.constexpr):
    """phi = exp(logits - shift) (softmax; logits already hold any -|x|^2 / 2) or relu(W x) + eps; 0 off the mask.

    The shift broadcasts against the [rows, BF] logits: [rows, 1] (a stabiliser per row) or [1, BF] (per feature).
    """
    m_rf = m_rows[:, None] & m_f[None, :]
    if SOFTMAX:
        # A masked row may have shift -inf or +inf: its exponent is replaced before exp, never NaN.
        b_phi = tl.exp(tl.where(m_rf, b_wx - b_shift, float("-inf")))
    else:
        # l <= 0, not a maximum: relu(NaN) is NaN (as torch's), and PTX's max would drop it.
        b_phi = tl.where(m_rf, tl.where(b_wx <= 0, 0.0, b_wx) + EPSILON, 0.0)
    return b_phi


@triton.jit
def _half_norm(b_x, scale, ACC: tl.constexpr):
    """|x|^2 / 2 of each row of x scaled by sqrt(scale), in the accumulation dtype.

    Summed in float64 for float32 inputs: |x|^2 / 2 is large next to the spread of the logits, and its
    rounding becomes a relative error of every feature of the key (several times the float32
    reference's at std 4). float16/bfloat16 inputs keep float32, well inside their tolerance.
    """
    if ACC == tl.float32 and b_x.dtype == tl.float32:
        b_xf = b_x.to(tl.float64)
        b_half_norm = (0.5 * scale * tl.sum(b_xf * b_xf, 1)).to(ACC)
    else:
        b_xf = b_x.to(ACC)
        b_half_norm = 0.5 * scale * tl.sum(b_xf * b_xf, 1)
    return b_half_norm


@triton.jit
def _largest_logit(b_x, p_w_base, M, stride_wm, o_d, sqrt_scale,
                   DOT_PRECISION: tl.constexpr, BN: tl.constexpr, BF: tl.constexpr, ACC: tl.constexpr):
    """max over the features of W x, for each row of a [BN, D] tile x (without -|x|^2 / 2)."""
    b_max = tl.full([BN], float("-inf"), dtype=ACC)
    for i_f in range(0, M, BF):
        o_f = i_f + tl.arange(0, BF)
        m_f = o_f < M
        b_wx = _logits(b_x, p_w_base, o_f, m_f, stride_wm, o_d, sqrt_scale, DOT_PRECISION)
        b_max = tl.maximum(b_max, tl.max(tl.where(m_f[None, :], b_wx, float("-inf")), 1))
    return b_max


@triton.jit
def _query_logits(b_wx, b_query_max, b_key_shift, SOFTMAX: tl.constexpr):
    """Non-causal softmax: a = (W q - max W q) + (s - max s), the query features' exponents before their
    stabiliser c = max a; W q itself for relu. b_key_shift is s - max s of the feature tile.

    Each difference is of two close large numbers (|x|^2 / 2 is hundreds at std 16), so it is nearly
    exact; W q + s added first would round at their magnitude and fail the tolerance rule. The query's
    -|q|^2 / 2 cancels in the first difference, so W q is used.
    """
    if SOFTMAX:
        return (b_wx - b_query_max[:, None]) + b_key_shift[None, :]
    return b_wx


@triton.jit
def performer_fwd_kernel_key_max(
    k, w, key_padding_mask, key_max_part,
    stride_kb, stride_kh, stride_kn,
    stride_wh, stride_wm,
    stride_pad_b,
    H, GROUP, Nk, M, CHUNK, SPLITS, sqrt_scale, scale,
    HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BN: tl.constexpr, BF: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr,
):
    """Non-causal softmax: the largest logit W k - |k|^2 / 2 of each feature over one split of the unpadded keys.

    The logits are computed as ``performer_fwd_kernel_state`` computes them (same tiles), so that the key
    reaching a feature's maximum has the feature exp(0) = 1 there.
    """
    i_bh, i_f, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_f = i_f * BF + tl.arange(0, BF)
    o_n_tile = tl.arange(0, BN)
    o_d = tl.arange(0, D)
    m_f = o_f < M
    p_k_base = k + i_b * stride_kb + (i_h // GROUP) * stride_kh
    p_w_base = w + i_h * stride_wh

    b_max = tl.full([BF], float("-inf"), dtype=ACC)
    i_first = i_s * CHUNK
    for i_n in range(i_first, tl.minimum(i_first + CHUNK, Nk), BN):
        o_n = i_n + o_n_tile
        m_n = o_n < Nk
        if HAS_PADDING:
            b_pad = tl.load(key_padding_mask + i_b * stride_pad_b + o_n, mask=m_n, other=1)
            m_n = m_n & (b_pad == 0)
        b_k = tl.load(p_k_base + o_n.to(tl.int64)[:, None] * stride_kn + o_d[None, :], mask=m_n[:, None], other=0.0)
        b_logits = _logits(b_k, p_w_base, o_f, m_f, stride_wm, o_d, sqrt_scale, DOT_PRECISION)
        b_logits = b_logits - _half_norm(b_k, scale, ACC)[:, None]
        b_max = tl.maximum(b_max, tl.max(tl.where(m_n[:, None], b_logits, float("-inf")), 0))
    tl.store(key_max_part + (i_bh.to(tl.int64) * SPLITS + i_s) * M + o_f, b_max, mask=m_f)


@triton.jit
def performer_fwd_kernel_query_stabiliser(
    q, w, key_shift, query_max, query_stabiliser,
    stride_qb, stride_qh, stride_qn,
    stride_wh, stride_wm,
    H, Nq, M, sqrt_scale,
    DOT_PRECISION: tl.constexpr, BN: tl.constexpr, BF: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr,
):
    """Non-causal softmax: max W q and the stabiliser c = max a (``_query_logits``) of each query.

    a needs max W q over every feature first, so the feature tiles are walked twice.
    """
    i_n, i_bh = _tile_and_batch_head(Nq, BN)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    o_d = tl.arange(0, D)
    m_n = o_n < Nq
    b_q = tl.load(q + i_b * stride_qb + i_h * stride_qh + o_n.to(tl.int64)[:, None] * stride_qn + o_d[None, :],
                  mask=m_n[:, None], other=0.0)
    p_w_base = w + i_h * stride_wh
    b_query_max = _largest_logit(b_q, p_w_base, M, stride_wm, o_d, sqrt_scale, DOT_PRECISION, BN, BF, ACC)

    b_c = tl.full([BN], float("-inf"), dtype=ACC)
    for i_f in range(0, M, BF):
        o_f = i_f + tl.arange(0, BF)
        m_f = o_f < M
        b_key_shift = tl.load(key_shift + i_bh.to(tl.int64) * M + o_f, mask=m_f, other=0.0)
        b_a = _query_logits(_logits(b_q, p_w_base, o_f, m_f, stride_wm, o_d, sqrt_scale, DOT_PRECISION), b_query_max,
                            b_key_shift, True)
        b_c = tl.maximum(b_c, tl.max(tl.where(m_f[None, :], b_a, float("-inf")), 1))
    tl.store(query_max + i_bh.to(tl.int64) * Nq + o_n, b_query_max, mask=m_n)
    tl.store(query_stabiliser + i_bh.to(tl.int64) * Nq + o_n, b_c, mask=m_n)


@triton.jit
def performer_fwd_kernel_state(
    k, v, w, key_stabiliser, key_padding_mask, state_part,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_wh, stride_wm,
    stride_pad_b,
    H, GROUP, Nk, M, CHUNK, SPLITS, sqrt_scale, scale,
    SOFTMAX: tl.constexpr, HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BN: tl.constexpr, BF: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr,
):
    i_bh, i_f, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    i_hkv = i_h // GROUP

    o_f = i_f * BF + tl.arange(0, BF)
    o_n_tile = tl.arange(0, BN)
    o_d = tl.arange(0, D)
    m_f = o_f < M
    p_k_base = k + i_b * stride_kb + i_hkv * stride_kh
    p_v_base = v + i_b * stride_vb + i_hkv * stride_vh
    p_w_base = w + i_h * stride_wh
    b_stab = tl.load(key_stabiliser + i_bh.to(tl.int64) * M + o_f, mask=m_f, other=0.0)

    b_num = tl.zeros([BF, D], dtype=ACC)
    b_den = tl.zeros([BF], dtype=ACC)
    i_first = i_s * CHUNK
    for i_n in range(i_first, tl.minimum(i_first + CHUNK, Nk), BN):
        o_n = i_n + o_n_tile
        m_n = o_n < Nk
        if HAS_PADDING:
            b_pad = tl.load(key_padding_mask + i_b * stride_pad_b + o_n, mask=m_n, other=1)
            m_n = m_n & (b_pad == 0)
        o_n64 = o_n.to(tl.int64)
        b_k = tl.load(p_k_base + o_n64[:, None] * stride_kn + o_d[None, :], mask=m_n[:, None], other=0.0)
        b_v = tl.load(p_v_base + o_n64[:, None] * stride_vn + o_d[None, :], mask=m_n[:, None], other=0.0)
        b_wx = _logits(b_k, p_w_base, o_f, m_f, stride_wm, o_d, sqrt_scale, DOT_PRECISION)
        if SOFTMAX:
            b_wx = b_wx - _half_norm(b_k, scale, ACC)[:, None]
        b_phi = _features(b_wx, b_stab[None, :], m_n, m_f, SOFTMAX)
        # [BF, BN] @ [BN, D] -> [BF, D]
        b_num += tl.dot(tl.trans(b_phi), b_v.to(ACC), input_precision=DOT_PRECISION)
        b_den += tl.sum(b_phi, 0)

    p_part = state_part + ((i_bh.to(tl.int64) * SPLITS + i_s) * M + o_f.to(tl.int64)) * (D + 1)
    tl.store(p_part[:, None] + o_d[None, :], b_num, mask=m_f[:, None])
    tl.store(p_part + D, b_den, mask=m_f)


@triton.jit
def _query_rows(p_q_base, query_max, query_stabiliser, i_bh, o_m, o_d, stride_qn, Nq):
    """Rows o_m of one head's q (zeros past Nq), with each row's largest logit and stabiliser c."""
    m_m = o_m < Nq
    b_q = tl.load(p_q_base + o_m.to(tl.int64)[:, None] * stride_qn + o_d[None, :], mask=m_m[:, None], other=0.0)
    p_rows = i_bh.to(tl.int64) * Nq + o_m
    b_query_max = tl.load(query_max + p_rows, mask=m_m, other=0.0)
    return b_q, b_query_max, tl.load(query_stabiliser + p_rows, mask=m_m, other=0.0)


@triton.jit
def performer_fwd_kernel(
    q, w, query_max, query_stabiliser, key_shift, state, o, normaliser,
    stride_qb, stride_qh, stride_qn,
    stride_wh, stride_wm,
    stride_ob, stride_oh, stride_on,
    H, Nq, M, sqrt_scale,
    SOFTMAX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BF: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr,
):
    i_m, i_bh = _tile_and_batch_head(Nq, BM)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, D)
    m_m = o_m < Nq
    o_m64 = o_m.to(tl.int64)
    b_q, b_query_max, b_c = _query_rows(q + i_b * stride_qb + i_h * stride_qh, query_max, query_stabiliser, i_bh,
                                        o_m, o_d, stride_qn, Nq)
    p_w_base = w + i_h * stride_wh
    p_state_base = state + i_bh.to(tl.int64) * M * (D + 1)

    b_num = tl.zeros([BM, D], dtype=ACC)
    b_den = tl.zeros([BM], dtype=ACC)
    n_key_features = 0  # features of the state's normaliser column that are not 0
    for i_f in range(0, M, BF):
        o_f = i_f + tl.arange(0, BF)
        m_f = o_f < M
        b_key_shift = tl.load(key_shift + i_bh.to(tl.int64) * M + o_f, mask=m_f, other=0.0)
        b_logits = _query_logits(_logits(b_q, p_w_base, o_f, m_f, stride_wm, o_d, sqrt_scale, DOT_PRECISION),
                                 b_query_max, b_key_shift, SOFTMAX)
        b_phi = _features(b_logits, b_c[:, None], m_m, m_f, SOFTMAX)
        p_state = p_state_base + o_f.to(tl.int64) * (D + 1)
        b_s_num = tl.load(p_state[:, None] + o_d[None, :], mask=m_f[:, None], other=0.0)
        b_s_den = tl.load(p_state + D, mask=m_f, other=0.0)
        # [BM, BF] @ [BF, D] -> [BM, D]
        b_num += tl.dot(b_phi, b_s_num, input_precision=DOT_PRECISION)
        b_den += tl.sum(b_phi * b_s_den[None, :], 1)
        n_key_features += tl.sum((b_s_den != 0).to(tl.int32), 0)

    # Every unpadded key adds to the state's normaliser column (softmax: 1 in the features its logits peak at;
    # relu: eps at least), so a state without keys has it all 0: its queries see no key, and give 0 and
    # normaliser 0 whatever they hold (a NaN query would make phi(q) . 0 NaN). Any other normaliser is >= 1
    # (softmax) or >= m eps^2 (relu), or NaN (an input's), which reaches the output.
    b_den = tl.where(n_key_features > 0, b_den, 0.0)
    m_seen = b_den != 0
    b_o = tl.where(m_seen[:, None], b_num / tl.where(m_seen, b_den, 1.0)[:, None], 0.0)
    p_o = o + i_b * stride_ob + i_h * stride_oh + o_m64[:, None] * stride_on + o_d[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_m[:, None])
    tl.store(normaliser + i_bh.to(tl.int64) * Nq + o_m, b_den, mask=m_m)


@triton.jit
def _query_shares(b_logits, b_c, b_den, b_s_den, m_m, m_f, SOFTMAX: tl.constexpr):
    """a[i, f] = phi_q[i, f] state_den[f] / den[i]: the share of feature f in query i's normaliser, in [0, 1].

    b_logits and b_c are those of ``_query_logits`` and ``performer_fwd_kernel_query_stabiliser``. The
    non-causal backward is written in these shares (and in states scaled by state_den) so that no
    intermediate exceeds the gradients themselves: (phi_q state_den) / den never overflows, den >=
    phi_q state_den. 0 for rows that see no key and for features no key reaches.
    """
    m_seen = m_m & (b_den != 0)
    m_share = m_seen[:, None] & (m_f & (b_s_den > 0))[None, :]
    b_phi = _features(b_logits, b_c[:, None], m_seen, m_f, SOFTMAX)
    return tl.where(m_share, (b_phi * b_s_den[None, :]) / tl.where(m_seen, b_den, 1.0)[:, None], 0.0)


@triton.jit
def _query_grads(p_do, p_o, b_den, m_m):
    """dO of the rows that see a key (0 elsewhere) [rows, D] and dO . O [rows]: dnum = dO / den, dden = -(dO . O) / den."""
    m_seen = m_m & (b_den != 0)
    b_g = tl.load(p_do, mask=m_seen[:, None], other=0.0).to(b_den.dtype)
    b_o = tl.load(p_o, mask=m_seen[:, None], other=0.0).to(b_den.dtype)
    return b_g, tl.sum(b_g * b_o, 1)


@triton.jit
def performer_bwd_kernel_dq(
    q, w, query_max, query_stabiliser, key_shift, state, do, o, normaliser, dq,
    stride_qb, stride_qh, stride_qn,
    stride_wh, stride_wm,
    stride_ob, stride_oh, stride_on,
    stride_dqb, stride_dqh, stride_dqn,
    H, Nq, M, sqrt_scale,
    SOFTMAX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BF: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr,
):
    """dQ = sqrt(scale) dlogits W, with dphi = [dnum | dden] state^T.

    With the shares a = phi_q state_den / den and the state's mean values Vbar = state_num / state_den,
    dphi * phi = a (dO . Vbar - dO . O) (softmax); relu takes dphi = a / phi_q (...) where W x > 0. The
    query's -|x|^2 / 2 is a per-row constant of the logits: its gradient term, sqrt(scale) x sum(dlogits),
    is 0 in exact arithmetic (sum(dphi * phi) = dnum . num + dden den = 0), so it is left out. The
    stabilisers are constants.
    """
    i_m, i_bh = _tile_and_batch_head(Nq, BM)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, D)
    m_m = o_m < Nq
    o_m64 = o_m.to(tl.int64)
    b_q, b_query_max, b_c = _query_rows(q + i_b * stride_qb + i_h * stride_qh, query_max, query_stabiliser, i_bh,
                                        o_m, o_d, stride_qn, Nq)
    b_den = tl.load(normaliser + i_bh.to(tl.int64) * Nq + o_m, mask=m_m, other=0.0)
    o_row = i_b * stride_ob + i_h * stride_oh + o_m64[:, None] * stride_on + o_d[None, :]
    b_g, b_go = _query_grads(do + o_row, o + o_row, b_den, m_m)
    p_w_base = w + i_h * stride_wh
    p_state_base = state + i_bh.to(tl.int64) * M * (D + 1)

    b_dx = tl.zeros([BM, D], dtype=ACC)
    for i_f in range(0, M, BF):
        o_f = i_f + tl.arange(0, BF)
        m_f = o_f < M
        b_key_shift = tl.load(key_shift + i_bh.to(tl.int64) * M + o_f, mask=m_f, other=0.0)
        b_logits = _query_logits(_logits(b_q, p_w_base, o_f, m_f, stride_wm, o_d, sqrt_scale, DOT_PRECISION),
                                 b_query_max, b_key_shift, SOFTMAX)
        p_state = p_state_base + o_f.to(tl.int64) * (D + 1)
        b_s_num = tl.load(p_state[:, None] + o_d[None, :], mask=m_f[:, None], other=0.0)
        b_s_den = tl.load(p_state + D, mask=m_f, other=0.0)
        b_share = _query_shares(b_logits, b_c, b_den, b_s_den, m_m, m_f, SOFTMAX)
        b_vbar = b_s_num / tl.where(b_s_den > 0, b_s_den, 1.0)[:, None]
        # [BM, D] @ [D, BF] -> [BM, BF]
        b_diff = tl.dot(b_g, tl.trans(b_vbar), input_precision=DOT_PRECISION) - b_go[:, None]
        if SOFTMAX:
            b_dlogit = b_share * b_diff
        else:
            # Rows that see no key (den 0) give 0, even with NaN logits.
            m_relu = (b_den != 0)[:, None] & ~(b_logits <= 0)
            b_dlogit = tl.where(m_relu, b_share / (b_logits + EPSILON) * b_diff, 0.0)
        b_w = tl.load(p_w_base + o_f.to(tl.int64)[:, None] * stride_wm + o_d[None, :], mask=m_f[:, None], other=0.0)
        # [BM, BF] @ [BF, D] -> [BM, D]
        b_dx += tl.dot(b_dlogit, b_w.to(ACC), input_precision=DOT_PRECISION)

    p_dq = dq + i_b * stride_dqb + i_h * stride_dqh + o_m64[:, None] * stride_dqn + o_d[None, :]
    tl.store(p_dq, (b_dx * sqrt_scale).to(dq.dtype.element_ty), mask=m_m[:, None])


@triton.jit
def performer_bwd_kernel_dstate(
    q, w, query_max, query_stabiliser, key_shift, state, do, o, normaliser, dstate_part,
    stride_qb, stride_qh, stride_qn,
    stride_wh, stride_wm,
    stride_ob, stride_oh, stride_on,
    H, Nq, M, CHUNK, SPLITS, sqrt_scale,
    SOFTMAX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BF: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr,
):
    """state_den * d state = sum of a [dO | -(dO . O)] over one split of the queries, for one feature tile."""
    i_bh, i_f, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_f = i_f * BF + tl.arange(0, BF)
    o_m_tile = tl.arange(0, BM)
    o_d = tl.arange(0, D)
    m_f = o_f < M
    p_w_base = w + i_h * stride_wh
    p_q_base = q + i_b * stride_qb + i_h * stride_qh
    b_s_den = tl.load(state + (i_bh.to(tl.int64) * M + o_f.to(tl.int64)) * (D + 1) + D, mask=m_f, other=0.0)
    b_key_shift = tl.load(key_shift + i_bh.to(tl.int64) * M + o_f, mask=m_f, other=0.0)

    b_dnum_state = tl.zeros([BF, D], dtype=ACC)
    b_dden_state = tl.zeros([BF], dtype=ACC)
    i_first = i_s * CHUNK
    for i_m in range(i_first, tl.minimum(i_first + CHUNK, Nq), BM):
        o_m = i_m + o_m_tile
        m_m = o_m < Nq
        o_m64 = o_m.to(tl.int64)
        b_q, b_query_max, b_c = _query_rows(p_q_base, query_max, query_stabiliser, i_bh, o_m, o_d, stride_qn, Nq)
        b_den = tl.load(normaliser + i_bh.to(tl.int64) * Nq + o_m, mask=m_m, other=0.0)
        o_row = i_b * stride_ob + i_h * stride_oh + o_m64[:, None] * stride_on + o_d[None, :]
        b_g, b_go = _query_grads(do + o_row, o + o_row, b_den, m_m)
        b_logits = _query_logits(_logits(b_q, p_w_base, o_f, m_f, stride_wm, o_d, sqrt_scale, DOT_PRECISION),
                                 b_query_max, b_key_shift, SOFTMAX)
        b_share = _query_shares(b_logits, b_c, b_den, b_s_den, m_m, m_f, SOFTMAX)
        # [BF, BM] @ [BM, D] -> [BF, D]
        b_dnum_state += tl.dot(tl.trans(b_share), b_g, input_precision=DOT_PRECISION)
        b_dden_state -= tl.sum(b_share * b_go[:, None], 0)

    p_part = dstate_part + ((i_bh.to(tl.int64) * SPLITS + i_s) * M + o_f.to(tl.int64)) * (D + 1)
    tl.store(p_part[:, None] + o_d[None, :], b_dnum_state, mask=m_f[:, None])
    tl.store(p_part + D, b_dden_state, mask=m_f)


@triton.jit
def performer_bwd_kernel_dkdv(
    k, v, w, key_stabiliser, state, dstate, dk, dv, key_padding_mask,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_wh, stride_wm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_pad_b,
    HKV, GROUP, Nk, M, sqrt_scale, scale,
    SOFTMAX: tl.constexpr, HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BN: tl.constexpr, BF: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr,
):
    """dV = phi(K) d state[:, :D] and dK through the feature map, summed over the query heads of the group.

    ``dstate`` is state_den * d state, so the keys take phi_k / state_den.
    """
    i_n, i_bh = _tile_and_batch_head(Nk, BN)
    i_b, i_hkv = (i_bh // HKV).to(tl.int64), (i_bh % HKV).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    o_d = tl.arange(0, D)
    m_n = o_n < Nk
    m_kv = m_n
    if HAS_PADDING:
        b_pad = tl.load(key_padding_mask + i_b * stride_pad_b + o_n, mask=m_n, other=1)
        m_kv = m_n & (b_pad == 0)
    o_n64 = o_n.to(tl.int64)
    b_k = tl.load(k + i_b * stride_kb + i_hkv * stride_kh + o_n64[:, None] * stride_kn + o_d[None, :],
                  mask=m_kv[:, None], other=0.0)
    b_v = tl.load(v + i_b * stride_vb + i_hkv * stride_vh + o_n64[:, None] * stride_vn + o_d[None, :],
                  mask=m_kv[:, None], other=0.0).to(ACC)
    b_half_norm = _half_norm(b_k, scale, ACC)

    b_dk = tl.zeros([BN, D], dtype=ACC)
    b_dv = tl.zeros([BN, D], dtype=ACC)
    b_dsum = tl.zeros([BN], dtype=ACC)
    for i_g in range(0, GROUP):
        i_h = i_hkv * GROUP + i_g
        i_bh_q = i_b * HKV * GROUP + i_h
        p_w_base = w + i_h * stride_wh
        for i_f in range(0, M, BF):
            o_f = i_f + tl.arange(0, BF)
            m_f = o_f < M
            b_stab = tl.load(key_stabiliser + i_bh_q * M + o_f, mask=m_f, other=0.0)
            o_state = (i_bh_q * M + o_f.to(tl.int64)) * (D + 1)
            b_s_den = tl.load(state + o_state + D, mask=m_f, other=0.0)
            b_ds_num = tl.load(dstate + o_state[:, None] + o_d[None, :], mask=m_f[:, None], other=0.0)
            b_ds_den = tl.load(dstate + o_state + D, mask=m_f, other=0.0)
            m_s = m_f & (b_s_den > 0)
            b_s_den = tl.where(m_s, b_s_den, 1.0)
            b_wx = _logits(b_k, p_w_base, o_f, m_f, stride_wm, o_d, sqrt_scale, DOT_PRECISION)
            if SOFTMAX:
                b_wx = b_wx - b_half_norm[:, None]
            # phi_k / state_den <= 1: state_den sums phi_k over the keys.
            b_phi = _features(b_wx, b_stab[None, :], m_kv, m_s, SOFTMAX) / b_s_den[None, :]
            # [BN, BF] @ [BF, D] -> [BN, D]
            b_dv += tl.dot(b_phi, b_ds_num, input_precision=DOT_PRECISION)
            # [BN, D] @ [D, BF] -> [BN, BF]
            b_dphi = tl.dot(b_v, tl.trans(b_ds_num), input_precision=DOT_PRECISION) + b_ds_den[None, :]
            if SOFTMAX:
                b_dlogit = b_dphi * b_phi
            else:
                b_dlogit = tl.where(m_kv[:, None] & m_s[None, :] & ~(b_wx <= 0), b_dphi / b_s_den[None, :], 0.0)
            b_w = tl.load(p_w_base + o_f.to(tl.int64)[:, None] * stride_wm + o_d[None, :], mask=m_f[:, None],
                          other=0.0)
            # [BN, BF] @ [BF, D] -> [BN, D]
            b_dk += tl.dot(b_dlogit, b_w.to(ACC), input_precision=DOT_PRECISION)
            b_dsum += tl.sum(b_dlogit, 1)

    # d logits / d x = sqrt(scale) (W - sqrt(scale) x) for softmax (the -|x|^2 / 2 term), sqrt(scale) W for relu.
    b_dk = b_dk * sqrt_scale
    if SOFTMAX:
        b_dk -= scale * b_dsum[:, None] * b_k.to(ACC)
    p_dk = dk + i_b * stride_dkb + i_hkv * stride_dkh + o_n64[:, None] * stride_dkn + o_d[None, :]
    p_dv = dv + i_b * stride_dvb + i_hkv * stride_dvh + o_n64[:, None] * stride_dvn + o_d[None, :]
    if HAS_PADDING:
        # Padded keys get 0: their features are 0, but a NaN query's makes the state's gradient NaN, and 0 * NaN is
        # NaN.
        b_dk = tl.where(m_kv[:, None], b_dk, 0.0)
        b_dv = tl.where(m_kv[:, None], b_dv, 0.0)
    tl.store(p_dk, b_dk.to(dk.dtype.element_ty), mask=m_n[:, None])
    tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_n[:, None])


@triton.jit
def _running_max(b_a, b_b):
    """The combine of ``tl.associative_scan`` for a running maximum down the keys of a chunk."""
    return tl.maximum(b_a, b_b)


@triton.jit
def _dot_nt_rows(p_a_rows, m_a, p_b_rows, m_b, DOT_PRECISION: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr):
    """a @ b^T of the [rows, D] a and [cols, D] b in memory, read in their own dtype: p_a_rows [rows, 1] and
    p_b_rows [cols, 1] point at each row's first column; rows off the masks m_a, m_b read 0.

    IEEE float32 dots run on the FMA units with whole rows of both operands in each thread, 2 D registers
    for the (16, 16) outputs of the causal kernels, which spilled: they walk the head dim in a loop of
    slices of 32 columns. Tensor-core dots take the whole tiles (sliced, the float16 dK/dV spilled on sm_90).
    """
    if DOT_PRECISION == "ieee" and D > 32:
        b_ab = tl.zeros([p_a_rows.shape[0], p_b_rows.shape[0]], dtype=ACC)
        for i_d in range(0, D, 32):
            o_d = i_d + tl.arange(0, 32)
            b_a = tl.load(p_a_rows + o_d[None, :], mask=m_a[:, None], other=0.0)
            b_b = tl.load(p_b_rows + o_d[None, :], mask=m_b[:, None], other=0.0)
            b_ab = tl.dot(b_a, tl.trans(b_b), acc=b_ab, input_precision=DOT_PRECISION)
    else:
        o_d = tl.arange(0, D)
        b_a = tl.load(p_a_rows + o_d[None, :], mask=m_a[:, None], other=0.0)
        b_b = tl.load(p_b_rows + o_d[None, :], mask=m_b[:, None], other=0.0)
        b_ab = tl.dot(b_a, tl.trans(b_b), input_precision=DOT_PRECISION)
    return b_ab


@triton.jit
def _causal_key_logits(k, w, key_padding_mask, i_c, i_b, i_h, i_hkv, o_f, m_f,
                       stride_kb, stride_kh, stride_kn, stride_wh, stride_wm, stride_pad_b, N, sqrt_scale, scale,
                       SOFTMAX: tl.constexpr, HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BC: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr):
    """The chunk's unpadded keys [BC] and their logits [BC, BF]: softmax W k - |k|^2 / 2, -inf for padded
    keys and features past m; relu W k.

    Every causal kernel computes them here, so that the running maxima are bit for bit the logits the
    weights take: the best weight of a query is exactly 1.
    """
    o_c = i_c + tl.arange(0, BC)
    o_d = tl.arange(0, D)
    m_kv = o_c < N
    if HAS_PADDING:
        b_pad = tl.load(key_padding_mask + i_b * stride_pad_b + o_c, mask=m_kv, other=1)
        m_kv = m_kv & (b_pad == 0)
    p_k_rows = k + i_b * stride_kb + i_hkv * stride_kh + o_c.to(tl.int64)[:, None] * stride_kn
    p_w_rows = w + i_h * stride_wh + o_f.to(tl.int64)[:, None] * stride_wm
    b_logits = _dot_nt_rows(p_k_rows, m_kv, p_w_rows, m_f, DOT_PRECISION, D, ACC) * sqrt_scale
    if SOFTMAX:
        b_k = tl.load(p_k_rows + o_d[None, :], mask=m_kv[:, None], other=0.0)
        b_logits = tl.where(m_kv[:, None] & m_f[None, :], b_logits - _half_norm(b_k, scale, ACC)[:, None],
                            float("-inf"))
    return m_kv, b_logits


@triton.jit
def performer_fwd_kernel_causal_key_max(
    k, w, key_padding_mask, key_max_part, chunk_max,
    stride_kb, stride_kh, stride_kn,
    stride_wh, stride_wm,
    stride_pad_b,
    H, GROUP, N, M, FEATURE_TILES, sqrt_scale, scale,
    HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BC: tl.constexpr, BF: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr,
):
    """Causal softmax: the running maxima s_f(j) of one feature tile, walking the keys in chunks of BC.

    Writes max_f s_f(j) over the tile for every key j (reduced over the tiles to M_j) and s_f after every
    chunk: chunk_max[c + 1] (chunk_max[0] is -inf, before any key), the stabilisers of the states.
    """
    i_bh, i_f = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_f = i_f * BF + tl.arange(0, BF)
    m_f = o_f < M
    p_chunk_max = chunk_max + i_bh.to(tl.int64) * (tl.cdiv(N, BC) + 1) * M + o_f
    p_part = key_max_part + (i_bh.to(tl.int64) * FEATURE_TILES + i_f) * N

    b_running = tl.full([BF], float("-inf"), dtype=ACC)
    tl.store(p_chunk_max, b_running, mask=m_f)
    for i_c in range(0, N, BC):
        _, b_logits = _causal_key_logits(k, w, key_padding_mask, i_c, i_b, i_h, i_h // GROUP, o_f, m_f,
                                         stride_kb, stride_kh, stride_kn, stride_wh, stride_wm, stride_pad_b, N,
                                         sqrt_scale, scale, True, HAS_PADDING, DOT_PRECISION, BC, D, ACC)
        b_prefix = tl.maximum(tl.associative_scan(b_logits, 0, _running_max), b_running[None, :])
        o_c = i_c + tl.arange(0, BC)
        tl.store(p_part + o_c, tl.max(b_prefix, 1), mask=o_c < N)
        b_running = tl.max(b_prefix, 0)
        tl.store(p_chunk_max + (i_c // BC + 1) * M, b_running, mask=m_f)


@triton.jit
def performer_fwd_kernel_causal_query_stabiliser(
    q, k, w, key_padding_mask, key_stabiliser, chunk_max, query_max, query_stabiliser,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_wh, stride_wm,
    stride_pad_b,
    H, GROUP, N, M, sqrt_scale, scale,
    HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BC: tl.constexpr, BF: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr,
):
    """Causal softmax: max W q and c_i = max_f [(W_f q_i - max W q_i) + (s_f(i) - M_i)] of one chunk's queries.

    s_f(i) continues the running maxima from the end of the previous chunk over the chunk's keys up to
    i. The feature tiles are walked twice: c needs max W q over every feature first. c is 0 where no
    key is seen (M_i = -inf).
    """
    i_n, i_bh = _tile_and_batch_head(N, BC)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    i_c = i_n * BC
    o_c = i_c + tl.arange(0, BC)
    o_d = tl.arange(0, D)
    m_c = o_c < N
    p_q_rows = q + i_b * stride_qb + i_h * stride_qh + o_c.to(tl.int64)[:, None] * stride_qn
    b_q = tl.load(p_q_rows + o_d[None, :], mask=m_c[:, None], other=0.0)
    p_w_base = w + i_h * stride_wh
    b_query_max = _largest_logit(b_q, p_w_base, M, stride_wm, o_d, sqrt_scale, DOT_PRECISION, BC, BF, ACC)
    b_stab = tl.load(key_stabiliser + i_bh.to(tl.int64) * N + o_c, mask=m_c, other=float("-inf"))
    m_seen = b_stab > float("-inf")
    p_chunk_max = chunk_max + (i_bh.to(tl.int64) * (tl.cdiv(N, BC) + 1) + i_n) * M

    b_c = tl.full([BC], float("-inf"), dtype=ACC)
    for i_f in range(0, M, BF):
        o_f = i_f + tl.arange(0, BF)
        m_f = o_f < M
        _, b_logits = _causal_key_logits(k, w, key_padding_mask, i_c, i_b, i_h, i_h // GROUP, o_f, m_f,
                                         stride_kb, stride_kh, stride_kn, stride_wh, stride_wm, stride_pad_b, N,
                                         sqrt_scale, scale, True, HAS_PADDING, DOT_PRECISION, BC, D, ACC)
        b_before = tl.load(p_chunk_max + o_f, mask=m_f, other=float("-inf"))
        b_prefix = tl.maximum(tl.associative_scan(b_logits, 0, _running_max), b_before[None, :])
        # As the causal passes compute W q (``_causal_chunk``), bit for bit.
        b_wx_q = _dot_nt_rows(p_q_rows, m_c, p_w_base + o_f.to(tl.int64)[:, None] * stride_wm, m_f, DOT_PRECISION, D,
                              ACC) * sqrt_scale
        m_gap = m_seen[:, None] & m_f[None, :]
        b_gap = tl.where(m_gap, _query_exponent(b_wx_q - b_query_max[:, None], b_prefix, b_stab[:, None], 0.0),
                         float("-inf"))
        b_c = tl.maximum(b_c, tl.max(b_gap, 1))
    tl.store(query_max + i_bh.to(tl.int64) * N + o_c, b_query_max, mask=m_c)
    tl.store(query_stabiliser + i_bh.to(tl.int64) * N + o_c, tl.where(m_seen, b_c, 0.0), mask=m_c)


@triton.jit
def _causal_chunk(q, k, v, w, query_max, query_stabiliser, key_stabiliser, chunk_max, key_padding_mask, i_c, i_b,
                  i_h, i_hkv, i_bh, o_f, m_f,
                  stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                  stride_wh, stride_wm, stride_pad_b, N, M, sqrt_scale, scale,
                  SOFTMAX: tl.constexpr, HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BC: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr):
    """One chunk of a causal pass, for one feature tile: positions, masks, v, logits and the weights
    that go through a state.

    Softmax: the logits W q - max W q and W k - |k|^2 / 2 (-inf where padded), query weights
    exp(A_if + (sigma_f - M_i)) on a state of the earlier chunks, sigma the running maxima before the
    chunk; key weights exp(l_f(k_j) - sigma'_f), sigma' those after it; and exp(sigma - sigma'), which
    moves a state from sigma to sigma' (both factors of a weight are <= 1). Also c and M (-inf where no
    key is seen) of the queries for ``_causal_pair_weights``, and the rows that see a key. relu: W q and
    W k, the features (0 for queries that see no key: M -inf) and no rescaling.
    """
    o_c = i_c + tl.arange(0, BC)
    o_d = tl.arange(0, D)
    m_c = o_c < N
    m_kv, b_wx_k = _causal_key_logits(k, w, key_padding_mask, i_c, i_b, i_h, i_hkv, o_f, m_f,
                                      stride_kb, stride_kh, stride_kn, stride_wh, stride_wm, stride_pad_b, N,
                                      sqrt_scale, scale, SOFTMAX, HAS_PADDING, DOT_PRECISION, BC, D, ACC)
    o_c64 = o_c.to(tl.int64)
    b_v = tl.load(v + i_b * stride_vb + i_hkv * stride_vh + o_c64[:, None] * stride_vn + o_d[None, :],
                  mask=m_kv[:, None], other=0.0).to(ACC)
    b_wx_q = _dot_nt_rows(q + i_b * stride_qb + i_h * stride_qh + o_c64[:, None] * stride_qn, m_c,
                          w + i_h * stride_wh + o_f.to(tl.int64)[:, None] * stride_wm, m_f, DOT_PRECISION, D,
                          ACC) * sqrt_scale
    b_stab = tl.load(key_stabiliser + i_bh.to(tl.int64) * N + o_c, mask=m_c, other=float("-inf"))
    m_seen = b_stab > float("-inf")
    if SOFTMAX:
        b_query_max = tl.load(query_max + i_bh.to(tl.int64) * N + o_c, mask=m_c, other=0.0)
        b_c = tl.load(query_stabiliser + i_bh.to(tl.int64) * N + o_c, mask=m_c, other=0.0)
        # A difference of two close large numbers, nearly exact.
        b_wx_q = b_wx_q - b_query_max[:, None]
        p_chunk_max = chunk_max + (i_bh.to(tl.int64) * (tl.cdiv(N, BC) + 1) + i_c // BC) * M + o_f
        b_before = tl.load(p_chunk_max, mask=m_f, other=float("-inf"))
        b_after = tl.load(p_chunk_max + M, mask=m_f, other=float("-inf"))
        m_rf = m_seen[:, None] & m_f[None, :]
        b_wq = tl.exp(tl.where(m_rf, _query_exponent(b_wx_q, b_before[None, :], b_stab[:, None], b_c[:, None]),
                               float("-inf")))
        b_wk = _features(b_wx_k, b_after[None, :], m_kv, m_f, SOFTMAX)
        # Equal maxima (-inf too: nothing summed yet) keep the state as it is.
        b_decay = tl.where(b_before == b_after, 1.0, tl.exp(b_before - b_after))
    else:
        b_c = tl.zeros([BC], dtype=ACC)
        b_wq = _features(b_wx_q, 0.0, m_seen, m_f, SOFTMAX)
        b_wk = _features(b_wx_k, 0.0, m_kv, m_f, SOFTMAX)
        b_decay = tl.full([o_f.shape[0]], 1.0, dtype=ACC)
    return o_c, m_c, m_kv, m_seen, b_v, b_wx_q, b_wx_k, b_c, b_stab, b_wq, b_wk, b_decay


@triton.jit
def _causal_mask(o_c, m_seen, m_kv):
    """Pairs of the chunk that may enter: key j <= query i, the query sees a key and j is not padded."""
    return (o_c[:, None] >= o_c[None, :]) & m_seen[:, None] & m_kv[None, :]


@triton.jit
def _chunk_output_grads(do, o, v, normaliser, i_b, i_h, i_hkv, i_bh, o_c, m_c, m_kv, m_pairs,
                        stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on, N,
                        DOT_PRECISION: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr):
    """For the chunk's queries: dO of the rows that see a key (0 elsewhere) [BC, D], dO . O [BC], the
    normalisers (1 where 0), and den_i g_ij = dO_i . v_j - dO_i . O_i of the chunk's pairs [BC (i), BC (j)],
    0 off m_pairs.

    dO . v takes the inputs in their own dtype (``_dot_nt_rows``), whose float16 and bfloat16 products are
    exact in the float32 sums.
    """
    b_den = tl.load(normaliser + i_bh.to(tl.int64) * N + o_c, mask=m_c, other=0.0)
    p_rows = i_b * stride_ob + i_h * stride_oh + o_c.to(tl.int64)[:, None] * stride_on
    o_d = tl.arange(0, D)
    b_g, b_go = _query_grads(do + p_rows + o_d[None, :], o + p_rows + o_d[None, :], b_den, m_c)
    p_v_rows = v + i_b * stride_vb + i_hkv * stride_vh + o_c.to(tl.int64)[:, None] * stride_vn
    b_gv = _dot_nt_rows(do + p_rows, m_c & (b_den != 0), p_v_rows, m_kv, DOT_PRECISION, D, ACC)
    return b_g, b_go, tl.where(b_den != 0, b_den, 1.0), tl.where(m_pairs, b_gv - b_go[:, None], 0.0)


@triton.jit
def _causal_pair_weights(b_wx_q, b_logits_k, b_c, b_stab, m_pairs, m_f, SUMMED: tl.constexpr):
    """Softmax: the weights exp(A_if + (l_f(k_j) - M_i)) <= 1 of the chunk's own pairs, 0 off the mask,
    with the axis the caller sums over first: [BF, BC (i), BC (j)] for SUMMED == "f", [BC (j), BC (i), BF]
    for "j".

    Each thread holds the block's first axis whole, so that sum stays in its registers and the operands
    without that axis take one register each instead of BC or BF (the causal dQ and dK/dV kernels spilled
    with the queries' axis first).

    Computed weight by weight: factoring them through the chunk's own maxima would let a later key of
    the chunk change an earlier row's weights, and underflow them.
    """
    if SUMMED == "f":
        b_wx_q = tl.trans(b_wx_q)[:, :, None]
        b_logits_k = tl.trans(b_logits_k)[:, None, :]
        b_stab, b_c = b_stab[None, :, None], b_c[None, :, None]
        m_weights = m_f[:, None, None] & m_pairs[None, :, :]
    else:
        b_wx_q, b_logits_k = b_wx_q[None, :, :], b_logits_k[:, None, :]
        b_stab, b_c = b_stab[None, :, None], b_c[None, :, None]
        m_weights = tl.trans(m_pairs)[:, :, None] & m_f[None, None, :]
    return tl.exp(tl.where(m_weights, _query_exponent(b_wx_q, b_logits_k, b_stab, b_c), float("-inf")))


@triton.jit
def _query_exponent(b_wx_q, b_key_logit, b_stab, b_c):
    """A_if + (l - M_i) = ((W_f q_i - max W q_i) + (l - M_i)) - c_i for a key logit or running maximum l.

    Summed in the order c_i was (``performer_fwd_kernel_causal_query_stabiliser``), so that query i's best
    feature on the key that set its running maximum has exponent exactly 0: its normaliser is >= 1.
    """
    return (b_wx_q + (b_key_logit - b_stab)) - b_c


@triton.jit
def performer_fwd_kernel_causal(
    q, k, v, w, query_max, query_stabiliser, key_stabiliser, chunk_max, key_padding_mask, numden_part, state,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_wh, stride_wm,
    stride_pad_b,
    H, GROUP, N, M, FEATURE_TILES, sqrt_scale, scale,
    SOFTMAX: tl.constexpr, HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BC: tl.constexpr, BF: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr,
):
    """One feature tile's share of [numerator | normaliser] of every query, chunk by chunk in order.

    The running state sum_j exp(l_f(k_j) - sigma_f) [v_j | 1] of the earlier chunks is held in registers,
    sigma the running maxima after its last chunk; the current chunk's pairs are summed weight by
    weight. A key only ever reaches queries at or after it. The final state is written, against the
    running maxima after the last key.
    """
    i_bh, i_f = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    i_hkv = i_h // GROUP
    o_f = i_f * BF + tl.arange(0, BF)
    o_d = tl.arange(0, D)
    m_f = o_f < M

    b_state_num = tl.zeros([BF, D], dtype=ACC)
    b_state_den = tl.zeros([BF], dtype=ACC)
    p_part_base = numden_part + (i_bh.to(tl.int64) * FEATURE_TILES + i_f) * N * (D + 1)
    for i_c in range(0, N, BC):
        o_c, m_c, m_kv, m_seen, b_v, b_wx_q, b_wx_k, b_c, b_stab, b_wq, b_wk, b_decay = _causal_chunk(
            q, k, v, w, query_max, query_stabiliser, key_stabiliser, chunk_max, key_padding_mask, i_c, i_b, i_h,
            i_hkv, i_bh, o_f, m_f, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb,
            stride_vh, stride_vn, stride_wh, stride_wm, stride_pad_b, N, M, sqrt_scale, scale, SOFTMAX, HAS_PADDING,
            DOT_PRECISION, BC, D, ACC)
        m_pairs = _causal_mask(o_c, m_seen, m_kv)
        # The chunk's pairs: summed weights [BC (queries), BC (keys)].
        if SOFTMAX:
            b_s = tl.sum(_causal_pair_weights(b_wx_q, b_wx_k, b_c, b_stab, m_pairs, m_f, "f"), 0)
        else:
            # [BC, BF] @ [BF, BC] -> [BC, BC]
            b_s = tl.where(m_pairs, tl.dot(b_wq, tl.trans(b_wk), input_precision=DOT_PRECISION), 0.0)
        # [BC, BC] @ [BC, D] + [BC, BF] @ [BF, D] -> [BC, D]
        b_num = tl.dot(b_s, b_v, input_precision=DOT_PRECISION)
        b_num += tl.dot(b_wq, b_state_num, input_precision=DOT_PRECISION)
        b_den = tl.sum(b_s, 1) + tl.sum(b_wq * b_state_den[None, :], 1)
        p_part = p_part_base + o_c.to(tl.int64) * (D + 1)
        tl.store(p_part[:, None] + o_d[None, :], b_num, mask=m_c[:, None])
        tl.store(p_part + D, b_den, mask=m_c)

        # [BF, BC] @ [BC, D] -> [BF, D]
        b_state_num = b_state_num * b_decay[:, None] + tl.dot(tl.trans(b_wk), b_v, input_precision=DOT_PRECISION)
        b_state_den = b_state_den * b_decay + tl.sum(b_wk, 0)

    p_state = state + (i_bh.to(tl.int64) * M + o_f.to(tl.int64)) * (D + 1)
    tl.store(p_state[:, None] + o_d[None, :], b_state_num, mask=m_f[:, None])
    tl.store(p_state + D, b_state_den, mask=m_f)


@triton.jit
def performer_bwd_kernel_causal_dq(
    q, k, v, w, query_max, query_stabiliser, key_stabiliser, chunk_max, key_padding_mask, do, o, normaliser,
    dq_part,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_wh, stride_wm,
    stride_ob, stride_oh, stride_on,
    stride_pad_b,
    H, GROUP, N, M, FEATURE_TILES, sqrt_scale, scale,
    SOFTMAX: tl.constexpr, HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BC: tl.constexpr, BF: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr,
):
    """One feature tile's share of dlogits(Q) W, forward over the chunks with the running state.

    With G_i = [dO_i | -(dO_i . O_i)] / den_i and g_ij = G_i . [v_j | 1], softmax dL/dl_f(q_i) = sum_{j <= i}
    g_ij weight_ijf: the earlier chunks as (G_i . state_f) times query i's weight on the state, the
    chunk's pairs weight by weight; relu takes dphi_q where W q > 0. As in the non-causal dq, the
    query's -|x|^2 / 2 term is 0. Computed times den_i, from dO, then divided.
    """
    i_bh, i_f = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    i_hkv = i_h // GROUP
    o_f = i_f * BF + tl.arange(0, BF)
    o_d = tl.arange(0, D)
    m_f = o_f < M
    p_w_tile = w + i_h * stride_wh + o_f.to(tl.int64)[:, None] * stride_wm + o_d[None, :]

    b_state_num = tl.zeros([BF, D], dtype=ACC)
    b_state_den = tl.zeros([BF], dtype=ACC)
    p_part_base = dq_part + (i_bh.to(tl.int64) * FEATURE_TILES + i_f) * N * D
    for i_c in range(0, N, BC):
        o_c, m_c, m_kv, m_seen, b_v, b_wx_q, b_wx_k, b_c, b_stab, b_wq, b_wk, b_decay = _causal_chunk(
            q, k, v, w, query_max, query_stabiliser, key_stabiliser, chunk_max, key_padding_mask, i_c, i_b, i_h,
            i_hkv, i_bh, o_f, m_f, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb,
            stride_vh, stride_vn, stride_wh, stride_wm, stride_pad_b, N, M, sqrt_scale, scale, SOFTMAX, HAS_PADDING,
            DOT_PRECISION, BC, D, ACC)
        m_pairs = _causal_mask(o_c, m_seen, m_kv)
        b_g, b_go, b_den, b_gv = _chunk_output_grads(
            do, o, v, normaliser, i_b, i_h, i_hkv, i_bh, o_c, m_c, m_kv, m_pairs, stride_vb, stride_vh, stride_vn,
            stride_ob, stride_oh, stride_on, N, DOT_PRECISION, D, ACC)
        # den_i G_i . state_f: [BC, D] @ [D, BF] -> [BC, BF]
        b_gs = tl.dot(b_g, tl.trans(b_state_num), input_precision=DOT_PRECISION) - b_go[:, None] * b_state_den[None, :]
        if SOFTMAX:
            b_pairs = _causal_pair_weights(b_wx_q, b_wx_k, b_c, b_stab, m_pairs, m_f, "j")
            b_dlogit = b_wq * b_gs + tl.sum(tl.trans(b_gv)[:, :, None] * b_pairs, 0)
        else:
            # [BC, BC] @ [BC, BF] -> [BC, BF]
            b_dphi = b_gs + tl.dot(b_gv, b_wk, input_precision=DOT_PRECISION)
            b_dlogit = tl.where(b_wx_q <= 0, 0.0, b_dphi)
        b_dlogit = b_dlogit / b_den[:, None]
        # [BC, BF] @ [BF, D] -> [BC, D]; W reloaded per chunk (an L2 hit) rather than held across the loop.
        b_dx = tl.dot(b_dlogit, tl.load(p_w_tile, mask=m_f[:, None], other=0.0).to(ACC), input_precision=DOT_PRECISION)
        tl.store(p_part_base + o_c.to(tl.int64)[:, None] * D + o_d[None, :], b_dx, mask=m_c[:, None])

        # [BF, BC] @ [BC, D] -> [BF, D]
        b_state_num = b_state_num * b_decay[:, None] + tl.dot(tl.trans(b_wk), b_v, input_precision=DOT_PRECISION)
        b_state_den = b_state_den * b_decay + tl.sum(b_wk, 0)


@triton.jit
def performer_bwd_kernel_causal_dkdv(
    q, k, v, w, query_max, query_stabiliser, key_stabiliser, chunk_max, key_padding_mask, do, o, normaliser,
    dkv_part,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_wh, stride_wm,
    stride_ob, stride_oh, stride_on,
    stride_pad_b,
    H, GROUP, N, M, FEATURE_TILES, sqrt_scale, scale,
    SOFTMAX: tl.constexpr, HAS_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BC: tl.constexpr, BF: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr,
):
    """One feature tile's share of [dV | dlogits(K) W | sum dlogits(K)] of every key, backward over the chunks.

    dL/dl_f(k_j) = sum_{i >= j} g_ij weight_ijf and dv_j = sum_{i >= j} (sum_f weight_ijf) G_i[:D]. The
    later chunks come through the suffix state R = sum of their queries' weights exp(A_if + (rho_f - M_i))
    times G_i, rho the running maxima after the key's chunk, read with the key weights exp(l_f(k_j) - rho_f);
    the chunk's pairs weight by weight. Leaving a chunk, R moves to the maxima before it (a factor <= 1)
    and takes the chunk's queries.
    """
    i_bh, i_f = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    i_hkv = i_h // GROUP
    o_f = i_f * BF + tl.arange(0, BF)
    o_d = tl.arange(0, D)
    m_f = o_f < M
    p_w_tile = w + i_h * stride_wh + o_f.to(tl.int64)[:, None] * stride_wm + o_d[None, :]

    b_suffix_num = tl.zeros([BF, D], dtype=ACC)
    b_suffix_den = tl.zeros([BF], dtype=ACC)
    p_part_base = dkv_part + (i_bh.to(tl.int64) * FEATURE_TILES + i_f) * N * (2 * D + 1)
    num_chunks = tl.cdiv(N, BC)
    for i_rev in range(0, num_chunks):
        i_c = (num_chunks - 1 - i_rev) * BC
        o_c, m_c, m_kv, m_seen, b_v, b_wx_q, b_wx_k, b_c, b_stab, b_wq, b_wk, b_decay = _causal_chunk(
            q, k, v, w, query_max, query_stabiliser, key_stabiliser, chunk_max, key_padding_mask, i_c, i_b, i_h,
            i_hkv, i_bh, o_f, m_f, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb,
            stride_vh, stride_vn, stride_wh, stride_wm, stride_pad_b, N, M, sqrt_scale, scale, SOFTMAX, HAS_PADDING,
            DOT_PRECISION, BC, D, ACC)
        m_pairs = _causal_mask(o_c, m_seen, m_kv)
        b_g, b_go, b_den, b_gv = _chunk_output_grads(
            do, o, v, normaliser, i_b, i_h, i_hkv, i_bh, o_c, m_c, m_kv, m_pairs, stride_vb, stride_vh, stride_vn,
            stride_ob, stride_oh, stride_on, N, DOT_PRECISION, D, ACC)
        # dnum = dO / den and dden = -(dO . O) / den; g_ij of the chunk's pairs (queries x keys).
        b_dnum = b_g / b_den[:, None]
        b_dden = -b_go / b_den
        b_g = b_gv / b_den[:, None]

        # Later chunks through the suffix state: [BC, BF] @ [BF, D] -> [BC, D], [BC, D] @ [D, BF] -> [BC, BF]
        b_dv = tl.dot(b_wk, b_suffix_num, input_precision=DOT_PRECISION)
        b_dsuffix = _dot_nt(b_v, b_suffix_num, DOT_PRECISION) + b_suffix_den[None, :]
        if SOFTMAX:
            b_pairs = _causal_pair_weights(b_wx_q, b_wx_k, b_c, b_stab, m_pairs, m_f, "f")
            b_s = tl.sum(b_pairs, 0)
            b_dlogit = b_wk * b_dsuffix + tl.trans(tl.sum(b_g[None, :, :] * b_pairs, 1))
        else:
            # [BC, BF] @ [BF, BC] -> [BC, BC] and [BC, BC] @ [BC, BF] -> [BC, BF]
            b_s = tl.where(m_pairs, tl.dot(b_wq, tl.trans(b_wk), input_precision=DOT_PRECISION), 0.0)
            b_dphi = b_dsuffix + tl.dot(tl.trans(b_g), b_wq, input_precision=DOT_PRECISION)
            b_dlogit = tl.where(m_kv[:, None] & ~(b_wx_k <= 0), b_dphi, 0.0)
        # [BC, BC] @ [BC, D] -> [BC, D]
        b_dv += tl.dot(tl.trans(b_s), b_dnum, input_precision=DOT_PRECISION)
        # [BC, BF] @ [BF, D] -> [BC, D]; W reloaded per chunk (an L2 hit) rather than held across the loop.
        b_dx = tl.dot(b_dlogit, tl.load(p_w_tile, mask=m_f[:, None], other=0.0).to(ACC), input_precision=DOT_PRECISION)
        p_part = p_part_base + o_c.to(tl.int64) * (2 * D + 1)
        tl.store(p_part[:, None] + o_d[None, :], b_dv, mask=m_c[:, None])
        tl.store(p_part[:, None] + D + o_d[None, :], b_dx, mask=m_c[:, None])
        tl.store(p_part + 2 * D, tl.sum(b_dlogit, 1), mask=m_c)

        # [BF, BC] @ [BC, D] -> [BF, D]
        b_suffix_num = b_suffix_num * b_decay[:, None] + tl.dot(tl.trans(b_wq), b_dnum, input_precision=DOT_PRECISION)
        b_suffix_den = b_suffix_den * b_decay + tl.sum(b_wq * b_dden[:, None], 0)


def _tiles(num_features: int, head_dim: int, dtype: torch.dtype, causal: bool) -> dict:
    """Row tile BM (queries, keys, causal chunks), feature tile BF (>= 16 for tl.dot) and launch options.

    Sized so that ptxas (Triton 3.6, sm_80 and sm_90; ``make gpu-static-check``) reports no register
    spills: the causal kernels hold a (BF, D) fp32 state, several (BM, D) tiles and the chunk's pairs'
    weights, a (BM, BM, BF) block, at once, so they take 8 warps and the smallest feature tile and chunk
    (more warps or fewer spill more); IEEE float32 dots run on the FMA units and need the most.
    """
    low_precision = dtype in (torch.float16, torch.bfloat16)
    wide = head_dim > 64
    if causal:
        tile_m, tile_f, num_warps = 16, 16, 8
    elif low_precision:
        tile_m, tile_f, num_warps = (32, 32, 8) if wide else (32, 32, 4)
    else:
        tile_m, tile_f, num_warps = (16 if wide else 32), (16 if wide else 32), 8
    # At float32 D = 64 the causal forward and the non-causal dK/dV spill on 8 warps (ptxas caps them
    # below 128 registers), the other kernels on 4.
    own_warps = 4 if dtype == torch.float32 and head_dim == 64 else num_warps
    tile_f = max(16, min(tile_f, triton.next_power_of_2(num_features)))
    # The causal query stabilisers have no (BM, BM, BF) block, only (BM, BF) tiles and dots over D: on 8
    # warps ptxas held them to 128 registers or fewer and spilled (float16 and bfloat16 at D = 128 with
    # padding, float32 at D = 64), on 4 they fit.
    return {"BM": tile_m, "BF": tile_f, "num_warps": num_warps, "num_stages": 2,
            "kernel_warps": {"performer_fwd_kernel_causal": own_warps, "performer_bwd_kernel_dkdv": own_warps,
                             "performer_fwd_kernel_causal_query_stabiliser": 4}}


def _projection_strides(projection: Tensor) -> tuple[int, int]:
    """(head, row) strides of an (m, D) or (H, m, D) projection; head stride 0 when shared."""
    return (0 if projection.dim() == 2 else projection.stride(0)), projection.stride(-2)


def _check_arguments(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, kernel: str, causal: bool,
                     key_padding_mask: Tensor | None, scale: float) -> None:
    _check_qkv(q, k, v)
    batch, heads, query_len, head_dim = q.shape
    if query_len == 0 or k.shape[2] == 0:
        raise ValueError(f"q, k: expected non-empty sequences, got Nq={query_len} and Nk={k.shape[2]}")
    if projection.device != q.device:
        raise ValueError(f"projection: expected device {q.device} (that of q), got {projection.device}")
    if not projection.is_floating_point():
        raise TypeError(f"projection: expected a floating-point tensor, got dtype {projection.dtype}")
    if (projection.dim() not in (2, 3) or (projection.dim() == 3 and projection.shape[0] != heads)
            or projection.shape[-1] != head_dim or projection.shape[-2] == 0):
        raise ValueError(f"projection: expected shape (m, {head_dim}) or ({heads}, m, {head_dim}), "
                         f"got {tuple(projection.shape)}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    if causal and query_len != k.shape[2]:
        raise ValueError(f"causal: expected Nq == Nk, got Nq={query_len} and Nk={k.shape[2]}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a positive finite float, got {scale}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool or key_padding_mask.device != q.device
                                         or tuple(key_padding_mask.shape) != (batch, k.shape[2])):
        raise ValueError(f"key_padding_mask: expected bool of shape ({batch}, {k.shape[2]}) on {q.device}, "
                         f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)} on {key_padding_mask.device}")


class _Problem:
    """Shapes, launch flags and the arguments every kernel shares, for one call."""

    def __init__(self, q: Tensor, k: Tensor, projection: Tensor, kernel: str, causal: bool,
                 key_padding_mask: Tensor | None, scale: float):
        self.batch, self.heads, self.query_len, self.head_dim = q.shape
        self.kv_heads, self.key_len = k.shape[1], k.shape[2]
        self.group = self.heads // self.kv_heads
        self.features = projection.shape[-2]
        self.softmax = kernel == "softmax"
        self.causal = causal
        self.acc = accumulation_dtype(q.dtype)
        # The reference computes the features with the projection in the inputs' dtype.
        self.projection = projection.to(q.dtype).contiguous()
        self.projection_strides = _projection_strides(self.projection)
        self.padding, self.stride_pad_b = _padding_arguments(key_padding_mask, q)
        self.has_padding = key_padding_mask is not None
        self.sqrt_scale, self.scale = math.sqrt(scale), scale
        self.tiles = _tiles(self.features, self.head_dim, q.dtype, causal)
        self.launch = {"num_warps": self.tiles["num_warps"], "num_stages": self.tiles["num_stages"]}
        self.flags = {"DOT_PRECISION": _dot_precision(q.dtype), "D": self.head_dim, "BF": self.tiles["BF"],
                      "ACC": _TRITON_DTYPES[self.acc]}

    def launch_options(self, kernel: str) -> dict:
        """num_warps and num_stages of a kernel whose warps ``_tiles`` sets apart from the others'."""
        return {**self.launch, "num_warps": self.tiles["kernel_warps"][kernel]}

    def key_stabiliser(self, k: Tensor) -> Tensor:
        """Non-causal: per (query head, feature) the largest key logit over the unpadded keys, (B, H, m), 0
        where no key is unpadded (softmax); zeros for relu."""
        if not self.softmax:
            return torch.zeros((self.batch, self.heads, self.features), dtype=self.acc, device=k.device)
        stabiliser = self.key_feature_max(k)
        return torch.where(torch.isfinite(stabiliser), stabiliser, torch.zeros_like(stabiliser)).contiguous()

    def causal_stabilisers(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Causal: max W q and c of each query, M_j of each key (B, H, N; M_j -inf before any unpadded key)
        and the running maxima of every feature after each chunk (B * H, chunks + 1, m; row 0 before any
        key; see the module docstring), softmax. relu: zeros, M_j 0 from the first unpadded key on, and no
        maxima."""
        shape = (self.batch, self.heads, self.query_len)
        if not self.softmax:
            zeros = torch.zeros(shape, dtype=self.acc, device=q.device)
            key_stabiliser = zeros
            if self.has_padding:
                # A query that sees no key must give 0 even where its features are NaN (phi(q) . 0 would be NaN).
                seen = (self.padding == 0).cumsum(-1)[:, None, : self.query_len] > 0
                key_stabiliser = torch.where(seen, zeros, float("-inf"))
            return zeros, zeros, key_stabiliser, torch.empty(0, dtype=self.acc, device=q.device)
        feature_tiles = triton.cdiv(self.features, self.tiles["BF"])
        chunks = triton.cdiv(self.key_len, self.tiles["BM"])
        key_max_part = torch.empty((self.batch * self.heads, feature_tiles, self.key_len), dtype=self.acc,
                                   device=k.device)
        chunk_max = torch.empty((self.batch * self.heads, chunks + 1, self.features), dtype=self.acc, device=k.device)
        performer_fwd_kernel_causal_key_max[(self.batch * self.heads, feature_tiles)](
            k, self.projection, self.padding, key_max_part, chunk_max, *k.stride()[:3], *self.projection_strides,
            self.stride_pad_b, self.heads, self.group, self.key_len, self.features, feature_tiles, self.sqrt_scale,
            self.scale, HAS_PADDING=self.has_padding, BC=self.tiles["BM"], **self.flags, **self.launch,
        )
        # A max does not depend on the order of the tiles: deterministic.
        key_stabiliser = key_max_part.amax(1).view(shape)
        query_max = torch.empty(shape, dtype=self.acc, device=q.device)
        query_stabiliser = torch.empty_like(query_max)
        performer_fwd_kernel_causal_query_stabiliser[_grid(self.query_len, self.tiles["BM"], self.batch, self.heads)](
            q, k, self.projection, self.padding, key_stabiliser, chunk_max, query_max, query_stabiliser,
            *q.stride()[:3], *k.stride()[:3], *self.projection_strides, self.stride_pad_b, self.heads, self.group,
            self.query_len, self.features, self.sqrt_scale, self.scale, HAS_PADDING=self.has_padding,
            BC=self.tiles["BM"], **self.flags,
            **self.launch_options("performer_fwd_kernel_causal_query_stabiliser"),
        )
        return query_max, query_stabiliser, key_stabiliser, chunk_max

    def key_feature_max(self, k: Tensor) -> Tensor:
        """Non-causal softmax: the largest logit of each feature over the unpadded keys (B, H, m); -inf if none."""
        chunk, splits = self.split(self.key_len)
        feature_tiles = triton.cdiv(self.features, self.tiles["BF"])
        key_max_part = torch.empty((self.batch * self.heads, splits, self.features), dtype=self.acc, device=k.device)
        performer_fwd_kernel_key_max[(self.batch * self.heads, feature_tiles, splits)](
            k, self.projection, self.padding, key_max_part, *k.stride()[:3], *self.projection_strides,
            self.stride_pad_b, self.heads, self.group, self.key_len, self.features, chunk, splits, self.sqrt_scale,
            self.scale, HAS_PADDING=self.has_padding, BN=self.tiles["BM"], **self.flags, **self.launch,
        )
        # A max does not depend on the order of the splits: deterministic.
        return key_max_part.amax(1).view(self.batch, self.heads, self.features)

    def query_stabilisers(self, q: Tensor, key_stabiliser: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Non-causal: max W q and c of each query (B, H, Nq) and the key shift s - max s (B, H, m) of
        ``_query_logits``, from the saved key stabiliser s; zeros for relu."""
        key_shift = (key_stabiliser - key_stabiliser.amax(-1, keepdim=True)).contiguous()
        if not self.softmax:
            zeros = torch.zeros((self.batch, self.heads, self.query_len), dtype=self.acc, device=q.device)
            return zeros, zeros, key_shift
        query_max = torch.empty((self.batch, self.heads, self.query_len), dtype=self.acc, device=q.device)
        query_stabiliser = torch.empty_like(query_max)
        performer_fwd_kernel_query_stabiliser[_grid(self.query_len, self.tiles["BM"], self.batch, self.heads)](
            q, self.projection, key_shift, query_max, query_stabiliser, *q.stride()[:3], *self.projection_strides,
            self.heads, self.query_len, self.features, self.sqrt_scale, BN=self.tiles["BM"], **self.flags,
            **self.launch,
        )
        return query_max, query_stabiliser, key_shift

    def causal_strides(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[int, ...]:
        """Strides of q, k, v, the projection and the padding mask, in the causal kernels' order."""
        return (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *self.projection_strides, self.stride_pad_b)

    def split(self, length: int) -> tuple[int, int]:
        feature_tiles = triton.cdiv(self.features, self.tiles["BF"])
        chunk, splits = _split(length, self.tiles["BM"], feature_tiles * self.batch * self.heads)
        if splits > MAX_GRID_AXIS:
            raise ValueError(f"sequence of {length} needs {splits} splits, more than a grid axis holds ({MAX_GRID_AXIS})")
        return chunk, splits


def _forward_global(p: _Problem, q: Tensor, k: Tensor, v: Tensor, key_stabiliser: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    chunk, splits = p.split(p.key_len)
    feature_tiles = triton.cdiv(p.features, p.tiles["BF"])
    state_part = torch.empty((p.batch * p.heads, splits, p.features, p.head_dim + 1), dtype=p.acc, device=q.device)
    performer_fwd_kernel_state[(p.batch * p.heads, feature_tiles, splits)](
        k, v, p.projection, key_stabiliser, p.padding, state_part,
        *k.stride()[:3], *v.stride()[:3], *p.projection_strides, p.stride_pad_b,
        p.heads, p.group, p.key_len, p.features, chunk, splits, p.sqrt_scale, p.scale,
        SOFTMAX=p.softmax, HAS_PADDING=p.has_padding, BN=p.tiles["BM"], **p.flags,
        **p.launch,
    )
    # The splits added in a fixed order: deterministic.
    state = state_part.sum(1).view(p.batch, p.heads, p.features, p.head_dim + 1)
    out = new_output(q.shape, q.dtype, q.device)
    normaliser = new_output((p.batch, p.heads, p.query_len), p.acc, q.device)
    performer_fwd_kernel[_grid(p.query_len, p.tiles["BM"], p.batch, p.heads)](
        q, p.projection, *p.query_stabilisers(q, key_stabiliser), state, out, normaliser,
        *q.stride()[:3], *p.projection_strides, *out.stride()[:3],
        p.heads, p.query_len, p.features, p.sqrt_scale,
        SOFTMAX=p.softmax, BM=p.tiles["BM"], **p.flags, **p.launch,
    )
    return out, normaliser, state


def _backward_global(p: _Problem, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                     normaliser: Tensor, key_stabiliser: Tensor, state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    query_stabilisers = p.query_stabilisers(q, key_stabiliser)
    grad_q = new_output(q.shape, q.dtype, q.device)
    performer_bwd_kernel_dq[_grid(p.query_len, p.tiles["BM"], p.batch, p.heads)](
        q, p.projection, *query_stabilisers, state, grad_out, out, normaliser, grad_q,
        *q.stride()[:3], *p.projection_strides, *out.stride()[:3], *grad_q.stride()[:3],
        p.heads, p.query_len, p.features, p.sqrt_scale,
        SOFTMAX=p.softmax, BM=p.tiles["BM"], **p.flags, **p.launch,
    )
    chunk, splits = p.split(p.query_len)
    feature_tiles = triton.cdiv(p.features, p.tiles["BF"])
    dstate_part = torch.empty((p.batch * p.heads, splits, p.features, p.head_dim + 1), dtype=p.acc, device=q.device)
    performer_bwd_kernel_dstate[(p.batch * p.heads, feature_tiles, splits)](
        q, p.projection, *query_stabilisers, state, grad_out, out, normaliser, dstate_part,
        *q.stride()[:3], *p.projection_strides, *out.stride()[:3],
        p.heads, p.query_len, p.features, chunk, splits, p.sqrt_scale,
        SOFTMAX=p.softmax, BM=p.tiles["BM"], **p.flags, **p.launch,
    )
    dstate = dstate_part.sum(1)
    grad_k = new_output(k.shape, k.dtype, k.device)
    grad_v = new_output(v.shape, v.dtype, v.device)
    performer_bwd_kernel_dkdv[_grid(p.key_len, p.tiles["BM"], p.batch, p.kv_heads)](
        k, v, p.projection, key_stabiliser, state, dstate, grad_k, grad_v, p.padding,
        *k.stride()[:3], *v.stride()[:3], *p.projection_strides, *grad_k.stride()[:3], *grad_v.stride()[:3],
        p.stride_pad_b, p.kv_heads, p.group, p.key_len, p.features, p.sqrt_scale, p.scale,
        SOFTMAX=p.softmax, HAS_PADDING=p.has_padding, BN=p.tiles["BM"],
        **p.flags, **p.launch_options("performer_bwd_kernel_dkdv"),
    )
    return grad_q, grad_k, grad_v


def _forward_causal(p: _Problem, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    feature_tiles = triton.cdiv(p.features, p.tiles["BF"])
    stabilisers = p.causal_stabilisers(q, k)
    numden_part = torch.empty((p.batch * p.heads, feature_tiles, p.query_len, p.head_dim + 1), dtype=p.acc,
                              device=q.device)
    state = new_output((p.batch, p.heads, p.features, p.head_dim + 1), p.acc, q.device)
    performer_fwd_kernel_causal[(p.batch * p.heads, feature_tiles)](
        q, k, v, p.projection, *stabilisers, p.padding, numden_part, state,
        *p.causal_strides(q, k, v), p.heads, p.group, p.query_len, p.features, feature_tiles, p.sqrt_scale, p.scale,
        SOFTMAX=p.softmax, HAS_PADDING=p.has_padding, BC=p.tiles["BM"], **p.flags,
        **p.launch_options("performer_fwd_kernel_causal"),
    )
    # The feature tiles' shares added in a fixed order: deterministic.
    numden = numden_part.sum(1).view(p.batch, p.heads, p.query_len, p.head_dim + 1)
    normaliser = numden[..., p.head_dim].contiguous()
    seen = (normaliser != 0).unsqueeze(-1)  # 0 where the query sees no key; NaN (an input's) reaches the output
    out = torch.where(seen, numden[..., : p.head_dim] / torch.where(seen, normaliser.unsqueeze(-1), 1.0), 0.0)
    key_stabiliser = stabilisers[2]
    key_stabiliser = torch.where(torch.isfinite(key_stabiliser), key_stabiliser, 0.0).contiguous()
    return out.to(q.dtype), normaliser, key_stabiliser, state


def _backward_causal(p: _Problem, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                     normaliser: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    feature_tiles = triton.cdiv(p.features, p.tiles["BF"])
    arguments = (q, k, v, p.projection, *p.causal_stabilisers(q, k), p.padding, grad_out, out, normaliser)
    strides = (*p.causal_strides(q, k, v)[:-1], *out.stride()[:3], p.stride_pad_b)
    sizes = (p.heads, p.group, p.query_len, p.features, feature_tiles, p.sqrt_scale, p.scale)
    options = dict(SOFTMAX=p.softmax, HAS_PADDING=p.has_padding, BC=p.tiles["BM"], **p.flags, **p.launch)
    dq_part = torch.empty((p.batch * p.heads, feature_tiles, p.query_len, p.head_dim), dtype=p.acc, device=q.device)
    performer_bwd_kernel_causal_dq[(p.batch * p.heads, feature_tiles)](*arguments, dq_part, *strides, *sizes, **options)
    dkv_part = torch.empty((p.batch * p.heads, feature_tiles, p.key_len, 2 * p.head_dim + 1), dtype=p.acc,
                           device=q.device)
    performer_bwd_kernel_causal_dkdv[(p.batch * p.heads, feature_tiles)](*arguments, dkv_part, *strides, *sizes,
                                                                         **options)
    # Feature tiles and the query heads of each group added in a fixed order: deterministic.
    grad_q = (dq_part.sum(1) * p.sqrt_scale).view(q.shape).to(q.dtype)
    dkv = dkv_part.view(p.batch, p.kv_heads, p.group, feature_tiles, p.key_len, 2 * p.head_dim + 1).sum((2, 3))
    grad_v = dkv[..., : p.head_dim].to(v.dtype).contiguous()
    grad_k = dkv[..., p.head_dim: 2 * p.head_dim] * p.sqrt_scale
    if p.softmax:
        # d logits / d x = sqrt(scale) (W - sqrt(scale) x): the -|x|^2 / 2 term of the keys' logits.
        grad_k = grad_k - p.scale * dkv[..., 2 * p.head_dim:] * k.to(p.acc)
    if p.has_padding:
        # Padded keys get 0: their weights are 0, but a NaN query's makes the suffix state NaN, and 0 * NaN is NaN.
        # Here rather than in the kernel, whose largest variants have no registers to spare.
        padded = p.padding.bool()[:, None, :, None]
        grad_k, grad_v = grad_k.masked_fill(padded, 0.0), grad_v.masked_fill(padded, 0.0)
    return grad_q, grad_k.to(k.dtype).contiguous(), grad_v


@torch.library.custom_op("fastattn::triton_performer_fwd", mutates_args=())
def performer_fwd(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, kernel: str, causal: bool,
                  key_padding_mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Output (B, H, Nq, D), normaliser (B, H, Nq), key stabiliser and state (B, H, m, D + 1).

    The key stabiliser is (B, H, m) non-causal (one per feature) and (B, H, Nk) causal (M_j, one per key,
    0 before any unpadded key). The statistics are float32 (float64 for float64 inputs); the state is
    phi(K)^T [V | 1], causal with the keys stabilised by each feature's running maximum after the last
    key. The causal backward recomputes its stabilisers and reads neither the key stabiliser nor the
    state.
    """
    _check_arguments(q, k, v, projection, kernel, causal, key_padding_mask, scale)
    p = _Problem(q, k, projection, kernel, causal, key_padding_mask, scale)
    if causal:
        return _forward_causal(p, q, k, v)
    key_stabiliser = p.key_stabiliser(k)
    out, normaliser, state = _forward_global(p, q, k, v, key_stabiliser)
    return out, normaliser, key_stabiliser, state


performer_fwd.register_fake(performer_fwd_fake)


@torch.library.custom_op("fastattn::triton_performer_bwd", mutates_args=())
def performer_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, projection: Tensor, out: Tensor,
                  normaliser: Tensor, key_stabiliser: Tensor, state: Tensor, kernel: str, causal: bool,
                  key_padding_mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of q, k, v; deterministic (partial sums added in a fixed order, no atomics)."""
    _check_arguments(q, k, v, projection, kernel, causal, key_padding_mask, scale)
    p = _Problem(q, k, projection, kernel, causal, key_padding_mask, scale)
    for name, tensor, shape in (
        ("normaliser", normaliser, (p.batch, p.heads, p.query_len)),
        ("key_stabiliser", key_stabiliser, (p.batch, p.heads, p.key_len if causal else p.features)),
        ("state", state, (p.batch, p.heads, p.features, p.head_dim + 1)),
    ):
        if tuple(tensor.shape) != shape or tensor.dtype != p.acc:
            raise ValueError(f"{name}: expected shape {shape} and dtype {p.acc}, got {tuple(tensor.shape)} and {tensor.dtype}")
    for name, tensor in (("grad_out", grad_out), ("out", out)):
        if tensor.shape != q.shape or tensor.dtype != q.dtype:
            raise ValueError(f"{name}: expected shape {tuple(q.shape)} and dtype {q.dtype}, "
                             f"got {tuple(tensor.shape)} and {tensor.dtype}")
    # out and grad_out share one set of strides in the kernels.
    grad_out, out = grad_out.contiguous(), out.contiguous()
    normaliser, key_stabiliser, state = normaliser.contiguous(), key_stabiliser.contiguous(), state.contiguous()
    if causal:
        return _backward_causal(p, grad_out, q, k, v, out, normaliser)
    return _backward_global(p, grad_out, q, k, v, out, normaliser, key_stabiliser, state)


performer_bwd.register_fake(performer_bwd_fake)
performer_fwd.register_autograd(backward_through(performer_bwd), setup_context=setup_context)


def performer_attention(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, *, kernel: str, causal: bool,
                        key_padding_mask: Tensor | None, scale: float) -> Tensor:
    """Differentiable Performer attention through the Triton kernels (the "triton" backend's call)."""
    out, _, _, _ = performer_fwd(q, k, v, projection, kernel, causal, key_padding_mask, scale)
    return out


def static_check_variants():
    """The launches ``scripts/gpu_static_check.py`` compiles for sm_80 and sm_90: (label, launch, is_default).

    Registers grow with the head dim and the tiles, so the check compiles softmax features with the
    largest feature tile (m >= 64; ``_tiles``), non-causal and causal, with padding: every head dim in
    float16, D = 64 and D = 128 in float32, D = 128 in bfloat16, and D = 128 float16 without padding;
    plus relu (the same loops, fewer live values) and the smallest feature tile (m = 16) at D = 128 in
    float16 and float32. Each variant costs about fifteen compiles per target, and CI's time budget is
    shared with the other mechanisms. ``launch()`` runs the forward and backward wrappers on small CPU
    tensors (B = H = 2, N = 256) whose sizes specialise the kernels as real calls do. Every variant is
    one the wrappers choose, so all are default.
    """
    softmax = [(head_dim, torch.float16, True) for head_dim in SUPPORTED_HEAD_DIMS]
    softmax += [(64, torch.float32, True), (128, torch.float32, True), (128, torch.bfloat16, True),
                (128, torch.float16, False)]
    cases = [(256, head_dim, dtype, "softmax", causal, padding) for head_dim, dtype, padding in softmax
             for causal in (False, True)]
    cases += [(features, 128, dtype, kernel, causal, True) for features, kernel in ((256, "relu"), (16, "softmax"))
              for dtype in (torch.float16, torch.float32) for causal in (False, True)]
    for features, head_dim, dtype, kernel, causal, padding in cases:
        label = (f"m{features}-D{head_dim}-{str(dtype).replace('torch.', '')}-{kernel}"
                 f"{'-causal' if causal else ''}{'-padding' if padding else ''}")
        yield label, _static_check_launch(features, head_dim, dtype, kernel, causal, padding), True


def _static_check_launch(features: int, head_dim: int, dtype: torch.dtype, kernel: str, causal: bool, padding: bool):
    def launch():
        length = 256
        q = torch.zeros(2, 2, length, head_dim, dtype=dtype)
        projection = torch.zeros(features, head_dim, dtype=dtype)
        mask = torch.zeros(2, length, dtype=torch.bool) if padding else None
        out, normaliser, key_stabiliser, state = performer_fwd(q, q, q, projection, kernel, causal, mask,
                                                               head_dim ** -0.5)
        performer_bwd(q, q, q, q, projection, out, normaliser, key_stabiliser, state, kernel, causal, mask,
                      head_dim ** -0.5)
    return launch
