// Forward block-sparse attention on tensor cores (FlashAttention-2 over the layout's CSR).
// One CTA per (query tile, head, batch); each warp owns Traits::kRowsPerWarp query rows and keeps their
// output, running maximum and running sum in registers while it walks the key tiles of the blocks listed
// for its query block: S = Q K^T (mma), masked online softmax, O += P V (mma, P straight from registers).
// The loads of the next tile overlap the current one's work (see the pipeline below).
#pragma once

#include "block_sparse_common.cuh"
#include "block_sparse_traits.h"

namespace fastattn::cuda {

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads) block_sparse_fwd_kernel(const BlockSparseFwdParams p) {
  using T = typename Traits::Element;
  using RowTile = typename Traits::RowTile;
  using ColumnTile = typename Traits::ColumnTile;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kRowTiles = Traits::kRowTilesPerWarp;
  constexpr int kD = Traits::kHeadDim;
  constexpr int kThreads = Traits::kThreads;

  extern __shared__ __align__(16) unsigned char shared_memory[];
  const RowTile q_tile{reinterpret_cast<T*>(shared_memory)};
  const ColumnTile k_tile{q_tile.data + RowTile::kElements};
  const ColumnTile v_tile{k_tile.data + ColumnTile::kElements};
  bool* const key_visible = reinterpret_cast<bool*>(v_tile.data + ColumnTile::kElements);  // 2 x kBlockN

  const int thread = threadIdx.x, warp = thread / 32, lane = thread % 32;
  const int head = blockIdx.y, batch = blockIdx.z;
  const int query0 = blockIdx.x * kBlockM;
  const int query_rows = min(kBlockM, p.query_len - query0);
  const int last_query = query0 + query_rows - 1;

  const T* q = head_pointer<T>(p.q, p.q_batch_stride, p.q_head_stride, batch, head) + int64_t(query0) * p.q_row_stride;
  const T* k = head_pointer<T>(p.k, p.k_batch_stride, p.k_head_stride, batch, head);
  const T* v = head_pointer<T>(p.v, p.v_batch_stride, p.v_head_stride, batch, head);
  // Loads of key tile key0: K (with its visibility flags into slot `slot`), or V.
  const auto load_keys = [&](int key0, int slot) {
    load_tile_async<kThreads>(k_tile, k + int64_t(key0) * p.k_row_stride, p.k_row_stride, p.key_len - key0, thread);
    cp_async_commit();
    for (int j = thread; j < kBlockN; j += kThreads) {
      key_visible[slot * kBlockN + j] = key_is_visible(p, batch, key0 + j);
    }
  };
  const auto load_values = [&](int key0) {
    load_tile_async<kThreads>(v_tile, v + int64_t(key0) * p.v_row_stride, p.v_row_stride, p.key_len - key0, thread);
    cp_async_commit();
  };

  // This warp's rows start at row0 of the tile (fragment_row gives each fragment's).
  const int row0 = warp * Traits::kRowsPerWarp;
  float out_acc[kRowTiles][kD / 8][4] = {};
  float row_max[kRowTiles][2], row_sum[kRowTiles][2];
#pragma unroll
  for (int i = 0; i < kRowTiles; ++i) {
    row_max[i][0] = row_max[i][1] = -kInfinity;
    row_sum[i][0] = row_sum[i][1] = 0.f;
  }

  // FlashAttention-2's pipeline on one buffer each for K and V: V of tile t loads while S = Q K^T runs,
  // and K of tile t + 1 while the softmax and O += P V of tile t run.
  KeyTileCursor<kBlockN> tile(p, key_blocks_of(p, head, query0 / p.block_size), last_query);
  load_tile_async<kThreads>(q_tile, q, p.q_row_stride, query_rows, thread);
  cp_async_commit();
  if (tile.valid()) load_keys(tile.key0, 0);
  for (int t = 0; tile.valid(); ++t) {
    const int key0 = tile.key0;
    __syncthreads();  // every warp is done with V of the previous tile
    load_values(key0);
    cp_async_wait<1>();  // q and K have landed; V may still be in flight
    __syncthreads();

    float scores[kRowTiles][kBlockN / 8][4] = {};
    warp_gemm_a_smem_b_nk<T, kBlockN, kD>(scores, q_tile, row0, k_tile, 0, lane);
    __syncthreads();  // every warp is done with K
    tile.advance(p, last_query);
    if (tile.valid()) load_keys(tile.key0, (t + 1) % 2);
    const bool* visible = key_visible + (t % 2) * kBlockN;
    const bool masked_tile = tile_needs_mask(p, query0, key0, kBlockN);
    uint32_t probs[kRowTiles][kBlockN / 16][4];
#pragma unroll
    for (int i = 0; i < kRowTiles; ++i) {
#pragma unroll
      for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = fragment_column(n, e, lane);
          const int row = fragment_row(row0, i, e / 2, lane);
          float s = scores[i][n][e] * p.scale_log2;
          if (masked_tile && (!visible[col] || (p.causal && key0 + col > query0 + row))) s = -kInfinity;
          scores[i][n][e] = s;
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float tile_max = -kInfinity;
#pragma unroll
        for (int n = 0; n < kBlockN / 8; ++n) {
          tile_max = fmaxf(tile_max, fmaxf(scores[i][n][2 * r], scores[i][n][2 * r + 1]));
        }
        const float new_max = fmaxf(row_max[i][r], quad_max(tile_max));
        const float base = finite_or_zero(new_max);
        const float correction = exp2f(row_max[i][r] - base);
        row_max[i][r] = new_max;
        float tile_sum = 0.f;
#pragma unroll
        for (int n = 0; n < kBlockN / 8; ++n) {
          scores[i][n][2 * r] = exp2f(scores[i][n][2 * r] - base);
          scores[i][n][2 * r + 1] = exp2f(scores[i][n][2 * r + 1] - base);
          tile_sum += scores[i][n][2 * r] + scores[i][n][2 * r + 1];
        }
        row_sum[i][r] = row_sum[i][r] * correction + tile_sum;  // per-thread partial sum, reduced at the end
#pragma unroll
        for (int n = 0; n < kD / 8; ++n) {
          out_acc[i][n][2 * r] *= correction;
          out_acc[i][n][2 * r + 1] *= correction;
        }
      }
      accumulator_to_a_fragments<T, kBlockN>(probs[i], scores[i]);
    }
    if (tile.valid()) {
      cp_async_wait<1>();  // V has landed; the next K may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    warp_gemm_a_regs_b_kn<T, kD, kBlockN>(out_acc, probs, v_tile, 0, lane);
  }
  cp_async_wait<0>();

  T* out = head_pointer<T>(p.out, p.out_batch_stride, p.out_head_stride, batch, head);
  float* lse = p.lse + (int64_t(batch) * p.heads + head) * p.query_len;
#pragma unroll
  for (int i = 0; i < kRowTiles; ++i) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = query0 + fragment_row(row0, i, r, lane);
      const float sum = quad_sum(row_sum[i][r]);
      if (row >= p.query_len) continue;
      const float inverse = sum > 0.f ? 1.f / sum : 0.f;
      T* out_row = out + int64_t(row) * p.out_row_stride;
#pragma unroll
      for (int n = 0; n < kD / 8; ++n) {
        const int col = fragment_column(n, 0, lane);
        *reinterpret_cast<uint32_t*>(out_row + col) =
            MmaType<T>::pack(out_acc[i][n][2 * r] * inverse, out_acc[i][n][2 * r + 1] * inverse);
      }
      if (lane % 4 == 0) lse[row] = sum > 0.f ? (row_max[i][r] + __log2f(sum)) * kLn2 : kInfinity;
    }
  }
}

}  // namespace fastattn::cuda
