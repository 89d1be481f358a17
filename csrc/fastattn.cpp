// The one place where the signatures of fastattn's ops are declared. Backends register kernels for
// these schemas (csrc/cpu, csrc/cuda); fake kernels and autograd formulas live in fastattn/ops.
//
// Conventions shared by every op:
//   q (B, H, Nq, D), k and v (B, H, Nk, D); the last dimension has stride 1, the others any stride.
//   key_padding_mask: bool (B, Nk), true = padding. scale multiplies the scores.
//   lse: log-sum-exp per query row, (B, H, Nq), float64 for float64 inputs, float32 otherwise;
//        +inf for a row that sees no key, so that exp(s - lse) vanishes in the backward.
//   Block-sparse layouts are per-head CSR, int32: row_offsets (h, nqb + 1), col_indices (h, nnz_max)
//   and their transpose col_offsets (h, nkb + 1), row_indices (h, nnz_max); h is 1 (shared) or H.
#include <torch/library.h>

TORCH_LIBRARY(fastattn, m) {
  m.def(
      "block_sparse_fwd(Tensor q, Tensor k, Tensor v, Tensor row_offsets, Tensor col_indices, "
      "Tensor col_offsets, Tensor row_indices, int block_size, bool causal, Tensor? key_padding_mask, "
      "float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "block_sparse_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor row_offsets, Tensor col_indices, Tensor col_offsets, Tensor row_indices, int block_size, "
      "bool causal, Tensor? key_padding_mask, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // Linformer: proj_k, proj_v (kp, Nk) or (H, kp, Nk), already sliced to Nk. k_proj and v_proj are
  // K' = proj_k K and V' = proj_v V (B, H, kp, D) in the accumulation dtype (that of lse), saved for the backward.
  m.def(
      "linformer_fwd(Tensor q, Tensor k, Tensor v, Tensor proj_k, Tensor proj_v, Tensor? key_padding_mask, "
      "float scale) -> (Tensor out, Tensor lse, Tensor k_proj, Tensor v_proj)");
  m.def(
      "linformer_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor proj_k, Tensor proj_v, Tensor out, "
      "Tensor lse, Tensor k_proj, Tensor v_proj, Tensor? key_padding_mask, float scale) -> (Tensor grad_q, "
      "Tensor grad_k, Tensor grad_v, Tensor grad_proj_k, Tensor grad_proj_v)");
  // Performer: projection (m, D) or (H, m, D); kernel "softmax" (FAVOR+) or "relu". Saved for the backward, in
  // the accumulation dtype: normaliser (B, H, Nq), the denominator of each output row (0 for a row that sees no
  // key); key_stabiliser (B, H, Nk), the constant subtracted from the logits of each key (the running maximum
  // when causal, the global one otherwise; 0 for relu and where no unpadded key was seen); state (B, H, m, D + 1),
  // phi(K)^T [V | 1] over all keys, stabilised by the last key's constant.
  m.def(
      "performer_fwd(Tensor q, Tensor k, Tensor v, Tensor projection, str kernel, bool causal, "
      "Tensor? key_padding_mask, float scale) -> (Tensor out, Tensor normaliser, Tensor key_stabiliser, Tensor state)");
  m.def(
      "performer_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor projection, Tensor out, "
      "Tensor normaliser, Tensor key_stabiliser, Tensor state, str kernel, bool causal, Tensor? key_padding_mask, "
      "float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}
