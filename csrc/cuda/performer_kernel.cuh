// Performer attention kernels (non-causal; causal in performer_causal_kernel.cuh), FAVOR+ ("softmax") or relu features, with the stabilisers of
// csrc/cpu/performer.cpp (its header). Features are computed from the projection W (float32) in shared memory, tile by
// tile, and never stored in global memory: no (N, m) feature matrix and no (N, m, D) prefix tensor exist.
//
// Every product here is float32 on the FMA units (SIMT), whatever the inputs' dtype: the features of a key far
// below its feature's stabiliser are tiny (float16 would make them subnormal or zero), and the state sums over
// every key (float16 could overflow), so the products of features, states and gradients take float32 operands,
// as the Triton kernels' do; the inputs are read in their dtype and converted once per tile.
//
// Forward: performer_key_max_kernel (the per-feature maxima s_f of the key logits, partial per split of the
// keys), performer_state_kernel (the state phi_k^T [V | 1] per feature tile and split, s_f from the partial
// maxima), performer_sum_splits_kernel (the splits' partial states added in split order: deterministic, no
// atomics) and performer_output_kernel (per tile of queries: every feature of the tile's queries in shared
// memory, then the product with the state).
//
// Backward: performer_bwd_query_kernel (dq from dphi_q = [dnum | dden] state^T, one CTA per query tile; it also
// writes each query's constants for the next kernel), performer_bwd_state_kernel (d state = phi_q^T [dnum | dden]
// per feature tile and split of the queries, summed by performer_sum_splits_kernel) and performer_bwd_key_kernel
// (dv = phi_k d state[:, :D], dphi_k = [v | 1] d state^T, then dk; one CTA per key tile).
//
// Thread layout: 256 threads as a 16 x 16 grid (ty = thread / 16, tx = thread % 16); a thread owns the
// rows ty + 16 i and the columns tx + 16 j of a product, so each output's sum runs in one thread in a fixed
// order. Shared rows are padded to an odd number of floats, so the 16 rows one warp reads fall in distinct banks.
#pragma once

#include <cstdint>

#include "block_sparse_common.cuh"
#include "performer_params.h"

namespace fastattn::cuda {

constexpr float kPerformerReluEpsilon = 1e-3f;  // fastattn.reference.RELU_KERNEL_EPSILON
constexpr int kPerformerSumThreads = 256;
// __launch_bounds__'s minimum CTAs per SM: 1, so that ptxas need not cap registers for more. Left to its own
// register target, it capped several kernels at 64 or 80 registers and spilled in their main loops (sm_80 and
// sm_90); their shared memory allows one or two CTAs per SM at D = 128 anyway.
constexpr int kPerformerMinBlocks = 1;

template <typename Element_, int HeadDim>
struct PerformerTraits {
  using Element = Element_;
  static constexpr int kHeadDim = HeadDim;
  static constexpr int kRows = kPerformerRows;
  static constexpr int kFeatures = kPerformerFeatureTile;
  static constexpr int kThreads = 256;
  static constexpr int kLanes = 16;  // threads along each side of the 16 x 16 grid
  static constexpr int kRowsPerThread = kRows / kLanes;
  static constexpr int kFeaturesPerThread = kFeatures / kLanes;
  static constexpr int kColumnsPerThread = HeadDim / kLanes;
  // Row strides of the shared tiles, in floats: rows x D (+ 1: a state row's normaliser column fits) and
  // rows x features.
  static constexpr int kLd = HeadDim + 1;
  static constexpr int kFeatureLd = kFeatures + 1;
  static constexpr int kRowFloats = kRows * kLd;
  static constexpr int kFeatureRowFloats = kFeatures * kLd;
  static constexpr int kRowFeatureFloats = kRows * kFeatureLd;

  // Shared memory of each kernel, in floats (see the kernels for the layouts).
  static constexpr int kKeyMaxFloats = kRowFloats + kFeatureRowFloats + kRows + kLanes * kFeatures;
  static constexpr int kStateFloats = 2 * kRowFloats + kFeatureRowFloats + kRowFeatureFloats + kRows + kFeatures;
  static constexpr int kBwdStateFloats = 2 * kRowFloats + kFeatureRowFloats + kRowFeatureFloats + 3 * kRows +
                                         kFeatures + 1;
  static constexpr int kBwdKeyFloats = 2 * kRowFloats + 2 * kFeatureRowFloats + 2 * kRowFeatureFloats + 2 * kRows +
                                       kFeatures;
  // The query kernels hold every logit of their rows: kRows x (m + 1) floats, and the m key stabilisers.
  static constexpr int query_logits_ld(int features) { return features + 1; }
  static constexpr int output_floats(int features) {
    return kRowFloats + kFeatureRowFloats + kRows * query_logits_ld(features) + features + kRows;
  }
  static constexpr int bwd_query_floats(int features) {
    return 2 * kRowFloats + kFeatureRowFloats + kRows * query_logits_ld(features) + kRowFeatureFloats + features +
           3 * kRows;
  }
  static constexpr int bytes(int floats) { return floats * static_cast<int>(sizeof(float)); }

  static_assert(HeadDim % kLanes == 0 && kRows % kLanes == 0 && kFeatures % kLanes == 0, "16 x 16 thread grid");
  static_assert(kFeatures >= kRows, "the query kernels stage kRows rows of out in a feature tile's buffer");
};

// (batch, head) of a CTA whose blockIdx.z is batch * heads + head.
struct PerformerHead {
  int bh, batch, head;
  __device__ __forceinline__ explicit PerformerHead(const PerformerParams& p)
      : bh(blockIdx.z), batch(blockIdx.z / p.heads), head(blockIdx.z % p.heads) {}
};

__device__ __forceinline__ bool performer_key_visible(const PerformerParams& p, int batch, int key, int key_end) {
  return key < key_end && (p.key_padding_mask == nullptr || !p.key_padding_mask[int64_t(batch) * p.key_len + key]);
}

// dst[r][c] = visible(r) ? src[r][c] * multiplier : 0 for kRows rows of D, as float32 (rows row_stride apart).
template <typename Traits, typename T, typename Visible>
__device__ __forceinline__ void performer_load_rows(float* dst, const T* src, int64_t row_stride, float multiplier,
                                                    Visible visible, int thread) {
  constexpr int kD = Traits::kHeadDim;
  for (int index = thread; index < Traits::kRows * kD; index += Traits::kThreads) {
    const int r = index / kD, c = index % kD;
    dst[r * Traits::kLd + c] = visible(r) ? static_cast<float>(src[int64_t(r) * row_stride + c]) * multiplier : 0.f;
  }
}

// kFeatures rows of `columns` floats from rows f0.. of a (features x row_length) matrix; zeros past `features`.
template <typename Traits>
__device__ __forceinline__ void performer_load_feature_rows(float* dst, const float* src, int row_length, int columns,
                                                            int f0, int features, int thread) {
  for (int index = thread; index < Traits::kFeatures * columns; index += Traits::kThreads) {
    const int f = index / columns, c = index % columns;
    dst[f * Traits::kLd + c] = f0 + f < features ? src[int64_t(f0 + f) * row_length + c] : 0.f;
  }
}

// |x|^2 / 2 of each row of a shared rows x D tile (x already scaled), summed in double: |x|^2 / 2 is large next
// to the spread of the logits, and its rounding becomes a relative error of every feature of the row.
template <typename Traits>
__device__ __forceinline__ void performer_half_norms(float* half_norms, const float* x, int thread) {
  if (thread >= Traits::kRows) return;
  double sum = 0;
  for (int c = 0; c < Traits::kHeadDim; ++c) {
    const double value = x[thread * Traits::kLd + c];
    sum += value * value;
  }
  half_norms[thread] = static_cast<float>(0.5 * sum);
}

// acc[i][j] = w_f . x_r over the first Columns columns, for the rows r = ty + 16 i of x and the features
// f = tx + 16 j of a feature tile w (rows of both kLd apart).
template <typename Traits, int Columns = Traits::kHeadDim>
__device__ __forceinline__ void performer_tile_logits(float (&acc)[Traits::kRowsPerThread][Traits::kFeaturesPerThread],
                                                      const float* x, const float* w, int ty, int tx) {
#pragma unroll
  for (int i = 0; i < Traits::kRowsPerThread; ++i) {
#pragma unroll
    for (int j = 0; j < Traits::kFeaturesPerThread; ++j) acc[i][j] = 0.f;
  }
#pragma unroll 4
  for (int c = 0; c < Columns; ++c) {
    float xs[Traits::kRowsPerThread], ws[Traits::kFeaturesPerThread];
#pragma unroll
    for (int i = 0; i < Traits::kRowsPerThread; ++i) xs[i] = x[(ty + Traits::kLanes * i) * Traits::kLd + c];
#pragma unroll
    for (int j = 0; j < Traits::kFeaturesPerThread; ++j) ws[j] = w[(tx + Traits::kLanes * j) * Traits::kLd + c];
#pragma unroll
    for (int i = 0; i < Traits::kRowsPerThread; ++i) {
#pragma unroll
      for (int j = 0; j < Traits::kFeaturesPerThread; ++j) acc[i][j] += xs[i] * ws[j];
    }
  }
}

// Calls visit(i, j, r, f) for the rows r = ty + 16 i and features f = tx + 16 j that the thread owns in a rows x
// feature tile product such as performer_tile_logits's.
template <typename Traits, typename Visit>
__device__ __forceinline__ void performer_for_each_entry(int ty, int tx, Visit visit) {
#pragma unroll
  for (int i = 0; i < Traits::kRowsPerThread; ++i) {
#pragma unroll
    for (int j = 0; j < Traits::kFeaturesPerThread; ++j) visit(i, j, ty + Traits::kLanes * i, tx + Traits::kLanes * j);
  }
}

// acc[a][b] += sum over k < count of lhs(r, k) rhs[k * rhs_ld + c] for the thread's rows r = ty + 16 a and columns
// c = tx + 16 b of D, with lhs(r, k) = lhs[r * lhs_row_stride + k * lhs_k_stride] (a transposed lhs swaps the
// strides). Each sum runs in one thread, in k order.
template <typename Traits, int Rows>
__device__ __forceinline__ void performer_add_product(float (&acc)[Rows][Traits::kColumnsPerThread], const float* lhs,
                                                      int lhs_row_stride, int lhs_k_stride, const float* rhs,
                                                      int rhs_ld, int count, int ty, int tx) {
  for (int k = 0; k < count; ++k) {
    float columns[Traits::kColumnsPerThread];
#pragma unroll
    for (int b = 0; b < Traits::kColumnsPerThread; ++b) columns[b] = rhs[k * rhs_ld + tx + Traits::kLanes * b];
#pragma unroll
    for (int a = 0; a < Rows; ++a) {
      const float left = lhs[(ty + Traits::kLanes * a) * lhs_row_stride + k * lhs_k_stride];
#pragma unroll
      for (int b = 0; b < Traits::kColumnsPerThread; ++b) acc[a][b] += left * columns[b];
    }
  }
}

// dst[r * ld + c] = acc[a][b] for the thread's rows r = ty + 16 a below `rows` and columns c = tx + 16 b of D.
template <typename Traits>
__device__ __forceinline__ void performer_store_rows(float* dst, int64_t ld,
                                                     const float (&acc)[Traits::kRowsPerThread][Traits::kColumnsPerThread],
                                                     int rows, int ty, int tx) {
#pragma unroll
  for (int a = 0; a < Traits::kRowsPerThread; ++a) {
    const int r = ty + Traits::kLanes * a;
    if (r >= rows) continue;
#pragma unroll
    for (int b = 0; b < Traits::kColumnsPerThread; ++b) dst[r * ld + tx + Traits::kLanes * b] = acc[a][b];
  }
}

// The dlogits of a feature tile (kRows x kFeatures, rows kFeatureLd apart) into the gradient of the rows' x:
// row_sum (thread < kRows: row `thread`'s; the factor of the -|x|^2 / 2 term) += the sum over the features, and
// acc (the thread's rows and columns of D) += dlogits W, W the tile's rows of the projection (w).
template <typename Traits>
__device__ __forceinline__ void performer_add_dlogit_products(
    float (&acc)[Traits::kRowsPerThread][Traits::kColumnsPerThread], float& row_sum, const float* dlogits,
    const float* w, int thread) {
  if (thread < Traits::kRows) {
    for (int f = 0; f < Traits::kFeatures; ++f) row_sum += dlogits[thread * Traits::kFeatureLd + f];
  }
  performer_add_product<Traits>(acc, dlogits, Traits::kFeatureLd, 1, w, Traits::kLd, Traits::kFeatures,
                                thread / Traits::kLanes, thread % Traits::kLanes);
}

// The gradient of a row's x (before the sqrt(scale) of its scaling) from product = (dlogits W) of the element and
// row_sum, the sum of the row's dlogits: sqrt(scale) (product - row_sum x) (softmax: the -|x|^2 / 2 term; x
// scaled) or sqrt(scale) product (relu).
__device__ __forceinline__ float performer_input_grad(const PerformerParams& p, float product, float row_sum,
                                                      float x) {
  return p.sqrt_scale * (p.softmax ? product - row_sum * x : product);
}

// relu features and the gradient through them: relu(l) + eps, and dL/dl = dL/dphi where l > 0 (phi > eps).
// Compared as l <= 0, not through fmaxf: relu(NaN) is NaN (as torch's), which must reach the outputs.
__device__ __forceinline__ float performer_relu_feature(float logit) {
  return (logit <= 0.f ? 0.f : logit) + kPerformerReluEpsilon;
}
__device__ __forceinline__ float performer_relu_dlogit(float grad, float feature) {
  return feature <= kPerformerReluEpsilon ? 0.f : grad;
}

// dL/dl of a feature phi from dL/dphi: softmax (phi an exponential of l) dphi phi, relu performer_relu_dlogit.
__device__ __forceinline__ float performer_dlogit(bool softmax, float grad, float feature) {
  return softmax ? grad * feature : performer_relu_dlogit(grad, feature);
}

// phi[r][f] = the features of keys x (rows kLd apart) for the feature tile w from f0: exp(l - |k|^2 / 2 - s_f)
// (softmax, stabilisers: s_f of the tile) or relu(l) + eps, l = w_f . k; 0 for padded keys and features past m.
template <typename Traits, typename Visible>
__device__ __forceinline__ void performer_key_features(float* phi, const float* x, const float* w,
                                                       const float* half_norms, const float* stabilisers, bool softmax,
                                                       int f0, int features, Visible visible, int ty, int tx) {
  float logits[Traits::kRowsPerThread][Traits::kFeaturesPerThread];
  performer_tile_logits<Traits>(logits, x, w, ty, tx);
  performer_for_each_entry<Traits>(ty, tx, [&](int i, int j, int r, int f) {
    float feature = 0.f;
    if (visible(r) && f0 + f < features) {
      feature = softmax ? expf((logits[i][j] - half_norms[r]) - stabilisers[f]) : performer_relu_feature(logits[i][j]);
    }
    phi[r * Traits::kFeatureLd + f] = feature;
  });
}

// A query's feature from its logit, its largest logit, its constant c and the key stabilisers:
// exp(((l_f - max_g l_g) + (s_f - max_g s_g)) - c) in this order (as csrc/cpu/performer.cpp), or relu(l) + eps.
// The -|q|^2 / 2 of the logits cancels in l_f - max_g l_g (a per-query constant) and is left out.
__device__ __forceinline__ float performer_query_exponent(float logit, float logit_max, float stabiliser,
                                                          float stabiliser_max) {
  return (logit - logit_max) + (stabiliser - stabiliser_max);
}

// max_g s_g over the m key stabilisers of a head (every lane of the calling warp gets it).
__device__ __forceinline__ float performer_stabiliser_max(const float* stabilisers, int features, int lane) {
  float best = -kInfinity;
  for (int f = lane; f < features; f += 32) best = fmaxf(best, stabilisers[f]);
  return warp_max(best);
}

// Turns kRows rows of query logits (shared, every feature) into their features in place; one warp per row.
// Softmax: writes each row's largest logit and constant c to row_stats[r] (pairs) when row_stats is not null.
template <typename Traits>
__device__ __forceinline__ void performer_query_features(float* logits, int ld, int features, const float* stabilisers,
                                                         bool softmax, float* row_max, float* row_constant, int warp,
                                                         int lane) {
  const float stabiliser_max = softmax ? performer_stabiliser_max(stabilisers, features, lane) : 0.f;
  for (int r = warp; r < Traits::kRows; r += Traits::kThreads / 32) {
    float* row = logits + r * ld;
    if (!softmax) {
      for (int f = lane; f < features; f += 32) row[f] = performer_relu_feature(row[f]);
      continue;
    }
    float logit_max = -kInfinity;
    for (int f = lane; f < features; f += 32) logit_max = fmaxf(logit_max, row[f]);
    logit_max = warp_max(logit_max);
    float constant = -kInfinity;
    for (int f = lane; f < features; f += 32) {
      const float exponent = performer_query_exponent(row[f], logit_max, stabilisers[f], stabiliser_max);
      row[f] = exponent;
      constant = fmaxf(constant, exponent);
    }
    constant = warp_max(constant);
    for (int f = lane; f < features; f += 32) row[f] = expf(row[f] - constant);
    if (lane == 0 && row_max != nullptr) {
      row_max[r] = logit_max;
      row_constant[r] = constant;
    }
  }
}

// Every feature's logit of kRows rows of x: tile by tile through the w buffer (kFeatures x D), into logits
// (kRows x ld). Ends with a __syncthreads.
template <typename Traits>
__device__ __forceinline__ void performer_all_logits(float* logits, int ld, const float* x, float* w,
                                                     const float* projection, int features, int thread) {
  const int ty = thread / Traits::kLanes, tx = thread % Traits::kLanes;
  for (int f0 = 0; f0 < features; f0 += Traits::kFeatures) {
    performer_load_feature_rows<Traits>(w, projection, Traits::kHeadDim, Traits::kHeadDim, f0, features, thread);
    __syncthreads();
    float acc[Traits::kRowsPerThread][Traits::kFeaturesPerThread];
    performer_tile_logits<Traits>(acc, x, w, ty, tx);
    performer_for_each_entry<Traits>(ty, tx, [&](int i, int j, int r, int f) {
      if (f0 + f < features) logits[r * ld + f0 + f] = acc[i][j];
    });
    __syncthreads();  // w is refilled by the next tile
  }
}

// Rows f0.. of a state (m x (D + 1), contiguous) from a feature tile's sums: acc (the thread's features
// f0 + ty + 16 a and columns tx + 16 b of D) and last_column (thread < kF: feature f0 + thread's column D).
template <typename Traits>
__device__ __forceinline__ void performer_store_state_tile(
    float* state, const float (&acc)[Traits::kFeaturesPerThread][Traits::kColumnsPerThread], float last_column, int f0,
    int features, int thread) {
  constexpr int kLanes = Traits::kLanes, kLd = Traits::kHeadDim + 1;
  const int ty = thread / kLanes, tx = thread % kLanes;
#pragma unroll
  for (int a = 0; a < Traits::kFeaturesPerThread; ++a) {
    const int f = f0 + ty + kLanes * a;
    if (f >= features) continue;
#pragma unroll
    for (int b = 0; b < Traits::kColumnsPerThread; ++b) state[int64_t(f) * kLd + tx + kLanes * b] = acc[a][b];
  }
  if (thread < Traits::kFeatures && f0 + thread < features) state[int64_t(f0 + thread) * kLd + Traits::kHeadDim] = last_column;
}

// ------------------------------------------------------------------------------------------- forward

// Partial maxima of the key logits l_f(k) = w_f . k - |k|^2 / 2 over the unpadded keys of one split, per
// feature: key_max_partial[split][bh][f]. grid (feature tiles, key splits, B * H). Softmax only.
template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, kPerformerMinBlocks) performer_key_max_kernel(const PerformerParams p) {
  using T = typename Traits::Element;
  constexpr int kRows = Traits::kRows, kF = Traits::kFeatures, kLanes = Traits::kLanes;
  extern __shared__ __align__(16) unsigned char shared_memory[];
  float* x = reinterpret_cast<float*>(shared_memory);  // [row][d]
  float* w = x + Traits::kRowFloats;                    // [feature][d]
  float* half_norms = w + Traits::kFeatureRowFloats;    // [row]
  float* partial = half_norms + kRows;                  // [ty][feature]

  const int thread = threadIdx.x, ty = thread / kLanes, tx = thread % kLanes;
  const PerformerHead hd(p);
  const int f0 = blockIdx.x * kF;
  const int key_begin = blockIdx.y * p.keys_per_split, key_end = min(p.key_len, key_begin + p.keys_per_split);
  const T* k = head_pointer<T>(p.k, p.k_batch_stride, p.k_head_stride, hd.batch, hd.head);
  performer_load_feature_rows<Traits>(w, p.projection + hd.head * p.projection_head_stride, Traits::kHeadDim,
                                      Traits::kHeadDim, f0, p.features, thread);
  float best[Traits::kFeaturesPerThread];
#pragma unroll
  for (int j = 0; j < Traits::kFeaturesPerThread; ++j) best[j] = -kInfinity;
  for (int key0 = key_begin; key0 < key_end; key0 += kRows) {
    const auto visible = [&](int r) { return performer_key_visible(p, hd.batch, key0 + r, key_end); };
    __syncthreads();  // every thread is done with the previous chunk
    performer_load_rows<Traits>(x, k + int64_t(key0) * p.k_row_stride, p.k_row_stride, p.sqrt_scale, visible, thread);
    __syncthreads();
    performer_half_norms<Traits>(half_norms, x, thread);
    __syncthreads();
    float acc[Traits::kRowsPerThread][Traits::kFeaturesPerThread];
    performer_tile_logits<Traits>(acc, x, w, ty, tx);
    performer_for_each_entry<Traits>(ty, tx, [&](int i, int j, int r, int) {
      if (visible(r)) best[j] = fmaxf(best[j], acc[i][j] - half_norms[r]);
    });
  }
#pragma unroll
  for (int j = 0; j < Traits::kFeaturesPerThread; ++j) partial[ty * kF + tx + kLanes * j] = best[j];
  __syncthreads();
  if (thread < kF && f0 + thread < p.features) {
    float value = -kInfinity;
    for (int y = 0; y < kLanes; ++y) value = fmaxf(value, partial[y * kF + thread]);
    p.key_max_partial[(int64_t(blockIdx.y) * p.batch * p.heads + hd.bh) * p.features + f0 + thread] = value;
  }
}

// The state phi_k^T [V | 1] of one feature tile over one split of the keys: into p.state with one split, else
// into the split's partial state. The split-0 CTA writes the key stabilisers s_f of its features (0 for relu,
// and where every key of the batch row is padded). grid (feature tiles, key splits, B * H).
template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, kPerformerMinBlocks) performer_state_kernel(const PerformerParams p) {
  using T = typename Traits::Element;
  constexpr int kRows = Traits::kRows, kF = Traits::kFeatures, kLanes = Traits::kLanes, kD = Traits::kHeadDim;
  constexpr int kLd = Traits::kLd, kFLd = Traits::kFeatureLd;
  extern __shared__ __align__(16) unsigned char shared_memory[];
  float* x = reinterpret_cast<float*>(shared_memory);  // [row][d]
  float* values = x + Traits::kRowFloats;               // [row][d]
  float* w = values + Traits::kRowFloats;               // [feature][d]
  float* phi = w + Traits::kFeatureRowFloats;           // [row][feature]
  float* half_norms = phi + Traits::kRowFeatureFloats;  // [row]
  float* stabilisers = half_norms + kRows;              // [feature]

  const int thread = threadIdx.x, ty = thread / kLanes, tx = thread % kLanes;
  const PerformerHead hd(p);
  const int f0 = blockIdx.x * kF, m = p.features;
  const int key_begin = blockIdx.y * p.keys_per_split, key_end = min(p.key_len, key_begin + p.keys_per_split);
  const int64_t heads_total = int64_t(p.batch) * p.heads;
  if (thread < kF) {
    const int f = f0 + thread;
    float value = 0.f;
    if (p.softmax && f < m) {
      value = -kInfinity;
      for (int s = 0; s < p.key_splits; ++s) value = fmaxf(value, p.key_max_partial[(s * heads_total + hd.bh) * m + f]);
      if (value == -kInfinity) value = 0.f;  // no unpadded key
    }
    stabilisers[thread] = value;
    if (blockIdx.y == 0 && f < m) p.key_stabiliser[int64_t(hd.bh) * m + f] = value;
  }
  performer_load_feature_rows<Traits>(w, p.projection + hd.head * p.projection_head_stride, kD, kD, f0, m, thread);
  const T* k = head_pointer<T>(p.k, p.k_batch_stride, p.k_head_stride, hd.batch, hd.head);
  const T* v = head_pointer<T>(p.v, p.v_batch_stride, p.v_head_stride, hd.batch, hd.head);

  float acc[Traits::kFeaturesPerThread][Traits::kColumnsPerThread] = {};
  float normaliser = 0.f;  // thread < kF: the sum of feature f0 + thread over the keys
  for (int key0 = key_begin; key0 < key_end; key0 += kRows) {
    const auto visible = [&](int r) { return performer_key_visible(p, hd.batch, key0 + r, key_end); };
    __syncthreads();  // every thread is done with the previous chunk
    performer_load_rows<Traits>(x, k + int64_t(key0) * p.k_row_stride, p.k_row_stride, p.sqrt_scale, visible, thread);
    performer_load_rows<Traits>(values, v + int64_t(key0) * p.v_row_stride, p.v_row_stride, 1.f, visible, thread);
    __syncthreads();
    if (p.softmax) performer_half_norms<Traits>(half_norms, x, thread);
    __syncthreads();
    performer_key_features<Traits>(phi, x, w, half_norms, stabilisers, p.softmax, f0, m, visible, ty, tx);
    __syncthreads();
    performer_add_product<Traits>(acc, phi, 1, kFLd, values, kLd, kRows, ty, tx);  // phi^T V
    if (thread < kF) {
      for (int r = 0; r < kRows; ++r) normaliser += phi[r * kFLd + thread];
    }
  }
  float* state = (p.key_splits == 1 ? p.state : p.state_partial + blockIdx.y * heads_total * m * (kD + 1)) +
                 int64_t(hd.bh) * m * (kD + 1);
  performer_store_state_tile<Traits>(state, acc, normaliser, f0, m, thread);
}

// out[i] = sum over s of partial[s][i], added in split order; one element per thread.
template <int Threads>
__global__ void __launch_bounds__(Threads) performer_sum_splits_kernel(const PerformerSplits s) {
  const int64_t index = int64_t(blockIdx.x) * Threads + threadIdx.x;
  if (index >= s.count) return;
  float sum = 0.f;
  for (int split = 0; split < s.splits; ++split) sum += s.partial[split * s.count + index];
  s.out[index] = sum;
}

// Outputs of a tile of kRows queries: their features (every feature, in shared memory) times the state, over
// the normaliser; saves the normaliser (0, and a zero output, where the query sees no key). grid (query
// tiles, 1, B * H); shared memory output_floats(m).
template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, kPerformerMinBlocks) performer_output_kernel(const PerformerParams p) {
  using T = typename Traits::Element;
  constexpr int kRows = Traits::kRows, kF = Traits::kFeatures, kLanes = Traits::kLanes, kD = Traits::kHeadDim;
  constexpr int kLd = Traits::kLd;
  const int m = p.features, ld = Traits::query_logits_ld(m);
  extern __shared__ __align__(16) unsigned char shared_memory[];
  float* x = reinterpret_cast<float*>(shared_memory);  // [row][d]
  float* tile = x + Traits::kRowFloats;                 // [feature][d]: projection rows, then state rows
  float* features = tile + Traits::kFeatureRowFloats;   // [row][feature], every feature
  float* stabilisers = features + kRows * ld;           // [feature], every feature
  float* normalisers = stabilisers + m;                 // [row]

  const int thread = threadIdx.x, warp = thread / 32, lane = thread % 32, ty = thread / kLanes, tx = thread % kLanes;
  const PerformerHead hd(p);
  const int q0 = blockIdx.x * kRows, rows = min(kRows, p.query_len - q0);
  const T* q = head_pointer<T>(p.q, p.q_batch_stride, p.q_head_stride, hd.batch, hd.head);
  const auto exists = [rows](int r) { return r < rows; };
  performer_load_rows<Traits>(x, q + int64_t(q0) * p.q_row_stride, p.q_row_stride, p.sqrt_scale, exists, thread);
  for (int f = thread; f < m; f += Traits::kThreads) stabilisers[f] = p.key_stabiliser[int64_t(hd.bh) * m + f];
  __syncthreads();
  performer_all_logits<Traits>(features, ld, x, tile, p.projection + hd.head * p.projection_head_stride, m, thread);
  performer_query_features<Traits>(features, ld, m, stabilisers, p.softmax, nullptr, nullptr, warp, lane);

  const float* state = p.state + int64_t(hd.bh) * m * (kD + 1);
  float acc[Traits::kRowsPerThread][Traits::kColumnsPerThread] = {};
  float normaliser = 0.f;  // thread < kRows: row `thread`'s
  // Whether the state holds a key: its normaliser column is all 0 when it holds none, while every unpadded key
  // adds to it (softmax: 1 in the features its logits peak at; relu: eps at least).
  bool holds_key = false;
  for (int f0 = 0; f0 < m; f0 += kF) {
    __syncthreads();  // the features are written, and every thread is done with the previous tile
    performer_load_feature_rows<Traits>(tile, state, kD + 1, kD + 1, f0, m, thread);
    __syncthreads();
    const int count = min(kF, m - f0);
    performer_add_product<Traits>(acc, features + f0, ld, 1, tile, kLd, count, ty, tx);
    if (thread < kRows) {
      for (int f = 0; f < count; ++f) {
        normaliser += features[thread * ld + f0 + f] * tile[f * kLd + kD];
        holds_key = holds_key || tile[f * kLd + kD] != 0.f;
      }
    }
  }
  if (thread < kRows) {
    // A query that sees a key has a normaliser >= 1 (softmax) or >= m eps^2 (relu), one that sees none exactly
    // 0 (its output is 0, whatever the query holds: a NaN one would make phi(q) . 0 NaN). NaN (an input's)
    // stays NaN.
    if (!holds_key) normaliser = 0.f;
    normalisers[thread] = normaliser;
    if (thread < rows) p.normaliser[int64_t(hd.bh) * p.query_len + q0 + thread] = normaliser;
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out) + (int64_t(hd.bh) * p.query_len + q0) * kD;
#pragma unroll
  for (int i = 0; i < Traits::kRowsPerThread; ++i) {
    const int r = ty + kLanes * i;
    if (r >= rows) continue;
    const float den = normalisers[r];
#pragma unroll
    for (int j = 0; j < Traits::kColumnsPerThread; ++j) {
      out[int64_t(r) * kD + tx + kLanes * j] = static_cast<T>(den == 0.f ? 0.f : acc[i][j] / den);
    }
  }
}

// ------------------------------------------------------------------------------------------- backward

// dnum = grad_out / den of kRows query rows from row_base (a row of (B * H * Nq)) into grads (rows kLd apart,
// the first D columns); zero where den == 0 (the query sees no key) or the row does not exist (r >= rows).
template <typename Traits>
__device__ __forceinline__ void performer_load_output_grads(const PerformerParams& p, int64_t row_base, int rows,
                                                            float* grads, int thread) {
  using T = typename Traits::Element;
  constexpr int kD = Traits::kHeadDim;
  const float* normaliser = p.normaliser + row_base;
  const T* grad_out = static_cast<const T*>(p.grad_out) + row_base * kD;
  for (int index = thread; index < Traits::kRows * kD; index += Traits::kThreads) {
    const int r = index / kD, c = index % kD;
    const float den = r < rows ? normaliser[r] : 0.f;
    grads[r * Traits::kLd + c] =
        r < rows && !(den == 0.f) ? static_cast<float>(grad_out[int64_t(r) * kD + c]) / den : 0.f;
  }
}

// Per query row: G = [dnum | dden] with dnum = grad_out / den and dden = -(dnum . out), zero where den == 0
// (the row sees no key) or the row does not exist; keep[r] says which rows have a gradient. The tile
// buffer (at least kRows x kLd floats) holds the rows of out for the dot product, summed in double
// (grad_out . out cancels against dnum . v in the gradients).
template <typename Traits>
__device__ __forceinline__ void performer_output_grads(const PerformerParams& p, const PerformerHead& hd, int q0,
                                                       int rows, float* grads, float* dden, float* scratch,
                                                       float* keep, int thread) {
  using T = typename Traits::Element;
  constexpr int kD = Traits::kHeadDim, kLd = Traits::kLd;
  const int64_t row_base = int64_t(hd.bh) * p.query_len + q0;
  const float* normaliser = p.normaliser + row_base;
  const T* out = static_cast<const T*>(p.out) + row_base * kD;
  performer_load_output_grads<Traits>(p, row_base, rows, grads, thread);
  for (int index = thread; index < Traits::kRows * kD; index += Traits::kThreads) {
    const int r = index / kD, c = index % kD;
    const bool has_grad = r < rows && !(normaliser[r] == 0.f);
    scratch[r * kLd + c] = has_grad ? static_cast<float>(out[int64_t(r) * kD + c]) : 0.f;
  }
  __syncthreads();
  if (thread < Traits::kRows) {
    double dot = 0;
    for (int c = 0; c < kD; ++c) dot += double(grads[thread * kLd + c]) * double(scratch[thread * kLd + c]);
    dden[thread] = static_cast<float>(-dot);
    keep[thread] = thread < rows && !(normaliser[thread] == 0.f) ? 1.f : 0.f;
  }
  __syncthreads();
}

// dq of a tile of kRows queries: dphi_q = [dnum | dden] state^T, dlogits = dphi_q phi_q (softmax) or dphi_q
// where w.q > 0 (relu), dq = sqrt(scale) (dlogits W - sum(dlogits) q) (softmax: the -|q|^2 / 2). Writes each
// query's largest logit, constant and dden to p.query_rows for performer_bwd_state_kernel. grid (query tiles,
// 1, B * H); shared memory bwd_query_floats(m).
template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, kPerformerMinBlocks) performer_bwd_query_kernel(const PerformerParams p) {
  using T = typename Traits::Element;
  constexpr int kRows = Traits::kRows, kF = Traits::kFeatures, kLanes = Traits::kLanes, kD = Traits::kHeadDim;
  constexpr int kLd = Traits::kLd, kFLd = Traits::kFeatureLd;
  const int m = p.features, ld = Traits::query_logits_ld(m);
  extern __shared__ __align__(16) unsigned char shared_memory[];
  float* x = reinterpret_cast<float*>(shared_memory);  // [row][d]
  float* grads = x + Traits::kRowFloats;                // [row][d]: dnum
  float* tile = grads + Traits::kRowFloats;             // [feature][d]: out rows, projection rows, state rows
  float* features = tile + Traits::kFeatureRowFloats;   // [row][feature], every feature
  float* dlogits = features + kRows * ld;               // [row][feature] of a feature tile
  float* stabilisers = dlogits + Traits::kRowFeatureFloats;  // [feature], every feature
  float* dden = stabilisers + m;                        // [row]
  float* keep = dden + kRows;                           // [row]: 1 where the row has a gradient
  float* row_sums = keep + kRows;                       // [row]: sum of the row's dlogits

  const int thread = threadIdx.x, warp = thread / 32, lane = thread % 32, ty = thread / kLanes, tx = thread % kLanes;
  const PerformerHead hd(p);
  const int q0 = blockIdx.x * kRows, rows = min(kRows, p.query_len - q0);
  const T* q = head_pointer<T>(p.q, p.q_batch_stride, p.q_head_stride, hd.batch, hd.head);
  const float* projection = p.projection + hd.head * p.projection_head_stride;
  const auto exists = [rows](int r) { return r < rows; };
  performer_load_rows<Traits>(x, q + int64_t(q0) * p.q_row_stride, p.q_row_stride, p.sqrt_scale, exists, thread);
  for (int f = thread; f < m; f += Traits::kThreads) stabilisers[f] = p.key_stabiliser[int64_t(hd.bh) * m + f];
  performer_output_grads<Traits>(p, hd, q0, rows, grads, dden, tile, keep, thread);
  performer_all_logits<Traits>(features, ld, x, tile, projection, m, thread);
  float* query_rows = p.query_rows + (int64_t(hd.bh) * p.query_len + q0) * 3;
  // The rows' largest logits and constants go to row_sums (free until the products below), then to global.
  performer_query_features<Traits>(features, ld, m, stabilisers, p.softmax, row_sums, dlogits, warp, lane);
  __syncthreads();
  if (thread < rows) {
    query_rows[thread * 3 + 0] = p.softmax ? row_sums[thread] : 0.f;
    query_rows[thread * 3 + 1] = p.softmax ? dlogits[thread] : 0.f;
    query_rows[thread * 3 + 2] = dden[thread];
  }
  float row_sum = 0.f;  // thread < kRows

  const float* state = p.state + int64_t(hd.bh) * m * (kD + 1);
  float acc[Traits::kRowsPerThread][Traits::kColumnsPerThread] = {};
  for (int f0 = 0; f0 < m; f0 += kF) {
    __syncthreads();  // every thread is done with the previous tile (and the row constants above)
    performer_load_feature_rows<Traits>(tile, state, kD + 1, kD + 1, f0, m, thread);
    __syncthreads();
    // dphi[r][f] = dnum_r . state[f, :D] + dden_r state[f, D]
    float dphi[Traits::kRowsPerThread][Traits::kFeaturesPerThread];
    performer_tile_logits<Traits>(dphi, grads, tile, ty, tx);
    performer_for_each_entry<Traits>(ty, tx, [&](int i, int j, int r, int f) {
      const float feature = f0 + f < m ? features[r * ld + f0 + f] : 0.f;
      dlogits[r * kFLd + f] = performer_dlogit(p.softmax, dphi[i][j] + dden[r] * tile[f * kLd + kD], feature);
    });
    __syncthreads();
    performer_load_feature_rows<Traits>(tile, projection, kD, kD, f0, m, thread);
    __syncthreads();
    performer_add_dlogit_products<Traits>(acc, row_sum, dlogits, tile, thread);
  }
  __syncthreads();
  if (thread < kRows) row_sums[thread] = row_sum;
  __syncthreads();
  T* grad_q = static_cast<T*>(p.grad_q) + (int64_t(hd.bh) * p.query_len + q0) * kD;
#pragma unroll
  for (int i = 0; i < Traits::kRowsPerThread; ++i) {
    const int r = ty + kLanes * i;
    if (r >= rows) continue;
#pragma unroll
    for (int j = 0; j < Traits::kColumnsPerThread; ++j) {
      const int c = tx + kLanes * j;
      const float grad = performer_input_grad(p, acc[i][j], row_sums[r], x[r * kLd + c]);
      // A row without a gradient is 0, not 0 * q (NaN where q is).
      grad_q[int64_t(r) * kD + c] = static_cast<T>(keep[r] != 0.f ? grad : 0.f);
    }
  }
}

// d state = sum over the queries of phi_q^T [dnum | dden] for one feature tile and one split of the queries
// (the query features recomputed from the constants that performer_bwd_query_kernel saved), into p.grad_state
// with one split, else into the split's partial sums. grid (feature tiles, query splits, B * H).
template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, kPerformerMinBlocks) performer_bwd_state_kernel(const PerformerParams p) {
  using T = typename Traits::Element;
  constexpr int kRows = Traits::kRows, kF = Traits::kFeatures, kLanes = Traits::kLanes, kD = Traits::kHeadDim;
  constexpr int kLd = Traits::kLd, kFLd = Traits::kFeatureLd;
  extern __shared__ __align__(16) unsigned char shared_memory[];
  float* x = reinterpret_cast<float*>(shared_memory);  // [row][d]
  float* grads = x + Traits::kRowFloats;                // [row][d]: dnum
  float* w = grads + Traits::kRowFloats;                // [feature][d]
  float* phi = w + Traits::kFeatureRowFloats;           // [row][feature]
  float* dden = phi + Traits::kRowFeatureFloats;        // [row]
  float* logit_max = dden + kRows;                      // [row]
  float* constant = logit_max + kRows;                  // [row]
  float* stabilisers = constant + kRows;                // [feature]
  float* stabiliser_max = stabilisers + kF;             // [1]

  const int thread = threadIdx.x, warp = thread / 32, lane = thread % 32, ty = thread / kLanes, tx = thread % kLanes;
  const PerformerHead hd(p);
  const int f0 = blockIdx.x * kF, m = p.features;
  const int query_begin = blockIdx.y * p.queries_per_split;
  const int query_end = min(p.query_len, query_begin + p.queries_per_split);
  const int64_t heads_total = int64_t(p.batch) * p.heads;
  const float* key_stabiliser = p.key_stabiliser + int64_t(hd.bh) * m;
  if (thread < kF) stabilisers[thread] = f0 + thread < m ? key_stabiliser[f0 + thread] : 0.f;
  if (warp == 0) {
    const float value = p.softmax ? performer_stabiliser_max(key_stabiliser, m, lane) : 0.f;
    if (lane == 0) *stabiliser_max = value;
  }
  performer_load_feature_rows<Traits>(w, p.projection + hd.head * p.projection_head_stride, kD, kD, f0, m, thread);
  const T* q = head_pointer<T>(p.q, p.q_batch_stride, p.q_head_stride, hd.batch, hd.head);

  float acc[Traits::kFeaturesPerThread][Traits::kColumnsPerThread] = {};
  float last_column = 0.f;  // thread < kF: d state[f0 + thread, D]
  for (int q0 = query_begin; q0 < query_end; q0 += kRows) {
    const int rows = min(kRows, query_end - q0);
    const auto exists = [rows](int r) { return r < rows; };
    __syncthreads();  // every thread is done with the previous chunk
    performer_load_rows<Traits>(x, q + int64_t(q0) * p.q_row_stride, p.q_row_stride, p.sqrt_scale, exists, thread);
    const float* normaliser = p.normaliser + int64_t(hd.bh) * p.query_len + q0;
    performer_load_output_grads<Traits>(p, int64_t(hd.bh) * p.query_len + q0, rows, grads, thread);
    if (thread < kRows) {
      const bool has_grad = thread < rows && !(normaliser[thread] == 0.f);
      const float* row = p.query_rows + (int64_t(hd.bh) * p.query_len + q0 + thread) * 3;
      // Rows without a gradient get a constant of +inf: their features are exp(-inf) = 0.
      logit_max[thread] = has_grad ? row[0] : 0.f;
      constant[thread] = has_grad ? row[1] : kInfinity;
      dden[thread] = has_grad ? row[2] : 0.f;
    }
    __syncthreads();
    float logits[Traits::kRowsPerThread][Traits::kFeaturesPerThread];
    performer_tile_logits<Traits>(logits, x, w, ty, tx);
    performer_for_each_entry<Traits>(ty, tx, [&](int i, int j, int r, int f) {
      float feature = 0.f;
      if (constant[r] != kInfinity && f0 + f < m) {
        feature = p.softmax ? expf(performer_query_exponent(logits[i][j], logit_max[r], stabilisers[f],
                                                            *stabiliser_max) - constant[r])
                            : performer_relu_feature(logits[i][j]);
      }
      phi[r * kFLd + f] = feature;
    });
    __syncthreads();
    performer_add_product<Traits>(acc, phi, 1, kFLd, grads, kLd, kRows, ty, tx);  // phi^T dnum
    if (thread < kF) {
      for (int r = 0; r < kRows; ++r) last_column += phi[r * kFLd + thread] * dden[r];
    }
  }
  float* grad_state =
      (p.query_splits == 1 ? p.grad_state : p.grad_state_partial + blockIdx.y * heads_total * m * (kD + 1)) +
      int64_t(hd.bh) * m * (kD + 1);
  performer_store_state_tile<Traits>(grad_state, acc, last_column, f0, m, thread);
}

// dk and dv of a tile of kRows keys from d state: dv = phi_k d state[:, :D], dphi_k = [v | 1] d state^T,
// dlogits = dphi_k phi_k (softmax) or dphi_k where w.k > 0 (relu), dk = sqrt(scale) (dlogits W - sum(dlogits) k)
// (softmax: the -|k|^2 / 2). Padded keys get zeros. grid (key tiles, 1, B * H).
template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, kPerformerMinBlocks) performer_bwd_key_kernel(const PerformerParams p) {
  using T = typename Traits::Element;
  constexpr int kRows = Traits::kRows, kF = Traits::kFeatures, kLanes = Traits::kLanes, kD = Traits::kHeadDim;
  constexpr int kLd = Traits::kLd, kFLd = Traits::kFeatureLd;
  extern __shared__ __align__(16) unsigned char shared_memory[];
  float* x = reinterpret_cast<float*>(shared_memory);  // [row][d]
  float* values = x + Traits::kRowFloats;               // [row][d]
  float* w = values + Traits::kRowFloats;               // [feature][d]
  float* grad_state_tile = w + Traits::kFeatureRowFloats;    // [feature][d + 1]
  float* phi = grad_state_tile + Traits::kFeatureRowFloats;  // [row][feature]
  float* dlogits = phi + Traits::kRowFeatureFloats;          // [row][feature]
  float* half_norms = dlogits + Traits::kRowFeatureFloats;   // [row]
  float* row_sums = half_norms + kRows;                      // [row]
  float* stabilisers = row_sums + kRows;                     // [feature]

  const int thread = threadIdx.x, ty = thread / kLanes, tx = thread % kLanes;
  const PerformerHead hd(p);
  const int key0 = blockIdx.x * kRows, m = p.features;
  const auto visible = [&](int r) { return performer_key_visible(p, hd.batch, key0 + r, p.key_len); };
  const T* k = head_pointer<T>(p.k, p.k_batch_stride, p.k_head_stride, hd.batch, hd.head);
  const T* v = head_pointer<T>(p.v, p.v_batch_stride, p.v_head_stride, hd.batch, hd.head);
  const float* projection = p.projection + hd.head * p.projection_head_stride;
  const float* grad_state = p.grad_state + int64_t(hd.bh) * m * (kD + 1);
  performer_load_rows<Traits>(x, k + int64_t(key0) * p.k_row_stride, p.k_row_stride, p.sqrt_scale, visible, thread);
  performer_load_rows<Traits>(values, v + int64_t(key0) * p.v_row_stride, p.v_row_stride, 1.f, visible, thread);
  __syncthreads();
  if (p.softmax) performer_half_norms<Traits>(half_norms, x, thread);

  float dv[Traits::kRowsPerThread][Traits::kColumnsPerThread] = {};
  float dk[Traits::kRowsPerThread][Traits::kColumnsPerThread] = {};
  float row_sum = 0.f;  // thread < kRows
  for (int f0 = 0; f0 < m; f0 += kF) {
    __syncthreads();  // every thread is done with the previous tile
    if (thread < kF) {
      stabilisers[thread] = p.softmax && f0 + thread < m ? p.key_stabiliser[int64_t(hd.bh) * m + f0 + thread] : 0.f;
    }
    performer_load_feature_rows<Traits>(w, projection, kD, kD, f0, m, thread);
    performer_load_feature_rows<Traits>(grad_state_tile, grad_state, kD + 1, kD + 1, f0, m, thread);
    __syncthreads();
    performer_key_features<Traits>(phi, x, w, half_norms, stabilisers, p.softmax, f0, m, visible, ty, tx);
    // dphi[r][f] = v_r . d state[f, :D] + d state[f, D]
    float dphi[Traits::kRowsPerThread][Traits::kFeaturesPerThread];
    performer_tile_logits<Traits>(dphi, values, grad_state_tile, ty, tx);
    __syncthreads();
    performer_for_each_entry<Traits>(ty, tx, [&](int i, int j, int r, int f) {
      const float grad = dphi[i][j] + grad_state_tile[f * kLd + kD];
      dlogits[r * kFLd + f] = performer_dlogit(p.softmax, grad, phi[r * kFLd + f]);
    });
    performer_add_product<Traits>(dv, phi, kFLd, 1, grad_state_tile, kLd, kF, ty, tx);  // phi d state[:, :D]
    __syncthreads();
    performer_add_dlogit_products<Traits>(dk, row_sum, dlogits, w, thread);
  }
  __syncthreads();
  if (thread < kRows) row_sums[thread] = row_sum;
  __syncthreads();
  T* grad_k = static_cast<T*>(p.grad_k) + (int64_t(hd.bh) * p.key_len + key0) * kD;
  T* grad_v = static_cast<T*>(p.grad_v) + (int64_t(hd.bh) * p.key_len + key0) * kD;
#pragma unroll
  for (int i = 0; i < Traits::kRowsPerThread; ++i) {
    const int r = ty + kLanes * i;
    if (key0 + r >= p.key_len) continue;
    const bool row_visible = visible(r);
#pragma unroll
    for (int j = 0; j < Traits::kColumnsPerThread; ++j) {
      const int c = tx + kLanes * j;
      const float grad = performer_input_grad(p, dk[i][j], row_sums[r], x[r * kLd + c]);
      grad_k[int64_t(r) * kD + c] = static_cast<T>(row_visible ? grad : 0.f);
      grad_v[int64_t(r) * kD + c] = static_cast<T>(row_visible ? dv[i][j] : 0.f);
    }
  }
}

}  // namespace fastattn::cuda
