// Entry points of the Performer CUDA kernels, one explicit instantiation per (dtype, head dim) and direction
// in its own .cu file. Element is __half, __nv_bfloat16 or float; HeadDim is 32, 64 or 128. They enqueue on
// `stream` and return; the caller checks the launch (C10_CUDA_KERNEL_LAUNCH_CHECK).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "performer_params.h"

namespace fastattn::cuda {

// Fills params.out, normaliser, key_stabiliser and state (workspaces: key_max_partial, state_partial; causal:
// chunk_max, running_max, query_max, query_constant, and relu's key_stabiliser filled with zeros by the caller,
// the shares).
template <typename Element, int HeadDim>
void run_performer_fwd(const PerformerParams& params, cudaStream_t stream);

// Fills params.grad_q, grad_k and grad_v (workspaces: query_rows, grad_state, grad_state_partial; causal: grad_den
// filled, chunk_max, running_max, query_max, query_constant, the shares; key_stabiliser unused).
template <typename Element, int HeadDim>
void run_performer_bwd(const PerformerParams& params, cudaStream_t stream);

}  // namespace fastattn::cuda
