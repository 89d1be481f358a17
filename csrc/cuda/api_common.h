// Host helpers shared by the torch-facing files of the CUDA kernels (csrc/cuda/*_api.cpp): aligned
// views of the inputs, the checks every CUDA op repeats, the block-sparse params without their layout,
// and the switch from runtime dtype and head dim to the kernels' template arguments.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

#include "block_sparse_params.h"
#include "common.h"

namespace fastattn::cuda_api {

constexpr int64_t kMaxGridDim = 65535;

// The tensor-core kernels copy rows with 16-byte cp.async: rows that are not 16-byte aligned get an aligned copy.
inline at::Tensor with_aligned_rows(const at::Tensor& t) {
  const int64_t elements_per_16_bytes = 16 / t.element_size();
  bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t dim = 0; dim + 1 < t.dim(); ++dim) {
    aligned = aligned && (t.size(dim) == 1 || t.stride(dim) % elements_per_16_bytes == 0);
  }
  return aligned ? t : t.clone(at::MemoryFormat::Contiguous);
}

// q is a CUDA tensor of a dtype and head dim the kernels are built for, on a device that runs them.
inline void check_cuda_query(const at::Tensor& q, const char* op) {
  TORCH_CHECK_VALUE(q.is_cuda(), "q: expected a CUDA tensor, got device ", q.device());
  const auto dtype = q.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
                   "q: expected dtype float16, bfloat16 or float32 on CUDA, got ", dtype);
  if (dtype != at::kFloat) {
    const auto* properties = at::cuda::getDeviceProperties(q.get_device());
    TORCH_CHECK_VALUE(properties->major >= 8, "q: float16/bfloat16 ", op, " needs tensor cores of ",
                      "compute capability 8.0 or newer (mma.sync m16n8k16), got ", properties->major, ".",
                      properties->minor, " (", properties->name, "); use float32");
  }
  const int64_t head_dim = q.size(3);
  TORCH_CHECK_VALUE(head_dim == 32 || head_dim == 64 || head_dim == 128,
                    "q: expected head dim 32, 64 or 128 on CUDA, got ", head_dim);
  TORCH_CHECK_VALUE(q.size(0) * q.size(1) <= kMaxGridDim, "q: expected B * H <= ", kMaxGridDim, ", got shape ",
                    q.sizes());
}

// Everything of the block-sparse params but the layout's CSR (left null: the dense layout).
inline void fill_block_sparse_params(cuda::BlockSparseFwdParams& params, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                     int64_t block_size, bool causal,
                                     const std::optional<at::Tensor>& key_padding_mask, double scale) {
  params.q = q.data_ptr();
  params.k = k.data_ptr();
  params.v = v.data_ptr();
  params.out = out.data_ptr();
  params.lse = lse.data_ptr<float>();
  params.q_batch_stride = q.stride(0), params.q_head_stride = q.stride(1), params.q_row_stride = q.stride(2);
  params.k_batch_stride = k.stride(0), params.k_head_stride = k.stride(1), params.k_row_stride = k.stride(2);
  params.v_batch_stride = v.stride(0), params.v_head_stride = v.stride(1), params.v_row_stride = v.stride(2);
  params.out_batch_stride = out.stride(0), params.out_head_stride = out.stride(1);
  params.out_row_stride = out.stride(2);
  params.key_padding_mask = key_padding_mask.has_value() ? key_padding_mask->data_ptr<bool>() : nullptr;
  params.batch = static_cast<int>(q.size(0));
  params.heads = static_cast<int>(q.size(1));
  params.query_len = static_cast<int>(q.size(2));
  params.key_len = static_cast<int>(k.size(2));
  params.head_dim = static_cast<int>(q.size(3));
  params.block_size = static_cast<int>(block_size);
  params.num_query_blocks = static_cast<int>(ceil_div(q.size(2), block_size));
  params.num_key_blocks = static_cast<int>(ceil_div(k.size(2), block_size));
  params.scale = static_cast<float>(scale);
  params.scale_log2 = static_cast<float>(scale * M_LOG2E);
  params.causal = causal;
}

template <typename Element, typename Params, typename Run>
void for_head_dim(const Params& params, Run&& run) {
  switch (params.head_dim) {
    case 32: return run.template operator()<Element, 32>(params);
    case 64: return run.template operator()<Element, 64>(params);
    default: return run.template operator()<Element, 128>(params);
  }
}

// run<Element, HeadDim>(params) for the dtype and params.head_dim (checked by check_cuda_query).
template <typename Params, typename Run>
void for_dtype_and_head_dim(at::ScalarType dtype, const Params& params, Run&& run) {
  switch (dtype) {
    case at::kHalf: return for_head_dim<__half>(params, run);
    case at::kBFloat16: return for_head_dim<__nv_bfloat16>(params, run);
    default: return for_head_dim<float>(params, run);
  }
}

}  // namespace fastattn::cuda_api
