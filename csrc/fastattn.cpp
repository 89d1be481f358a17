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
}
