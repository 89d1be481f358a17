// Launch templates: turn the runtime block size and dtype into the compile-time shapes of a kernel (chosen in
// block_sparse_traits.h). Causal masking, key padding and ragged lengths stay runtime flags (a uniform branch
// per tile), which keeps the instantiations to dtype x head dim x shape.
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
  const dim3 grid(tile_count(p.query_len, Traits::kBlockM), p.heads, p.batch);
  if constexpr (std::is_same_v<typename Traits::Element, float>) {
    launch<block_sparse_fwd_simt_kernel<Traits>>(grid, Traits::kThreads, Traits::kFwdSharedBytes, p, stream);
  } else {
    launch<block_sparse_fwd_kernel<Traits>>(grid, Traits::kThreads, Traits::kFwdSharedBytes, p, stream);
  }
}

// Dkdv and Dq: the traits of the dK/dV and of the dQ kernel.
template <typename Dkdv, typename Dq>
void launch_bwd(const BlockSparseBwdParams& p, cudaStream_t stream) {
  const dim3 key_grid(tile_count(p.key_len, Dkdv::kBlockM), p.heads, p.batch);
  const dim3 query_grid(tile_count(p.query_len, Dq::kBlockM), p.heads, p.batch);
  if constexpr (std::is_same_v<typename Dkdv::Element, float>) {
    launch<block_sparse_bwd_dkdv_simt_kernel<Dkdv>>(key_grid, Dkdv::kThreads, Dkdv::kBwdSharedBytes, p, stream);
    launch<block_sparse_bwd_dq_simt_kernel<Dq>>(query_grid, Dq::kThreads, Dq::kBwdSharedBytes, p, stream);
  } else {
    launch<block_sparse_bwd_dkdv_kernel<Dkdv>>(key_grid, Dkdv::kThreads, Dkdv::kBwdDkdvSharedBytes, p, stream);
    launch<block_sparse_bwd_dq_kernel<Dq>>(query_grid, Dq::kThreads, Dq::kBwdDqSharedBytes, p, stream);
  }
}

template <typename Element>
void launch_bwd_preprocess(const BlockSparseBwdParams& p, cudaStream_t stream) {
  constexpr int kRowsPerBlock = 8;
  const dim3 grid(tile_count(p.query_len, kRowsPerBlock), p.heads, p.batch);
  block_sparse_bwd_preprocess_kernel<Element><<<grid, kRowsPerBlock * 32, 0, stream>>>(p);
}

template <typename Element, int HeadDim>
void run_block_sparse_fwd(const BlockSparseFwdParams& params, cudaStream_t stream) {
  with_fwd_traits<Element, HeadDim>(params.block_size, [&](auto traits) {
    launch_fwd<typename decltype(traits)::type>(params, stream);
  });
}

template <typename Element, int HeadDim>
void run_block_sparse_bwd(const BlockSparseBwdParams& params, cudaStream_t stream) {
  launch_bwd_preprocess<Element>(params, stream);
  with_bwd_traits<Element, HeadDim>(params.block_size, [&](auto dkdv, auto dq) {
    launch_bwd<typename decltype(dkdv)::type, typename decltype(dq)::type>(params, stream);
  });
}

}  // namespace fastattn::cuda
