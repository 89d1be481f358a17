// Torch-facing side of Linformer on CUDA (the schemas of csrc/fastattn.cpp under the CUDA dispatch key).
// Forward: the projection kernel writes K' = P_k K and V' = P_v V (float32, saved for the backward), then
// the block-sparse attention kernels run over the kp projected keys with the dense layout (no CSR; they
// pad and mask kp to their tile). Backward: the block-sparse backward gives dQ, dK' and dV'; the
// projection gradients are plain GEMMs, so they go to cuBLAS through ATen.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "api_common.h"
#include "block_sparse_launch.h"
#include "common.h"
#include "linformer_launch.h"

namespace fastattn {
namespace {

using cuda_api::for_dtype_and_head_dim;
using cuda_api::with_aligned_rows;

// Blocks of the dense layout over the projected keys: the tensor-core kernels' 64-row tile.
constexpr int64_t kAttentionBlock = 64;

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& proj_k,
                  const at::Tensor& proj_v, const std::optional<at::Tensor>& key_padding_mask) {
  check_qkv(q, k, v);
  cuda_api::check_cuda_query(q, "Linformer attention");
  check_key_padding_mask(key_padding_mask, q, k.size(2));
  check_linformer_projections(q, k, proj_k, proj_v);
  TORCH_CHECK_VALUE(k.size(2) > 0 && q.size(2) > 0, "q, k: expected non-empty sequences, got Nq=", q.size(2),
                    " and Nk=", k.size(2));
  TORCH_CHECK_VALUE(q.size(2) < std::numeric_limits<int32_t>::max() && k.size(2) < std::numeric_limits<int32_t>::max(),
                    "q, k: expected lengths below 2^31, got Nq=", q.size(2), " and Nk=", k.size(2));
}

// The projection kernels copy 16 bytes at a time from 16-byte aligned rows (the columns past Nk are never
// read): a projection whose rows are not aligned is copied into rows padded to a multiple of 16 bytes.
at::Tensor projection_for_kernel(const at::Tensor& projection) {
  const int64_t elements_per_16_bytes = 16 / projection.element_size();
  bool aligned = projection.stride(-1) == 1 && reinterpret_cast<uintptr_t>(projection.data_ptr()) % 16 == 0;
  for (int64_t dim = 0; dim + 1 < projection.dim(); ++dim) {
    aligned = aligned && (projection.size(dim) == 1 || projection.stride(dim) % elements_per_16_bytes == 0);
  }
  if (aligned) return projection;
  const int64_t columns = projection.size(-1);
  std::vector<int64_t> padded_shape(projection.sizes().begin(), projection.sizes().end());
  padded_shape.back() = ceil_div(columns, elements_per_16_bytes) * elements_per_16_bytes;
  at::Tensor padded = at::empty(padded_shape, projection.options());
  return padded.narrow(-1, 0, columns).copy_(projection);
}

// Keys per split: enough splits for about two CTAs per SM when B x H x (kp tiles) is small, each a whole
// number of the kernels' key chunks.
int64_t keys_per_split(const at::Tensor& q, int64_t key_len, int64_t projected_len) {
  const int64_t sms = at::cuda::getDeviceProperties(q.get_device())->multiProcessorCount;
  const int64_t ctas = q.size(0) * q.size(1) * ceil_div(projected_len, 64);
  const int64_t chunks = ceil_div(key_len, cuda::kLinformerKeyChunk);
  const int64_t splits = std::clamp<int64_t>(ceil_div(2 * sms, ctas), 1, std::min<int64_t>(chunks, 65535));
  return ceil_div(chunks, splits) * cuda::kLinformerKeyChunk;
}

std::tuple<at::Tensor, at::Tensor> project(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& proj_k, const at::Tensor& proj_v,
                                           const std::optional<at::Tensor>& key_padding_mask) {
  const int64_t batch = q.size(0), heads = q.size(1), key_len = k.size(2), dim = q.size(3);
  const int64_t projected_len = proj_k.size(-2);
  const auto float_options = q.options().dtype(at::kFloat);
  at::Tensor k_proj = new_output({batch, heads, projected_len, dim}, float_options);
  at::Tensor v_proj = new_output({batch, heads, projected_len, dim}, float_options);
  const int64_t per_split = keys_per_split(q, key_len, projected_len);
  const int64_t splits = ceil_div(key_len, per_split);
  at::Tensor partials;
  if (splits > 1) partials = at::empty({2, splits, batch, heads, projected_len, dim}, float_options);

  cuda::LinformerProjectionParams params{};
  params.k = k.data_ptr();
  params.v = v.data_ptr();
  params.proj_k = proj_k.data_ptr();
  params.proj_v = proj_v.data_ptr();
  params.k_proj = k_proj.data_ptr<float>();
  params.v_proj = v_proj.data_ptr<float>();
  params.k_partial = splits > 1 ? partials[0].data_ptr<float>() : params.k_proj;
  params.v_partial = splits > 1 ? partials[1].data_ptr<float>() : params.v_proj;
  params.split_stride = batch * heads * projected_len * dim;
  params.k_batch_stride = k.stride(0), params.k_head_stride = k.stride(1), params.k_row_stride = k.stride(2);
  params.v_batch_stride = v.stride(0), params.v_head_stride = v.stride(1), params.v_row_stride = v.stride(2);
  params.proj_k_head_stride = proj_k.dim() == 3 ? proj_k.stride(0) : 0;
  params.proj_k_row_stride = proj_k.stride(-2);
  params.proj_v_head_stride = proj_v.dim() == 3 ? proj_v.stride(0) : 0;
  params.proj_v_row_stride = proj_v.stride(-2);
  params.key_padding_mask = key_padding_mask.has_value() ? key_padding_mask->data_ptr<bool>() : nullptr;
  params.batch = static_cast<int>(batch);
  params.heads = static_cast<int>(heads);
  params.key_len = static_cast<int>(key_len);
  params.head_dim = static_cast<int>(dim);
  params.projected_len = static_cast<int>(projected_len);
  params.splits = static_cast<int>(splits);
  params.keys_per_split = static_cast<int>(per_split);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for_dtype_and_head_dim(q.scalar_type(), params, [stream]<typename Element, int HeadDim>(const auto& p) {
    cuda::run_linformer_projection<Element, HeadDim>(p, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {k_proj, v_proj};
}

// The block-sparse params of the attention of q over the projected keys and values (in q's dtype, for the
// tensor cores): the dense layout, no padding (every projected key exists).
cuda::BlockSparseBwdParams attention_params(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                            const at::Tensor& out, const at::Tensor& lse, double scale) {
  cuda::BlockSparseBwdParams params{};
  cuda_api::fill_block_sparse_params(params, q, keys, values, out, lse, kAttentionBlock, false, std::nullopt, scale);
  return params;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linformer_fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& proj_k_in,
    const at::Tensor& proj_v_in, const std::optional<at::Tensor>& key_padding_mask, double scale) {
  check_inputs(q_in, k_in, v_in, proj_k_in, proj_v_in, key_padding_mask);
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const at::Tensor q = with_aligned_rows(q_in), k = with_aligned_rows(k_in), v = with_aligned_rows(v_in);
  const auto [k_proj, v_proj] =
      project(q, k, v, projection_for_kernel(proj_k_in), projection_for_kernel(proj_v_in), key_padding_mask);

  const at::Tensor keys = k_proj.to(q.scalar_type()), values = v_proj.to(q.scalar_type());
  at::Tensor out = new_output(q.sizes(), q.options());
  at::Tensor lse = new_output({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const cuda::BlockSparseFwdParams params = attention_params(q, keys, values, out, lse, scale);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for_dtype_and_head_dim(q.scalar_type(), params, [stream]<typename Element, int HeadDim>(const auto& p) {
    cuda::run_block_sparse_fwd<Element, HeadDim>(p, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse, k_proj, v_proj};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linformer_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& proj_k, const at::Tensor& proj_v, const at::Tensor& out_in, const at::Tensor& lse_in,
    const at::Tensor& k_proj, const at::Tensor& v_proj, const std::optional<at::Tensor>& key_padding_mask,
    double scale) {
  check_inputs(q_in, k_in, v_in, proj_k, proj_v, key_padding_mask);
  check_linformer_saved(grad_out_in, q_in, out_in, lse_in, k_proj, v_proj, proj_k);
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const at::Tensor q = with_aligned_rows(q_in), grad_out = with_aligned_rows(grad_out_in);
  const at::Tensor out = with_aligned_rows(out_in), lse = lse_in.contiguous();
  // The forward's keys and values exactly: the saved projections rounded to q's dtype.
  const at::Tensor keys = k_proj.to(q.scalar_type()).contiguous(), values = v_proj.to(q.scalar_type()).contiguous();

  // dQ, dK' and dV': the block-sparse backward over the dense layout.
  at::Tensor grad_q = new_output(q.sizes(), q.options());
  at::Tensor grad_keys = new_output(keys.sizes(), keys.options());
  at::Tensor grad_values = new_output(values.sizes(), values.options());
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  cuda::BlockSparseBwdParams params = attention_params(q, keys, values, out, lse, scale);
  params.grad_out = grad_out.data_ptr();
  params.grad_out_batch_stride = grad_out.stride(0);
  params.grad_out_head_stride = grad_out.stride(1);
  params.grad_out_row_stride = grad_out.stride(2);
  params.grad_q = grad_q.data_ptr();
  params.grad_k = grad_keys.data_ptr();
  params.grad_v = grad_values.data_ptr();
  params.delta = delta.data_ptr<float>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for_dtype_and_head_dim(q.scalar_type(), params, [stream]<typename Element, int HeadDim>(const auto& p) {
    cuda::run_block_sparse_bwd<Element, HeadDim>(p, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // dK = P_k^T dK' and dV = P_v^T dV' (zero on padded keys); dP_k = sum of dK' K^T over the batch (and the
  // heads when P_k is shared), with padded keys zeroed as in the forward. Plain GEMMs: cuBLAS via ATen.
  const bool padded = key_padding_mask.has_value();
  const at::Tensor padding = padded ? key_padding_mask->view({q.size(0), 1, k_in.size(2), 1}) : at::Tensor();
  const auto project_back = [&](const at::Tensor& projection, const at::Tensor& grad_projected) {
    at::Tensor grad = at::matmul(projection.transpose(-1, -2), grad_projected);
    return padded ? grad.masked_fill_(padding, 0) : grad;
  };
  const auto projection_grad = [&](const at::Tensor& projection, const at::Tensor& grad_projected,
                                   const at::Tensor& rows) {
    const at::Tensor visible = padded ? rows.masked_fill(padding, 0) : rows;
    return at::einsum(projection.dim() == 3 ? "bhkd,bhnd->hkn" : "bhkd,bhnd->kn", {grad_projected, visible});
  };
  return {grad_q, project_back(proj_k, grad_keys), project_back(proj_v, grad_values),
          projection_grad(proj_k, grad_keys, k_in), projection_grad(proj_v, grad_values, v_in)};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("linformer_fwd", &fastattn::linformer_fwd_cuda);
  m.impl("linformer_bwd", &fastattn::linformer_bwd_cuda);
}
