// Launch template of the Linformer projection: the tensor-core kernel for float16/bfloat16, the SIMT one
// for float32, then the fixed-order sum of the splits' partial sums.
#pragma once

#include <type_traits>

#include "launch_common.cuh"
#include "linformer_launch.h"
#include "linformer_projection_kernel.cuh"

namespace fastattn::cuda {

template <typename Element, int HeadDim>
void run_linformer_projection(const LinformerProjectionParams& p, cudaStream_t stream) {
  using Traits = std::conditional_t<std::is_same_v<Element, float>, LinformerProjectionSimtTraits<HeadDim>,
                                    LinformerProjectionTraits<Element, HeadDim>>;
  const dim3 grid(tile_count(p.projected_len, Traits::kRows), p.splits, p.batch * p.heads);
  if constexpr (std::is_same_v<Element, float>) {
    launch<linformer_projection_simt_kernel<Traits>>(grid, Traits::kThreads, Traits::kSharedBytes, p, stream);
  } else {
    launch<linformer_projection_kernel<Traits>>(grid, Traits::kThreads, Traits::kSharedBytes, p, stream);
  }
  if (p.splits > 1) {
    const int64_t count = int64_t(p.batch) * p.heads * p.projected_len * p.head_dim;
    const dim3 reduce_grid(static_cast<unsigned>((count + kLinformerReduceThreads - 1) / kLinformerReduceThreads));
    constexpr int kThreads = kLinformerReduceThreads;
    launch<linformer_projection_reduce_kernel<kThreads>>(reduce_grid, kThreads, 0, p, stream);
  }
}

}  // namespace fastattn::cuda
