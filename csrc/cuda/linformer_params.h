// Torch-free description of the Linformer projection K' = P_k K, V' = P_v V (padded keys zeroed):
// raw pointers, strides in elements, sizes. csrc/cuda/linformer_api.cpp fills it; the kernels read only this.
#pragma once

#include <cstdint>

namespace fastattn::cuda {

// Keys per step of the projection kernels; a split of the keys is a multiple of it.
constexpr int kLinformerKeyChunk = 32;

struct LinformerProjectionParams {
  const void* k;  // (B, H, Nk, D), unit stride in the last dim
  const void* v;
  const void* proj_k;  // (kp, Nk) per head: head stride 0 when one projection serves all heads
  const void* proj_v;
  // The sums over the keys, float32: split s of the keys writes its partial sums at
  // k_partial + s * split_stride, laid out (B, H, kp, D) contiguous. With one split they are the result.
  float* k_partial;
  float* v_partial;
  int64_t split_stride;
  // With more than one split, the reduce kernel adds the partials in split order into these (B, H, kp, D).
  float* k_proj;
  float* v_proj;

  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t proj_k_head_stride, proj_k_row_stride;
  int64_t proj_v_head_stride, proj_v_row_stride;

  const bool* key_padding_mask;  // (B, Nk) contiguous, true = padding; nullptr when absent

  int batch, heads, key_len, head_dim, projected_len;
  int splits, keys_per_split;  // keys_per_split is a multiple of every kernel's key chunk (kKeyChunk)
};

}  // namespace fastattn::cuda
