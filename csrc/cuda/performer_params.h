// Torch-free description of a Performer call (forward and backward): raw pointers, strides in elements,
// sizes and flags. csrc/cuda/performer_api.cpp fills it; the kernels of performer_kernel.cuh read only this.
//
// Non-causal, kernel "softmax" (as csrc/cpu/performer.cpp): per-feature key stabilisers s_f (the maximum of
// feature f's logit over the unpadded keys), query features exp(a_f(i) - c_i) with
// a_f(i) = (l_f(q_i) - max_g l_g(q_i)) + (s_f - max_g s_g) and c_i = max_f a_f(i). Causal: per-feature running
// maxima (performer_causal_kernel.cuh; csrc/cpu/performer.cpp, kSubBlock).
#pragma once

#include <cstdint>

namespace fastattn::cuda {

// Rows (keys or queries) per step of every Performer kernel, and features per feature tile. A split of
// the keys or queries is a multiple of kPerformerRows.
constexpr int kPerformerRows = 32;
constexpr int kPerformerFeatureTile = 64;
// The largest number of features (m) the kernels take: the query kernels hold a tile of rows x m logits
// in shared memory.
constexpr int kPerformerMaxFeatures = 512;

struct PerformerParams {
  const void* q;  // (B, H, Nq, D), unit stride in the last dim
  const void* k;  // (B, H, Nk, D)
  const void* v;
  const float* projection;  // (m, D) per head, contiguous rows; head stride 0 when one projection serves all heads
  int64_t projection_head_stride;
  void* out;  // (B, H, Nq, D) contiguous

  // Saved tensors, float32 contiguous: normaliser (B, H, Nq); key_stabiliser (B, H, m) (non-causal: s_f, zeros
  // for relu); state (B, H, m, D + 1) = sum over keys of phi_k^T [v | 1].
  float* normaliser;
  float* key_stabiliser;
  float* state;

  // Workspaces, float32. Split s of the keys writes its partial maxima (softmax) at
  // key_max_partial + s * (B * H * m) and its partial state at state_partial + s * (B * H * m * (D + 1));
  // the state kernel takes the maximum over the splits, the reduce kernel sums the states in split order.
  // With one split the state kernel writes `state` directly and state_partial is unused.
  float* key_max_partial;
  float* state_partial;

  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;

  const bool* key_padding_mask;  // (B, Nk) contiguous, true = padding; nullptr when absent

  int batch, heads, query_len, key_len, head_dim, features;
  int key_splits, keys_per_split;        // keys_per_split: a multiple of kPerformerRows
  int query_splits, queries_per_split;   // backward: the splits of d state over the queries
  float sqrt_scale;                      // q and k are multiplied by sqrt(scale) before the features
  bool softmax;                          // kernel "softmax" (FAVOR+) or "relu"
  bool causal;

  // Backward. grad_out and out (B, H, Nq, D) contiguous; grad_q (B, H, Nq, D), grad_k and grad_v (B, H, Nk, D)
  // contiguous, of the inputs' element type.
  const void* grad_out;
  void* grad_q;
  void* grad_k;
  void* grad_v;
  // Per query row, float32 (B, H, Nq, 3): the query's largest logit max_g l_g, its constant c_i and
  // dden_i = -(grad_out_i . out_i) / den_i, written by the dq kernel for the d state kernel.
  float* query_rows;
  // d state = sum over queries of phi_q^T [dnum | dden], (B, H, m, D + 1); split s of the queries writes its
  // partial sums at grad_state_partial + s * (B * H * m * (D + 1)) (unused with one split).
  float* grad_state;
  float* grad_state_partial;

  // Causal softmax (performer_causal_kernel.cuh; key_stabiliser is (B, H, Nk): M_j, 0 before the first unpadded key,
  // written by the forward only, nullptr in the backward, which recomputes every stabiliser). chunk_max
  // (chunks + 1, B, H, m), chunks of kPerformerRows positions: the running maxima s_f of the key logits after each
  // chunk (row 0: -inf, before any key). Per query (B, H, Nq): running_max M_i (-inf before the first unpadded
  // key), query_max max_g l_g(q_i) and query_constant c_i. relu: running_max only, with padding (0 from the first
  // unpadded key on, -inf before; nullptr without).
  float* chunk_max;
  float* running_max;
  float* query_max;
  float* query_constant;
  // Causal kernels run one CTA per (feature tile, batch x head) along the sequence and write their feature tile's
  // share of each result, float32, summed over the tiles in tile order by the finishing kernels: forward, shares
  // of [num | den] (tiles, B, H, N, D + 1); backward, of dq (shares), dk, dv (tiles, B, H, N, D) and of the row
  // sums of the query and key dlogits (tiles, B, H, N).
  float* shares;
  float* grad_k_shares;
  float* grad_v_shares;
  float* row_sum_shares;
  float* key_row_sum_shares;
  const float* grad_den;  // causal backward: dden = -(grad_out . out) / den per query (B, H, Nq), 0 where den == 0
};

// Per-split partial results of `count` floats each, at partial + s * count: performer_sum_splits_kernel adds
// them in split order (out[i] = sum over s of partial[s * count + i]); performer_running_max_kernel turns
// per-chunk maxima into running maxima in place (partial unused).
struct PerformerSplits {
  const float* partial;
  float* out;
  int64_t count;
  int splits;
};

}  // namespace fastattn::cuda
