// Helpers shared by the torch-facing code of every backend (csrc/cpu/*.cpp, csrc/cuda/*_api.cpp):
// output allocation (NaN-poisoned under FASTATTN_POISON_OUTPUTS=1, so that tests catch an unwritten
// tile) and the input checks that every op repeats, with messages that name the argument.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <optional>
#include <vector>

namespace fastattn {

inline bool poison_outputs() {
  static const bool enabled = [] {
    const char* value = std::getenv("FASTATTN_POISON_OUTPUTS");
    return value != nullptr && value[0] == '1';
  }();
  return enabled;
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (poison_outputs()) {
    return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  }
  return at::empty(sizes, options);
}

inline at::ScalarType lse_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// t (any rank >= 1) with the strides that the CPU kernels pass to BLAS and brgemm: unit stride in the last
// dim and rows (the last-but-one dim) at least a row apart, the smallest leading dimension BLAS accepts.
// PyTorch leaves the stride of a size-1 dim arbitrary, and such a tensor may still count as contiguous
// (randn(B, H, D, 1).transpose(2, 3) has rows 1 element apart), so every size-1 dim gets the stride of a
// contiguous tensor: a view, no copy. Rows that overlap (a tensor expanded along N, stride 0) are copied.
// A last dim with a stride other than 1 is left as it is: the ops' contract rejects it (check_qkv), and
// callers that transpose a tensor make it contiguous first. Every CPU kernel takes its tensor arguments
// through here before reading a stride.
inline at::Tensor with_blas_strides(const at::Tensor& t) {
  if (t.dim() == 0) return t;
  std::vector<int64_t> strides = t.strides().vec();
  int64_t contiguous_stride = 1;
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    if (t.size(d) == 1) strides[d] = contiguous_stride;
    contiguous_stride *= std::max<int64_t>(t.size(d), 1);
  }
  const at::Tensor view = t.as_strided(t.sizes(), strides);
  const int64_t last = t.dim() - 1;
  const bool rows_fit = t.dim() < 2 || t.size(last - 1) <= 1 || strides[last - 1] >= t.size(last);
  return strides[last] != 1 || rows_fit ? view : view.contiguous();
}

// q (B, H, Nq, D), k and v (B, H, Nk, D) on one device, one dtype, unit stride in the last dim. With
// grouped_kv (a kernel that reads kv head h / (H / Hkv) for query head h), k and v may have Hkv heads, H % Hkv == 0.
inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool grouped_kv = false) {
  TORCH_CHECK_VALUE(q.dim() == 4, "q: expected 4 dims (B, H, Nq, D), got ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, "k: expected 4 dims (B, H, Nk, D), got ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v: expected the shape of k ", k.sizes(), ", got ", v.sizes());
  const bool heads_fit =
      k.size(1) == q.size(1) || (grouped_kv && k.size(1) > 0 && q.size(1) % k.size(1) == 0);
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && heads_fit && k.size(3) == q.size(3), "k: expected shape (", q.size(0),
                    ", ", grouped_kv ? "Hkv dividing " : "", q.size(1), ", Nk, ", q.size(3), ") to match q, got ",
                    k.sizes());
  for (const at::Tensor* t : {&k, &v}) {
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), "k, v: expected dtype ", q.scalar_type(),
                     " (that of q), got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == q.device(), "k, v: expected device ", q.device(), " (that of q), got ",
                      t->device());
  }
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK_VALUE(t->stride(3) == 1, "q, k, v: expected unit stride in the last dim, got strides ",
                      t->strides());
  }
}

// bool (B, Nk), contiguous, on the device of q.
inline void check_key_padding_mask(const std::optional<at::Tensor>& mask, const at::Tensor& q, int64_t key_len) {
  if (!mask.has_value()) return;
  TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "key_padding_mask: expected dtype bool, got ",
                   mask->scalar_type());
  TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(0) == q.size(0) && mask->size(1) == key_len,
                    "key_padding_mask: expected shape (", q.size(0), ", ", key_len, "), got ", mask->sizes());
  TORCH_CHECK_VALUE(mask->device() == q.device(), "key_padding_mask: expected device ", q.device(), ", got ",
                    mask->device());
  TORCH_CHECK_VALUE(mask->is_contiguous(), "key_padding_mask: expected a contiguous tensor");
}

// Per-head CSR of a block layout: offsets (h, blocks + 1) and indices (h, nnz_max), int32, contiguous,
// h == 1 or H, on the device of q.
inline void check_csr(const char* offsets_name, const at::Tensor& offsets, const char* indices_name,
                      const at::Tensor& indices, int64_t heads, int64_t blocks, const at::Tensor& q) {
  for (const auto& [name, t] : {std::pair{offsets_name, &offsets}, std::pair{indices_name, &indices}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kInt, name, ": expected dtype int32, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 2 && t->is_contiguous(), name, ": expected a contiguous 2-dim tensor, got ",
                      t->sizes());
    TORCH_CHECK_VALUE(t->device() == q.device(), name, ": expected device ", q.device(), ", got ", t->device());
  }
  TORCH_CHECK_VALUE(offsets.size(0) == 1 || offsets.size(0) == heads, offsets_name, ": expected 1 or ", heads,
                    " heads, got ", offsets.size(0));
  TORCH_CHECK_VALUE(offsets.size(1) == blocks + 1, offsets_name, ": expected ", blocks + 1,
                    " offsets per head for ", blocks, " blocks, got ", offsets.size(1));
  TORCH_CHECK_VALUE(indices.size(0) == offsets.size(0), indices_name, ": expected ", offsets.size(0),
                    " heads (as ", offsets_name, "), got ", indices.size(0));
}

// Offsets start at 0, never decrease and stay within the indices; listed indices lie in [0, index_bound).
// offsets and indices are host tensors (the CUDA host API copies them first).
inline void check_csr_values(const char* offsets_name, const at::Tensor& offsets, const char* indices_name,
                             const at::Tensor& indices, int64_t index_bound) {
  const int32_t* off = offsets.const_data_ptr<int32_t>();
  const int32_t* idx = indices.const_data_ptr<int32_t>();
  const int64_t heads = offsets.size(0), blocks = offsets.size(1) - 1, capacity = indices.size(1);
  for (int64_t h = 0; h < heads; ++h) {
    const int32_t* o = off + h * (blocks + 1);
    TORCH_CHECK_VALUE(o[0] == 0, offsets_name, ": expected each head's offsets to start at 0, got ", o[0],
                      " for head ", h);
    for (int64_t i = 0; i < blocks; ++i) {
      TORCH_CHECK_VALUE(o[i] <= o[i + 1], offsets_name, ": expected non-decreasing offsets, got ", o[i], " then ",
                        o[i + 1], " for head ", h);
    }
    TORCH_CHECK_VALUE(o[blocks] <= capacity, offsets_name, ": last offset ", o[blocks], " of head ", h,
                      " exceeds the ", capacity, " entries of ", indices_name);
    for (int64_t i = 0; i < o[blocks]; ++i) {
      const int32_t value = idx[h * capacity + i];
      TORCH_CHECK_VALUE(value >= 0 && value < index_bound, indices_name, ": expected block indices in [0, ",
                        index_bound, "), got ", value, " for head ", h);
    }
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Linformer: proj_k and proj_v (kp, Nk) or (H, kp, Nk) with the same kp > 0, dtype and device of q.
inline void check_linformer_projections(const at::Tensor& q, const at::Tensor& k, const at::Tensor& proj_k,
                                        const at::Tensor& proj_v) {
  for (const auto& [name, p] : {std::pair{"proj_k", &proj_k}, std::pair{"proj_v", &proj_v}}) {
    TORCH_CHECK_TYPE(p->scalar_type() == q.scalar_type(), name, ": expected dtype ", q.scalar_type(),
                     " (that of q), got ", p->scalar_type());
    TORCH_CHECK_VALUE(p->device() == q.device(), name, ": expected device ", q.device(), ", got ", p->device());
    TORCH_CHECK_VALUE((p->dim() == 2 || (p->dim() == 3 && p->size(0) == q.size(1))) && p->size(-1) == k.size(2) &&
                          p->size(-2) > 0,
                      name, ": expected shape (kp, ", k.size(2), ") or (", q.size(1), ", kp, ", k.size(2), "), got ",
                      p->sizes());
  }
  TORCH_CHECK_VALUE(proj_v.size(-2) == proj_k.size(-2), "proj_v: expected kp = ", proj_k.size(-2),
                    " (that of proj_k), got shape ", proj_v.sizes());
}

// What linformer_bwd reads besides the inputs of linformer_fwd: grad_out and out like q, lse (B, H, Nq) and
// k_proj, v_proj (B, H, kp, D) in the accumulation dtype, all on the device of q.
inline void check_linformer_saved(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out,
                                  const at::Tensor& lse, const at::Tensor& k_proj, const at::Tensor& v_proj,
                                  const at::Tensor& proj_k) {
  for (const auto& [name, t] : {std::pair{"grad_out", &grad_out}, std::pair{"out", &out}}) {
    TORCH_CHECK_VALUE(t->sizes() == q.sizes() && t->stride(3) == 1 && t->scalar_type() == q.scalar_type() &&
                          t->device() == q.device(),
                      name, ": expected shape ", q.sizes(), ", dtype ", q.scalar_type(), ", device ", q.device(),
                      " and unit last stride, got ", t->sizes(), ", ", t->scalar_type(), ", ", t->device(),
                      ", strides ", t->strides());
  }
  const auto acc = lse_dtype(q.scalar_type());
  const std::vector<int64_t> projected_shape{q.size(0), q.size(1), proj_k.size(-2), q.size(3)};
  for (const auto& [name, t] : {std::pair{"k_proj", &k_proj}, std::pair{"v_proj", &v_proj}}) {
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(projected_shape) && t->scalar_type() == acc &&
                          t->device() == q.device(),
                      name, ": expected shape ", projected_shape, ", dtype ", acc, " and device ", q.device(),
                      ", got ", t->sizes(), ", ", t->scalar_type(), " and ", t->device());
  }
  TORCH_CHECK_VALUE(lse.sizes() == q.sizes().slice(0, 3) && lse.scalar_type() == acc && lse.device() == q.device(),
                    "lse: expected shape ", q.sizes().slice(0, 3), ", dtype ", acc, " and device ", q.device(),
                    ", got ", lse.sizes(), ", ", lse.scalar_type(), " and ", lse.device());
}

}  // namespace fastattn
