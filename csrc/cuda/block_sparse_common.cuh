// Device helpers shared by every block-sparse kernel: where a (batch, head) starts, which blocks the
// layout lists, which (query, key) pairs are masked, and reductions over the lanes that share a row.
#pragma once

#include <cstdint>

#include "block_sparse_params.h"

namespace fastattn::cuda {

constexpr float kInfinity = __builtin_huge_valf();
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T>
__device__ __forceinline__ const T* head_pointer(const void* base, int64_t batch_stride, int64_t head_stride, int batch,
                                                 int head) {
  return static_cast<const T*>(base) + batch * batch_stride + head * head_stride;
}

template <typename T>
__device__ __forceinline__ T* head_pointer(void* base, int64_t batch_stride, int64_t head_stride, int batch, int head) {
  return static_cast<T*>(base) + batch * batch_stride + head * head_stride;
}

// The blocks listed for one block of one head: indices[begin..end), or every block [begin, end) of a
// dense layout (no CSR: indices is null).
struct BlockList {
  const int32_t* indices;
  int begin, end;
  __device__ __forceinline__ int block(int listed) const { return indices == nullptr ? listed : indices[listed]; }
};

__device__ __forceinline__ BlockList key_blocks_of(const BlockSparseFwdParams& p, int head, int query_block) {
  if (p.row_offsets == nullptr) return {nullptr, 0, p.num_key_blocks};
  const int32_t* offsets = p.row_offsets + head * p.row_offsets_head_stride;
  return {p.col_indices + head * p.col_indices_head_stride, offsets[query_block], offsets[query_block + 1]};
}

__device__ __forceinline__ BlockList query_blocks_of(const BlockSparseFwdParams& p, int head, int key_block) {
  if (p.col_offsets == nullptr) return {nullptr, 0, p.num_query_blocks};
  const int32_t* offsets = p.col_offsets + head * p.col_offsets_head_stride;
  return {p.row_indices + head * p.row_indices_head_stride, offsets[key_block], offsets[key_block + 1]};
}

// Whether key `key` (absolute index) exists and is not padding for this batch row.
__device__ __forceinline__ bool key_is_visible(const BlockSparseFwdParams& p, int batch, int key) {
  return key < p.key_len && (p.key_padding_mask == nullptr || !p.key_padding_mask[int64_t(batch) * p.key_len + key]);
}

// A tile of keys [key0, key0 + width) seen from queries [query0, query0 + height) needs element-wise
// masking when it has padding, runs past the end, or crosses the causal diagonal.
__device__ __forceinline__ bool tile_needs_mask(const BlockSparseFwdParams& p, int query0, int key0, int width) {
  return p.key_padding_mask != nullptr || key0 + width > p.key_len || (p.causal && key0 + width - 1 > query0);
}

// Under causal masking a key tile starting after the last query of the tile contributes nothing.
__device__ __forceinline__ bool tile_is_causally_empty(const BlockSparseFwdParams& p, int last_query, int key0) {
  return p.causal && key0 > last_query;
}

// The key tiles (Tile keys from key0) of the blocks listed for a query tile, in list order, without the
// tiles the causal mask empties: a kernel walks them with a single cursor, so it can issue the loads of
// the next tile before it computes on the current one.
template <int Tile>
struct KeyTileCursor {
  BlockList blocks;
  int listed, key0;

  __device__ __forceinline__ KeyTileCursor(const BlockSparseFwdParams& p, BlockList blocks_, int last_query)
      : blocks(blocks_), listed(blocks_.begin), key0(0) {
    if (listed < blocks.end) key0 = blocks.block(listed) * p.block_size;
    settle(p, last_query);
  }
  __device__ __forceinline__ bool valid() const { return listed < blocks.end; }
  __device__ __forceinline__ void advance(const BlockSparseFwdParams& p, int last_query) {
    key0 += Tile;
    settle(p, last_query);
  }

 private:
  // Moves on to the next listed block while key0 is past the current one's keys or causally empty (then
  // so are the block's later tiles).
  __device__ __forceinline__ void settle(const BlockSparseFwdParams& p, int last_query) {
    while (listed < blocks.end) {
      const int block = blocks.block(listed);
      if (key0 < min((block + 1) * p.block_size, p.key_len) && !tile_is_causally_empty(p, last_query, key0)) return;
      if (++listed < blocks.end) key0 = blocks.block(listed) * p.block_size;
    }
  }
};

// The query tiles (Tile queries from query0) of the blocks that list a key tile, in list order, without
// the tiles that see none of its keys under the causal mask (the tiles after them may: they are skipped
// one by one).
template <int Tile>
struct QueryTileCursor {
  BlockList blocks;
  int listed, query0;

  __device__ __forceinline__ QueryTileCursor(const BlockSparseFwdParams& p, BlockList blocks_, int key0)
      : blocks(blocks_), listed(blocks_.begin), query0(0) {
    if (listed < blocks.end) query0 = blocks.block(listed) * p.block_size;
    settle(p, key0);
  }
  __device__ __forceinline__ bool valid() const { return listed < blocks.end; }
  __device__ __forceinline__ void advance(const BlockSparseFwdParams& p, int key0) {
    query0 += Tile;
    settle(p, key0);
  }

 private:
  __device__ __forceinline__ void settle(const BlockSparseFwdParams& p, int key0) {
    while (listed < blocks.end) {
      const int block = blocks.block(listed);
      if (query0 >= min((block + 1) * p.block_size, p.query_len)) {
        if (++listed < blocks.end) query0 = blocks.block(listed) * p.block_size;
      } else if (tile_is_causally_empty(p, min(query0 + Tile, p.query_len) - 1, key0)) {
        query0 += Tile;
      } else {
        return;
      }
    }
  }
};

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// exp2 of a score against a running maximum that is still -inf (no key seen yet) must not give NaN.
__device__ __forceinline__ float finite_or_zero(float max_value) { return max_value == -kInfinity ? 0.f : max_value; }

}  // namespace fastattn::cuda
