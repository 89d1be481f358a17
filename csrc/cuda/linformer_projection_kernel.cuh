// Linformer's projections K' = P_k K and V' = P_v V in one pass over K and V (padded keys zeroed),
// float32 sums. One CTA per (tile of projected rows, split of the keys, batch x head): it walks its split
// in chunks of kLinformerKeyChunk keys, loading a chunk of K and V and the matching columns of P_k and P_v,
// and keeps both products in registers. Splitting the keys gives the grid enough CTAs when B x H x kp is
// small; each split writes its own float32 partial sums and the reduce kernel adds them in split order,
// so the result does not depend on scheduling (no atomics). The CTAs of one split that differ only in
// their row tile are adjacent in the grid and read the same chunk of K and V, mostly from L2.
#pragma once

#include "block_sparse_common.cuh"
#include "linformer_params.h"
#include "sm80_primitives.cuh"

namespace fastattn::cuda {

constexpr int kLinformerReduceThreads = 256;

// Tensor cores (float16, bfloat16): 8 warps, 16 projected rows of K' (warps 0-3) or of V' (warps 4-7)
// each, so that a thread holds one accumulator of HeadDim columns; chunks double-buffered with cp.async.
template <typename Element_, int HeadDim>
struct LinformerProjectionTraits {
  using Element = Element_;
  static constexpr int kHeadDim = HeadDim;
  static constexpr int kRows = 64;
  static constexpr int kRowWarps = kRows / 16;
  static constexpr int kWarps = 2 * kRowWarps;
  static constexpr int kThreads = kWarps * 32;
  using ProjectionTile = SharedTile<Element, kRows, kLinformerKeyChunk>;
  using KeyTile = SharedTile<Element, kLinformerKeyChunk, HeadDim>;
  // A stage holds a tile of P_k and of P_v and a chunk of K and of V; two stages.
  static constexpr int kStageElements = 2 * ProjectionTile::kElements + 2 * KeyTile::kElements;
  static constexpr int kSharedBytes = 2 * kStageElements * static_cast<int>(sizeof(Element));
  static_assert(HeadDim % 16 == 0 && kLinformerKeyChunk % 16 == 0, "mma.m16n8k16 tiles");
};

// float32 (SIMT): 8 warps, 4 projected rows each; lane l owns columns l + 32 c of the rows of its warp.
template <int HeadDim>
struct LinformerProjectionSimtTraits {
  using Element = float;
  static constexpr int kHeadDim = HeadDim;
  static constexpr int kRows = 32;
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsPerWarp = kRows / kWarps;
  static constexpr int kValuesPerLane = HeadDim / 32;
  static constexpr int kProjectionFloats = kRows * kLinformerKeyChunk;
  static constexpr int kKeyFloats = kLinformerKeyChunk * HeadDim;
  static constexpr int kSharedBytes = (2 * kProjectionFloats + 2 * kKeyFloats) * static_cast<int>(sizeof(float));
  static_assert(HeadDim % 32 == 0, "each lane owns HeadDim / 32 columns");
};

// What one CTA works on: its projected rows, its keys, and where its inputs and partial sums start.
template <typename T>
struct ProjectionWork {
  int row0, rows;          // projected rows [row0, row0 + rows)
  int key_begin, key_end;  // keys of this split
  const T *k, *v, *proj_k, *proj_v;
  const bool* padding;     // this batch row's flags, or nullptr
  float *k_out, *v_out;    // (kp, D) of this split, batch and head

  __device__ __forceinline__ bool key_visible(int key) const {
    return key < key_end && (padding == nullptr || !padding[key]);
  }
};

template <typename T, int Rows>
__device__ __forceinline__ ProjectionWork<T> projection_work(const LinformerProjectionParams& p) {
  const int batch = blockIdx.z / p.heads, head = blockIdx.z % p.heads;
  ProjectionWork<T> w;
  w.row0 = blockIdx.x * Rows;
  w.rows = min(Rows, p.projected_len - w.row0);
  w.key_begin = blockIdx.y * p.keys_per_split;
  w.key_end = min(p.key_len, w.key_begin + p.keys_per_split);
  w.k = head_pointer<T>(p.k, p.k_batch_stride, p.k_head_stride, batch, head);
  w.v = head_pointer<T>(p.v, p.v_batch_stride, p.v_head_stride, batch, head);
  w.proj_k = static_cast<const T*>(p.proj_k) + head * p.proj_k_head_stride + int64_t(w.row0) * p.proj_k_row_stride;
  w.proj_v = static_cast<const T*>(p.proj_v) + head * p.proj_v_head_stride + int64_t(w.row0) * p.proj_v_row_stride;
  w.padding = p.key_padding_mask == nullptr ? nullptr : p.key_padding_mask + int64_t(batch) * p.key_len;
  const int64_t offset = blockIdx.y * p.split_stride + (int64_t(blockIdx.z) * p.projected_len + w.row0) * p.head_dim;
  w.k_out = p.k_partial + offset;
  w.v_out = p.v_partial + offset;
  return w;
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads) linformer_projection_kernel(const LinformerProjectionParams p) {
  using T = typename Traits::Element;
  using ProjectionTile = typename Traits::ProjectionTile;
  using KeyTile = typename Traits::KeyTile;
  constexpr int kD = Traits::kHeadDim;
  constexpr int kChunk = kLinformerKeyChunk;
  constexpr int kThreads = Traits::kThreads;

  extern __shared__ __align__(16) unsigned char shared_memory[];
  // Stage s: [P_k tile, P_v tile, K chunk, V chunk].
  T* const stages = reinterpret_cast<T*>(shared_memory);
  const auto projection_tile = [stages](int s, int which) {
    return ProjectionTile{stages + s * Traits::kStageElements + which * ProjectionTile::kElements};
  };
  const auto key_tile = [stages](int s, int which) {
    return KeyTile{stages + s * Traits::kStageElements + 2 * ProjectionTile::kElements + which * KeyTile::kElements};
  };

  const int thread = threadIdx.x, warp = thread / 32, lane = thread % 32;
  const ProjectionWork<T> w = projection_work<T, Traits::kRows>(p);
  const int rows = w.rows, key_end = w.key_end;
  const bool* const padding = w.padding;
  const auto row_exists = [rows](int row) { return row < rows; };
  // Projection columns past the split and key rows past it or padded are zero-filled.
  const auto load_chunk = [&](int key0, int s) {
    const int keys = key_end - key0;
    load_tile_async_if<kThreads>(projection_tile(s, 0), w.proj_k + key0, p.proj_k_row_stride, row_exists, keys,
                                 thread);
    load_tile_async_if<kThreads>(projection_tile(s, 1), w.proj_v + key0, p.proj_v_row_stride, row_exists, keys,
                                 thread);
    const auto key_visible = [key_end, padding, key0](int row) {
      const int key = key0 + row;
      return key < key_end && (padding == nullptr || !padding[key]);
    };
    load_tile_async_if<kThreads>(key_tile(s, 0), w.k + int64_t(key0) * p.k_row_stride, p.k_row_stride, key_visible,
                                 kD, thread);
    load_tile_async_if<kThreads>(key_tile(s, 1), w.v + int64_t(key0) * p.v_row_stride, p.v_row_stride, key_visible,
                                 kD, thread);
    cp_async_commit();
  };

  const int which = warp / Traits::kRowWarps;  // 0: K' = P_k K, 1: V' = P_v V
  const int m0 = (warp % Traits::kRowWarps) * 16;
  float acc[kD / 8][4] = {};
  const int chunks = (key_end - w.key_begin + kChunk - 1) / kChunk;
  load_chunk(w.key_begin, 0);
  for (int c = 0; c < chunks; ++c) {
    // The next chunk's loads are in flight while this one is multiplied.
    if (c + 1 < chunks) {
      load_chunk(w.key_begin + (c + 1) * kChunk, (c + 1) % 2);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    uint32_t frags[kChunk / 16][4];
    load_a_fragments<kChunk>(frags, projection_tile(c % 2, which), m0, 0, lane);
    warp_gemm_a_regs_b_kn<T, kD, kChunk>(acc, frags, key_tile(c % 2, which), 0, lane);
    __syncthreads();  // every warp is done with this stage before the next iteration refills it
  }

  float* const out = which == 0 ? w.k_out : w.v_out;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + lane / 4 + 8 * r;
    if (row >= rows) continue;
#pragma unroll
    for (int n = 0; n < kD / 8; ++n) {
      *reinterpret_cast<float2*>(out + int64_t(row) * kD + n * 8 + (lane % 4) * 2) =
          make_float2(acc[n][2 * r], acc[n][2 * r + 1]);
    }
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads)
    linformer_projection_simt_kernel(const LinformerProjectionParams p) {
  constexpr int kD = Traits::kHeadDim, kChunk = kLinformerKeyChunk;
  constexpr int kThreads = Traits::kThreads, kWarps = Traits::kWarps, kRows = Traits::kRowsPerWarp;
  constexpr int kValues = Traits::kValuesPerLane;
  extern __shared__ __align__(16) unsigned char shared_memory[];
  float* proj_k_tile = reinterpret_cast<float*>(shared_memory);  // [row][key]
  float* proj_v_tile = proj_k_tile + Traits::kProjectionFloats;
  float* k_tile = proj_v_tile + Traits::kProjectionFloats;  // [key][d]
  float* v_tile = k_tile + Traits::kKeyFloats;

  const int thread = threadIdx.x, warp = thread / 32, lane = thread % 32;
  const ProjectionWork<float> w = projection_work<float, Traits::kRows>(p);
  float k_acc[kRows][kValues] = {};
  float v_acc[kRows][kValues] = {};
  for (int key0 = w.key_begin; key0 < w.key_end; key0 += kChunk) {
    __syncthreads();  // every warp is done with the previous chunk
    for (int index = thread; index < Traits::kProjectionFloats; index += kThreads) {
      const int row = index / kChunk, key = key0 + index % kChunk;
      const bool exists = row < w.rows && key < w.key_end;
      proj_k_tile[index] = exists ? w.proj_k[row * p.proj_k_row_stride + key] : 0.f;
      proj_v_tile[index] = exists ? w.proj_v[row * p.proj_v_row_stride + key] : 0.f;
    }
    for (int index = thread; index < Traits::kKeyFloats; index += kThreads) {
      const int key = key0 + index / kD, col = index % kD;
      const bool visible = w.key_visible(key);
      k_tile[index] = visible ? w.k[int64_t(key) * p.k_row_stride + col] : 0.f;
      v_tile[index] = visible ? w.v[int64_t(key) * p.v_row_stride + col] : 0.f;
    }
    __syncthreads();
    // Unrolled 8 deep, not fully: fully unrolled, ptxas spilled it on sm_80 at D = 64.
#pragma unroll 8
    for (int j = 0; j < kChunk; ++j) {
#pragma unroll
      for (int c = 0; c < kValues; ++c) {
        const float key_value = k_tile[j * kD + lane + 32 * c], value = v_tile[j * kD + lane + 32 * c];
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          const int row = warp + i * kWarps;
          k_acc[i][c] += proj_k_tile[row * kChunk + j] * key_value;
          v_acc[i][c] += proj_v_tile[row * kChunk + j] * value;
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int row = warp + i * kWarps;
    if (row >= w.rows) continue;
#pragma unroll
    for (int c = 0; c < kValues; ++c) {
      w.k_out[int64_t(row) * kD + lane + 32 * c] = k_acc[i][c];
      w.v_out[int64_t(row) * kD + lane + 32 * c] = v_acc[i][c];
    }
  }
}

// k_proj = sum over splits of the partial sums, added in split order; one element per thread. (A template,
// so that every .cu that includes it may instantiate it.)
template <int Threads>
__global__ void __launch_bounds__(Threads) linformer_projection_reduce_kernel(const LinformerProjectionParams p) {
  const int64_t count = int64_t(p.batch) * p.heads * p.projected_len * p.head_dim;
  const int64_t index = int64_t(blockIdx.x) * Threads + threadIdx.x;
  if (index >= count) return;
  float k_sum = 0.f, v_sum = 0.f;
  for (int s = 0; s < p.splits; ++s) {
    k_sum += p.k_partial[s * p.split_stride + index];
    v_sum += p.v_partial[s * p.split_stride + index];
  }
  p.k_proj[index] = k_sum;
  p.v_proj[index] = v_sum;
}

}  // namespace fastattn::cuda
