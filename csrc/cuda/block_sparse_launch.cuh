// Launch templates: turn the runtime block size and dtype into the compile-time tile of a kernel.
// Causal masking, key padding and ragged lengths stay runtime flags (a uniform branch per tile),
// which keeps the instantiations to dtype x head dim x tile.
#pragma once

#include <type_traits>

#include "block_sparse_bwd_kernel.cuh"
#include "block_sparse_fwd_kernel.cuh"
#include "block_sparse_launch.h"
#include "block_sparse_simt_kernel.cuh"
#include "launch_common.cuh"

namespace fastattn::cuda {

template <typename Traits>
void launch_fwd(const BlockSparseFwdParams& p, cudaStream_t stream) {
  const dim3 grid(tile_count(p.query_len, Traits::kTile), p.heads, p.batch);
  if constexpr (std::is_same_v<typename Traits::Element, float>) {
    launch<block_sparse_fwd_simt_kernel<Traits>>(grid, Traits::kThreads, Traits::kFwdSharedBytes, p, stream);
  } else {
    launch<block_sparse_fwd_kernel<Traits>>(grid, Traits::kThreads, Traits::kFwdSharedBytes, p, stream);
  }
}

template <typename Traits>
void launch_bwd(const BlockSparseBwdParams& p, cudaStream_t stream) {
  const dim3 query_grid(tile_count(p.query_len, Traits::kTile), p.heads, p.batch);
  const dim3 key_grid(tile_count(p.key_len, Traits::kTile), p.heads, p.batch);
  if constexpr (std::is_same_v<typename Traits::Element, float>) {
    launch<block_sparse_bwd_dkdv_simt_kernel<Traits>>(key_grid, Traits::kThreads, Traits::kBwdSharedBytes, p, stream);
    launch<block_sparse_bwd_dq_simt_kernel<Traits>>(query_grid, Traits::kThreads, Traits::kBwdSharedBytes, p, stream);
  } else {
    launch<block_sparse_bwd_dkdv_kernel<Traits>>(key_grid, Traits::kThreads, Traits::kBwdDkdvSharedBytes, p, stream);
    launch<block_sparse_bwd_dq_kernel<Traits>>(query_grid, Traits::kThreads, Traits::kBwdDqSharedBytes, p, stream);
  }
}

template <typename Element>
void launch_bwd_preprocess(const BlockSparseBwdParams& p, cudaStream_t stream) {
  constexpr int kRowsPerBlock = 8;
  const dim3 grid(tile_count(p.query_len, kRowsPerBlock), p.heads, p.batch);
  block_sparse_bwd_preprocess_kernel<Element><<<grid, kRowsPerBlock * 32, 0, stream>>>(p);
}

// Tiles of 64 rows (4 warps) where the block size allows, 32 (2 warps) for blocks of 32. The backward
// keeps two accumulators of HeadDim columns per row, so at HeadDim 128 it uses 32-row tiles to stay
// within the register file.
template <typename Element, int HeadDim>
void run_block_sparse_fwd(const BlockSparseFwdParams& params, cudaStream_t stream) {
  if constexpr (std::is_same_v<Element, float>) {
    launch_fwd<SimtTraits<HeadDim>>(params, stream);
  } else if (params.block_size == 32) {
    launch_fwd<TensorCoreTraits<Element, HeadDim, 32>>(params, stream);
  } else {
    launch_fwd<TensorCoreTraits<Element, HeadDim, 64>>(params, stream);
  }
}

template <typename Element, int HeadDim>
void run_block_sparse_bwd(const BlockSparseBwdParams& params, cudaStream_t stream) {
  launch_bwd_preprocess<Element>(params, stream);
  if constexpr (std::is_same_v<Element, float>) {
    launch_bwd<SimtTraits<HeadDim>>(params, stream);
  } else if constexpr (HeadDim == 128) {
    launch_bwd<TensorCoreTraits<Element, HeadDim, 32>>(params, stream);
  } else if (params.block_size == 32) {
    launch_bwd<TensorCoreTraits<Element, HeadDim, 32>>(params, stream);
  } else {
    launch_bwd<TensorCoreTraits<Element, HeadDim, 64>>(params, stream);
  }
}

}  // namespace fastattn::cuda
