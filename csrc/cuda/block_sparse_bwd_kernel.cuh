// Backward block-sparse attention on tensor cores (FlashAttention-2), deterministic (no atomics):
//   preprocess: delta = rowsum(dO * O) per query row;
//   dK, dV: one CTA per key tile, walking the query blocks that list it (the transposed CSR);
//   dQ:     one CTA per query tile, walking the key blocks listed for it (the CSR).
// Both recompute P = exp(S - lse) from the saved log-sum-exp; dS = P * (dP - delta). Each issues the loads
// of its next tile before it computes on the current one (double-buffered K in dQ, q in dK/dV).
#pragma once

#include "block_sparse_common.cuh"
#include "block_sparse_traits.h"

namespace fastattn::cuda {

// delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] in float32; a warp per row.
template <typename T>
__global__ void block_sparse_bwd_preprocess_kernel(const BlockSparseBwdParams p) {
  constexpr int kRowsPerBlock = 8;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int head = blockIdx.y, batch = blockIdx.z;
  const int row = blockIdx.x * kRowsPerBlock + warp;
  if (row >= p.query_len) return;
  const T* grad_out = head_pointer<T>(p.grad_out, p.grad_out_batch_stride, p.grad_out_head_stride, batch, head) +
                      int64_t(row) * p.grad_out_row_stride;
  const T* out = head_pointer<T>(p.out, p.out_batch_stride, p.out_head_stride, batch, head) +
                 int64_t(row) * p.out_row_stride;
  float sum = 0.f;
  for (int d = lane; d < p.head_dim; d += 32) sum += static_cast<float>(grad_out[d]) * static_cast<float>(out[d]);
  sum = warp_sum(sum);
  if (lane == 0) p.delta[(int64_t(batch) * p.heads + head) * p.query_len + row] = sum;
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads) block_sparse_bwd_dq_kernel(const BlockSparseBwdParams p) {
  using T = typename Traits::Element;
  using RowTile = typename Traits::RowTile;
  using ColumnTile = typename Traits::ColumnTile;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kRowTiles = Traits::kRowTilesPerWarp;
  constexpr int kD = Traits::kHeadDim;
  constexpr int kThreads = Traits::kThreads;

  // K is double-buffered (K of the next tile loads during the whole of this one); V has one buffer, refilled
  // as soon as dP = dO V^T no longer needs it.
  extern __shared__ __align__(16) unsigned char shared_memory[];
  const RowTile q_tile{reinterpret_cast<T*>(shared_memory)};
  const RowTile grad_out_tile{q_tile.data + RowTile::kElements};
  const ColumnTile v_tile{grad_out_tile.data + RowTile::kElements};
  T* const k_buffers = v_tile.data + ColumnTile::kElements;
  bool* const key_visible = reinterpret_cast<bool*>(k_buffers + 2 * ColumnTile::kElements);  // 2 x kBlockN

  const int thread = threadIdx.x, warp = thread / 32, lane = thread % 32;
  const int head = blockIdx.y, batch = blockIdx.z;
  const int query0 = blockIdx.x * kBlockM;
  const int query_rows = min(kBlockM, p.query_len - query0);
  const int last_query = query0 + query_rows - 1;

  load_tile_async<kThreads>(q_tile,
                            head_pointer<T>(p.q, p.q_batch_stride, p.q_head_stride, batch, head) +
                                int64_t(query0) * p.q_row_stride,
                            p.q_row_stride, query_rows, thread);
  load_tile_async<kThreads>(grad_out_tile,
                            head_pointer<T>(p.grad_out, p.grad_out_batch_stride, p.grad_out_head_stride, batch, head) +
                                int64_t(query0) * p.grad_out_row_stride,
                            p.grad_out_row_stride, query_rows, thread);
  cp_async_commit();
  const T* k = head_pointer<T>(p.k, p.k_batch_stride, p.k_head_stride, batch, head);
  const T* v = head_pointer<T>(p.v, p.v_batch_stride, p.v_head_stride, batch, head);
  const auto load_keys = [&](int key0, int slot) {
    load_tile_async<kThreads>(ColumnTile{k_buffers + slot * ColumnTile::kElements}, k + int64_t(key0) * p.k_row_stride,
                              p.k_row_stride, p.key_len - key0, thread);
    cp_async_commit();
    for (int j = thread; j < kBlockN; j += kThreads) {
      key_visible[slot * kBlockN + j] = key_is_visible(p, batch, key0 + j);
    }
  };
  const auto load_values = [&](int key0) {
    load_tile_async<kThreads>(v_tile, v + int64_t(key0) * p.v_row_stride, p.v_row_stride, p.key_len - key0, thread);
    cp_async_commit();
  };

  // This warp's query rows start at row0 of the tile (fragment_row gives each fragment's).
  const int row0 = warp * Traits::kRowsPerWarp;
  const int64_t row_stats = (int64_t(batch) * p.heads + head) * p.query_len + query0;
  float lse_log2[kRowTiles][2], delta[kRowTiles][2];
#pragma unroll
  for (int i = 0; i < kRowTiles; ++i) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = fragment_row(row0, i, r, lane);
      const bool exists = row < query_rows;
      lse_log2[i][r] = exists ? p.lse[row_stats + row] * kLog2e : kInfinity;
      delta[i][r] = exists ? p.delta[row_stats + row] : 0.f;
    }
  }
  float grad_q_acc[kRowTiles][kD / 8][4] = {};

  // Groups in flight: K and V of this tile when an iteration starts; K of the next issued first.
  KeyTileCursor<kBlockN> tile(p, key_blocks_of(p, head, query0 / p.block_size), last_query);
  if (tile.valid()) {
    load_keys(tile.key0, 0);
    load_values(tile.key0);
  }
  for (int t = 0; tile.valid(); ++t) {
    const int key0 = tile.key0, slot = t % 2;
    const ColumnTile k_tile{k_buffers + slot * ColumnTile::kElements};
    __syncthreads();  // every warp is done with the other K buffer (the previous tile's)
    tile.advance(p, last_query);
    const bool has_next = tile.valid();
    if (has_next) load_keys(tile.key0, 1 - slot);
    if (has_next) {
      cp_async_wait<2>();  // q, dO and this K have landed; this V and the next K may be in flight
    } else {
      cp_async_wait<1>();
    }
    __syncthreads();

    float probs[kRowTiles][kBlockN / 8][4] = {};
    warp_gemm_a_smem_b_nk<T, kBlockN, kD>(probs, q_tile, row0, k_tile, 0, lane);
    const bool* visible = key_visible + slot * kBlockN;
    const bool masked_tile = tile_needs_mask(p, query0, key0, kBlockN);
#pragma unroll
    for (int i = 0; i < kRowTiles; ++i) {
#pragma unroll
      for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = fragment_column(n, e, lane);
          const int row = fragment_row(row0, i, e / 2, lane);
          const bool masked = masked_tile && (!visible[col] || (p.causal && key0 + col > query0 + row));
          probs[i][n][e] = masked ? 0.f : exp2f(probs[i][n][e] * p.scale_log2 - lse_log2[i][e / 2]);
        }
      }
    }
    if (has_next) {
      cp_async_wait<1>();  // this V has landed
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    float grad_scores[kRowTiles][kBlockN / 8][4] = {};
    warp_gemm_a_smem_b_nk<T, kBlockN, kD>(grad_scores, grad_out_tile, row0, v_tile, 0, lane);
    __syncthreads();  // every warp is done with V
    if (has_next) load_values(tile.key0);
    uint32_t grad_score_frags[kRowTiles][kBlockN / 16][4];
#pragma unroll
    for (int i = 0; i < kRowTiles; ++i) {
#pragma unroll
      for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) grad_scores[i][n][e] = probs[i][n][e] * (grad_scores[i][n][e] - delta[i][e / 2]);
      }
      accumulator_to_a_fragments<T, kBlockN>(grad_score_frags[i], grad_scores[i]);
    }
    warp_gemm_a_regs_b_kn<T, kD, kBlockN>(grad_q_acc, grad_score_frags, k_tile, 0, lane);
  }
  cp_async_wait<0>();

  T* grad_q = static_cast<T*>(p.grad_q) + ((int64_t(batch) * p.heads + head) * p.query_len) * kD;
#pragma unroll
  for (int i = 0; i < kRowTiles; ++i) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = fragment_row(row0, i, r, lane);
      if (row >= query_rows) continue;
      T* grad_q_row = grad_q + int64_t(query0 + row) * kD;
#pragma unroll
      for (int n = 0; n < kD / 8; ++n) {
        *reinterpret_cast<uint32_t*>(grad_q_row + fragment_column(n, 0, lane)) =
            MmaType<T>::pack(grad_q_acc[i][n][2 * r] * p.scale, grad_q_acc[i][n][2 * r + 1] * p.scale);
      }
    }
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads) block_sparse_bwd_dkdv_kernel(const BlockSparseBwdParams p) {
  using T = typename Traits::Element;
  using RowTile = typename Traits::RowTile;
  using ColumnTile = typename Traits::ColumnTile;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kRowTiles = Traits::kRowTilesPerWarp;
  constexpr int kD = Traits::kHeadDim;
  constexpr int kThreads = Traits::kThreads;

  // Rows are keys, columns queries. q is double-buffered with its rows' statistics (the next query tile's
  // load during the whole of this one); dO has one buffer, refilled as soon as dV += P^T dO no longer needs it.
  extern __shared__ __align__(16) unsigned char shared_memory[];
  const RowTile k_tile{reinterpret_cast<T*>(shared_memory)};
  const RowTile v_tile{k_tile.data + RowTile::kElements};
  const ColumnTile grad_out_tile{v_tile.data + RowTile::kElements};
  T* const query_buffers = grad_out_tile.data + ColumnTile::kElements;
  float* const stat_buffers = reinterpret_cast<float*>(query_buffers + 2 * ColumnTile::kElements);  // slot: lse, delta
  bool* const key_visible = reinterpret_cast<bool*>(stat_buffers + 4 * kBlockN);

  const int thread = threadIdx.x, warp = thread / 32, lane = thread % 32;
  const int head = blockIdx.y, batch = blockIdx.z;
  const int key0 = blockIdx.x * kBlockM;
  const int key_rows = min(kBlockM, p.key_len - key0);

  load_tile_async<kThreads>(k_tile,
                            head_pointer<T>(p.k, p.k_batch_stride, p.k_head_stride, batch, head) +
                                int64_t(key0) * p.k_row_stride,
                            p.k_row_stride, key_rows, thread);
  load_tile_async<kThreads>(v_tile,
                            head_pointer<T>(p.v, p.v_batch_stride, p.v_head_stride, batch, head) +
                                int64_t(key0) * p.v_row_stride,
                            p.v_row_stride, key_rows, thread);
  cp_async_commit();
  for (int j = thread; j < kBlockM; j += kThreads) key_visible[j] = key_is_visible(p, batch, key0 + j);
  const T* q = head_pointer<T>(p.q, p.q_batch_stride, p.q_head_stride, batch, head);
  const T* grad_out = head_pointer<T>(p.grad_out, p.grad_out_batch_stride, p.grad_out_head_stride, batch, head);
  const int64_t row_stats = (int64_t(batch) * p.heads + head) * p.query_len;
  const auto load_queries = [&](int query0, int slot) {
    // Rows that see no key (lse +inf; only with padding) load as 0: dS^T Q would add 0 times such a NaN query to
    // the later keys of this tile.
    const float* lse = p.lse + row_stats + query0;
    const int query_rows = p.query_len - query0;
    load_tile_async_if<kThreads>(
        ColumnTile{query_buffers + slot * ColumnTile::kElements}, q + int64_t(query0) * p.q_row_stride,
        p.q_row_stride,
        [&](int row) { return row < query_rows && (p.key_padding_mask == nullptr || lse[row] != kInfinity); }, kD,
        thread);
    cp_async_commit();
    float* const lse_log2 = stat_buffers + 2 * slot * kBlockN;
    float* const delta = lse_log2 + kBlockN;
    for (int i = thread; i < kBlockN; i += kThreads) {
      const bool exists = query0 + i < p.query_len;
      lse_log2[i] = exists ? p.lse[row_stats + query0 + i] * kLog2e : kInfinity;
      delta[i] = exists ? p.delta[row_stats + query0 + i] : 0.f;
    }
  };
  const auto load_grad_out = [&](int query0) {
    load_tile_async<kThreads>(grad_out_tile, grad_out + int64_t(query0) * p.grad_out_row_stride,
                              p.grad_out_row_stride, p.query_len - query0, thread);
    cp_async_commit();
  };

  // This warp's key rows start at row0 of the tile (fragment_row gives each fragment's).
  const int row0 = warp * Traits::kRowsPerWarp;
  float grad_k_acc[kRowTiles][kD / 8][4] = {};
  float grad_v_acc[kRowTiles][kD / 8][4] = {};

  // Groups in flight: q and dO of this tile when an iteration starts; q of the next issued first.
  QueryTileCursor<kBlockN> tile(p, query_blocks_of(p, head, key0 / p.block_size), key0);
  if (tile.valid()) {
    load_queries(tile.query0, 0);
    load_grad_out(tile.query0);
  }
  for (int t = 0; tile.valid(); ++t) {
    const int query0 = tile.query0, slot = t % 2;
    const ColumnTile q_tile{query_buffers + slot * ColumnTile::kElements};
    const float* lse_log2 = stat_buffers + 2 * slot * kBlockN;
    const float* delta = lse_log2 + kBlockN;
    __syncthreads();  // every warp is done with the other slot (the previous tile's)
    tile.advance(p, key0);
    const bool has_next = tile.valid();
    if (has_next) {
      load_queries(tile.query0, 1 - slot);
      cp_async_wait<1>();  // k, v, this q and this dO have landed; the next q may be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    float probs[kRowTiles][kBlockN / 8][4] = {};  // P^T: rows are keys, columns queries
    warp_gemm_a_smem_b_nk<T, kBlockN, kD>(probs, k_tile, row0, q_tile, 0, lane);
    const bool masked_tile = tile_needs_mask(p, query0, key0, kBlockM);
#pragma unroll
    for (int i = 0; i < kRowTiles; ++i) {
#pragma unroll
      for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = fragment_column(n, e, lane);
          const int row = fragment_row(row0, i, e / 2, lane);
          const bool masked = masked_tile && (!key_visible[row] || (p.causal && key0 + row > query0 + col));
          probs[i][n][e] = masked ? 0.f : exp2f(probs[i][n][e] * p.scale_log2 - lse_log2[col]);
        }
      }
    }
    float grad_scores[kRowTiles][kBlockN / 8][4] = {};  // dP^T = V dO^T, then dS^T
    warp_gemm_a_smem_b_nk<T, kBlockN, kD>(grad_scores, v_tile, row0, grad_out_tile, 0, lane);
    uint32_t prob_frags[kRowTiles][kBlockN / 16][4];
    uint32_t grad_score_frags[kRowTiles][kBlockN / 16][4];
#pragma unroll
    for (int i = 0; i < kRowTiles; ++i) {
#pragma unroll
      for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = fragment_column(n, e, lane);
          grad_scores[i][n][e] = probs[i][n][e] * (grad_scores[i][n][e] - delta[col]);
        }
      }
      accumulator_to_a_fragments<T, kBlockN>(prob_frags[i], probs[i]);
      accumulator_to_a_fragments<T, kBlockN>(grad_score_frags[i], grad_scores[i]);
    }
    warp_gemm_a_regs_b_kn<T, kD, kBlockN>(grad_v_acc, prob_frags, grad_out_tile, 0, lane);
    __syncthreads();  // every warp is done with dO
    if (has_next) load_grad_out(tile.query0);
    warp_gemm_a_regs_b_kn<T, kD, kBlockN>(grad_k_acc, grad_score_frags, q_tile, 0, lane);
  }
  cp_async_wait<0>();

  // Padded keys get 0: their P is 0, but a NaN query that sees keys makes delta, and so dS, NaN.
  __syncthreads();  // key_visible is written (the loop above may not have run)
  const int64_t head_offset = ((int64_t(batch) * p.heads + head) * p.key_len) * kD;
  T* grad_k = static_cast<T*>(p.grad_k) + head_offset;
  T* grad_v = static_cast<T*>(p.grad_v) + head_offset;
#pragma unroll
  for (int i = 0; i < kRowTiles; ++i) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = fragment_row(row0, i, r, lane);
      if (row >= key_rows) continue;
      const int64_t offset = int64_t(key0 + row) * kD;
      const bool visible = key_visible[row];
#pragma unroll
      for (int n = 0; n < kD / 8; ++n) {
        const int col = fragment_column(n, 0, lane);
        *reinterpret_cast<uint32_t*>(grad_k + offset + col) =
            visible ? MmaType<T>::pack(grad_k_acc[i][n][2 * r] * p.scale, grad_k_acc[i][n][2 * r + 1] * p.scale)
                    : MmaType<T>::pack(0.f, 0.f);
        *reinterpret_cast<uint32_t*>(grad_v + offset + col) =
            visible ? MmaType<T>::pack(grad_v_acc[i][n][2 * r], grad_v_acc[i][n][2 * r + 1])
                    : MmaType<T>::pack(0.f, 0.f);
      }
    }
  }
}

}  // namespace fastattn::cuda
