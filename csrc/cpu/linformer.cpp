// Linformer attention on the CPU: K' = P_k K and V' = P_v V (padded keys zeroed), kept in the
// accumulation type, then softmax attention of Q over the kp projected keys. kp is small, so a tile
// of query rows holds its whole score row (no online softmax): parallel over batch x head x query tile.
// The backward recomputes the scores from the saved lse (FlashAttention-2 style), reduces dK' and dV'
// over query tiles, then projects them back: dK = P_k^T dK', dP_k = sum over batch (and heads when
// shared) of dK' K^T, computed per key tile so that every task owns its output columns.
//
// Every tile product is written as a plain row-major A B (cpu::product: oneDNN's brgemm micro-kernels
// for float, dgemm_ for double), the operands being laid out for it: the small per-head K'^T, V'^T and
// projection transposes once per call, the Q^T and dO^T tiles (n x D) in the backward, and the gradients
// of the projected keys and values accumulated transposed. Recomputing the scores in the backward costs
// about a tenth of it; saving the (N, kp) probabilities instead would write and read B H N kp floats and
// fault in their pages on every forward, for a smaller gain, so the kernel recomputes.
#include "cpu/dense_tiles.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <vector>

#include "common.h"
#include "cpu/softmax_grad.h"

namespace fastattn {
namespace {

using cpu::HeadView;

constexpr int64_t kQueryTile = 256;
constexpr int64_t kKeyTile = 1024;
// Sums over the sequence (K' = P_k K, dK'^T = sum of Q^T dS over query tiles) add one product per chunk of
// this many rows: a micro-kernel accumulates its inner dimension in one running sum, so a single product over
// thousands of rows would round several times worse than BLAS, which blocks that dimension. For float, each
// chunk's product adds its finished sum to C (oneDNN's brgemm with C accumulated).
constexpr int64_t kSumChunk = 256;
// Key rows per task of the projection gradients: their (rows x kp) sum stays in the L2 cache.
constexpr int64_t kProjectionGradTile = 128;

// A (kp, Nk) projection shared by the heads or an (H, kp, Nk) one per head, in the accumulation type.
template <typename T>
struct Projection {
  const T* data;
  int64_t head_stride, row_stride;
  const T* head(int64_t h) const { return data + h * head_stride; }
};

// BLAS reads it in place where its strides allow (unit stride along its rows).
at::Tensor projection_in(const at::Tensor& projection, at::ScalarType acc) {
  const at::Tensor converted = projection.to(acc);
  return with_blas_strides(converted.stride(-1) == 1 ? converted : converted.contiguous());
}

// A projection (or its transpose) as the A operand of products of type O: in the accumulation type, or for
// bf16 products in bfloat16 with rows of even length (a zero pad column), so that a product over all of its
// columns has an even inner dimension.
template <typename O>
at::Tensor projection_operand(const at::Tensor& projection, at::ScalarType acc) {
  if constexpr (std::is_same_v<O, c10::BFloat16>) {
    return at::constant_pad_nd(projection, {0, projection.size(-1) % 2}).contiguous();
  } else {
    return projection_in(projection, acc);
  }
}

template <typename T>
Projection<T> projection_view(const at::Tensor& projection) {
  const bool per_head = projection.dim() == 3;
  return {projection.data_ptr<T>(), per_head ? projection.stride(0) : 0, projection.stride(-2)};
}

// bfloat16 inputs are multiplied in bfloat16 where the CPU can (cpu::bf16_products) and the head dim is even
// (bf16 products over it read pairs); else they are converted to float32 first.
bool use_bf16_products(const at::Tensor& q) {
  return q.scalar_type() == at::kBFloat16 && q.size(3) % 2 == 0 && cpu::bf16_products();
}

// n rounded up to even when products of type O read pairs of rows (bf16 products): their zero pads.
template <typename O>
constexpr int64_t inner_size(int64_t n) {
  return std::is_same_v<O, c10::BFloat16> ? n + n % 2 : n;
}

// Zeroes column `cols` of a (rows x cols + 1) bfloat16 A operand (leading dimension ld) when cols is odd: the
// pad of an even inner dimension.
void zero_pad_column(c10::BFloat16* a, int64_t ld, int64_t rows, int64_t cols) {
  if (cols % 2 == 0) return;
  for (int64_t r = 0; r < rows; ++r) a[r * ld + cols] = c10::BFloat16(0.0f);
}

// Rows [start, start + rows) of one head of k or v as a matrix for BLAS, with padded keys zeroed: read in
// place when the input already has the accumulation type and no key of the head is padded, else
// converted into `buffer`. Returns the rows and their leading dimension.
template <typename scalar_t, typename T>
std::pair<const T*, int64_t> key_rows(const scalar_t* head, int64_t row_stride, const bool* padding, int64_t start,
                                      int64_t rows, int64_t dim, T* buffer) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    if (padding == nullptr) return {head + start * row_stride, row_stride};
  }
  cpu::load_rows(head + start * row_stride, row_stride, rows, dim, T(1), buffer);
  if (padding != nullptr) {
    for (int64_t r = 0; r < rows; ++r) {
      if (padding[start + r]) std::fill(buffer + r * dim, buffer + (r + 1) * dim, T(0));
    }
  }
  return {buffer, dim};
}

// Rows [start, start + rows) of one bfloat16 head of k or v, padded keys zeroed, as the pair-interleaved B
// operand of a bf16 product over them (cpu::pair_rows, a zero pad row when rows is odd), in `buffer`.
const c10::BFloat16* paired_key_rows(const c10::BFloat16* head, int64_t row_stride, const bool* padding, int64_t start,
                                     int64_t rows, int64_t dim, c10::BFloat16* buffer) {
  cpu::pair_rows(head + start * row_stride, row_stride, rows, dim, buffer, dim);
  if (padding != nullptr) {
    for (int64_t r = 0; r < rows; ++r) {
      if (!padding[start + r]) continue;
      c10::BFloat16* pairs = buffer + (r / 2) * 2 * dim + r % 2;
      for (int64_t c = 0; c < dim; ++c) pairs[2 * c] = c10::BFloat16(0.0f);
    }
  }
  return buffer;
}

// The padding flags of batch b, or nullptr when none of its keys is padded (the common case reads in place).
inline const bool* padding_of(const bool* mask, int64_t b, int64_t key_len) {
  if (mask == nullptr) return nullptr;
  const bool* row = mask + b * key_len;
  return std::any_of(row, row + key_len, [](bool padded) { return padded; }) ? row : nullptr;
}

// A tile of rows of one head of q, out or grad_out as a matrix for the tile products: read in place when the
// input already has the accumulation type, else converted into `buffer`. Returns the rows and their
// leading dimension.
template <typename scalar_t, typename T>
std::pair<const T*, int64_t> rows_in(const scalar_t* first_row, int64_t row_stride, int64_t rows, int64_t dim,
                                     T* buffer) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    return {first_row, row_stride};
  } else {
    cpu::load_rows(first_row, row_stride, rows, dim, T(1), buffer);
    return {buffer, dim};
  }
}

// Where a tile of output rows is computed: in place when the output has the accumulation type, else in
// `buffer` (then stored with cpu::store_rows).
template <typename scalar_t, typename T>
std::pair<T*, int64_t> rows_out(scalar_t* first_row, int64_t row_stride, int64_t dim, T* buffer) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    return {first_row, row_stride};
  } else {
    return {buffer, dim};
  }
}

template <typename scalar_t, typename T>
void finish_rows(const T* rows, int64_t count, int64_t dim, scalar_t* first_row, int64_t row_stride) {
  if constexpr (!std::is_same_v<scalar_t, T>) cpu::store_rows(rows, count, dim, first_row, row_stride);
}

// The tile products take operands of type O: the accumulation type, or bfloat16 for bf16 products
// (use_bf16_products), whose B operands are pair-interleaved (cpu::product) and whose inner dimensions are
// rounded up to even over zero pads (inner_size). K' and V' stay float32 sums; their bf16 operands are rounded
// once per head, the probabilities once per tile.
template <typename scalar_t, typename O>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& proj_k, const at::Tensor& proj_v,
    const std::optional<at::Tensor>& key_padding_mask, double scale) {
  using T = at::opmath_type<scalar_t>;
  constexpr bool kPaired = std::is_same_v<O, c10::BFloat16>;
  const int64_t batch = q.size(0), heads = q.size(1), query_len = q.size(2), dim = q.size(3), key_len = k.size(2);
  // Grouped-query attention: query head h reads kv head h / heads_per_kv.
  const int64_t kv_heads = k.size(1), heads_per_kv = heads / kv_heads;
  const int64_t kp = proj_k.size(-2), kp_inner = inner_size<O>(kp);
  const auto acc = cpu::acc_dtype(q.scalar_type());
  const at::Tensor pk_tensor = projection_operand<O>(proj_k, acc), pv_tensor = projection_operand<O>(proj_v, acc);
  const auto pk = projection_view<O>(pk_tensor), pv = projection_view<O>(pv_tensor);

  at::Tensor out = new_output({batch, heads, query_len, dim}, q.options());
  at::Tensor lse = new_output({batch, heads, query_len}, q.options().dtype(lse_dtype(q.scalar_type())));
  at::Tensor k_proj = new_output({batch, heads, kp, dim}, q.options().dtype(acc));
  at::Tensor v_proj = new_output({batch, heads, kp, dim}, q.options().dtype(acc));
  // scale * K'^T per head (D x kp), so that the scores are one plain product Q (scale K'^T); and the B
  // operand of P V': V' itself, or pair-interleaved in bfloat16.
  const auto operand_dtype = c10::CppTypeToScalarType<O>::value;
  at::Tensor keys_t = at::empty({batch * heads, dim, kp}, q.options().dtype(operand_dtype));
  at::Tensor values_pairs = kPaired ? at::empty({batch * heads, kp_inner, dim}, q.options()) : at::Tensor();
  const HeadView qv(q), kv(k), vv(v), ov(out);
  const scalar_t *q_ptr = q.data_ptr<scalar_t>(), *k_ptr = k.data_ptr<scalar_t>(), *v_ptr = v.data_ptr<scalar_t>();
  const bool* mask = key_padding_mask ? key_padding_mask->data_ptr<bool>() : nullptr;
  T *kp_ptr = k_proj.data_ptr<T>(), *vp_ptr = v_proj.data_ptr<T>(), *lse_ptr = lse.data_ptr<T>();
  O* kt_ptr = keys_t.data_ptr<O>();
  const O* values = kPaired ? values_pairs.data_ptr<O>() : reinterpret_cast<const O*>(vp_ptr);
  scalar_t* out_ptr = out.data_ptr<scalar_t>();

  cpu::parallel_tasks(batch * heads, [&](const auto& claim) {
    std::vector<T> rows(kSumChunk * dim);
    std::vector<O> operand_rows(kPaired ? (kSumChunk + 1) * dim : 0);
    for (int64_t bh = claim(); bh >= 0; bh = claim()) {
      const int64_t b = bh / heads, h = bh % heads;
      const bool* padding = padding_of(mask, b, key_len);
      for (const auto& [src, view, projection, dst] :
           {std::tuple{k_ptr, &kv, &pk, kp_ptr}, std::tuple{v_ptr, &vv, &pv, vp_ptr}}) {
        T* projected = dst + bh * kp * dim;
        for (int64_t start = 0; start < key_len; start += kSumChunk) {
          const int64_t n = std::min(kSumChunk, key_len - start);
          const O* keys;
          int64_t ld = dim;
          if constexpr (kPaired) {
            keys = paired_key_rows(src + view->offset(b, h / heads_per_kv), view->row_stride, padding, start, n, dim,
                                   operand_rows.data());
          } else {
            std::tie(keys, ld) = key_rows(src + view->offset(b, h / heads_per_kv), view->row_stride, padding, start, n, dim,
                                          rows.data());
          }
          cpu::product(kp, dim, inner_size<O>(n), projection->head(h) + start, projection->row_stride, keys, ld,
                       projected, dim, start > 0);
        }
      }
      if constexpr (kPaired) {
        cpu::pair_transposed(kp_ptr + bh * kp * dim, dim, kp, dim, static_cast<float>(scale), kt_ptr + bh * dim * kp,
                             kp);
        cpu::pair_rows(vp_ptr + bh * kp * dim, dim, kp, dim, values_pairs.data_ptr<O>() + bh * kp_inner * dim, dim);
      } else {
        cpu::transpose(kp_ptr + bh * kp * dim, dim, kp, dim, T(scale), kt_ptr + bh * dim * kp, kp);
      }
    }
    cpu::release_products();
  });

  const int64_t query_tiles = ceil_div(query_len, kQueryTile);
  cpu::parallel_tasks(batch * heads * query_tiles, [&](const auto& claim) {
    std::vector<T> queries(kQueryTile * dim), scores(kQueryTile * kp), outputs(kQueryTile * dim), row_sums(kQueryTile);
    std::vector<O> probs(kPaired ? kQueryTile * kp_inner : 0);
    for (int64_t task = claim(); task >= 0; task = claim()) {
      const int64_t bh = task / query_tiles, b = bh / heads, h = bh % heads;
      const int64_t start = (task % query_tiles) * kQueryTile, n = std::min(kQueryTile, query_len - start);
      const auto [query_rows, ldq] = rows_in<scalar_t, O>(q_ptr + qv.offset(b, h) + start * qv.row_stride,
                                                          qv.row_stride, n, dim, reinterpret_cast<O*>(queries.data()));
      cpu::product(n, kp, dim, query_rows, ldq, kt_ptr + bh * dim * kp, kp, scores.data(), kp, false);
      // The probabilities in place of the scores, or with bf16 products rounded into their operand.
      const O* prob_rows = kPaired ? probs.data() : reinterpret_cast<const O*>(scores.data());
      for (int64_t r = 0; r < n; ++r) {
        T* row = scores.data() + r * kp;
        const T row_max = cpu::max_of(row, kp);
        T sum;
        if constexpr (kPaired) {
          uint16_t* prob_row = reinterpret_cast<uint16_t*>(probs.data() + r * kp_inner);
          sum = cpu::exp_scaled_sum_bf16(row, kp, 1.0f, row_max, prob_row);
          if (kp % 2 == 1) prob_row[kp] = 0;
        } else {
          sum = cpu::exp_shifted_sum(row, row, kp, row_max);
        }
        row_sums[r] = sum;
        lse_ptr[bh * query_len + start + r] = row_max + std::log(sum);
      }
      scalar_t* out_rows = out_ptr + ov.offset(b, h) + start * ov.row_stride;
      const auto [result, ldo] = rows_out(out_rows, ov.row_stride, dim, outputs.data());
      cpu::product(n, dim, kp_inner, prob_rows, kp_inner, values + bh * kp_inner * dim, dim, result, ldo, false);
      // Normalising the outputs (n x D) instead of the probabilities (n x kp) costs less when D < kp.
      for (int64_t r = 0; r < n; ++r) {
        const T inverse = T(1) / row_sums[r];
        for (int64_t c = 0; c < dim; ++c) result[r * ldo + c] *= inverse;
      }
      finish_rows(result, n, dim, out_rows, ov.row_stride);
    }
    cpu::release_products();
  });
  return {out, lse, k_proj, v_proj};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linformer_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& proj_k,
    const at::Tensor& proj_v, const std::optional<at::Tensor>& key_padding_mask, double scale) {
  const at::Tensor q = with_blas_strides(q_in), k = with_blas_strides(k_in), v = with_blas_strides(v_in);
  check_qkv(q, k, v, /*grouped_kv=*/true);
  check_key_padding_mask(key_padding_mask, q, k.size(2));
  check_linformer_projections(q, k, proj_k, proj_v);
  TORCH_CHECK_VALUE(k.size(2) > 0 && q.size(2) > 0, "q, k: expected non-empty sequences, got Nq=", q.size(2),
                    " and Nk=", k.size(2));
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> result;
  if (use_bf16_products(q)) {
    return forward_impl<c10::BFloat16, c10::BFloat16>(q, k, v, proj_k, proj_v, key_padding_mask, scale);
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "linformer_fwd", [&] {
    result = forward_impl<scalar_t, at::opmath_type<scalar_t>>(q, k, v, proj_k, proj_v, key_padding_mask, scale);
  });
  return result;
}

// Operands of type O as in forward_impl; dS, P and the gradients of K' and V' are rounded to bfloat16 once
// per tile (or per head) for bf16 products.
template <typename scalar_t, typename O>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& proj_k, const at::Tensor& proj_v, const at::Tensor& lse, const at::Tensor& k_proj,
    const at::Tensor& v_proj, const std::optional<at::Tensor>& key_padding_mask, double scale) {
  using T = at::opmath_type<scalar_t>;
  constexpr bool kPaired = std::is_same_v<O, c10::BFloat16>;
  const int64_t batch = q.size(0), heads = q.size(1), query_len = q.size(2), dim = q.size(3), key_len = k.size(2);
  // Grouped-query attention: query head h reads kv head h / heads_per_kv.
  const int64_t kv_heads = k.size(1), heads_per_kv = heads / kv_heads;
  const int64_t kp = proj_k.size(-2), kp_inner = inner_size<O>(kp);
  const auto acc = cpu::acc_dtype(q.scalar_type());
  const at::Tensor k_proj_c = k_proj.contiguous(), v_proj_c = v_proj.contiguous(), lse_c = lse.contiguous();
  const T *kp_ptr = k_proj_c.data_ptr<T>(), *vp_ptr = v_proj_c.data_ptr<T>(), *lse_ptr = lse_c.data_ptr<T>();

  // Every tile product is a plain A B: with the transposed tiles Q^T and dO^T (D x n) and the per-head
  // K'^T and V'^T (D x kp), the gradients of the projected keys and values come out transposed,
  // dK'^T += Q^T dS and dV'^T += dO^T P (D x kp), which is the form the projection gradients need.
  // They are sums over query tiles: each (head, split) task sums its share, then the splits are added.
  const int64_t query_tiles = ceil_div(query_len, kQueryTile);
  const int64_t splits = cpu::query_splits(batch * heads, query_tiles);
  const int64_t tiles_per_split = ceil_div(query_tiles, splits);
  at::Tensor partial = at::empty({batch * heads, splits, 2, dim, kp}, q.options().dtype(acc));
  T* partial_ptr = partial.data_ptr<T>();
  at::Tensor grad_q = new_output(q.sizes(), q.options());
  const HeadView qv(q), kv(k), vv(v), gov(grad_out), gqv(grad_q);
  const scalar_t *q_ptr = q.data_ptr<scalar_t>(), *k_ptr = k.data_ptr<scalar_t>(), *v_ptr = v.data_ptr<scalar_t>();
  const scalar_t* go_ptr = grad_out.data_ptr<scalar_t>();
  scalar_t* gq_ptr = grad_q.data_ptr<scalar_t>();

  cpu::parallel_tasks(batch * heads * splits, [&](const auto& claim) {
    const int64_t tile_inner = inner_size<O>(kQueryTile);
    std::vector<O> queries(kQueryTile * dim), grads(kQueryTile * dim);
    std::vector<O> queries_t(dim * tile_inner), grads_t(dim * tile_inner);
    std::vector<T> grad_rows(kQueryTile * dim);
    // The B operands of Q (scale K'^T), dO V'^T and dS K' (K' itself, or pair-interleaved), and with bf16
    // products P and dS as the B operands of dO^T P and Q^T dS, and dS as the A operand of dS K'.
    std::vector<O> keys_t(dim * kp), values_t(dim * kp), keys_pairs(kPaired ? kp_inner * dim : 0);
    std::vector<T> probs(kQueryTile * kp), dprobs(kQueryTile * kp);
    std::vector<O> probs_pairs(kPaired ? tile_inner * kp : 0), ds_pairs(kPaired ? tile_inner * kp : 0);
    std::vector<O> ds_rows(kPaired ? kQueryTile * kp_inner : 0);
    for (int64_t task = claim(); task >= 0; task = claim()) {
      const int64_t bh = task / splits, b = bh / heads, h = bh % heads;
      const T* keys = kp_ptr + bh * kp * dim;
      const O* keys_operand = reinterpret_cast<const O*>(keys);
      if constexpr (kPaired) {
        cpu::pair_transposed(keys, dim, kp, dim, static_cast<float>(scale), keys_t.data(), kp);
        cpu::pair_transposed(vp_ptr + bh * kp * dim, dim, kp, dim, 1.0f, values_t.data(), kp);
        cpu::pair_rows(keys, dim, kp, dim, keys_pairs.data(), dim);
        keys_operand = keys_pairs.data();
      } else {
        cpu::transpose(keys, dim, kp, dim, T(scale), keys_t.data(), kp);
        cpu::transpose(vp_ptr + bh * kp * dim, dim, kp, dim, T(1), values_t.data(), kp);
      }
      T* grad_keys_t = partial_ptr + task * 2 * dim * kp;
      T* grad_values_t = grad_keys_t + dim * kp;
      const int64_t first_tile = (task % splits) * tiles_per_split;
      const int64_t last_tile = std::min(query_tiles, first_tile + tiles_per_split);
      if (first_tile >= last_tile) std::fill(grad_keys_t, grad_keys_t + 2 * dim * kp, T(0));
      for (int64_t tile = first_tile; tile < last_tile; ++tile) {
        const int64_t start = tile * kQueryTile, n = std::min(kQueryTile, query_len - start), n_inner = inner_size<O>(n);
        const bool first = tile == first_tile;
        const scalar_t* q_rows = q_ptr + qv.offset(b, h) + start * qv.row_stride;
        const scalar_t* go_rows = go_ptr + gov.offset(b, h) + start * gov.row_stride;
        const auto [query_rows, ldq] = rows_in<scalar_t, O>(q_rows, qv.row_stride, n, dim, queries.data());
        const auto [grad_out_rows, ldg] = rows_in<scalar_t, O>(go_rows, gov.row_stride, n, dim, grads.data());
        cpu::transpose(query_rows, ldq, n, dim, T(1), queries_t.data(), n_inner);
        cpu::transpose(grad_out_rows, ldg, n, dim, T(1), grads_t.data(), n_inner);
        if constexpr (kPaired) {
          zero_pad_column(queries_t.data(), n_inner, dim, n);
          zero_pad_column(grads_t.data(), n_inner, dim, n);
        }

        cpu::product(n, kp, dim, query_rows, ldq, keys_t.data(), kp, probs.data(), kp, false);
        cpu::product(n, kp, dim, grad_out_rows, ldg, values_t.data(), kp, dprobs.data(), kp, false);
        // Row r of P, and delta = dO . O = P . dP, taken from the recomputed P and dP (kp terms) rather than
        // from the output, which is rounded to the input dtype: near a saturated row dP - delta is a small
        // difference, and the output's rounding (bfloat16's 2^-9) would swamp it.
        const auto probabilities_and_delta = [&](int64_t r) {
          T* p_row = probs.data() + r * kp;
          if constexpr (kPaired) {
            cpu::exp_shifted_bf16(p_row, kp, 1.0f, lse_ptr + bh * query_len + start + r,
                                  /*shift_per_element=*/false, nullptr);
          } else {
            cpu::exp_shifted(p_row, p_row, kp, lse_ptr[bh * query_len + start + r]);
          }
          return static_cast<T>(cpu::dot_in_double(p_row, dprobs.data() + r * kp, kp));
        };
        // dS becomes scale * dS, the factor that both dQ and dK' carry: in place of dP, or with bf16 products
        // rounded into its operands (a pair of rows at a time), with P pair-interleaved.
        const O* probs_operand = reinterpret_cast<const O*>(probs.data());
        const O* ds_operand = reinterpret_cast<const O*>(dprobs.data());
        const O* ds_a = ds_operand;
        if constexpr (kPaired) {
          uint16_t* ds_bits = reinterpret_cast<uint16_t*>(ds_rows.data());
          for (int64_t r = 0; r < n; r += 2) {
            const bool has_second = r + 1 < n;
            const int64_t second = has_second ? r + 1 : r;
            const float deltas[2] = {probabilities_and_delta(r), has_second ? probabilities_and_delta(second) : 0.0f};
            cpu::softmax_grad_pair<cpu::Deltas::kPerRow>(
                probs.data() + r * kp, probs.data() + second * kp, dprobs.data() + r * kp, dprobs.data() + second * kp,
                deltas, kp, static_cast<float>(scale), has_second, ds_bits + r * kp_inner, ds_bits + second * kp_inner,
                reinterpret_cast<uint32_t*>(ds_pairs.data() + r * kp));
            cpu::pair_rows(probs.data() + r * kp, kp, has_second ? 2 : 1, kp, probs_pairs.data() + r * kp, kp);
          }
          zero_pad_column(ds_rows.data(), kp_inner, n, kp);
          probs_operand = probs_pairs.data();
          ds_operand = ds_pairs.data();
          ds_a = ds_rows.data();
        } else {
          for (int64_t r = 0; r < n; ++r) {
            cpu::softmax_grad_row(probs.data() + r * kp, dprobs.data() + r * kp, kp, probabilities_and_delta(r), T(scale));
          }
        }
        cpu::product(dim, kp, n_inner, grads_t.data(), n_inner, probs_operand, kp, grad_values_t, kp, !first);
        cpu::product(dim, kp, n_inner, queries_t.data(), n_inner, ds_operand, kp, grad_keys_t, kp, !first);
        scalar_t* gq_rows = gq_ptr + gqv.offset(b, h) + start * gqv.row_stride;
        const auto [grad_query_rows, ldq_out] = rows_out(gq_rows, gqv.row_stride, dim, grad_rows.data());
        cpu::product(n, dim, kp_inner, ds_a, kp_inner, keys_operand, dim, grad_query_rows, ldq_out, false);
        finish_rows(grad_query_rows, n, dim, gq_rows, gqv.row_stride);
      }
    }
    cpu::release_products();
  });
  const at::Tensor grad_projected_t = cpu::sum_in_order(partial, 1);  // (B * H, 2, D, kp): dK'^T, dV'^T
  const at::Tensor grad_projected = grad_projected_t.transpose(-1, -2).contiguous();  // (B * H, 2, kp, D)
  // As B operands of P_k^T dK' and K dK'^T: themselves, or pair-interleaved in bfloat16 (over kp, over D).
  at::Tensor grad_projected_pairs = grad_projected, grad_projected_t_pairs = grad_projected_t;
  if constexpr (kPaired) {
    grad_projected_pairs = at::empty({batch * heads, 2, kp_inner, dim}, q.options());
    grad_projected_t_pairs = at::empty({batch * heads, 2, dim, kp}, q.options());
    const T *gpt = grad_projected_t.data_ptr<T>(), *gp = grad_projected.data_ptr<T>();
    O *gpt_pairs = grad_projected_t_pairs.data_ptr<O>(), *gp_pairs = grad_projected_pairs.data_ptr<O>();
    at::parallel_for(0, batch * heads * 2, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        cpu::pair_rows(gp + i * kp * dim, dim, kp, dim, gp_pairs + i * kp_inner * dim, dim);
        cpu::pair_rows(gpt + i * dim * kp, kp, dim, kp, gpt_pairs + i * dim * kp, kp);
      }
    });
  }
  const O *gpt_ptr = grad_projected_t_pairs.data_ptr<O>(), *gp_ptr = grad_projected_pairs.data_ptr<O>();

  // P_k^T and P_v^T ((N, kp), or (H, N, kp) per head), so that dK = P_k^T dK' is a plain product.
  const at::Tensor pk_t = projection_operand<O>(proj_k.transpose(-1, -2).contiguous(), acc);
  const at::Tensor pv_t = projection_operand<O>(proj_v.transpose(-1, -2).contiguous(), acc);
  const auto pkt = projection_view<O>(pk_t), pvt = projection_view<O>(pv_t);

  at::Tensor grad_k = new_output(k.sizes(), k.options());
  at::Tensor grad_v = new_output(v.sizes(), v.options());
  const HeadView gkv(grad_k), gvv(grad_v);
  scalar_t *gk_ptr = grad_k.data_ptr<scalar_t>(), *gv_ptr = grad_v.data_ptr<scalar_t>();
  const bool* mask = key_padding_mask ? key_padding_mask->data_ptr<bool>() : nullptr;
  const int64_t key_tiles = ceil_div(key_len, kKeyTile);

  // dK = P_k^T dK' and dV = P_v^T dV', zero on padded keys; written in place when the dtype allows. With
  // grouped-query attention, a kv head's gradient is the sum over its query heads, taken in head order.
  cpu::parallel_tasks(batch * kv_heads * key_tiles, [&](const auto& claim) {
    std::vector<T> rows(kKeyTile * dim);
    for (int64_t task = claim(); task >= 0; task = claim()) {
      const int64_t b = task / key_tiles / kv_heads, kv_head = task / key_tiles % kv_heads;
      const int64_t start = (task % key_tiles) * kKeyTile, n = std::min(kKeyTile, key_len - start);
      for (int64_t which = 0; which < 2; ++which) {
        const auto& projection_t = which == 0 ? pkt : pvt;
        const HeadView& view = which == 0 ? gkv : gvv;
        scalar_t* dst = (which == 0 ? gk_ptr : gv_ptr) + view.offset(b, kv_head) + start * view.row_stride;
        const auto [result, ld] = rows_out(dst, view.row_stride, dim, rows.data());
        for (int64_t h = kv_head * heads_per_kv; h < (kv_head + 1) * heads_per_kv; ++h) {
          cpu::product(n, dim, kp_inner, projection_t.head(h) + start * projection_t.row_stride,
                       projection_t.row_stride, gp_ptr + ((b * heads + h) * 2 + which) * kp_inner * dim, dim, result,
                       ld, h > kv_head * heads_per_kv);
        }
        if (mask) {
          for (int64_t r = 0; r < n; ++r) {
            if (mask[b * key_len + start + r]) std::fill(result + r * ld, result + r * ld + dim, T(0));
          }
        }
        finish_rows(result, n, dim, dst, view.row_stride);
      }
    }
    cpu::release_products();
  });

  // dP_k = sum of dK' K^T over the batch (and over the heads when the projection is shared), computed
  // transposed per key tile, dP_k^T = sum of K dK'^T (n x kp), then transposed into its columns of dP_k.
  // Likewise dP_v.
  at::Tensor grad_proj_k = new_output(proj_k.sizes(), proj_k.options());
  at::Tensor grad_proj_v = new_output(proj_v.sizes(), proj_v.options());
  const int64_t sum_tiles = ceil_div(key_len, kProjectionGradTile);
  for (int64_t which = 0; which < 2; ++which) {
    const bool per_head = (which == 0 ? proj_k : proj_v).dim() == 3;
    const scalar_t* src = which == 0 ? k_ptr : v_ptr;
    const HeadView& view = which == 0 ? kv : vv;
    scalar_t* grad_ptr = (which == 0 ? grad_proj_k : grad_proj_v).data_ptr<scalar_t>();
    const int64_t groups = per_head ? heads : 1;
    cpu::parallel_tasks(groups * sum_tiles, [&](const auto& claim) {
      std::vector<O> rows(kProjectionGradTile * dim);
      std::vector<T> sums(kProjectionGradTile * kp);
      for (int64_t task = claim(); task >= 0; task = claim()) {
        const int64_t group = task / sum_tiles;
        const int64_t start = (task % sum_tiles) * kProjectionGradTile;
        const int64_t n = std::min(kProjectionGradTile, key_len - start);
        const int64_t head_begin = per_head ? group : 0, head_end = per_head ? group + 1 : heads;
        for (int64_t b = 0; b < batch; ++b) {
          const bool* padding = padding_of(mask, b, key_len);
          for (int64_t h = head_begin; h < head_end; ++h) {
            const auto [keys, keys_ld] = key_rows(src + view.offset(b, h / heads_per_kv), view.row_stride, padding,
                                                  start, n, dim, rows.data());
            const bool first = b == 0 && h == head_begin;
            cpu::product(n, kp, dim, keys, keys_ld, gpt_ptr + ((b * heads + h) * 2 + which) * dim * kp, kp,
                         sums.data(), kp, !first);
          }
        }
        cpu::transpose(sums.data(), kp, n, kp, T(1), grad_ptr + group * kp * key_len + start, key_len);
      }
      cpu::release_products();
    });
  }
  return {grad_q, grad_k, grad_v, grad_proj_k, grad_proj_v};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linformer_bwd(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& proj_k, const at::Tensor& proj_v, const at::Tensor& out_in, const at::Tensor& lse,
    const at::Tensor& k_proj, const at::Tensor& v_proj, const std::optional<at::Tensor>& key_padding_mask,
    double scale) {
  const at::Tensor grad_out = with_blas_strides(grad_out_in), out = with_blas_strides(out_in);
  const at::Tensor q = with_blas_strides(q_in), k = with_blas_strides(k_in), v = with_blas_strides(v_in);
  check_qkv(q, k, v, /*grouped_kv=*/true);
  check_key_padding_mask(key_padding_mask, q, k.size(2));
  check_linformer_projections(q, k, proj_k, proj_v);
  check_linformer_saved(grad_out, q, out, lse, k_proj, v_proj, proj_k);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> result;
  if (use_bf16_products(q)) {
    return backward_impl<c10::BFloat16, c10::BFloat16>(grad_out, q, k, v, proj_k, proj_v, lse, k_proj, v_proj,
                                                       key_padding_mask, scale);
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "linformer_bwd", [&] {
    // out is checked but not read: delta = dO . O comes from the recomputed probabilities (backward_impl).
    result = backward_impl<scalar_t, at::opmath_type<scalar_t>>(grad_out, q, k, v, proj_k, proj_v, lse, k_proj, v_proj,
                                                                 key_padding_mask, scale);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("linformer_fwd", &linformer_fwd);
  m.impl("linformer_bwd", &linformer_bwd);
}

}  // namespace fastattn
