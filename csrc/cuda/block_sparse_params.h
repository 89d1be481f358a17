// Torch-free description of one block-sparse attention call: raw pointers, strides in elements, sizes
// and flags. csrc/cuda/block_sparse_api.cpp fills it from tensors; the kernels (*.cu) read only this.
#pragma once

#include <cstdint>

namespace fastattn::cuda {

struct BlockSparseFwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // (B, H, Nq) contiguous, natural log; +inf for a row that sees no key

  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t out_batch_stride, out_head_stride, out_row_stride;

  // Per-head CSR of the layout and its transpose. The head strides are 0 when one layout serves all heads.
  // All four null: the dense layout (every query block sees every key block), as Linformer's attention uses.
  const int32_t* row_offsets;
  const int32_t* col_indices;
  const int32_t* col_offsets;
  const int32_t* row_indices;
  int64_t row_offsets_head_stride, col_indices_head_stride;
  int64_t col_offsets_head_stride, row_indices_head_stride;

  const bool* key_padding_mask;  // (B, Nk) contiguous, true = padding; nullptr when absent

  int batch, heads, query_len, key_len, head_dim;
  int block_size, num_query_blocks, num_key_blocks;
  float scale;       // multiplies q.k
  float scale_log2;  // scale * log2(e): the kernels exponentiate with exp2
  bool causal;
};

struct BlockSparseBwdParams : BlockSparseFwdParams {
  const void* grad_out;
  void* grad_q;
  void* grad_k;
  void* grad_v;
  float* delta;  // (B, H, Nq) contiguous: rowsum(grad_out * out), filled by the preprocess kernel

  int64_t grad_out_batch_stride, grad_out_head_stride, grad_out_row_stride;
  // grad_q, grad_k and grad_v are contiguous (B, H, N, D).
};

}  // namespace fastattn::cuda
