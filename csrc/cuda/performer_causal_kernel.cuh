// Causal Performer kernels, FAVOR+ ("softmax") or relu, with the per-feature running maxima of
// the CPU kernel's causal sweeps (the same function; csrc/cpu/performer.cpp, kSubBlock). Softmax:
// s_f(j) is the largest logit of feature f over the unpadded keys <= j, M_j = max_f s_f(j) (saved as
// key_stabiliser, 0 before the first unpadded key), a_f(i) = l_f(q_i) - max_g l_g(q_i) and
// c_i = max_f [a_f(i) + (s_f(i) - M_i)]. Query i weighs key j <= i through feature f by
// exp((a_f(i) + (l_f(k_j) - M_i)) - c_i) <= 1, and its best feature on the key that set that feature's running
// maximum by exactly 1: the normaliser of a query that sees a key is >= 1 (to rounding). One running maximum
// over all features let a query's best features meet its keys far below it, and the float32 normalisers
// underflowed at large |q|, |k|. relu: the features relu(l) + eps, no stabilisers.
//
// Stabilisers (softmax, before either direction; the backward recomputes them): performer_key_max_kernel with
// one split per chunk of kRows keys gives each chunk's per-feature maxima, performer_running_max_kernel turns
// them into the running maxima after each chunk (chunk_max), and performer_causal_query_stabiliser_kernel
// gives M_i, max_g l_g(q_i) and c_i of each chunk's queries.
//
// Then one CTA per (feature tile, batch x head) walks the sequence in chunks of kRows positions, holding its
// feature tile of a float32 state in shared memory. The earlier chunks reach a query through the prefix state
// sum_j exp(l_f(k_j) - sigma_f) [v_j | 1], sigma the running maxima after its last chunk, which query i reads
// with exp((a_f(i) + (sigma_f - M_i)) - c_i): both factors are <= 1. The chunk's own pairs are summed weight by
// weight: factoring them through the chunk's maxima would let a later key of the chunk change an earlier row's
// weights (and underflow them). Each CTA writes its feature tile's share of [num | den], which
// performer_causal_output_kernel adds in tile order (deterministic, no atomics).
//
// Backward (gradients of the exact weights, the stabilisers constants):
// performer_causal_bwd_query_kernel walks forward with the prefix state for the shares of dq;
// performer_causal_bwd_key_kernel walks backward with the suffix state R = sum over later chunks' queries of
// exp((a_f(i) + (rho_f - M_i)) - c_i) [dnum_i | dden_i], rho the running maxima after the key's chunk, read
// with exp(l_f(k_j) - rho_f), for the shares of dk and dv; performer_causal_grads_kernel adds them.
#pragma once

#include "performer_kernel.cuh"

namespace fastattn::cuda {

template <typename Traits>
struct PerformerCausalTraits {
  static constexpr int kRows = Traits::kRows, kFeatures = Traits::kFeatures;
  static constexpr int kScoreLd = kRows + 1;
  static constexpr int kScoreFloats = kRows * kScoreLd;
  // PerformerCausalChunk's per-row and per-feature arrays.
  static constexpr int kScalarFloats = 5 * kRows + 3 * kFeatures;
  // Shared floats: x of the queries and keys, [v | 1] (and in the backward [dnum | dden]), the projection tile and
  // the state tile, the logits (then weights) of the queries and keys (and the dlogits), the chunk's scores, and
  // the scalars.
  static constexpr int kFwdFloats = 3 * Traits::kRowFloats + 2 * Traits::kFeatureRowFloats +
                                    2 * Traits::kRowFeatureFloats + kScoreFloats + kScalarFloats;
  static constexpr int kBwdFloats = 4 * Traits::kRowFloats + 2 * Traits::kFeatureRowFloats +
                                    3 * Traits::kRowFeatureFloats + kScoreFloats + kScalarFloats;
  // performer_causal_query_stabiliser_kernel: x of the queries and keys, a projection tile, every logit of the
  // queries, a feature tile of the keys' running maxima, and per-row scalars.
  static constexpr int query_stabiliser_floats(int features) {
    return 2 * Traits::kRowFloats + Traits::kFeatureRowFloats + kRows * Traits::query_logits_ld(features) +
           Traits::kRowFeatureFloats + 2 * kRows;
  }
};

// The running maxima after each chunk, in place: chunk_max[c] = max(chunk_max[c - 1], chunk_max[c]) for
// c = 1..chunks (performer_key_max_kernel wrote each chunk's own maxima there) and chunk_max[0] = -inf (before any
// key). s.out: chunk_max, (chunks + 1) rows of s.count = B * H * m floats; s.splits: the chunks. One column per
// thread, in chunk order.
template <int Threads>
__global__ void __launch_bounds__(Threads) performer_running_max_kernel(const PerformerSplits s) {
  const int64_t index = int64_t(blockIdx.x) * Threads + threadIdx.x;
  if (index >= s.count) return;
  float running = -kInfinity;
  s.out[index] = running;
  for (int chunk = 1; chunk <= s.splits; ++chunk) {
    running = fmaxf(running, s.out[chunk * s.count + index]);
    s.out[chunk * s.count + index] = running;
  }
}

// logits[r][f] = the logits of keys x (rows kLd apart) for the feature tile w from f0 (the same operations as
// performer_key_max_kernel's, so that a running maximum is the logit of some key to the bit): softmax
// l = w_f . k - |k|^2 / 2, -inf where padded or past m; relu the features, 0 there.
template <typename Traits, typename Visible>
__device__ __forceinline__ void performer_causal_key_logits(float* logits, const float* x, const float* w,
                                                            const float* half_norms, bool softmax, int f0,
                                                            int features, Visible visible, int ty, int tx) {
  float acc[Traits::kRowsPerThread][Traits::kFeaturesPerThread];
  performer_tile_logits<Traits>(acc, x, w, ty, tx);
  performer_for_each_entry<Traits>(ty, tx, [&](int i, int j, int r, int f) {
    float logit = softmax ? -kInfinity : 0.f;
    if (visible(r) && f0 + f < features) logit = softmax ? acc[i][j] - half_norms[r] : performer_relu_feature(acc[i][j]);
    logits[r * Traits::kFeatureLd + f] = logit;
  });
}

// running[r][f] = s_{f0 + f}(pos0 + r): the running maxima of the logits of keys (x, half_norms, visible) of a
// chunk for the feature tile from f0, continuing from those after the previous chunk (before); -inf past m.
// Loads the tile of W into w. Begins and ends with a __syncthreads.
template <typename Traits, typename Visible>
__device__ __forceinline__ void performer_causal_running_maxima(float* running, float* w, const float* x,
                                                                const float* half_norms, const float* projection,
                                                                const float* before, int f0, int features,
                                                                Visible visible, int thread) {
  constexpr int kRows = Traits::kRows, kLanes = Traits::kLanes, kFLd = Traits::kFeatureLd;
  const int ty = thread / kLanes, tx = thread % kLanes;
  __syncthreads();  // every thread is done with the previous tile
  performer_load_feature_rows<Traits>(w, projection, Traits::kHeadDim, Traits::kHeadDim, f0, features, thread);
  __syncthreads();
  performer_causal_key_logits<Traits>(running, x, w, half_norms, true, f0, features, visible, ty, tx);
  __syncthreads();
  if (thread < Traits::kFeatures) {
    float best = f0 + thread < features ? before[f0 + thread] : -kInfinity;
    for (int r = 0; r < kRows; ++r) {
      best = fmaxf(best, running[r * kFLd + thread]);
      running[r * kFLd + thread] = best;
    }
  }
  __syncthreads();
}

// M_i (running_max, -inf before the first unpadded key), max_g l_g(q_i) (query_max) and c_i (query_constant, 0
// where M_i is -inf) of a chunk of kRows queries; the forward also saves M as key_stabiliser (0 where -inf). The
// feature tiles of the keys are walked twice: c needs M, the maximum over every feature, first. Softmax only.
// grid (chunks, 1, B * H); shared memory query_stabiliser_floats(m).
template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, kPerformerMinBlocks)
    performer_causal_query_stabiliser_kernel(const PerformerParams p) {
  using T = typename Traits::Element;
  constexpr int kRows = Traits::kRows, kF = Traits::kFeatures, kFLd = Traits::kFeatureLd;
  const int m = p.features, ld = Traits::query_logits_ld(m);
  extern __shared__ __align__(16) unsigned char shared_memory[];
  float* xq = reinterpret_cast<float*>(shared_memory);  // [row][d]
  float* xk = xq + Traits::kRowFloats;                   // [row][d]
  float* w = xk + Traits::kRowFloats;                    // [feature][d]
  float* query_logits = w + Traits::kFeatureRowFloats;   // [row][feature], every feature
  float* running = query_logits + kRows * ld;            // [row][feature] of a feature tile
  float* half_norms = running + Traits::kRowFeatureFloats;  // [row]
  float* query_max = half_norms + kRows;                 // [row]

  const int thread = threadIdx.x, warp = thread / 32, lane = thread % 32;
  const PerformerHead hd(p);
  const int n = p.query_len, pos0 = blockIdx.x * kRows, rows = min(kRows, n - pos0);
  const auto exists = [rows](int r) { return r < rows; };
  const auto key_visible = [&](int r) { return performer_key_visible(p, hd.batch, pos0 + r, pos0 + rows); };
  const T* q = head_pointer<T>(p.q, p.q_batch_stride, p.q_head_stride, hd.batch, hd.head);
  const T* k = head_pointer<T>(p.k, p.k_batch_stride, p.k_head_stride, hd.batch, hd.head);
  const float* projection = p.projection + hd.head * p.projection_head_stride;
  const float* before = p.chunk_max + (int64_t(blockIdx.x) * p.batch * p.heads + hd.bh) * m;
  performer_load_rows<Traits>(xq, q + int64_t(pos0) * p.q_row_stride, p.q_row_stride, p.sqrt_scale, exists, thread);
  performer_load_rows<Traits>(xk, k + int64_t(pos0) * p.k_row_stride, p.k_row_stride, p.sqrt_scale, key_visible,
                              thread);
  __syncthreads();
  performer_half_norms<Traits>(half_norms, xk, thread);
  performer_all_logits<Traits>(query_logits, ld, xq, w, projection, m, thread);
  for (int r = warp; r < kRows; r += Traits::kThreads / 32) {
    float best = -kInfinity;
    for (int f = lane; f < m; f += 32) best = fmaxf(best, query_logits[r * ld + f]);
    best = warp_max(best);
    if (lane == 0) query_max[r] = best;
  }

  float row_max = -kInfinity;  // thread < kRows: M of row `thread`
  for (int f0 = 0; f0 < m; f0 += kF) {
    performer_causal_running_maxima<Traits>(running, w, xk, half_norms, projection, before, f0, m, key_visible, thread);
    if (thread < kRows) {
      for (int f = 0; f < kF; ++f) row_max = fmaxf(row_max, running[thread * kFLd + f]);
    }
  }
  float constant = -kInfinity;  // thread < kRows: c of row `thread`
  for (int f0 = 0; f0 < m; f0 += kF) {
    performer_causal_running_maxima<Traits>(running, w, xk, half_norms, projection, before, f0, m, key_visible, thread);
    if (thread < kRows) {
      const float* logits = query_logits + thread * ld + f0;
      for (int f = 0; f < kF && f0 + f < m; ++f) {
        // The exponent's order of performer_causal_pair_weight, so that the best pair's exponent is exactly 0.
        constant = fmaxf(constant, (logits[f] - query_max[thread]) + (running[thread * kFLd + f] - row_max));
      }
    }
  }
  if (thread < rows) {
    const int64_t row = int64_t(hd.bh) * n + pos0 + thread;
    const bool seen = row_max > -kInfinity;
    p.running_max[row] = row_max;
    p.query_max[row] = query_max[thread];
    p.query_constant[row] = seen ? constant : 0.f;
    if (p.key_stabiliser != nullptr) p.key_stabiliser[row] = finite_or_zero(row_max);
  }
}

// Shared buffers of one causal chunk and the CTA's feature tile. Rows of values and grads carry a last column:
// 1 for an unpadded key (so [v | 1]) and dden (so [dnum | dden]).
template <typename Traits>
struct PerformerCausalChunk {
  float *xq, *xk, *values, *grads, *w, *state, *scores;
  // [row][feature] of the feature tile: softmax a_f(i) of the queries and l_f(k_j) of the keys (-inf where padded
  // or past m) until performer_causal_state_weights turns them into the weights on the states; relu the features.
  float *query_features, *key_features, *dlogits;
  float *half_norms, *running_max, *query_max, *query_constant, *keep;  // [row]; keep: 1 where the query counts
  float *before, *after, *decay;  // [feature]: the running maxima before and after the chunk, exp(before - after)

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
    state = take(Traits::kFeatureRowFloats);
    query_features = take(Traits::kRowFeatureFloats);
    key_features = take(Traits::kRowFeatureFloats);
    dlogits = backward ? take(Traits::kRowFeatureFloats) : nullptr;
    scores = take(PerformerCausalTraits<Traits>::kScoreFloats);
    half_norms = take(Traits::kRows);
    running_max = take(Traits::kRows);
    query_max = take(Traits::kRows);
    query_constant = take(Traits::kRows);
    keep = take(Traits::kRows);
    before = take(Traits::kFeatures);
    after = take(Traits::kFeatures);
    decay = take(Traits::kFeatures);
  }
};

// Loads chunk `chunk` of head hd and the logits (softmax) or features (relu) of its queries and keys for the
// feature tile from f0. A query counts (keep) where it exists and sees a key, and with `backward` where its
// normaliser is not 0; then also [dnum | dden] (grads). Begins and ends with a __syncthreads.
template <typename Traits>
__device__ __forceinline__ void performer_causal_load_chunk(const PerformerParams& p, const PerformerHead& hd,
                                                            const PerformerCausalChunk<Traits>& c, int chunk, int f0,
                                                            bool backward, int thread) {
  using T = typename Traits::Element;
  constexpr int kRows = Traits::kRows, kLanes = Traits::kLanes, kD = Traits::kHeadDim, kLd = Traits::kLd;
  constexpr int kFLd = Traits::kFeatureLd;
  const int ty = thread / kLanes, tx = thread % kLanes, m = p.features, n = p.query_len;
  const int pos0 = chunk * kRows, rows = min(kRows, n - pos0);
  const auto exists = [rows](int r) { return r < rows; };
  const auto key_visible = [&](int r) { return performer_key_visible(p, hd.batch, pos0 + r, pos0 + rows); };
  __syncthreads();  // every thread is done with the previous chunk
  const T* q = head_pointer<T>(p.q, p.q_batch_stride, p.q_head_stride, hd.batch, hd.head);
  const T* k = head_pointer<T>(p.k, p.k_batch_stride, p.k_head_stride, hd.batch, hd.head);
  const T* v = head_pointer<T>(p.v, p.v_batch_stride, p.v_head_stride, hd.batch, hd.head);
  performer_load_rows<Traits>(c.xq, q + int64_t(pos0) * p.q_row_stride, p.q_row_stride, p.sqrt_scale, exists, thread);
  performer_load_rows<Traits>(c.xk, k + int64_t(pos0) * p.k_row_stride, p.k_row_stride, p.sqrt_scale, key_visible,
                              thread);
  performer_load_rows<Traits>(c.values, v + int64_t(pos0) * p.v_row_stride, p.v_row_stride, 1.f, key_visible, thread);
  const int64_t row_base = int64_t(hd.bh) * n + pos0;
  if (backward) performer_load_output_grads<Traits>(p, row_base, rows, c.grads, thread);
  if (thread < kRows) {
    const bool row = thread < rows;
    // relu reads running_max only where given (with padding): 0 from the first unpadded key on, -inf before.
    const float running = !row ? -kInfinity : p.running_max != nullptr ? p.running_max[row_base + thread] : 0.f;
    bool keep = row && running > -kInfinity;
    if (backward) {
      keep = keep && !(p.normaliser[row_base + thread] == 0.f);
      c.grads[thread * kLd + kD] = keep ? p.grad_den[row_base + thread] : 0.f;
    }
    c.values[thread * kLd + kD] = key_visible(thread) ? 1.f : 0.f;
    c.running_max[thread] = running;
    c.query_max[thread] = keep && p.softmax ? p.query_max[row_base + thread] : 0.f;
    c.query_constant[thread] = keep && p.softmax ? p.query_constant[row_base + thread] : 0.f;
    c.keep[thread] = keep ? 1.f : 0.f;
  }
  if (thread < Traits::kFeatures) {
    // relu: 0 throughout (no rescaling); softmax: -inf past m (rows of the state that stay 0).
    const int64_t chunk_stride = int64_t(p.batch) * p.heads * m, column = int64_t(hd.bh) * m + f0 + thread;
    const bool feature = p.softmax && f0 + thread < m;
    const float before = feature ? p.chunk_max[chunk * chunk_stride + column] : (p.softmax ? -kInfinity : 0.f);
    const float after = feature ? p.chunk_max[(chunk + 1) * chunk_stride + column] : before;
    c.before[thread] = before;
    c.after[thread] = after;
    // Equal maxima (-inf too: nothing summed yet) keep the state as it is.
    c.decay[thread] = before == after ? 1.f : expf(before - after);
  }
  __syncthreads();
  if (p.softmax) performer_half_norms<Traits>(c.half_norms, c.xk, thread);
  __syncthreads();
  float acc[Traits::kRowsPerThread][Traits::kFeaturesPerThread];
  performer_tile_logits<Traits>(acc, c.xq, c.w, ty, tx);
  performer_for_each_entry<Traits>(ty, tx, [&](int i, int j, int r, int f) {
    float feature = 0.f;
    if (c.keep[r] != 0.f && f0 + f < m) feature = p.softmax ? acc[i][j] - c.query_max[r] : performer_relu_feature(acc[i][j]);
    c.query_features[r * kFLd + f] = feature;
  });
  performer_causal_key_logits<Traits>(c.key_features, c.xk, c.w, c.half_norms, p.softmax, f0, m, key_visible, ty, tx);
  __syncthreads();
}

// Softmax: the weight exp((a_f(i) + (l_f(k_j) - M_i)) - c_i) of query i on key j through feature f of the tile,
// for a query that counts and j <= i (0 for a padded key or a feature past m, whose logit is -inf). Summed in
// the order c_i was (performer_causal_query_stabiliser_kernel): the best pair's exponent is exactly 0.
template <typename Traits>
__device__ __forceinline__ float performer_causal_pair_weight(const PerformerCausalChunk<Traits>& c, int i, int j,
                                                              int f) {
  constexpr int kFLd = Traits::kFeatureLd;
  return expf((c.query_features[i * kFLd + f] + (c.key_features[j * kFLd + f] - c.running_max[i])) -
              c.query_constant[i]);
}

// scores[i][j] = pair(i, j) for the pairs of the chunk that the thread owns (queries i = ty + 16 a, keys
// j = tx + 16 b) with j <= i; 0 above the diagonal.
template <typename Traits, typename Pair>
__device__ __forceinline__ void performer_causal_scores(const PerformerCausalChunk<Traits>& c, int ty, int tx,
                                                        Pair pair) {
  constexpr int kLanes = Traits::kLanes, kSLd = PerformerCausalTraits<Traits>::kScoreLd;
#pragma unroll
  for (int a = 0; a < Traits::kRowsPerThread; ++a) {
    const int i = ty + kLanes * a;
#pragma unroll
    for (int b = 0; b < Traits::kRowsPerThread; ++b) {
      const int j = tx + kLanes * b;
      c.scores[i * kSLd + j] = j <= i ? pair(i, j) : 0.f;
    }
  }
}

// scores[i][j] = the tile's share of query i's weight on key j <= i: the sum of the pair's weights over the tile's
// features (softmax) or phi_q_i . phi_k_j (relu); 0 for a query that does not count.
template <typename Traits>
__device__ __forceinline__ void performer_causal_pair_scores(const PerformerParams& p,
                                                             const PerformerCausalChunk<Traits>& c, int ty, int tx) {
  constexpr int kFLd = Traits::kFeatureLd;
  performer_causal_scores<Traits>(c, ty, tx, [&](int i, int j) {
    float sum = 0.f;
    if (c.keep[i] == 0.f) return sum;
    if (p.softmax) {
      for (int f = 0; f < Traits::kFeatures; ++f) sum += performer_causal_pair_weight(c, i, j, f);
    } else {
      for (int f = 0; f < Traits::kFeatures; ++f) sum += c.query_features[i * kFLd + f] * c.key_features[j * kFLd + f];
    }
    return sum;
  });
}

// scores[i][j] = g_ij = [dnum_i | dden_i] . [v_j | 1] for j <= i (zero rows for the queries that do not count, zero
// columns for padded keys).
template <typename Traits>
__device__ __forceinline__ void performer_causal_grad_scores(const PerformerCausalChunk<Traits>& c, int ty, int tx) {
  constexpr int kLd = Traits::kLd;
  performer_causal_scores<Traits>(c, ty, tx, [&](int i, int j) {
    float sum = 0.f;
    for (int col = 0; col <= Traits::kHeadDim; ++col) sum += c.grads[i * kLd + col] * c.values[j * kLd + col];
    return sum;
  });
}

// The chunk's own pairs' share of the dlogits of the thread's rows r (ty + 16 a) and features (tx + 16 b):
// queries (sum over keys j <= r) or, with Keys, keys (sum over queries i >= r that count) of g_ij (scores) times
// the pair's weight (softmax) or the other side's feature (relu: d weight / d phi of this side).
template <typename Traits, bool Keys>
__device__ __forceinline__ void performer_causal_pair_grads(
    const PerformerParams& p, const PerformerCausalChunk<Traits>& c,
    float (&grad)[Traits::kRowsPerThread][Traits::kFeaturesPerThread], int ty, int tx) {
  constexpr int kRows = Traits::kRows, kFLd = Traits::kFeatureLd, kSLd = PerformerCausalTraits<Traits>::kScoreLd;
  const float* other = Keys ? c.query_features : c.key_features;
  performer_for_each_entry<Traits>(ty, tx, [&](int a, int b, int r, int f) {
    float sum = 0.f;
    for (int partner = Keys ? r : 0; partner < (Keys ? kRows : r + 1); ++partner) {
      const int i = Keys ? partner : r, j = Keys ? r : partner;
      if (c.keep[i] == 0.f) continue;
      const float weight = p.softmax ? performer_causal_pair_weight(c, i, j, f) : other[partner * kFLd + f];
      sum += c.scores[i * kSLd + j] * weight;
    }
    grad[a][b] = sum;
  });
}

// Softmax: the logits of the tile turn into the weights on the states, in place: queries
// exp((a_f(i) + (before_f - M_i)) - c_i) (0 where they do not count), keys exp(l_f(k_j) - after_f) (0 where
// padded or past m). relu: the features stay.
template <typename Traits>
__device__ __forceinline__ void performer_causal_state_weights(const PerformerParams& p,
                                                               const PerformerCausalChunk<Traits>& c, int thread) {
  constexpr int kF = Traits::kFeatures, kFLd = Traits::kFeatureLd;
  if (!p.softmax) return;
  for (int index = thread; index < Traits::kRows * kF; index += Traits::kThreads) {
    const int r = index / kF, f = index % kF;
    float& query = c.query_features[r * kFLd + f];
    float& key = c.key_features[r * kFLd + f];
    query = c.keep[r] != 0.f ? expf((query + (c.before[f] - c.running_max[r])) - c.query_constant[r]) : 0.f;
    key = key == -kInfinity ? 0.f : expf(key - c.after[f]);  // NaN (an input's) stays NaN
  }
}

// state[f][col] = state[f][col] decay[f] + sum_r weights[r][f] rows[r][col] over the D + 1 columns: the prefix
// state takes the chunk's keys ([v | 1] against the maxima after the chunk), the suffix state its queries
// ([dnum | dden] against those before it). Each element is one thread's, summed in row order.
template <typename Traits>
__device__ __forceinline__ void performer_causal_add_to_state(float* state, const float* weights, const float* rows,
                                                              const float* decay, int thread) {
  constexpr int kColumns = Traits::kHeadDim + 1, kLd = Traits::kLd, kFLd = Traits::kFeatureLd;
  for (int index = thread; index < Traits::kFeatures * kColumns; index += Traits::kThreads) {
    const int f = index / kColumns, col = index % kColumns;
    float sum = state[f * kLd + col] * decay[f];
    for (int r = 0; r < Traits::kRows; ++r) sum += weights[r * kFLd + f] * rows[r * kLd + col];
    state[f * kLd + col] = sum;
  }
}

// grad[a][b] += weight * (rows_r . state_f) over the D + 1 columns for the thread's rows r and features f: the
// states' share of the dlogits (softmax: times the row's weight on the state; relu: d phi, weight 1).
template <typename Traits>
__device__ __forceinline__ void performer_causal_add_state_grads(
    const PerformerParams& p, float (&grad)[Traits::kRowsPerThread][Traits::kFeaturesPerThread], const float* rows,
    const float* state, const float* weights, int ty, int tx) {
  float products[Traits::kRowsPerThread][Traits::kFeaturesPerThread];
  performer_tile_logits<Traits, Traits::kHeadDim + 1>(products, rows, state, ty, tx);
  performer_for_each_entry<Traits>(ty, tx, [&](int a, int b, int r, int f) {
    grad[a][b] += (p.softmax ? weights[r * Traits::kFeatureLd + f] : 1.f) * products[a][b];
  });
}

// The dlogits of the thread's rows and features into shared memory: softmax the gradients as they are (the
// weights' own derivative), relu those where the feature's logit is > 0.
template <typename Traits>
__device__ __forceinline__ void performer_causal_store_dlogits(
    const PerformerParams& p, float* dlogits, const float* features,
    const float (&grad)[Traits::kRowsPerThread][Traits::kFeaturesPerThread], int ty, int tx) {
  performer_for_each_entry<Traits>(ty, tx, [&](int a, int b, int r, int f) {
    const int index = r * Traits::kFeatureLd + f;
    dlogits[index] = p.softmax ? grad[a][b] : performer_relu_dlogit(grad[a][b], features[index]);
  });
}

// The shares of a chunk's rows from its dlogits: the row sums (the -|x|^2 / 2 term's factor) and dlogits W.
template <typename Traits>
__device__ __forceinline__ void performer_causal_store_dlogit_shares(const PerformerCausalChunk<Traits>& c,
                                                                     float* shares, float* row_sums, int pos0, int rows,
                                                                     int thread) {
  constexpr int kLanes = Traits::kLanes, kD = Traits::kHeadDim;
  const int ty = thread / kLanes, tx = thread % kLanes;
  float acc[Traits::kRowsPerThread][Traits::kColumnsPerThread] = {};
  float row_sum = 0.f;
  performer_add_dlogit_products<Traits>(acc, row_sum, c.dlogits, c.w, thread);
  if (thread < rows) row_sums[pos0 + thread] = row_sum;
  performer_store_rows<Traits>(shares + int64_t(pos0) * kD, kD, acc, rows, ty, tx);
}

// The start of a walk along the sequence: the CTA's tile of W (from f0) and a zero state.
template <typename Traits>
__device__ __forceinline__ void performer_causal_begin(const PerformerParams& p, const PerformerHead& hd,
                                                       const PerformerCausalChunk<Traits>& c, int f0, int thread) {
  constexpr int kD = Traits::kHeadDim;
  performer_load_feature_rows<Traits>(c.w, p.projection + hd.head * p.projection_head_stride, kD, kD, f0, p.features,
                                      thread);
  for (int index = thread; index < Traits::kFeatureRowFloats; index += Traits::kThreads) c.state[index] = 0.f;
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
  const int f0 = blockIdx.x * kF, m = p.features, n = p.query_len, chunks = (n + kRows - 1) / kRows;
  performer_causal_begin<Traits>(p, hd, c, f0, thread);
  float* shares = p.shares + (int64_t(blockIdx.x) * p.batch * p.heads + hd.bh) * n * (kD + 1);
  for (int chunk = 0; chunk < chunks; ++chunk) {
    const int pos0 = chunk * kRows, rows = min(kRows, n - pos0);
    performer_causal_load_chunk<Traits>(p, hd, c, chunk, f0, false, thread);
    performer_causal_pair_scores<Traits>(p, c, ty, tx);
    __syncthreads();
    performer_causal_state_weights<Traits>(p, c, thread);
    __syncthreads();
    float acc[Traits::kRowsPerThread][Traits::kColumnsPerThread] = {};
    performer_add_product<Traits>(acc, c.scores, kSLd, 1, c.values, kLd, kRows, ty, tx);
    if (chunk > 0) performer_add_product<Traits>(acc, c.query_features, kFLd, 1, c.state, kLd, kF, ty, tx);
    performer_store_rows<Traits>(shares + int64_t(pos0) * (kD + 1), kD + 1, acc, rows, ty, tx);
    if (thread < rows) {
      float den = 0.f;
      for (int j = 0; j < kRows; ++j) den += c.scores[thread * kSLd + j];
      for (int f = 0; f < kF && chunk > 0; ++f) den += c.query_features[thread * kFLd + f] * c.state[f * kLd + kD];
      shares[int64_t(pos0 + thread) * (kD + 1) + kD] = den;
    }
    __syncthreads();  // every thread is done reading the state
    performer_causal_add_to_state<Traits>(c.state, c.key_features, c.values, c.decay, thread);
  }
  __syncthreads();
  float* state = p.state + int64_t(hd.bh) * m * (kD + 1);
  for (int index = thread; index < kF * (kD + 1); index += Traits::kThreads) {
    const int f = index / (kD + 1), col = index % (kD + 1);
    if (f0 + f < m) state[int64_t(f0 + f) * (kD + 1) + col] = c.state[f * kLd + col];
  }
}

// out and normaliser from the feature tiles' shares of [num | den], added in tile order: a normaliser is >= 1
// (softmax) or >= m eps^2 (relu) for a query that sees a key, and exactly 0 (out 0) for one that sees none. NaN
// (an input's) stays NaN. grid (row tiles, 1, B * H).
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
    static_cast<T*>(p.out)[(int64_t(hd.bh) * n + i) * kD + col] = static_cast<T>(den == 0.f ? 0.f : num / den);
    if (col == 0) p.normaliser[int64_t(hd.bh) * n + i] = den;
  }
}

// Feature tile blockIdx.x's shares of dq (before the -|q|^2 / 2 term and sqrt(scale)) and of the row sums of the
// query dlogits, along the sequence with the prefix state: dL/dl_f(q_i) = sum_{j <= i} g_ij weight_ijf.
// grid (feature tiles, 1, B * H).
template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, kPerformerMinBlocks) performer_causal_bwd_query_kernel(const PerformerParams p) {
  constexpr int kRows = Traits::kRows, kLanes = Traits::kLanes, kD = Traits::kHeadDim, kF = Traits::kFeatures;
  extern __shared__ __align__(16) unsigned char shared_memory[];
  const PerformerCausalChunk<Traits> c(shared_memory, true);
  const int thread = threadIdx.x, ty = thread / kLanes, tx = thread % kLanes;
  const PerformerHead hd(p);
  const int f0 = blockIdx.x * kF, n = p.query_len, chunks = (n + kRows - 1) / kRows;
  performer_causal_begin<Traits>(p, hd, c, f0, thread);
  const int64_t tile_head = int64_t(blockIdx.x) * p.batch * p.heads + hd.bh;
  float* shares = p.shares + tile_head * n * kD;
  float* row_sums = p.row_sum_shares + tile_head * n;
  for (int chunk = 0; chunk < chunks; ++chunk) {
    const int pos0 = chunk * kRows, rows = min(kRows, n - pos0);
    performer_causal_load_chunk<Traits>(p, hd, c, chunk, f0, true, thread);
    performer_causal_grad_scores<Traits>(c, ty, tx);
    __syncthreads();
    float grad[Traits::kRowsPerThread][Traits::kFeaturesPerThread];
    performer_causal_pair_grads<Traits, false>(p, c, grad, ty, tx);
    __syncthreads();  // every thread is done with the logits
    performer_causal_state_weights<Traits>(p, c, thread);
    __syncthreads();
    if (chunk > 0) performer_causal_add_state_grads<Traits>(p, grad, c.grads, c.state, c.query_features, ty, tx);
    performer_causal_store_dlogits<Traits>(p, c.dlogits, c.query_features, grad, ty, tx);
    __syncthreads();
    performer_causal_store_dlogit_shares<Traits>(c, shares, row_sums, pos0, rows, thread);
    performer_causal_add_to_state<Traits>(c.state, c.key_features, c.values, c.decay, thread);
  }
}

// Feature tile blockIdx.x's shares of dk (before the -|k|^2 / 2 term and sqrt(scale)), dv and the row sums of the
// key dlogits, backward along the sequence with the suffix state: dL/dl_f(k_j) = sum_{i >= j} g_ij weight_ijf and
// dv_j = sum_{i >= j} (sum_f weight_ijf) dnum_i. grid (feature tiles, 1, B * H).
template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, kPerformerMinBlocks) performer_causal_bwd_key_kernel(const PerformerParams p) {
  constexpr int kRows = Traits::kRows, kLanes = Traits::kLanes, kD = Traits::kHeadDim, kF = Traits::kFeatures;
  constexpr int kLd = Traits::kLd, kFLd = Traits::kFeatureLd, kSLd = PerformerCausalTraits<Traits>::kScoreLd;
  extern __shared__ __align__(16) unsigned char shared_memory[];
  const PerformerCausalChunk<Traits> c(shared_memory, true);
  const int thread = threadIdx.x, ty = thread / kLanes, tx = thread % kLanes;
  const PerformerHead hd(p);
  const int f0 = blockIdx.x * kF, n = p.query_len, chunks = (n + kRows - 1) / kRows;
  performer_causal_begin<Traits>(p, hd, c, f0, thread);
  const int64_t tile_head = int64_t(blockIdx.x) * p.batch * p.heads + hd.bh;
  float* grad_k = p.grad_k_shares + tile_head * n * kD;
  float* grad_v = p.grad_v_shares + tile_head * n * kD;
  float* row_sums = p.key_row_sum_shares + tile_head * n;
  for (int chunk = chunks - 1; chunk >= 0; --chunk) {
    const int pos0 = chunk * kRows, rows = min(kRows, n - pos0);
    performer_causal_load_chunk<Traits>(p, hd, c, chunk, f0, true, thread);
    performer_causal_pair_scores<Traits>(p, c, ty, tx);
    __syncthreads();
    // dv_j of the chunk's pairs: sum_i scores[i][j] dnum_i.
    float dv[Traits::kRowsPerThread][Traits::kColumnsPerThread] = {};
    performer_add_product<Traits>(dv, c.scores, 1, kSLd, c.grads, kLd, kRows, ty, tx);
    __syncthreads();  // every thread is done with the scores
    performer_causal_grad_scores<Traits>(c, ty, tx);
    __syncthreads();
    float grad[Traits::kRowsPerThread][Traits::kFeaturesPerThread];
    performer_causal_pair_grads<Traits, true>(p, c, grad, ty, tx);
    __syncthreads();  // every thread is done with the logits
    performer_causal_state_weights<Traits>(p, c, thread);
    __syncthreads();
    if (chunk < chunks - 1) {
      performer_add_product<Traits>(dv, c.key_features, kFLd, 1, c.state, kLd, kF, ty, tx);
      performer_causal_add_state_grads<Traits>(p, grad, c.values, c.state, c.key_features, ty, tx);
    }
    performer_causal_store_dlogits<Traits>(p, c.dlogits, c.key_features, grad, ty, tx);
    performer_store_rows<Traits>(grad_v + int64_t(pos0) * kD, kD, dv, rows, ty, tx);
    __syncthreads();
    performer_causal_store_dlogit_shares<Traits>(c, grad_k, row_sums, pos0, rows, thread);
    performer_causal_add_to_state<Traits>(c.state, c.query_features, c.grads, c.decay, thread);
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
    grad[row * kD + col] = static_cast<T>(has_grad ? performer_input_grad(p, sum, row_sum, scaled_x) : 0.f);
    if (keys) static_cast<T*>(p.grad_v)[row * kD + col] = static_cast<T>(has_grad ? value_grad : 0.f);
  }
}

}  // namespace fastattn::cuda
