// float32 block-sparse attention without tensor cores (the same algorithm as the tensor-core kernels):
// a CTA owns a tile of 32 rows (queries, or keys for dK/dV), each warp 4 of them; per chunk of 32
// keys (queries) in shared memory, lane j computes the score of column j with a full dot product,
// and each lane accumulates HeadDim / 32 output columns (lane + 32 c).
#pragma once

#include "block_sparse_common.cuh"
#include "block_sparse_traits.h"

namespace fastattn::cuda {

// Loads Rows x head_dim floats into a shared tile (rows Stride apart), zero-filling the rows where
// row_visible(row) is false.
template <int Rows, int Stride, typename RowVisible>
__device__ __forceinline__ void load_float_tile_if(float* tile, const float* global, int64_t row_stride,
                                                   RowVisible row_visible, int head_dim, int thread, int threads) {
  for (int index = thread; index < Rows * head_dim; index += threads) {
    const int row = index / head_dim, col = index % head_dim;
    tile[row * Stride + col] = row_visible(row) ? global[row * row_stride + col] : 0.f;
  }
}

// The same for rows at or past `valid_rows`.
template <int Rows, int Stride>
__device__ __forceinline__ void load_float_tile(float* tile, const float* global, int64_t row_stride, int valid_rows,
                                                int head_dim, int thread, int threads) {
  load_float_tile_if<Rows, Stride>(tile, global, row_stride, [valid_rows](int row) { return row < valid_rows; },
                                   head_dim, thread, threads);
}

template <int HeadDim>
__device__ __forceinline__ float dot(const float* a, const float* b) {
  float sum = 0.f;
#pragma unroll 16
  for (int d = 0; d < HeadDim; ++d) sum += a[d] * b[d];
  return sum;
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads) block_sparse_fwd_simt_kernel(const BlockSparseFwdParams p) {
  constexpr int kD = Traits::kHeadDim, kTile = Traits::kTile, kStride = Traits::kPaddedStride;
  constexpr int kThreads = Traits::kThreads, kWarps = Traits::kWarps, kRows = Traits::kRowsPerWarp;
  constexpr int kValues = Traits::kValuesPerLane;
  extern __shared__ __align__(16) unsigned char shared_memory[];
  float* q_tile = reinterpret_cast<float*>(shared_memory);
  float* k_tile = q_tile + Traits::kTileFloats;
  float* v_tile = k_tile + Traits::kTileFloats;
  bool* key_visible = reinterpret_cast<bool*>(v_tile + Traits::kTileFloats);

  const int thread = threadIdx.x, warp = thread / 32, lane = thread % 32;
  const int head = blockIdx.y, batch = blockIdx.z;
  const int query0 = blockIdx.x * kTile;
  const int query_rows = min(kTile, p.query_len - query0);
  const int last_query = query0 + query_rows - 1;
  const float* k = head_pointer<float>(p.k, p.k_batch_stride, p.k_head_stride, batch, head);
  const float* v = head_pointer<float>(p.v, p.v_batch_stride, p.v_head_stride, batch, head);
  load_float_tile<kTile, kStride>(q_tile,
                                  head_pointer<float>(p.q, p.q_batch_stride, p.q_head_stride, batch, head) +
                                      int64_t(query0) * p.q_row_stride,
                                  p.q_row_stride, query_rows, kD, thread, kThreads);

  float out_acc[kRows][kValues] = {};
  float row_max[kRows], row_sum[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) row_max[i] = -kInfinity, row_sum[i] = 0.f;

  const BlockList key_blocks = key_blocks_of(p, head, query0 / p.block_size);
  for (int listed = key_blocks.begin; listed < key_blocks.end; ++listed) {
    const int key_block = key_blocks.block(listed);
    for (int key0 = key_block * p.block_size; key0 < min((key_block + 1) * p.block_size, p.key_len); key0 += kTile) {
      if (tile_is_causally_empty(p, last_query, key0)) break;
      const int key_rows = min(kTile, p.key_len - key0);
      __syncthreads();
      load_float_tile<kTile, kStride>(k_tile, k + int64_t(key0) * p.k_row_stride, p.k_row_stride, key_rows, kD, thread,
                                      kThreads);
      load_float_tile<kTile, kStride>(v_tile, v + int64_t(key0) * p.v_row_stride, p.v_row_stride, key_rows, kD, thread,
                                      kThreads);
      for (int j = thread; j < kTile; j += kThreads) key_visible[j] = key_is_visible(p, batch, key0 + j);
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int row = warp + i * kWarps;
        float s = dot<kD>(q_tile + row * kStride, k_tile + lane * kStride) * p.scale_log2;
        if (!key_visible[lane] || (p.causal && key0 + lane > query0 + row)) s = -kInfinity;
        const float new_max = fmaxf(row_max[i], warp_max(s));
        const float base = finite_or_zero(new_max);
        const float correction = exp2f(row_max[i] - base);
        const float prob = exp2f(s - base);
        row_max[i] = new_max;
        row_sum[i] = row_sum[i] * correction + warp_sum(prob);
#pragma unroll
        for (int c = 0; c < kValues; ++c) out_acc[i][c] *= correction;
        for (int j = 0; j < kTile; ++j) {
          const float prob_j = __shfl_sync(0xffffffffu, prob, j);
#pragma unroll
          for (int c = 0; c < kValues; ++c) out_acc[i][c] += prob_j * v_tile[j * kStride + lane + 32 * c];
        }
      }
    }
  }

  float* out = head_pointer<float>(p.out, p.out_batch_stride, p.out_head_stride, batch, head);
  float* lse = p.lse + (int64_t(batch) * p.heads + head) * p.query_len;
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int row = warp + i * kWarps;
    if (row >= query_rows) continue;
    const float inverse = row_sum[i] > 0.f ? 1.f / row_sum[i] : 0.f;
#pragma unroll
    for (int c = 0; c < kValues; ++c) out[int64_t(query0 + row) * p.out_row_stride + lane + 32 * c] = out_acc[i][c] * inverse;
    if (lane == 0) lse[query0 + row] = row_sum[i] > 0.f ? (row_max[i] + log2f(row_sum[i])) * kLn2 : kInfinity;
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads) block_sparse_bwd_dq_simt_kernel(const BlockSparseBwdParams p) {
  constexpr int kD = Traits::kHeadDim, kTile = Traits::kTile, kStride = Traits::kPaddedStride;
  constexpr int kThreads = Traits::kThreads, kWarps = Traits::kWarps, kRows = Traits::kRowsPerWarp;
  constexpr int kValues = Traits::kValuesPerLane;
  extern __shared__ __align__(16) unsigned char shared_memory[];
  float* q_tile = reinterpret_cast<float*>(shared_memory);
  float* grad_out_tile = q_tile + Traits::kTileFloats;
  float* k_tile = grad_out_tile + Traits::kTileFloats;
  float* v_tile = k_tile + Traits::kTileFloats;
  bool* key_visible = reinterpret_cast<bool*>(v_tile + Traits::kTileFloats);

  const int thread = threadIdx.x, warp = thread / 32, lane = thread % 32;
  const int head = blockIdx.y, batch = blockIdx.z;
  const int query0 = blockIdx.x * kTile;
  const int query_rows = min(kTile, p.query_len - query0);
  const int last_query = query0 + query_rows - 1;
  const float* k = head_pointer<float>(p.k, p.k_batch_stride, p.k_head_stride, batch, head);
  const float* v = head_pointer<float>(p.v, p.v_batch_stride, p.v_head_stride, batch, head);
  load_float_tile<kTile, kStride>(q_tile,
                                  head_pointer<float>(p.q, p.q_batch_stride, p.q_head_stride, batch, head) +
                                      int64_t(query0) * p.q_row_stride,
                                  p.q_row_stride, query_rows, kD, thread, kThreads);
  load_float_tile<kTile, kStride>(
      grad_out_tile,
      head_pointer<float>(p.grad_out, p.grad_out_batch_stride, p.grad_out_head_stride, batch, head) +
          int64_t(query0) * p.grad_out_row_stride,
      p.grad_out_row_stride, query_rows, kD, thread, kThreads);

  const int64_t row_stats = (int64_t(batch) * p.heads + head) * p.query_len + query0;
  float lse_log2[kRows], delta[kRows];
  float grad_q_acc[kRows][kValues] = {};
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int row = warp + i * kWarps;
    lse_log2[i] = row < query_rows ? p.lse[row_stats + row] * kLog2e : kInfinity;
    delta[i] = row < query_rows ? p.delta[row_stats + row] : 0.f;
  }

  const BlockList key_blocks = key_blocks_of(p, head, query0 / p.block_size);
  for (int listed = key_blocks.begin; listed < key_blocks.end; ++listed) {
    const int key_block = key_blocks.block(listed);
    for (int key0 = key_block * p.block_size; key0 < min((key_block + 1) * p.block_size, p.key_len); key0 += kTile) {
      if (tile_is_causally_empty(p, last_query, key0)) break;
      const int key_rows = min(kTile, p.key_len - key0);
      __syncthreads();
      load_float_tile<kTile, kStride>(k_tile, k + int64_t(key0) * p.k_row_stride, p.k_row_stride, key_rows, kD, thread,
                                      kThreads);
      load_float_tile<kTile, kStride>(v_tile, v + int64_t(key0) * p.v_row_stride, p.v_row_stride, key_rows, kD, thread,
                                      kThreads);
      for (int j = thread; j < kTile; j += kThreads) key_visible[j] = key_is_visible(p, batch, key0 + j);
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int row = warp + i * kWarps;
        const bool masked = !key_visible[lane] || (p.causal && key0 + lane > query0 + row);
        const float s = dot<kD>(q_tile + row * kStride, k_tile + lane * kStride);
        const float prob = masked ? 0.f : exp2f(s * p.scale_log2 - lse_log2[i]);
        const float grad_prob = dot<kD>(grad_out_tile + row * kStride, v_tile + lane * kStride);
        const float grad_score = prob * (grad_prob - delta[i]);
        for (int j = 0; j < kTile; ++j) {
          const float grad_score_j = __shfl_sync(0xffffffffu, grad_score, j);
#pragma unroll
          for (int c = 0; c < kValues; ++c) grad_q_acc[i][c] += grad_score_j * k_tile[j * kStride + lane + 32 * c];
        }
      }
    }
  }

  float* grad_q = static_cast<float*>(p.grad_q) + ((int64_t(batch) * p.heads + head) * p.query_len) * kD;
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int row = warp + i * kWarps;
    if (row >= query_rows) continue;
#pragma unroll
    for (int c = 0; c < kValues; ++c) grad_q[int64_t(query0 + row) * kD + lane + 32 * c] = grad_q_acc[i][c] * p.scale;
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads) block_sparse_bwd_dkdv_simt_kernel(const BlockSparseBwdParams p) {
  constexpr int kD = Traits::kHeadDim, kTile = Traits::kTile, kStride = Traits::kPaddedStride;
  constexpr int kThreads = Traits::kThreads, kWarps = Traits::kWarps, kRows = Traits::kRowsPerWarp;
  constexpr int kValues = Traits::kValuesPerLane;
  extern __shared__ __align__(16) unsigned char shared_memory[];
  float* k_tile = reinterpret_cast<float*>(shared_memory);
  float* v_tile = k_tile + Traits::kTileFloats;
  float* q_tile = v_tile + Traits::kTileFloats;
  float* grad_out_tile = q_tile + Traits::kTileFloats;
  float* lse_log2 = grad_out_tile + Traits::kTileFloats;
  float* delta = lse_log2 + kTile;
  bool* key_visible = reinterpret_cast<bool*>(delta + kTile);

  const int thread = threadIdx.x, warp = thread / 32, lane = thread % 32;
  const int head = blockIdx.y, batch = blockIdx.z;
  const int key0 = blockIdx.x * kTile;
  const int key_rows = min(kTile, p.key_len - key0);
  load_float_tile<kTile, kStride>(k_tile,
                                  head_pointer<float>(p.k, p.k_batch_stride, p.k_head_stride, batch, head) +
                                      int64_t(key0) * p.k_row_stride,
                                  p.k_row_stride, key_rows, kD, thread, kThreads);
  load_float_tile<kTile, kStride>(v_tile,
                                  head_pointer<float>(p.v, p.v_batch_stride, p.v_head_stride, batch, head) +
                                      int64_t(key0) * p.v_row_stride,
                                  p.v_row_stride, key_rows, kD, thread, kThreads);
  for (int j = thread; j < kTile; j += kThreads) key_visible[j] = key_is_visible(p, batch, key0 + j);
  const float* q = head_pointer<float>(p.q, p.q_batch_stride, p.q_head_stride, batch, head);
  const float* grad_out = head_pointer<float>(p.grad_out, p.grad_out_batch_stride, p.grad_out_head_stride, batch, head);
  const int64_t row_stats = (int64_t(batch) * p.heads + head) * p.query_len;

  float grad_k_acc[kRows][kValues] = {};
  float grad_v_acc[kRows][kValues] = {};
  const BlockList query_blocks = query_blocks_of(p, head, key0 / p.block_size);
  for (int listed = query_blocks.begin; listed < query_blocks.end; ++listed) {
    const int query_block = query_blocks.block(listed);
    for (int query0 = query_block * p.block_size; query0 < min((query_block + 1) * p.block_size, p.query_len);
         query0 += kTile) {
      const int query_rows = min(kTile, p.query_len - query0);
      if (tile_is_causally_empty(p, query0 + query_rows - 1, key0)) continue;
      __syncthreads();
      // Rows that see no key (lse +inf; only with padding) load as 0: dS^T Q would add 0 times such a NaN query
      // to the later keys of this tile.
      const float* lse = p.lse + row_stats + query0;
      load_float_tile_if<kTile, kStride>(
          q_tile, q + int64_t(query0) * p.q_row_stride, p.q_row_stride,
          [&](int row) { return row < query_rows && (p.key_padding_mask == nullptr || lse[row] != kInfinity); }, kD,
          thread, kThreads);
      load_float_tile<kTile, kStride>(grad_out_tile, grad_out + int64_t(query0) * p.grad_out_row_stride,
                                      p.grad_out_row_stride, query_rows, kD, thread, kThreads);
      for (int i = thread; i < kTile; i += kThreads) {
        lse_log2[i] = i < query_rows ? p.lse[row_stats + query0 + i] * kLog2e : kInfinity;
        delta[i] = i < query_rows ? p.delta[row_stats + query0 + i] : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int row = warp + r * kWarps;  // key row; lane = query column
        const bool masked = !key_visible[row] || (p.causal && key0 + row > query0 + lane);
        const float s = dot<kD>(q_tile + lane * kStride, k_tile + row * kStride);
        const float prob = masked ? 0.f : exp2f(s * p.scale_log2 - lse_log2[lane]);
        const float grad_prob = dot<kD>(grad_out_tile + lane * kStride, v_tile + row * kStride);
        const float grad_score = prob * (grad_prob - delta[lane]);
        for (int i = 0; i < kTile; ++i) {
          const float prob_i = __shfl_sync(0xffffffffu, prob, i);
          const float grad_score_i = __shfl_sync(0xffffffffu, grad_score, i);
#pragma unroll
          for (int c = 0; c < kValues; ++c) {
            grad_v_acc[r][c] += prob_i * grad_out_tile[i * kStride + lane + 32 * c];
            grad_k_acc[r][c] += grad_score_i * q_tile[i * kStride + lane + 32 * c];
          }
        }
      }
    }
  }

  // Padded keys get 0: their P is 0, but a NaN query that sees keys makes delta, and so dS, NaN.
  __syncthreads();  // key_visible is written (the loop above may not have run)
  const int64_t head_offset = ((int64_t(batch) * p.heads + head) * p.key_len) * kD;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = warp + r * kWarps;
    if (row >= key_rows) continue;
    const bool visible = key_visible[row];
#pragma unroll
    for (int c = 0; c < kValues; ++c) {
      const int64_t index = head_offset + int64_t(key0 + row) * kD + lane + 32 * c;
      static_cast<float*>(p.grad_k)[index] = visible ? grad_k_acc[r][c] * p.scale : 0.f;
      static_cast<float*>(p.grad_v)[index] = visible ? grad_v_acc[r][c] : 0.f;
    }
  }
}

}  // namespace fastattn::cuda
