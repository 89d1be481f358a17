// Causal Performer kernels, FAVOR+ ("softmax") or relu, with the scalar running prefix maximum of
// notes/performer_spec.md (unchanged by the per-feature contract of the non-causal kernels): key j is
// stabilised by M_j (the largest key logit over the unpadded keys <= j; 0 before the first one) and rescaled
// by exp(M_j - M_i) <= 1 for query i, and each query by its own largest logit. A later key never changes an
// earlier output.
//
// performer_row_max_kernel gives the largest logit of every query and key (the host turns the keys' into M
// with a running maximum). Then one CTA per (feature tile, batch x head) walks the sequence in chunks of
// kRows positions, holding its feature tile of the running float32 state in shared memory: the earlier chunks
// through the state (rescaled from the stabiliser of the last key it summed, exp(M_old - M_new)), the current
// one quadratically (phi_q phi_k^T masked to j <= i and rescaled by exp(M_j - M_i)). Each CTA writes its
// feature tile's share of [num | den] (a sum over features splits into sums over feature tiles), and
// performer_causal_output_kernel adds the shares in tile order (deterministic, no atomics).
//
// Backward: performer_causal_bwd_query_kernel walks forward (the prefix state) for the shares of dq;
// performer_causal_bwd_key_kernel walks backward with a suffix state of phi_q^T [dnum | dden] (rescaled to the
// smallest stabiliser of the queries it holds) for the shares of dk and dv; performer_causal_grads_kernel adds
// them. All exponents of rescaling factors are clamped at 0, as in the CPU kernel: exact where a state holds a
// key (M only grows from the first unpadded key on), and harmless before (the state is zero there).
#pragma once

#include "performer_kernel.cuh"

namespace fastattn::cuda {

template <typename Traits>
struct PerformerCausalTraits {
  static constexpr int kRows = Traits::kRows, kLd = Traits::kLd, kFeatureLd = Traits::kFeatureLd;
  static constexpr int kScoreLd = kRows + 1;
  static constexpr int kScoreFloats = kRows * kScoreLd;
  // Shared floats: x of the queries and keys, the values (and in the backward dnum), the projection tile and
  // the running state tile, the features of the queries and keys (and the dlogits), the chunk's scores, and
  // per-row scalars.
  static constexpr int kRowScalars = 6;
  static constexpr int kFwdFloats = 3 * Traits::kRowFloats + 2 * Traits::kFeatureRowFloats +
                                    2 * Traits::kRowFeatureFloats + kScoreFloats + kRowScalars * kRows;
  static constexpr int kBwdFloats = 4 * Traits::kRowFloats + 2 * Traits::kFeatureRowFloats +
                                    3 * Traits::kRowFeatureFloats + kScoreFloats + kRowScalars * kRows;
};

// Largest logit of every query (blockIdx.y == 0; the -|q|^2 / 2 cancels and is left out) or key (blockIdx.y == 1;
// w.k - |k|^2 / 2, -inf where padded) of a tile of kRows rows. grid (row tiles, 1 or 2, B * H). Softmax only.
template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, kPerformerMinBlocks) performer_row_max_kernel(const PerformerParams p) {
  using T = typename Traits::Element;
  constexpr int kRows = Traits::kRows, kF = Traits::kFeatures, kLanes = Traits::kLanes;
  extern __shared__ __align__(16) unsigned char shared_memory[];
  float* x = reinterpret_cast<float*>(shared_memory);  // [row][d]
  float* w = x + Traits::kRowFloats;                    // [feature][d]
  float* half_norms = w + Traits::kFeatureRowFloats;    // [row]
  float* partial = half_norms + kRows;                  // [row][tx]

  const int thread = threadIdx.x, ty = thread / kLanes, tx = thread % kLanes;
  const PerformerHead hd(p);
  const bool keys = blockIdx.y == 1;
  const int length = keys ? p.key_len : p.query_len, row0 = blockIdx.x * kRows;
  const T* src = keys ? head_pointer<T>(p.k, p.k_batch_stride, p.k_head_stride, hd.batch, hd.head)
                      : head_pointer<T>(p.q, p.q_batch_stride, p.q_head_stride, hd.batch, hd.head);
  const int64_t row_stride = keys ? p.k_row_stride : p.q_row_stride;
  const auto visible = [&](int r) {
    return keys ? performer_key_visible(p, hd.batch, row0 + r, p.key_len) : row0 + r < p.query_len;
  };
  performer_load_rows<Traits>(x, src + int64_t(row0) * row_stride, row_stride, p.sqrt_scale, visible, thread);
  __syncthreads();
  if (keys) performer_half_norms<Traits>(half_norms, x, thread);
  float best[Traits::kRowsPerThread];
#pragma unroll
  for (int i = 0; i < Traits::kRowsPerThread; ++i) best[i] = -kInfinity;
  const float* projection = p.projection + hd.head * p.projection_head_stride;
  for (int f0 = 0; f0 < p.features; f0 += kF) {
    __syncthreads();
    performer_load_feature_rows<Traits>(w, projection, Traits::kHeadDim, Traits::kHeadDim, f0, p.features, thread);
    __syncthreads();
    float acc[Traits::kRowsPerThread][Traits::kFeaturesPerThread];
    performer_tile_logits<Traits>(acc, x, w, ty, tx);
#pragma unroll
    for (int i = 0; i < Traits::kRowsPerThread; ++i) {
#pragma unroll
      for (int j = 0; j < Traits::kFeaturesPerThread; ++j) {
        if (f0 + tx + kLanes * j < p.features) best[i] = fmaxf(best[i], acc[i][j]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < Traits::kRowsPerThread; ++i) partial[(ty + kLanes * i) * kLanes + tx] = best[i];
  __syncthreads();
  if (thread < kRows && row0 + thread < length) {
    float value = -kInfinity;
    for (int t = 0; t < kLanes; ++t) value = fmaxf(value, partial[thread * kLanes + t]);
    if (keys) value = visible(thread) ? value - half_norms[thread] : -kInfinity;
    (keys ? p.key_max : p.query_max)[int64_t(hd.bh) * length + row0 + thread] = value;
  }
}

// Shared buffers of one causal chunk and the CTA's feature tile.
template <typename Traits>
struct PerformerCausalChunk {
  static constexpr int kRows = Traits::kRows, kLd = Traits::kLd, kFLd = Traits::kFeatureLd;
  float *xq, *xk, *values, *grads, *w, *running, *phq, *phk, *dlogits, *scores;
  float *half_norms, *stab, *query_max, *decay, *dden, *keep;

  __device__ __forceinline__ PerformerCausalChunk(unsigned char* shared, bool backward) {
    float* next = reinterpret_cast<float*>(shared);
    const auto take = [&next](int floats) {
      float* taken = next;
      next += floats;
      return taken;
    };
    xq = take(Traits::kRowFloats);
    xk = take(Traits::kRowFloats);
    values = take(Traits::kRowFloats);
    grads = backward ? take(Traits::kRowFloats) : nullptr;
    w = take(Traits::kFeatureRowFloats);
    running = take(Traits::kFeatureRowFloats);
    phq = take(Traits::kRowFeatureFloats);
    phk = take(Traits::kRowFeatureFloats);
    dlogits = backward ? take(Traits::kRowFeatureFloats) : nullptr;
    scores = take(PerformerCausalTraits<Traits>::kScoreFloats);
    half_norms = take(kRows);
    stab = take(kRows);
    query_max = take(kRows);
    decay = take(kRows);
    dden = take(kRows);
    keep = take(kRows);
  }
};

// Loads chunk [pos0, pos0 + kRows) of head hd and computes its features for the feature tile from f0:
// phq (queries; zero rows where query_kept(r) is false), phk (keys; zero where padded). With `backward`, also
// dnum (grads), dden and keep (1 where the query has a gradient: it exists and its normaliser is not 0).
// Ends with a __syncthreads.
template <typename Traits, typename Visible>
__device__ __forceinline__ void performer_causal_load_chunk(const PerformerParams& p, const PerformerHead& hd,
                                                            const PerformerCausalChunk<Traits>& c, int pos0, int f0,
                                                            bool backward, Visible key_visible, int thread) {
  using T = typename Traits::Element;
  constexpr int kRows = Traits::kRows, kLanes = Traits::kLanes, kD = Traits::kHeadDim, kLd = Traits::kLd;
  constexpr int kFLd = Traits::kFeatureLd;
  const int ty = thread / kLanes, tx = thread % kLanes, m = p.features, n = p.query_len;
  const int rows = min(kRows, n - pos0);
  const auto exists = [rows](int r) { return r < rows; };
  const T* q = head_pointer<T>(p.q, p.q_batch_stride, p.q_head_stride, hd.batch, hd.head);
  const T* k = head_pointer<T>(p.k, p.k_batch_stride, p.k_head_stride, hd.batch, hd.head);
  const T* v = head_pointer<T>(p.v, p.v_batch_stride, p.v_head_stride, hd.batch, hd.head);
  performer_load_rows<Traits>(c.xq, q + int64_t(pos0) * p.q_row_stride, p.q_row_stride, p.sqrt_scale, exists, thread);
  performer_load_rows<Traits>(c.xk, k + int64_t(pos0) * p.k_row_stride, p.k_row_stride, p.sqrt_scale, key_visible,
                              thread);
  performer_load_rows<Traits>(c.values, v + int64_t(pos0) * p.v_row_stride, p.v_row_stride, 1.f, key_visible, thread);
  const int64_t row_base = int64_t(hd.bh) * n + pos0;
  if (thread < kRows) {
    const bool row = thread < rows;
    c.stab[thread] = row && p.softmax ? p.key_stabiliser[row_base + thread] : 0.f;
    c.query_max[thread] = row && p.softmax ? p.query_max[row_base + thread] : 0.f;
    float keep = row ? 1.f : 0.f;
    if (backward) {
      const float den = row ? p.normaliser[row_base + thread] : 0.f;
      keep = row && !(den == 0.f) ? 1.f : 0.f;
      c.dden[thread] = keep != 0.f ? p.grad_den[row_base + thread] : 0.f;
    }
    c.keep[thread] = keep;
  }
  if (backward) {
    const T* grad_out = static_cast<const T*>(p.grad_out) + row_base * kD;
    const float* normaliser = p.normaliser + row_base;
    for (int index = thread; index < kRows * kD; index += Traits::kThreads) {
      const int r = index / kD, col = index % kD;
      const float den = r < rows ? normaliser[r] : 0.f;
      c.grads[r * kLd + col] =
          r < rows && !(den == 0.f) ? static_cast<float>(grad_out[int64_t(r) * kD + col]) / den : 0.f;
    }
  }
  __syncthreads();
  if (p.softmax) performer_half_norms<Traits>(c.half_norms, c.xk, thread);
  __syncthreads();
  float acc[Traits::kRowsPerThread][Traits::kFeaturesPerThread];
  performer_tile_logits<Traits>(acc, c.xq, c.w, ty, tx);
#pragma unroll
  for (int i = 0; i < Traits::kRowsPerThread; ++i) {
    const int r = ty + kLanes * i;
    const bool kept = c.keep[r] != 0.f;
#pragma unroll
    for (int j = 0; j < Traits::kFeaturesPerThread; ++j) {
      const int f = tx + kLanes * j;
      const float logit = acc[i][j];
      c.phq[r * kFLd + f] = kept && f0 + f < m ? (p.softmax ? expf(logit - c.query_max[r])
                                                            : fmaxf(logit, 0.f) + kPerformerReluEpsilon)
                                               : 0.f;
    }
  }
  performer_tile_logits<Traits>(acc, c.xk, c.w, ty, tx);
#pragma unroll
  for (int i = 0; i < Traits::kRowsPerThread; ++i) {
    const int r = ty + kLanes * i;
    const bool row_visible = key_visible(r);
#pragma unroll
    for (int j = 0; j < Traits::kFeaturesPerThread; ++j) {
      const int f = tx + kLanes * j;
      c.phk[r * kFLd + f] =
          row_visible && f0 + f < m
              ? performer_key_feature(p.softmax, acc[i][j], p.softmax ? c.half_norms[r] : 0.f, c.stab[r])
              : 0.f;
    }
  }
  __syncthreads();
}

// exp(min(gap, 0)) for softmax (the rescaling between two stabilisers), 1 for relu.
__device__ __forceinline__ float performer_rescale(bool softmax, float gap) {
  return softmax ? expf(fminf(gap, 0.f)) : 1.f;
}

// scores[i][j] = phq_i . phk_j exp(M_j - M_i) for j <= i, 0 above the diagonal (rows i: queries, columns j: keys).
template <typename Traits>
__device__ __forceinline__ void performer_causal_scores(const PerformerParams& p, const PerformerCausalChunk<Traits>& c,
                                                        int ty, int tx) {
  constexpr int kLanes = Traits::kLanes, kFLd = Traits::kFeatureLd, kSLd = PerformerCausalTraits<Traits>::kScoreLd;
#pragma unroll
  for (int a = 0; a < Traits::kRowsPerThread; ++a) {
    const int i = ty + kLanes * a;
#pragma unroll
    for (int b = 0; b < Traits::kRowsPerThread; ++b) {
      const int j = tx + kLanes * b;
      float sum = 0.f;
      for (int f = 0; f < Traits::kFeatures; ++f) sum += c.phq[i * kFLd + f] * c.phk[j * kFLd + f];
      c.scores[i * kSLd + j] = j <= i ? sum * performer_rescale(p.softmax, c.stab[j] - c.stab[i]) : 0.f;
    }
  }
}

// scores[i][j] = ([dnum_i | dden_i] . [v_j | 1]) exp(M_j - M_i) for j <= i, 0 above the diagonal.
template <typename Traits, typename Visible>
__device__ __forceinline__ void performer_causal_grad_scores(const PerformerParams& p,
                                                             const PerformerCausalChunk<Traits>& c, Visible key_visible,
                                                             int ty, int tx) {
  constexpr int kLanes = Traits::kLanes, kLd = Traits::kLd, kSLd = PerformerCausalTraits<Traits>::kScoreLd;
#pragma unroll
  for (int a = 0; a < Traits::kRowsPerThread; ++a) {
    const int i = ty + kLanes * a;
#pragma unroll
    for (int b = 0; b < Traits::kRowsPerThread; ++b) {
      const int j = tx + kLanes * b;
      float sum = key_visible(j) ? c.dden[i] : 0.f;
      for (int col = 0; col < Traits::kHeadDim; ++col) sum += c.grads[i * kLd + col] * c.values[j * kLd + col];
      c.scores[i * kSLd + j] = j <= i ? sum * performer_rescale(p.softmax, c.stab[j] - c.stab[i]) : 0.f;
    }
  }
}

// The running state after this chunk's keys: state * exp(current - next) + sum_j phk_j exp(M_j - next) [v_j | 1]
// with next = M of the chunk's last key. Each thread updates the entries it owns. Returns whether the state
// now holds a key; `current` becomes next.
template <typename Traits, typename Visible>
__device__ __forceinline__ bool performer_causal_add_keys(const PerformerParams& p,
                                                          const PerformerCausalChunk<Traits>& c, int rows,
                                                          Visible key_visible, bool have_state, float& current,
                                                          int thread) {
  constexpr int kRows = Traits::kRows, kLanes = Traits::kLanes, kLd = Traits::kLd, kFLd = Traits::kFeatureLd;
  constexpr int kD = Traits::kHeadDim, kF = Traits::kFeatures;
  bool any_key = have_state;
  for (int r = 0; r < rows; ++r) any_key = any_key || key_visible(r);
  if (!any_key) return false;
  const int ty = thread / kLanes, tx = thread % kLanes;
  const float next = c.stab[rows - 1];
  if (thread < kRows) c.decay[thread] = performer_rescale(p.softmax, c.stab[thread] - next);
  __syncthreads();  // the decays are written, and every thread is done reading the state
  const float old = have_state ? performer_rescale(p.softmax, current - next) : 1.f;
  for (int a = 0; a < Traits::kFeaturesPerThread; ++a) {
    const int f = ty + kLanes * a;
#pragma unroll
    for (int b = 0; b < Traits::kColumnsPerThread; ++b) {
      const int col = tx + kLanes * b;
      float sum = c.running[f * kLd + col] * old;
      for (int j = 0; j < kRows; ++j) sum += c.phk[j * kFLd + f] * c.decay[j] * c.values[j * kLd + col];
      c.running[f * kLd + col] = sum;
    }
  }
  if (thread < kF) {
    float sum = c.running[thread * kLd + kD] * old;
    for (int j = 0; j < kRows; ++j) sum += c.phk[j * kFLd + thread] * c.decay[j];
    c.running[thread * kLd + kD] = sum;
  }
  current = next;
  return true;
}

// Feature tile blockIdx.x's shares of [num | den] for every query, along the sequence. grid (feature tiles, 1, B * H).
template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, kPerformerMinBlocks) performer_causal_fwd_kernel(const PerformerParams p) {
  constexpr int kRows = Traits::kRows, kLanes = Traits::kLanes, kD = Traits::kHeadDim, kF = Traits::kFeatures;
  constexpr int kLd = Traits::kLd, kFLd = Traits::kFeatureLd, kSLd = PerformerCausalTraits<Traits>::kScoreLd;
  extern __shared__ __align__(16) unsigned char shared_memory[];
  const PerformerCausalChunk<Traits> c(shared_memory, false);
  const int thread = threadIdx.x, ty = thread / kLanes, tx = thread % kLanes;
  const PerformerHead hd(p);
  const int f0 = blockIdx.x * kF, m = p.features, n = p.query_len;
  performer_load_feature_rows<Traits>(c.w, p.projection + hd.head * p.projection_head_stride, kD, kD, f0, m, thread);
  for (int index = thread; index < Traits::kFeatureRowFloats; index += Traits::kThreads) c.running[index] = 0.f;
  float* shares = p.shares + (int64_t(blockIdx.x) * p.batch * p.heads + hd.bh) * n * (kD + 1);
  bool have_state = false;
  float current = 0.f;
  for (int pos0 = 0; pos0 < n; pos0 += kRows) {
    const int rows = min(kRows, n - pos0);
    const auto key_visible = [&](int r) { return performer_key_visible(p, hd.batch, pos0 + r, pos0 + rows); };
    __syncthreads();  // every thread is done with the previous chunk
    performer_causal_load_chunk<Traits>(p, hd, c, pos0, f0, false, key_visible, thread);
    performer_causal_scores<Traits>(p, c, ty, tx);
    __syncthreads();
    float acc[Traits::kRowsPerThread][Traits::kColumnsPerThread] = {};
    if (have_state) {
      for (int f = 0; f < kF; ++f) {
#pragma unroll
        for (int a = 0; a < Traits::kRowsPerThread; ++a) {
          const float feature = c.phq[(ty + kLanes * a) * kFLd + f];
#pragma unroll
          for (int b = 0; b < Traits::kColumnsPerThread; ++b) acc[a][b] += feature * c.running[f * kLd + tx + kLanes * b];
        }
      }
#pragma unroll
      for (int a = 0; a < Traits::kRowsPerThread; ++a) {
        const float factor = performer_rescale(p.softmax, current - c.stab[ty + kLanes * a]);
#pragma unroll
        for (int b = 0; b < Traits::kColumnsPerThread; ++b) acc[a][b] *= factor;
      }
    }
    for (int j = 0; j < kRows; ++j) {
#pragma unroll
      for (int a = 0; a < Traits::kRowsPerThread; ++a) {
        const float score = c.scores[(ty + kLanes * a) * kSLd + j];
#pragma unroll
        for (int b = 0; b < Traits::kColumnsPerThread; ++b) acc[a][b] += score * c.values[j * kLd + tx + kLanes * b];
      }
    }
#pragma unroll
    for (int a = 0; a < Traits::kRowsPerThread; ++a) {
      const int i = ty + kLanes * a;
      if (i >= rows) continue;
#pragma unroll
      for (int b = 0; b < Traits::kColumnsPerThread; ++b) shares[int64_t(pos0 + i) * (kD + 1) + tx + kLanes * b] = acc[a][b];
    }
    if (thread < rows) {
      float den = 0.f;
      if (have_state) {
        for (int f = 0; f < kF; ++f) den += c.phq[thread * kFLd + f] * c.running[f * kLd + kD];
        den *= performer_rescale(p.softmax, current - c.stab[thread]);
      }
      for (int j = 0; j < kRows; ++j) den += c.scores[thread * kSLd + j];
      shares[int64_t(pos0 + thread) * (kD + 1) + kD] = den;
    }
    have_state = performer_causal_add_keys<Traits>(p, c, rows, key_visible, have_state, current, thread) || have_state;
  }
  __syncthreads();
  float* state = p.state + int64_t(hd.bh) * m * (kD + 1);
  for (int index = thread; index < kF * (kD + 1); index += Traits::kThreads) {
    const int f = index / (kD + 1), col = index % (kD + 1);
    if (f0 + f < m) state[int64_t(f0 + f) * (kD + 1) + col] = c.running[f * kLd + col];
  }
}

// out and normaliser from the feature tiles' shares of [num | den], added in tile order. grid (row tiles, 1, B * H).
template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, kPerformerMinBlocks) performer_causal_output_kernel(const PerformerParams p) {
  using T = typename Traits::Element;
  constexpr int kRows = Traits::kRows, kD = Traits::kHeadDim;
  const PerformerHead hd(p);
  const int n = p.query_len, pos0 = blockIdx.x * kRows, tiles = (p.features + Traits::kFeatures - 1) / Traits::kFeatures;
  const int64_t tile_stride = int64_t(p.batch) * p.heads * n * (kD + 1);
  for (int index = threadIdx.x; index < kRows * kD; index += Traits::kThreads) {
    const int r = index / kD, col = index % kD, i = pos0 + r;
    if (i >= n) continue;
    const float* share = p.shares + (int64_t(hd.bh) * n + i) * (kD + 1);
    float num = 0.f, den = 0.f;
    for (int t = 0; t < tiles; ++t) {
      num += share[t * tile_stride + col];
      den += share[t * tile_stride + kD];
    }
    // Below the normal range the query's features meet the keys' only in products too small for float32
    // (the CPU kernel's rule): no normaliser, output 0. NaN (an input's) stays NaN.
    den = den < FLT_MIN ? 0.f : den;
    static_cast<T*>(p.out)[(int64_t(hd.bh) * n + i) * kD + col] = static_cast<T>(den == 0.f ? 0.f : num / den);
    if (col == 0) p.normaliser[int64_t(hd.bh) * n + i] = den;
  }
}

// Feature tile blockIdx.x's shares of dq (before the -|q|^2 / 2 term and sqrt(scale)) and of the row sums of the
// query dlogits, along the sequence with the prefix state. grid (feature tiles, 1, B * H).
template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, kPerformerMinBlocks) performer_causal_bwd_query_kernel(const PerformerParams p) {
  constexpr int kRows = Traits::kRows, kLanes = Traits::kLanes, kD = Traits::kHeadDim, kF = Traits::kFeatures;
  constexpr int kLd = Traits::kLd, kFLd = Traits::kFeatureLd, kSLd = PerformerCausalTraits<Traits>::kScoreLd;
  extern __shared__ __align__(16) unsigned char shared_memory[];
  const PerformerCausalChunk<Traits> c(shared_memory, true);
  const int thread = threadIdx.x, ty = thread / kLanes, tx = thread % kLanes;
  const PerformerHead hd(p);
  const int f0 = blockIdx.x * kF, m = p.features, n = p.query_len;
  performer_load_feature_rows<Traits>(c.w, p.projection + hd.head * p.projection_head_stride, kD, kD, f0, m, thread);
  for (int index = thread; index < Traits::kFeatureRowFloats; index += Traits::kThreads) c.running[index] = 0.f;
  const int64_t tile_head = int64_t(blockIdx.x) * p.batch * p.heads + hd.bh;
  float* shares = p.shares + tile_head * n * kD;
  float* row_sums = p.row_sum_shares + tile_head * n;
  bool have_state = false;
  float current = 0.f;
  for (int pos0 = 0; pos0 < n; pos0 += kRows) {
    const int rows = min(kRows, n - pos0);
    const auto key_visible = [&](int r) { return performer_key_visible(p, hd.batch, pos0 + r, pos0 + rows); };
    __syncthreads();  // every thread is done with the previous chunk
    performer_causal_load_chunk<Traits>(p, hd, c, pos0, f0, true, key_visible, thread);
    performer_causal_grad_scores<Traits>(p, c, key_visible, ty, tx);
    __syncthreads();
    // dphi_q[i][f] = exp(current - M_i) [dnum_i | dden_i] . state[f] + sum_j scores[i][j] phk[j][f]
#pragma unroll
    for (int a = 0; a < Traits::kRowsPerThread; ++a) {
      const int i = ty + kLanes * a;
#pragma unroll
      for (int b = 0; b < Traits::kFeaturesPerThread; ++b) {
        const int f = tx + kLanes * b;
        float grad = 0.f;
        if (have_state) {
          grad = c.dden[i] * c.running[f * kLd + kD];
          for (int col = 0; col < kD; ++col) grad += c.grads[i * kLd + col] * c.running[f * kLd + col];
          grad *= performer_rescale(p.softmax, current - c.stab[i]);
        }
        for (int j = 0; j < kRows; ++j) grad += c.scores[i * kSLd + j] * c.phk[j * kFLd + f];
        const float feature = c.phq[i * kFLd + f];
        c.dlogits[i * kFLd + f] = p.softmax ? grad * feature : (feature > kPerformerReluEpsilon ? grad : 0.f);
      }
    }
    __syncthreads();
    if (thread < rows) {
      float sum = 0.f;
      for (int f = 0; f < kF; ++f) sum += c.dlogits[thread * kFLd + f];
      row_sums[pos0 + thread] = sum;
    }
#pragma unroll
    for (int a = 0; a < Traits::kRowsPerThread; ++a) {
      const int i = ty + kLanes * a;
      float acc[Traits::kColumnsPerThread] = {};
      for (int f = 0; f < kF; ++f) {
        const float grad = c.dlogits[i * kFLd + f];
#pragma unroll
        for (int b = 0; b < Traits::kColumnsPerThread; ++b) acc[b] += grad * c.w[f * kLd + tx + kLanes * b];
      }
      if (i >= rows) continue;
#pragma unroll
      for (int b = 0; b < Traits::kColumnsPerThread; ++b) shares[int64_t(pos0 + i) * kD + tx + kLanes * b] = acc[b];
    }
    have_state = performer_causal_add_keys<Traits>(p, c, rows, key_visible, have_state, current, thread) || have_state;
  }
}

// Feature tile blockIdx.x's shares of dk (before the -|k|^2 / 2 term and sqrt(scale)), dv and the row sums of the
// key dlogits, backward along the sequence with the suffix state R = sum over later queries i of
// exp(M_ref - M_i) phq_i^T [dnum_i | dden_i] (M_ref: the smallest M_i it holds). grid (feature tiles, 1, B * H).
template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, kPerformerMinBlocks) performer_causal_bwd_key_kernel(const PerformerParams p) {
  constexpr int kRows = Traits::kRows, kLanes = Traits::kLanes, kD = Traits::kHeadDim, kF = Traits::kFeatures;
  constexpr int kLd = Traits::kLd, kFLd = Traits::kFeatureLd, kSLd = PerformerCausalTraits<Traits>::kScoreLd;
  extern __shared__ __align__(16) unsigned char shared_memory[];
  const PerformerCausalChunk<Traits> c(shared_memory, true);
  float* const suffix = c.running;
  const int thread = threadIdx.x, ty = thread / kLanes, tx = thread % kLanes;
  const PerformerHead hd(p);
  const int f0 = blockIdx.x * kF, m = p.features, n = p.query_len;
  performer_load_feature_rows<Traits>(c.w, p.projection + hd.head * p.projection_head_stride, kD, kD, f0, m, thread);
  for (int index = thread; index < Traits::kFeatureRowFloats; index += Traits::kThreads) suffix[index] = 0.f;
  const int64_t tile_head = int64_t(blockIdx.x) * p.batch * p.heads + hd.bh;
  float* grad_k = p.grad_k_shares + tile_head * n * kD;
  float* grad_v = p.grad_v_shares + tile_head * n * kD;
  float* row_sums = p.key_row_sum_shares + tile_head * n;
  bool have_suffix = false;
  float reference = 0.f;
  const int chunks = (n + kRows - 1) / kRows;
  for (int chunk = chunks - 1; chunk >= 0; --chunk) {
    const int pos0 = chunk * kRows, rows = min(kRows, n - pos0);
    const auto key_visible = [&](int r) { return performer_key_visible(p, hd.batch, pos0 + r, pos0 + rows); };
    __syncthreads();  // every thread is done with the previous chunk
    performer_causal_load_chunk<Traits>(p, hd, c, pos0, f0, true, key_visible, thread);
    performer_causal_scores<Traits>(p, c, ty, tx);
    __syncthreads();
    // dv_j = exp(M_j - M_ref) phk_j R[:, :D] + sum_i scores[i][j] dnum_i
#pragma unroll
    for (int a = 0; a < Traits::kRowsPerThread; ++a) {
      const int j = ty + kLanes * a;
      float acc[Traits::kColumnsPerThread] = {};
      if (have_suffix) {
        for (int f = 0; f < kF; ++f) {
          const float feature = c.phk[j * kFLd + f];
#pragma unroll
          for (int b = 0; b < Traits::kColumnsPerThread; ++b) acc[b] += feature * suffix[f * kLd + tx + kLanes * b];
        }
        const float factor = performer_rescale(p.softmax, c.stab[j] - reference);
#pragma unroll
        for (int b = 0; b < Traits::kColumnsPerThread; ++b) acc[b] *= factor;
      }
      for (int i = 0; i < kRows; ++i) {
        const float score = c.scores[i * kSLd + j];
#pragma unroll
        for (int b = 0; b < Traits::kColumnsPerThread; ++b) acc[b] += score * c.grads[i * kLd + tx + kLanes * b];
      }
      if (j >= rows) continue;
#pragma unroll
      for (int b = 0; b < Traits::kColumnsPerThread; ++b) grad_v[int64_t(pos0 + j) * kD + tx + kLanes * b] = acc[b];
    }
    __syncthreads();  // every thread is done with the scores
    performer_causal_grad_scores<Traits>(p, c, key_visible, ty, tx);
    __syncthreads();
    // dphi_k[j][f] = exp(M_j - M_ref) R[f] . [v_j | 1] + sum_i scores[i][j] phq[i][f]
#pragma unroll
    for (int a = 0; a < Traits::kRowsPerThread; ++a) {
      const int j = ty + kLanes * a;
#pragma unroll
      for (int b = 0; b < Traits::kFeaturesPerThread; ++b) {
        const int f = tx + kLanes * b;
        float grad = 0.f;
        if (have_suffix) {
          grad = key_visible(j) ? suffix[f * kLd + kD] : 0.f;
          for (int col = 0; col < kD; ++col) grad += c.values[j * kLd + col] * suffix[f * kLd + col];
          grad *= performer_rescale(p.softmax, c.stab[j] - reference);
        }
        for (int i = 0; i < kRows; ++i) grad += c.scores[i * kSLd + j] * c.phq[i * kFLd + f];
        const float feature = c.phk[j * kFLd + f];
        c.dlogits[j * kFLd + f] = p.softmax ? grad * feature : (feature > kPerformerReluEpsilon ? grad : 0.f);
      }
    }
    __syncthreads();
    if (thread < rows) {
      float sum = 0.f;
      for (int f = 0; f < kF; ++f) sum += c.dlogits[thread * kFLd + f];
      row_sums[pos0 + thread] = sum;
    }
#pragma unroll
    for (int a = 0; a < Traits::kRowsPerThread; ++a) {
      const int j = ty + kLanes * a;
      float acc[Traits::kColumnsPerThread] = {};
      for (int f = 0; f < kF; ++f) {
        const float grad = c.dlogits[j * kFLd + f];
#pragma unroll
        for (int b = 0; b < Traits::kColumnsPerThread; ++b) acc[b] += grad * c.w[f * kLd + tx + kLanes * b];
      }
      if (j >= rows) continue;
#pragma unroll
      for (int b = 0; b < Traits::kColumnsPerThread; ++b) grad_k[int64_t(pos0 + j) * kD + tx + kLanes * b] = acc[b];
    }
    // This chunk's queries join the suffix state, referred to the smallest M_i among those with a gradient (the
    // first: M grows along the sequence from the first unpadded key on, and a query with a gradient sees one).
    int first = 0;
    while (first < rows && c.keep[first] == 0.f) ++first;
    if (first == rows) continue;
    const float next = c.stab[first];
    if (thread < kRows) c.decay[thread] = c.keep[thread] != 0.f ? performer_rescale(p.softmax, next - c.stab[thread]) : 0.f;
    __syncthreads();  // the decays are written, and every thread is done reading the suffix state
    const float old = have_suffix ? performer_rescale(p.softmax, next - reference) : 1.f;
    for (int a = 0; a < Traits::kFeaturesPerThread; ++a) {
      const int f = ty + kLanes * a;
#pragma unroll
      for (int b = 0; b < Traits::kColumnsPerThread; ++b) {
        const int col = tx + kLanes * b;
        float sum = suffix[f * kLd + col] * old;
        for (int i = 0; i < kRows; ++i) sum += c.phq[i * kFLd + f] * c.decay[i] * c.grads[i * kLd + col];
        suffix[f * kLd + col] = sum;
      }
    }
    if (thread < kF) {
      float sum = suffix[thread * kLd + kD] * old;
      for (int i = 0; i < kRows; ++i) sum += c.phq[i * kFLd + thread] * c.decay[i] * c.dden[i];
      suffix[thread * kLd + kD] = sum;
    }
    have_suffix = true;
    reference = next;
  }
}

// dq (blockIdx.y == 0) or dk and dv (blockIdx.y == 1) of a tile of rows from the feature tiles' shares, added in
// tile order: sqrt(scale) (sum of shares - sum of row sums x) (softmax; relu without the second term); zero
// for queries without a gradient and for padded keys. grid (row tiles, 2, B * H).
template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, kPerformerMinBlocks) performer_causal_grads_kernel(const PerformerParams p) {
  using T = typename Traits::Element;
  constexpr int kRows = Traits::kRows, kD = Traits::kHeadDim;
  const PerformerHead hd(p);
  const bool keys = blockIdx.y == 1;
  const int n = p.query_len, pos0 = blockIdx.x * kRows, tiles = (p.features + Traits::kFeatures - 1) / Traits::kFeatures;
  const int64_t heads_total = int64_t(p.batch) * p.heads;
  const T* x = keys ? head_pointer<T>(p.k, p.k_batch_stride, p.k_head_stride, hd.batch, hd.head)
                    : head_pointer<T>(p.q, p.q_batch_stride, p.q_head_stride, hd.batch, hd.head);
  const int64_t row_stride = keys ? p.k_row_stride : p.q_row_stride;
  const float* shares = keys ? p.grad_k_shares : p.shares;
  const float* row_sums = keys ? p.key_row_sum_shares : p.row_sum_shares;
  T* grad = static_cast<T*>(keys ? p.grad_k : p.grad_q);
  for (int index = threadIdx.x; index < kRows * kD; index += Traits::kThreads) {
    const int r = index / kD, col = index % kD, i = pos0 + r;
    if (i >= n) continue;
    const int64_t row = int64_t(hd.bh) * n + i;
    const bool has_grad = keys ? performer_key_visible(p, hd.batch, i, n) : !(p.normaliser[row] == 0.f);
    float sum = 0.f, row_sum = 0.f, value_grad = 0.f;
    for (int t = 0; t < tiles; ++t) {
      sum += shares[(t * heads_total * n + row) * kD + col];
      row_sum += row_sums[t * heads_total * n + row];
      if (keys) value_grad += p.grad_v_shares[(t * heads_total * n + row) * kD + col];
    }
    const float scaled_x = static_cast<float>(x[int64_t(i) * row_stride + col]) * p.sqrt_scale;
    const float result = p.sqrt_scale * (p.softmax ? sum - row_sum * scaled_x : sum);
    grad[row * kD + col] = static_cast<T>(has_grad ? result : 0.f);
    if (keys) static_cast<T*>(p.grad_v)[row * kD + col] = static_cast<T>(has_grad ? value_grad : 0.f);
  }
}

}  // namespace fastattn::cuda
