// Torch-facing side of Performer on CUDA (the schemas of csrc/fastattn.cpp under the CUDA dispatch key): checks
// with messages that name the argument, the params of csrc/cuda/performer_params.h, workspaces, and the launches
// of csrc/cuda/performer_launch.h on the current stream.
//
// Saved tensors (the stabilisers of csrc/cpu/performer.cpp): normaliser (B, H, Nq), key_stabiliser
// (non-causal: (B, H, m), the per-feature key maxima s_f; causal: (B, H, Nk), M_j, the largest of the per-feature
// running maxima; zeros for relu) and state (B, H, m, D + 1), all float32. Causal: dden of the backward (an
// O(N D) reduction) goes through ATen before the kernels, which recompute the stabilisers.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "api_common.h"
#include "common.h"
#include "performer_launch.h"

namespace fastattn {
namespace {

using cuda_api::for_dtype_and_head_dim;

bool is_softmax_kernel(std::string_view kernel) {
  TORCH_CHECK_VALUE(kernel == "softmax" || kernel == "relu", "kernel: expected 'softmax' or 'relu', got '", kernel,
                    "'");
  return kernel == "softmax";
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& projection,
                  bool causal, const std::optional<at::Tensor>& key_padding_mask, double scale) {
  // k and v with the heads of q: grouped-query attention reaches here with k and v repeated to H heads
  // (fastattn.functional), as the CUDA backend does not read them grouped.
  check_qkv(q, k, v);
  cuda_api::check_cuda_query(q, "Performer attention");
  check_key_padding_mask(key_padding_mask, q, k.size(2));
  TORCH_CHECK_TYPE(at::isFloatingType(projection.scalar_type()), "projection: expected a floating-point tensor, got ",
                   projection.scalar_type());
  TORCH_CHECK_VALUE(projection.device() == q.device(), "projection: expected device ", q.device(), ", got ",
                    projection.device());
  TORCH_CHECK_VALUE((projection.dim() == 2 || (projection.dim() == 3 && projection.size(0) == q.size(1))) &&
                        projection.size(-1) == q.size(3),
                    "projection: expected shape (m, ", q.size(3), ") or (", q.size(1), ", m, ", q.size(3), "), got ",
                    projection.sizes());
  const int64_t features = projection.size(-2);
  TORCH_CHECK_VALUE(features > 0 && features % 16 == 0 && features <= cuda::kPerformerMaxFeatures,
                    "projection: expected m (its number of features) a multiple of 16 up to ",
                    cuda::kPerformerMaxFeatures, " on CUDA (the query kernels hold every feature of a tile of ",
                    "queries in shared memory), got m=", features);
  TORCH_CHECK_VALUE(!causal || q.size(2) == k.size(2), "causal: expected Nq == Nk, got Nq=", q.size(2), " and Nk=",
                    k.size(2));
  TORCH_CHECK_VALUE(scale > 0, "scale: expected a positive value, got ", scale);
  TORCH_CHECK_VALUE(k.size(2) > 0 && q.size(2) > 0, "q, k: expected non-empty sequences, got Nq=", q.size(2),
                    " and Nk=", k.size(2));
  TORCH_CHECK_VALUE(q.size(2) < std::numeric_limits<int32_t>::max() && k.size(2) < std::numeric_limits<int32_t>::max(),
                    "q, k: expected lengths below 2^31, got Nq=", q.size(2), " and Nk=", k.size(2));
}

// Rows per split of a sum over `length` rows (keys or queries) computed by (feature tiles, splits, B * H)
// CTAs: enough splits for about two CTAs per SM, each a whole number of the kernels' row tiles.
int64_t rows_per_split(const at::Tensor& q, int64_t length, int64_t features) {
  const int64_t sms = at::cuda::getDeviceProperties(q.get_device())->multiProcessorCount;
  const int64_t ctas = q.size(0) * q.size(1) * ceil_div(features, cuda::kPerformerFeatureTile);
  const int64_t tiles = ceil_div(length, cuda::kPerformerRows);
  const int64_t splits = std::clamp<int64_t>(ceil_div(2 * sms, ctas), 1, std::min<int64_t>(tiles, 65535));
  return ceil_div(tiles, splits) * cuda::kPerformerRows;
}

// Everything but the outputs and workspaces.
cuda::PerformerParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& projection, bool softmax, bool causal,
                                  const std::optional<at::Tensor>& key_padding_mask, double scale) {
  cuda::PerformerParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.projection = projection.data_ptr<float>();
  p.projection_head_stride = projection.dim() == 3 ? projection.stride(0) : 0;
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(2);
  p.key_padding_mask = key_padding_mask.has_value() ? key_padding_mask->data_ptr<bool>() : nullptr;
  p.batch = static_cast<int>(q.size(0));
  p.heads = static_cast<int>(q.size(1));
  p.query_len = static_cast<int>(q.size(2));
  p.key_len = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(q.size(3));
  p.features = static_cast<int>(projection.size(-2));
  p.sqrt_scale = static_cast<float>(std::sqrt(scale));
  p.softmax = softmax;
  p.causal = causal;
  return p;
}

// Feature tiles of the causal kernels (each writes its share of every result).
int64_t feature_tiles(int64_t features) { return ceil_div(features, cuda::kPerformerFeatureTile); }

// The launches of a dtype and head dim.
template <typename Run>
void dispatch(const at::Tensor& q, const cuda::PerformerParams& p, Run&& run) {
  for_dtype_and_head_dim(q.scalar_type(), p, run);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Causal softmax: the stabilisers' workspaces (performer_params.h), which each direction fills anew; the returned
// tensors own them until the kernels are enqueued.
std::vector<at::Tensor> causal_stabiliser_workspaces(const at::Tensor& q, cuda::PerformerParams& p) {
  const int64_t chunks = ceil_div(q.size(2), cuda::kPerformerRows);
  // performer_key_max_kernel takes one chunk per blockIdx.y.
  TORCH_CHECK_VALUE(chunks <= 65535, "q: expected Nq <= ", 65535 * cuda::kPerformerRows,
                    " for causal softmax Performer on CUDA, got Nq=", q.size(2));
  const auto float_options = q.options().dtype(at::kFloat);
  at::Tensor chunk_max = at::empty({chunks + 1, q.size(0), q.size(1), p.features}, float_options);
  at::Tensor per_query = at::empty({3, q.size(0), q.size(1), q.size(2)}, float_options);
  p.chunk_max = chunk_max.data_ptr<float>();
  p.running_max = per_query[0].data_ptr<float>();
  p.query_max = per_query[1].data_ptr<float>();
  p.query_constant = per_query[2].data_ptr<float>();
  return {chunk_max, per_query};
}

// Causal relu with padding: running_max per query (B, H, Nq), 0 from the first unpadded key on and -inf before,
// so that a query that sees no key gives 0 even where its features are NaN (phi(q) . 0 would be NaN). The
// returned tensor owns it until the kernels are enqueued.
at::Tensor relu_keys_seen(const at::Tensor& q, const at::Tensor& key_padding_mask, cuda::PerformerParams& p) {
  const at::Tensor seen = key_padding_mask.logical_not().cumsum(-1).gt(0);
  at::Tensor running = at::where(seen, 0.0, -std::numeric_limits<double>::infinity()).to(at::kFloat);
  running = running.unsqueeze(1).expand({q.size(0), q.size(1), q.size(2)}).contiguous();
  p.running_max = running.data_ptr<float>();
  return running;
}

// The projection as the kernels read it: float32 with contiguous (m, D) rows.
at::Tensor projection_for_kernel(const at::Tensor& projection) {
  return projection.to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> performer_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& projection_in,
    std::string_view kernel, bool causal, const std::optional<at::Tensor>& key_padding_mask, double scale) {
  const bool softmax = is_softmax_kernel(kernel);
  check_inputs(q, k, v, projection_in, causal, key_padding_mask, scale);
  const c10::cuda::CUDAGuard device_guard(q.device());
  const at::Tensor projection = projection_for_kernel(projection_in);
  cuda::PerformerParams p = make_params(q, k, v, projection, softmax, causal, key_padding_mask, scale);
  const int64_t batch = q.size(0), heads = q.size(1), features = p.features, dim = p.head_dim;
  const auto float_options = q.options().dtype(at::kFloat);
  at::Tensor out = new_output(q.sizes(), q.options());
  at::Tensor normaliser = new_output({batch, heads, q.size(2)}, float_options);
  at::Tensor key_stabiliser = new_output({batch, heads, causal ? k.size(2) : features}, float_options);
  at::Tensor state = new_output({batch, heads, features, dim + 1}, float_options);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (causal) {
    p.out = out.data_ptr();
    p.normaliser = normaliser.data_ptr<float>();
    p.key_stabiliser = key_stabiliser.data_ptr<float>();
    p.state = state.data_ptr<float>();
    std::vector<at::Tensor> stabilisers;
    if (softmax) {
      stabilisers = causal_stabiliser_workspaces(q, p);
    } else {
      key_stabiliser.zero_();
      if (key_padding_mask.has_value()) stabilisers = {relu_keys_seen(q, *key_padding_mask, p)};
    }
    at::Tensor shares = at::empty({feature_tiles(features), batch, heads, q.size(2), dim + 1}, float_options);
    p.shares = shares.data_ptr<float>();
    dispatch(q, p, [stream]<typename Element, int HeadDim>(const auto& params) {
      cuda::run_performer_fwd<Element, HeadDim>(params, stream);
    });
    return {out, normaliser, key_stabiliser, state};
  }
  const int64_t per_split = rows_per_split(q, k.size(2), features);
  const int64_t splits = ceil_div(k.size(2), per_split);
  at::Tensor key_max_partial, state_partial;
  if (softmax) key_max_partial = at::empty({splits, batch, heads, features}, float_options);
  if (splits > 1) state_partial = at::empty({splits, batch, heads, features, dim + 1}, float_options);
  p.out = out.data_ptr();
  p.normaliser = normaliser.data_ptr<float>();
  p.key_stabiliser = key_stabiliser.data_ptr<float>();
  p.state = state.data_ptr<float>();
  p.key_max_partial = softmax ? key_max_partial.data_ptr<float>() : nullptr;
  p.state_partial = splits > 1 ? state_partial.data_ptr<float>() : nullptr;
  p.key_splits = static_cast<int>(splits);
  p.keys_per_split = static_cast<int>(per_split);
  dispatch(q, p, [stream]<typename Element, int HeadDim>(const auto& params) {
    cuda::run_performer_fwd<Element, HeadDim>(params, stream);
  });
  return {out, normaliser, key_stabiliser, state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> performer_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& projection_in, const at::Tensor& out_in, const at::Tensor& normaliser_in,
    const at::Tensor& key_stabiliser_in, const at::Tensor& state_in, std::string_view kernel, bool causal,
    const std::optional<at::Tensor>& key_padding_mask, double scale) {
  const bool softmax = is_softmax_kernel(kernel);
  check_inputs(q, k, v, projection_in, causal, key_padding_mask, scale);
  for (const auto& [name, t] : {std::pair{"grad_out", &grad_out_in}, std::pair{"out", &out_in}}) {
    TORCH_CHECK_VALUE(t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type() && t->device() == q.device(),
                      name, ": expected shape ", q.sizes(), ", dtype ", q.scalar_type(), " and device ", q.device(),
                      ", got ", t->sizes(), ", ", t->scalar_type(), " and ", t->device());
  }
  const int64_t batch = q.size(0), heads = q.size(1), features = projection_in.size(-2), dim = q.size(3);
  const std::vector<int64_t> normaliser_shape{batch, heads, q.size(2)};
  const std::vector<int64_t> stabiliser_shape{batch, heads, causal ? k.size(2) : features};
  const std::vector<int64_t> state_shape{batch, heads, features, dim + 1};
  for (const auto& [name, t, shape] :
       {std::tuple{"normaliser", &normaliser_in, &normaliser_shape},
        std::tuple{"key_stabiliser", &key_stabiliser_in, &stabiliser_shape},
        std::tuple{"state", &state_in, &state_shape}}) {
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(*shape) && t->scalar_type() == at::kFloat &&
                          t->device() == q.device(),
                      name, ": expected shape ", *shape, ", dtype float32 and device ", q.device(), ", got ",
                      t->sizes(), ", ", t->scalar_type(), " and ", t->device());
  }
  const c10::cuda::CUDAGuard device_guard(q.device());
  const at::Tensor projection = projection_for_kernel(projection_in);
  const at::Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous();
  const at::Tensor normaliser = normaliser_in.contiguous(), key_stabiliser = key_stabiliser_in.contiguous();
  const at::Tensor state = state_in.contiguous();
  cuda::PerformerParams p = make_params(q, k, v, projection, softmax, causal, key_padding_mask, scale);
  const auto float_options = q.options().dtype(at::kFloat);
  at::Tensor grad_q = new_output(q.sizes(), q.options());
  at::Tensor grad_k = new_output(k.sizes(), q.options());
  at::Tensor grad_v = new_output(v.sizes(), q.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (causal) {
    p.out = out.data_ptr();
    p.normaliser = normaliser.data_ptr<float>();
    p.key_stabiliser = nullptr;  // recomputed with the other stabilisers
    p.state = state.data_ptr<float>();
    p.grad_out = grad_out.data_ptr();
    p.grad_q = grad_q.data_ptr();
    p.grad_k = grad_k.data_ptr();
    p.grad_v = grad_v.data_ptr();
    std::vector<at::Tensor> stabilisers;
    if (softmax) stabilisers = causal_stabiliser_workspaces(q, p);
    // dden = -(dnum . out) with dnum = grad_out / den in float32, summed in double (it cancels against dnum . v
    // in the gradients); 0 where den == 0 (the query sees no key).
    const at::Tensor den = normaliser.unsqueeze(-1);
    const at::Tensor dnum = grad_out.to(at::kFloat) / den;
    const at::Tensor grad_den =
        at::where(normaliser == 0, 0.0, -(dnum.to(at::kDouble) * out.to(at::kDouble)).sum(-1)).to(at::kFloat).contiguous();
    p.grad_den = grad_den.data_ptr<float>();
    const int64_t tiles = feature_tiles(features);
    at::Tensor shares = at::empty({tiles, batch, heads, q.size(2), dim}, float_options);
    at::Tensor grad_k_shares = at::empty_like(shares), grad_v_shares = at::empty_like(shares);
    at::Tensor row_sums = at::empty({tiles, batch, heads, q.size(2)}, float_options);
    at::Tensor key_row_sums = at::empty_like(row_sums);
    p.shares = shares.data_ptr<float>();
    p.grad_k_shares = grad_k_shares.data_ptr<float>();
    p.grad_v_shares = grad_v_shares.data_ptr<float>();
    p.row_sum_shares = row_sums.data_ptr<float>();
    p.key_row_sum_shares = key_row_sums.data_ptr<float>();
    dispatch(q, p, [stream]<typename Element, int HeadDim>(const auto& params) {
      cuda::run_performer_bwd<Element, HeadDim>(params, stream);
    });
    return {grad_q, grad_k, grad_v};
  }
  at::Tensor query_rows = at::empty({batch, heads, q.size(2), 3}, float_options);
  at::Tensor grad_state = at::empty(state_shape, float_options);
  const int64_t per_split = rows_per_split(q, q.size(2), features);
  const int64_t splits = ceil_div(q.size(2), per_split);
  at::Tensor grad_state_partial;
  if (splits > 1) grad_state_partial = at::empty({splits, batch, heads, features, dim + 1}, float_options);
  p.out = out.data_ptr();
  p.normaliser = normaliser.data_ptr<float>();
  p.key_stabiliser = key_stabiliser.data_ptr<float>();
  p.state = state.data_ptr<float>();
  p.grad_out = grad_out.data_ptr();
  p.grad_q = grad_q.data_ptr();
  p.grad_k = grad_k.data_ptr();
  p.grad_v = grad_v.data_ptr();
  p.query_rows = query_rows.data_ptr<float>();
  p.grad_state = grad_state.data_ptr<float>();
  p.grad_state_partial = splits > 1 ? grad_state_partial.data_ptr<float>() : nullptr;
  p.query_splits = static_cast<int>(splits);
  p.queries_per_split = static_cast<int>(per_split);
  dispatch(q, p, [stream]<typename Element, int HeadDim>(const auto& params) {
    cuda::run_performer_bwd<Element, HeadDim>(params, stream);
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("performer_fwd", &fastattn::performer_fwd_cuda);
  m.impl("performer_bwd", &fastattn::performer_bwd_cuda);
}
