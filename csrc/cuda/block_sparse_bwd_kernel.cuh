// Backward block-sparse attention on tensor cores (FlashAttention-2), deterministic (no atomics):
//   preprocess: delta = rowsum(dO * O) per query row;
//   dK, dV: one CTA per key tile, walking the query blocks that list it (the transposed CSR);
//   dQ:     one CTA per query tile, walking the key blocks listed for it (the CSR).
// Both recompute P = exp(S - lse) from the saved log-sum-exp; dS = P * (dP - delta).
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
  using Tile = typename Traits::RowTile;
  constexpr int kTile = Traits::kTile;
  constexpr int kD = Traits::kHeadDim;
  constexpr int kThreads = Traits::kThreads;

  extern __shared__ __align__(16) unsigned char shared_memory[];
  const Tile q_tile{reinterpret_cast<T*>(shared_memory)};
  const Tile grad_out_tile{q_tile.data + Tile::kElements};
  const Tile k_tile{grad_out_tile.data + Tile::kElements};
  const Tile v_tile{k_tile.data + Tile::kElements};
  bool* key_visible = reinterpret_cast<bool*>(v_tile.data + Tile::kElements);

  const int thread = threadIdx.x, warp = thread / 32, lane = thread % 32;
  const int head = blockIdx.y, batch = blockIdx.z;
  const int query0 = blockIdx.x * kTile;
  const int query_rows = min(kTile, p.query_len - query0);
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

  const int rows[2] = {warp * 16 + lane / 4, warp * 16 + lane / 4 + 8};
  const int64_t row_stats = (int64_t(batch) * p.heads + head) * p.query_len + query0;
  float lse_log2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool exists = rows[r] < query_rows;
    lse_log2[r] = exists ? p.lse[row_stats + rows[r]] * kLog2e : kInfinity;
    delta[r] = exists ? p.delta[row_stats + rows[r]] : 0.f;
  }
  float grad_q_acc[kD / 8][4] = {};

  const BlockList key_blocks = key_blocks_of(p, head, query0 / p.block_size);
  for (int listed = key_blocks.begin; listed < key_blocks.end; ++listed) {
    const int key_block = key_blocks.block(listed);
    for (int key0 = key_block * p.block_size; key0 < min((key_block + 1) * p.block_size, p.key_len); key0 += kTile) {
      if (tile_is_causally_empty(p, last_query, key0)) break;
      const int key_rows = min(kTile, p.key_len - key0);
      __syncthreads();
      load_tile_async<kThreads>(k_tile, k + int64_t(key0) * p.k_row_stride, p.k_row_stride, key_rows, thread);
      cp_async_commit();
      load_tile_async<kThreads>(v_tile, v + int64_t(key0) * p.v_row_stride, p.v_row_stride, key_rows, thread);
      cp_async_commit();
      for (int j = thread; j < kTile; j += kThreads) key_visible[j] = key_is_visible(p, batch, key0 + j);
      cp_async_wait<1>();
      __syncthreads();

      float probs[kTile / 8][4] = {};
      warp_gemm_a_smem_b_nk<T, kTile, kD>(probs, q_tile, warp * 16, k_tile, 0, lane);
      const bool masked_tile = tile_needs_mask(p, query0, key0, kTile);
#pragma unroll
      for (int n = 0; n < kTile / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = n * 8 + (lane % 4) * 2 + (e % 2);
          const bool masked =
              masked_tile && (!key_visible[col] || (p.causal && key0 + col > query0 + rows[e / 2]));
          probs[n][e] = masked ? 0.f : exp2f(probs[n][e] * p.scale_log2 - lse_log2[e / 2]);
        }
      }
      cp_async_wait<0>();
      __syncthreads();
      float grad_scores[kTile / 8][4] = {};
      warp_gemm_a_smem_b_nk<T, kTile, kD>(grad_scores, grad_out_tile, warp * 16, v_tile, 0, lane);
#pragma unroll
      for (int n = 0; n < kTile / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) grad_scores[n][e] = probs[n][e] * (grad_scores[n][e] - delta[e / 2]);
      }
      uint32_t grad_score_frags[kTile / 16][4];
      accumulator_to_a_fragments<T, kTile>(grad_score_frags, grad_scores);
      warp_gemm_a_regs_b_kn<T, kD, kTile>(grad_q_acc, grad_score_frags, k_tile, 0, lane);
    }
  }
  cp_async_wait<0>();

  T* grad_q = static_cast<T*>(p.grad_q) + ((int64_t(batch) * p.heads + head) * p.query_len) * kD;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= query_rows) continue;
    T* row = grad_q + int64_t(query0 + rows[r]) * kD;
#pragma unroll
    for (int n = 0; n < kD / 8; ++n) {
      *reinterpret_cast<uint32_t*>(row + n * 8 + (lane % 4) * 2) =
          MmaType<T>::pack(grad_q_acc[n][2 * r] * p.scale, grad_q_acc[n][2 * r + 1] * p.scale);
    }
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads) block_sparse_bwd_dkdv_kernel(const BlockSparseBwdParams p) {
  using T = typename Traits::Element;
  using Tile = typename Traits::RowTile;
  constexpr int kTile = Traits::kTile;
  constexpr int kD = Traits::kHeadDim;
  constexpr int kThreads = Traits::kThreads;

  extern __shared__ __align__(16) unsigned char shared_memory[];
  const Tile k_tile{reinterpret_cast<T*>(shared_memory)};
  const Tile v_tile{k_tile.data + Tile::kElements};
  const Tile q_tile{v_tile.data + Tile::kElements};
  const Tile grad_out_tile{q_tile.data + Tile::kElements};
  float* lse_log2 = reinterpret_cast<float*>(grad_out_tile.data + Tile::kElements);
  float* delta = lse_log2 + kTile;
  bool* key_visible = reinterpret_cast<bool*>(delta + kTile);

  const int thread = threadIdx.x, warp = thread / 32, lane = thread % 32;
  const int head = blockIdx.y, batch = blockIdx.z;
  const int key0 = blockIdx.x * kTile;
  const int key_rows = min(kTile, p.key_len - key0);

  load_tile_async<kThreads>(k_tile,
                            head_pointer<T>(p.k, p.k_batch_stride, p.k_head_stride, batch, head) +
                                int64_t(key0) * p.k_row_stride,
                            p.k_row_stride, key_rows, thread);
  load_tile_async<kThreads>(v_tile,
                            head_pointer<T>(p.v, p.v_batch_stride, p.v_head_stride, batch, head) +
                                int64_t(key0) * p.v_row_stride,
                            p.v_row_stride, key_rows, thread);
  cp_async_commit();
  for (int j = thread; j < kTile; j += kThreads) key_visible[j] = key_is_visible(p, batch, key0 + j);
  const T* q = head_pointer<T>(p.q, p.q_batch_stride, p.q_head_stride, batch, head);
  const T* grad_out = head_pointer<T>(p.grad_out, p.grad_out_batch_stride, p.grad_out_head_stride, batch, head);
  const int64_t row_stats = (int64_t(batch) * p.heads + head) * p.query_len;

  // This thread holds key rows `rows[0]` and `rows[0] + 8`; columns are queries.
  const int rows[2] = {warp * 16 + lane / 4, warp * 16 + lane / 4 + 8};
  float grad_k_acc[kD / 8][4] = {};
  float grad_v_acc[kD / 8][4] = {};

  const BlockList query_blocks = query_blocks_of(p, head, key0 / p.block_size);
  for (int listed = query_blocks.begin; listed < query_blocks.end; ++listed) {
    const int query_block = query_blocks.block(listed);
    for (int query0 = query_block * p.block_size; query0 < min((query_block + 1) * p.block_size, p.query_len);
         query0 += kTile) {
      const int query_rows = min(kTile, p.query_len - query0);
      if (tile_is_causally_empty(p, query0 + query_rows - 1, key0)) continue;
      __syncthreads();
      load_tile_async<kThreads>(q_tile, q + int64_t(query0) * p.q_row_stride, p.q_row_stride, query_rows, thread);
      cp_async_commit();
      load_tile_async<kThreads>(grad_out_tile, grad_out + int64_t(query0) * p.grad_out_row_stride,
                                p.grad_out_row_stride, query_rows, thread);
      cp_async_commit();
      for (int i = thread; i < kTile; i += kThreads) {
        const bool exists = i < query_rows;
        lse_log2[i] = exists ? p.lse[row_stats + query0 + i] * kLog2e : kInfinity;
        delta[i] = exists ? p.delta[row_stats + query0 + i] : 0.f;
      }
      cp_async_wait<1>();
      __syncthreads();

      float probs[kTile / 8][4] = {};  // P^T: rows are keys, columns queries
      warp_gemm_a_smem_b_nk<T, kTile, kD>(probs, k_tile, warp * 16, q_tile, 0, lane);
      const bool masked_tile = tile_needs_mask(p, query0, key0, kTile);
#pragma unroll
      for (int n = 0; n < kTile / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = n * 8 + (lane % 4) * 2 + (e % 2);
          const int row = rows[e / 2];
          const bool masked = masked_tile && (!key_visible[row] || (p.causal && key0 + row > query0 + col));
          probs[n][e] = masked ? 0.f : exp2f(probs[n][e] * p.scale_log2 - lse_log2[col]);
        }
      }
      cp_async_wait<0>();
      __syncthreads();
      float grad_scores[kTile / 8][4] = {};  // dP^T = V dO^T, then dS^T
      warp_gemm_a_smem_b_nk<T, kTile, kD>(grad_scores, v_tile, warp * 16, grad_out_tile, 0, lane);
#pragma unroll
      for (int n = 0; n < kTile / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = n * 8 + (lane % 4) * 2 + (e % 2);
          grad_scores[n][e] = probs[n][e] * (grad_scores[n][e] - delta[col]);
        }
      }
      uint32_t prob_frags[kTile / 16][4];
      accumulator_to_a_fragments<T, kTile>(prob_frags, probs);
      warp_gemm_a_regs_b_kn<T, kD, kTile>(grad_v_acc, prob_frags, grad_out_tile, 0, lane);
      uint32_t grad_score_frags[kTile / 16][4];
      accumulator_to_a_fragments<T, kTile>(grad_score_frags, grad_scores);
      warp_gemm_a_regs_b_kn<T, kD, kTile>(grad_k_acc, grad_score_frags, q_tile, 0, lane);
    }
  }
  cp_async_wait<0>();

  const int64_t head_offset = ((int64_t(batch) * p.heads + head) * p.key_len) * kD;
  T* grad_k = static_cast<T*>(p.grad_k) + head_offset;
  T* grad_v = static_cast<T*>(p.grad_v) + head_offset;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= key_rows) continue;
    const int64_t row = int64_t(key0 + rows[r]) * kD;
#pragma unroll
    for (int n = 0; n < kD / 8; ++n) {
      const int col = n * 8 + (lane % 4) * 2;
      *reinterpret_cast<uint32_t*>(grad_k + row + col) =
          MmaType<T>::pack(grad_k_acc[n][2 * r] * p.scale, grad_k_acc[n][2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(grad_v + row + col) = MmaType<T>::pack(grad_v_acc[n][2 * r], grad_v_acc[n][2 * r + 1]);
    }
  }
}

}  // namespace fastattn::cuda
