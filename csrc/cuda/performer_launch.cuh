// Launch templates of the Performer kernels (performer_kernel.cuh): the order of the kernels of each
// direction, their grids and shared memory. The query kernels' shared memory grows with m; the attribute
// that allows it is set once per kernel and device for the largest m the kernels take.
#pragma once

#include "launch_common.cuh"
#include "performer_causal_kernel.cuh"
#include "performer_kernel.cuh"
#include "performer_launch.h"

namespace fastattn::cuda {

// out = the fixed-order sum of `splits` partial sums of `count` floats.
inline void launch_performer_sum_splits(const float* partial, float* out, int64_t count, int splits,
                                        cudaStream_t stream) {
  const PerformerSplits sum{partial, out, count, splits};
  constexpr int kThreads = kPerformerSumThreads;
  const dim3 grid(static_cast<unsigned>((count + kThreads - 1) / kThreads));
  launch<performer_sum_splits_kernel<kThreads>>(grid, kThreads, 0, sum, stream);
}

// A kernel whose shared memory depends on m: allowed once for the largest m, launched with this call's.
template <auto Kernel>
void launch_with_features(dim3 grid, int threads, int max_shared_bytes, int shared_bytes, const PerformerParams& p,
                          cudaStream_t stream) {
  if (max_shared_bytes > 48 * 1024) allow_shared_bytes<Kernel>(max_shared_bytes);
  launch<Kernel>(grid, threads, shared_bytes, p, stream);
}

// Causal softmax, before either direction: each chunk's per-feature key maxima (performer_key_max_kernel with
// one split per chunk, into rows 1.. of chunk_max), the running maxima after each chunk, then M, max_g l_g and c
// of every query.
template <typename Element, int HeadDim>
void run_performer_causal_stabilisers(const PerformerParams& p, cudaStream_t stream) {
  using Traits = PerformerTraits<Element, HeadDim>;
  using Causal = PerformerCausalTraits<Traits>;
  const unsigned heads = static_cast<unsigned>(p.batch * p.heads);
  const int chunks = tile_count(p.query_len, Traits::kRows);
  const int64_t columns = int64_t(heads) * p.features;
  PerformerParams chunk_maxima = p;
  chunk_maxima.key_max_partial = p.chunk_max + columns;
  chunk_maxima.keys_per_split = Traits::kRows;
  chunk_maxima.key_splits = chunks;
  launch<performer_key_max_kernel<Traits>>(dim3(tile_count(p.features, Traits::kFeatures), chunks, heads),
                                           Traits::kThreads, Traits::bytes(Traits::kKeyMaxFloats), chunk_maxima,
                                           stream);
  constexpr int kThreads = kPerformerSumThreads;
  const PerformerSplits running{nullptr, p.chunk_max, columns, chunks};
  launch<performer_running_max_kernel<kThreads>>(dim3(static_cast<unsigned>((columns + kThreads - 1) / kThreads)),
                                                 kThreads, 0, running, stream);
  launch_with_features<performer_causal_query_stabiliser_kernel<Traits>>(
      dim3(chunks, 1, heads), Traits::kThreads, Traits::bytes(Causal::query_stabiliser_floats(kPerformerMaxFeatures)),
      Traits::bytes(Causal::query_stabiliser_floats(p.features)), p, stream);
}

template <typename Element, int HeadDim>
void run_performer_causal_fwd(const PerformerParams& p, cudaStream_t stream) {
  using Traits = PerformerTraits<Element, HeadDim>;
  const unsigned heads = static_cast<unsigned>(p.batch * p.heads);
  if (p.softmax) run_performer_causal_stabilisers<Element, HeadDim>(p, stream);
  const dim3 tile_grid(tile_count(p.features, Traits::kFeatures), 1, heads);
  launch<performer_causal_fwd_kernel<Traits>>(tile_grid, Traits::kThreads,
                                              Traits::bytes(PerformerCausalTraits<Traits>::kFwdFloats), p, stream);
  launch<performer_causal_output_kernel<Traits>>(dim3(tile_count(p.query_len, Traits::kRows), 1, heads),
                                                 Traits::kThreads, 0, p, stream);
}

template <typename Element, int HeadDim>
void run_performer_causal_bwd(const PerformerParams& p, cudaStream_t stream) {
  using Traits = PerformerTraits<Element, HeadDim>;
  const unsigned heads = static_cast<unsigned>(p.batch * p.heads);
  const dim3 tile_grid(tile_count(p.features, Traits::kFeatures), 1, heads);
  constexpr int kBytes = Traits::bytes(PerformerCausalTraits<Traits>::kBwdFloats);
  if (p.softmax) run_performer_causal_stabilisers<Element, HeadDim>(p, stream);
  launch<performer_causal_bwd_query_kernel<Traits>>(tile_grid, Traits::kThreads, kBytes, p, stream);
  launch<performer_causal_bwd_key_kernel<Traits>>(tile_grid, Traits::kThreads, kBytes, p, stream);
  launch<performer_causal_grads_kernel<Traits>>(dim3(tile_count(p.query_len, Traits::kRows), 2, heads),
                                                Traits::kThreads, 0, p, stream);
}

template <typename Element, int HeadDim>
void run_performer_fwd(const PerformerParams& p, cudaStream_t stream) {
  using Traits = PerformerTraits<Element, HeadDim>;
  if (p.causal) return run_performer_causal_fwd<Element, HeadDim>(p, stream);
  const unsigned heads = static_cast<unsigned>(p.batch * p.heads);
  const dim3 key_grid(tile_count(p.features, Traits::kFeatures), p.key_splits, heads);
  if (p.softmax) {
    launch<performer_key_max_kernel<Traits>>(key_grid, Traits::kThreads, Traits::bytes(Traits::kKeyMaxFloats), p,
                                             stream);
  }
  launch<performer_state_kernel<Traits>>(key_grid, Traits::kThreads, Traits::bytes(Traits::kStateFloats), p, stream);
  if (p.key_splits > 1) {
    launch_performer_sum_splits(p.state_partial, p.state, int64_t(heads) * p.features * (HeadDim + 1), p.key_splits,
                                stream);
  }
  const dim3 query_grid(tile_count(p.query_len, Traits::kRows), 1, heads);
  launch_with_features<performer_output_kernel<Traits>>(
      query_grid, Traits::kThreads, Traits::bytes(Traits::output_floats(kPerformerMaxFeatures)),
      Traits::bytes(Traits::output_floats(p.features)), p, stream);
}

template <typename Element, int HeadDim>
void run_performer_bwd(const PerformerParams& p, cudaStream_t stream) {
  using Traits = PerformerTraits<Element, HeadDim>;
  if (p.causal) return run_performer_causal_bwd<Element, HeadDim>(p, stream);
  const unsigned heads = static_cast<unsigned>(p.batch * p.heads);
  const dim3 query_grid(tile_count(p.query_len, Traits::kRows), 1, heads);
  launch_with_features<performer_bwd_query_kernel<Traits>>(
      query_grid, Traits::kThreads, Traits::bytes(Traits::bwd_query_floats(kPerformerMaxFeatures)),
      Traits::bytes(Traits::bwd_query_floats(p.features)), p, stream);
  const dim3 state_grid(tile_count(p.features, Traits::kFeatures), p.query_splits, heads);
  launch<performer_bwd_state_kernel<Traits>>(state_grid, Traits::kThreads, Traits::bytes(Traits::kBwdStateFloats), p,
                                             stream);
  if (p.query_splits > 1) {
    launch_performer_sum_splits(p.grad_state_partial, p.grad_state, int64_t(heads) * p.features * (HeadDim + 1),
                                p.query_splits, stream);
  }
  const dim3 key_grid(tile_count(p.key_len, Traits::kRows), 1, heads);
  launch<performer_bwd_key_kernel<Traits>>(key_grid, Traits::kThreads, Traits::bytes(Traits::kBwdKeyFloats), p,
                                           stream);
}

}  // namespace fastattn::cuda
