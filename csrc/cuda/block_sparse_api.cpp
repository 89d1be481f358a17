// Torch-facing side of the CUDA block-sparse kernels: checks the inputs (messages name the argument,
// the expected and the actual value), fills the torch-free params, launches on the current stream,
// and registers the kernels for the CUDA dispatch key of the schemas in csrc/fastattn.cpp.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "api_common.h"
#include "block_sparse_launch.h"
#include "common.h"

namespace fastattn {
namespace {

using cuda_api::for_dtype_and_head_dim;
using cuda_api::kMaxGridDim;
using cuda_api::with_aligned_rows;

// The kernels read block indices from the CSR on the device without bounds checks, so the values are
// checked on the host first. That copy syncs the stream, so it is done once per set of CSR tensors and
// their versions (an in-place change bumps the version); inference tensors keep no version and are
// checked on every call.
void check_layout_values(const at::Tensor& row_offsets, const at::Tensor& col_indices, const at::Tensor& col_offsets,
                         const at::Tensor& row_indices, int64_t query_blocks, int64_t key_blocks) {
  using WeakTensor = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Checked {
    std::array<WeakTensor, 4> tensors;
    std::array<int64_t, 4> versions;
    int64_t query_blocks, key_blocks;
  };
  constexpr size_t kRemembered = 16;
  static std::mutex mutex;
  static std::vector<Checked> checked;

  const std::array<const at::Tensor*, 4> csr{&row_offsets, &col_indices, &col_offsets, &row_indices};
  const bool cacheable = std::none_of(csr.begin(), csr.end(), [](const at::Tensor* t) { return t->is_inference(); });
  std::array<int64_t, 4> versions{};
  if (cacheable) {
    for (size_t i = 0; i < csr.size(); ++i) versions[i] = csr[i]->_version();
    const auto same = [&](const Checked& c) {
      if (c.versions != versions || c.query_blocks != query_blocks || c.key_blocks != key_blocks) return false;
      for (size_t i = 0; i < csr.size(); ++i) {
        // The weak reference keeps the TensorImpl's memory, so its address names no other tensor.
        if (c.tensors[i].expired() || c.tensors[i]._unsafe_get_target() != csr[i]->unsafeGetTensorImpl()) return false;
      }
      return true;
    };
    const std::lock_guard<std::mutex> lock(mutex);
    if (std::any_of(checked.begin(), checked.end(), same)) return;
  }
  check_csr_values("row_offsets", row_offsets.cpu(), "col_indices", col_indices.cpu(), key_blocks);
  check_csr_values("col_offsets", col_offsets.cpu(), "row_indices", row_indices.cpu(), query_blocks);
  if (cacheable) {
    const auto weak = [](const at::Tensor& t) { return WeakTensor(t.getIntrusivePtr()); };
    const std::lock_guard<std::mutex> lock(mutex);
    if (checked.size() == kRemembered) checked.erase(checked.begin());
    checked.push_back(Checked{{weak(row_offsets), weak(col_indices), weak(col_offsets), weak(row_indices)},
                              versions, query_blocks, key_blocks});
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& row_offsets,
                  const at::Tensor& col_indices, const at::Tensor& col_offsets, const at::Tensor& row_indices,
                  int64_t block_size, bool causal, const std::optional<at::Tensor>& key_padding_mask) {
  check_qkv(q, k, v);
  TORCH_CHECK_VALUE(q.is_cuda(), "q: expected a CUDA tensor, got device ", q.device());
  const auto dtype = q.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
                   "q: expected dtype float16, bfloat16 or float32 on CUDA, got ", dtype);
  if (dtype != at::kFloat) {
    const auto* properties = at::cuda::getDeviceProperties(q.get_device());
    TORCH_CHECK_VALUE(properties->major >= 8, "q: float16/bfloat16 block-sparse attention needs tensor cores of ",
                      "compute capability 8.0 or newer (mma.sync m16n8k16), got ", properties->major, ".",
                      properties->minor, " (", properties->name, "); use float32");
  }
  const int64_t head_dim = q.size(3);
  TORCH_CHECK_VALUE(head_dim == 32 || head_dim == 64 || head_dim == 128,
                    "q: expected head dim 32, 64 or 128 on CUDA, got ", head_dim);
  TORCH_CHECK_VALUE(block_size == 32 || block_size == 64 || block_size == 128,
                    "block_size: expected 32, 64 or 128 on CUDA, got ", block_size);
  TORCH_CHECK_VALUE(!causal || q.size(2) == k.size(2), "causal: expected Nq == Nk, got Nq=", q.size(2),
                    " and Nk=", k.size(2));
  TORCH_CHECK_VALUE(q.size(0) <= kMaxGridDim && q.size(1) <= kMaxGridDim, "q: expected B and H <= ", kMaxGridDim,
                    ", got shape ", q.sizes());
  TORCH_CHECK_VALUE(q.size(2) < std::numeric_limits<int32_t>::max() && k.size(2) < std::numeric_limits<int32_t>::max(),
                    "q, k: expected lengths below 2^31, got Nq=", q.size(2), " and Nk=", k.size(2));
  check_key_padding_mask(key_padding_mask, q, k.size(2));
  const int64_t heads = q.size(1);
  check_csr("row_offsets", row_offsets, "col_indices", col_indices, heads, ceil_div(q.size(2), block_size), q);
  check_csr("col_offsets", col_offsets, "row_indices", row_indices, heads, ceil_div(k.size(2), block_size), q);
  TORCH_CHECK_VALUE(row_offsets.size(0) == col_offsets.size(0), "col_offsets: expected ", row_offsets.size(0),
                    " heads (as row_offsets), got ", col_offsets.size(0));
  check_layout_values(row_offsets, col_indices, col_offsets, row_indices, ceil_div(q.size(2), block_size),
                      ceil_div(k.size(2), block_size));
}

int64_t layout_head_stride(const at::Tensor& csr_part) { return csr_part.size(0) == 1 ? 0 : csr_part.stride(0); }

void fill_fwd_params(cuda::BlockSparseFwdParams& params, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, const at::Tensor& row_offsets,
                     const at::Tensor& col_indices, const at::Tensor& col_offsets, const at::Tensor& row_indices,
                     int64_t block_size, bool causal, const std::optional<at::Tensor>& key_padding_mask, double scale) {
  cuda_api::fill_block_sparse_params(params, q, k, v, out, lse, block_size, causal, key_padding_mask, scale);
  params.row_offsets = row_offsets.data_ptr<int32_t>();
  params.col_indices = col_indices.data_ptr<int32_t>();
  params.col_offsets = col_offsets.data_ptr<int32_t>();
  params.row_indices = row_indices.data_ptr<int32_t>();
  params.row_offsets_head_stride = layout_head_stride(row_offsets);
  params.col_indices_head_stride = layout_head_stride(col_indices);
  params.col_offsets_head_stride = layout_head_stride(col_offsets);
  params.row_indices_head_stride = layout_head_stride(row_indices);
}

std::tuple<at::Tensor, at::Tensor> block_sparse_fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& row_offsets,
    const at::Tensor& col_indices, const at::Tensor& col_offsets, const at::Tensor& row_indices, int64_t block_size,
    bool causal, const std::optional<at::Tensor>& key_padding_mask, double scale) {
  check_inputs(q_in, k_in, v_in, row_offsets, col_indices, col_offsets, row_indices, block_size, causal,
               key_padding_mask);
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const at::Tensor q = with_aligned_rows(q_in), k = with_aligned_rows(k_in), v = with_aligned_rows(v_in);
  at::Tensor out = new_output(q.sizes(), q.options());
  at::Tensor lse = new_output({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  if (k.size(2) == 0) {
    out.zero_();
    lse.fill_(std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  cuda::BlockSparseFwdParams params{};
  fill_fwd_params(params, q, k, v, out, lse, row_offsets, col_indices, col_offsets, row_indices, block_size, causal,
                  key_padding_mask, scale);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for_dtype_and_head_dim(q.scalar_type(), params, [stream]<typename Element, int HeadDim>(const auto& p) {
    cuda::run_block_sparse_fwd<Element, HeadDim>(p, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out, const at::Tensor& lse_in, const at::Tensor& row_offsets, const at::Tensor& col_indices,
    const at::Tensor& col_offsets, const at::Tensor& row_indices, int64_t block_size, bool causal,
    const std::optional<at::Tensor>& key_padding_mask, double scale) {
  check_inputs(q_in, k_in, v_in, row_offsets, col_indices, col_offsets, row_indices, block_size, causal,
               key_padding_mask);
  for (const auto& [name, t] : {std::pair{"grad_out", &grad_out_in}, std::pair{"out", &out}}) {
    TORCH_CHECK_VALUE(t->sizes() == q_in.sizes(), name, ": expected the shape of q ", q_in.sizes(), ", got ",
                      t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == q_in.scalar_type(), name, ": expected dtype ", q_in.scalar_type(),
                     " (that of q), got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == q_in.device(), name, ": expected device ", q_in.device(), ", got ",
                      t->device());
    TORCH_CHECK_VALUE(t->stride(3) == 1, name, ": expected unit stride in the last dim, got strides ", t->strides());
  }
  TORCH_CHECK_TYPE(lse_in.scalar_type() == at::kFloat, "lse: expected dtype float32, got ", lse_in.scalar_type());
  TORCH_CHECK_VALUE(lse_in.sizes() == q_in.sizes().slice(0, 3), "lse: expected shape ", q_in.sizes().slice(0, 3),
                    ", got ", lse_in.sizes());
  TORCH_CHECK_VALUE(lse_in.device() == q_in.device(), "lse: expected device ", q_in.device(), ", got ",
                    lse_in.device());
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const at::Tensor q = with_aligned_rows(q_in), k = with_aligned_rows(k_in), v = with_aligned_rows(v_in);
  const at::Tensor grad_out = with_aligned_rows(grad_out_in);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor grad_q = new_output(q.sizes(), q.options());
  at::Tensor grad_k = new_output(k.sizes(), k.options());
  at::Tensor grad_v = new_output(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) {
    grad_q.zero_(), grad_k.zero_(), grad_v.zero_();
    return {grad_q, grad_k, grad_v};
  }
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));

  cuda::BlockSparseBwdParams params{};
  fill_fwd_params(params, q, k, v, out, lse, row_offsets, col_indices, col_offsets, row_indices, block_size, causal,
                  key_padding_mask, scale);
  params.grad_out = grad_out.data_ptr();
  params.grad_out_batch_stride = grad_out.stride(0);
  params.grad_out_head_stride = grad_out.stride(1);
  params.grad_out_row_stride = grad_out.stride(2);
  params.grad_q = grad_q.data_ptr();
  params.grad_k = grad_k.data_ptr();
  params.grad_v = grad_v.data_ptr();
  params.delta = delta.data_ptr<float>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for_dtype_and_head_dim(q.scalar_type(), params, [stream]<typename Element, int HeadDim>(const auto& p) {
    cuda::run_block_sparse_bwd<Element, HeadDim>(p, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_q, grad_k, grad_v};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("block_sparse_fwd", &fastattn::block_sparse_fwd_cuda);
  m.impl("block_sparse_bwd", &fastattn::block_sparse_bwd_cuda);
}
