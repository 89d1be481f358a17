// Entry points of the Linformer CUDA kernels, one explicit instantiation per (dtype, head dim) in its own
// .cu file. Element is __half, __nv_bfloat16 or float; HeadDim is 32, 64 or 128. They enqueue on `stream`
// and return; the caller checks the launch (C10_CUDA_KERNEL_LAUNCH_CHECK). The attention over the kp
// projected keys is the block-sparse kernel with a dense layout (csrc/cuda/linformer_api.cpp).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "linformer_params.h"

namespace fastattn::cuda {

// Fills params.k_partial and v_partial per split, then, with more than one split, k_proj and v_proj.
template <typename Element, int HeadDim>
void run_linformer_projection(const LinformerProjectionParams& params, cudaStream_t stream);

}  // namespace fastattn::cuda
