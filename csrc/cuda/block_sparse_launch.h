// Entry points of the block-sparse CUDA kernels, one explicit instantiation per (dtype, head dim) in
// its own .cu file. Element is __half, __nv_bfloat16 or float; HeadDim is 32, 64 or 128. They
// enqueue on `stream` and return; the caller checks the launch (C10_CUDA_KERNEL_LAUNCH_CHECK).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "block_sparse_params.h"

namespace fastattn::cuda {

template <typename Element, int HeadDim>
void run_block_sparse_fwd(const BlockSparseFwdParams& params, cudaStream_t stream);

// Fills params.delta, then grad_k, grad_v and grad_q.
template <typename Element, int HeadDim>
void run_block_sparse_bwd(const BlockSparseBwdParams& params, cudaStream_t stream);

}  // namespace fastattn::cuda
