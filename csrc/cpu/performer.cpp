// Performer attention on the CPU, kernel "softmax" (FAVOR+) or "relu", with the stabilisers of
// fastattn.reference.performer_attention. Features are computed per tile of rows from the projection
// and never stored beyond the tile. The running state is phi(K)^T [V | 1] (m x (D + 1)): its last column
// is the normaliser, so one GEMM gives numerator and denominator.
//
// Softmax stabilisers. Non-causal: one per feature, s_f = the maximum of feature f's logit over the
// unpadded keys (reached online tile by tile; state row f is rescaled by exp(s_old - s_new) <= 1 when s_f
// grows). Keys weigh exp(l_f - s_f) and queries exp(a_f - max a) with a_f = (l_f - max l) + (s_f - max s),
// so that some feature of every query meets the keys at weight 1 on both sides: the normaliser is >= 1
// and never underflows, however far apart |q| and |k| put the logits (with one constant for all features,
// a query's best feature can meet keys far below it, and its normaliser falls out of float32's range).
// Causal: per feature and position, the running maximum over the keys so far (see kSubBlock), so that a
// later key never changes an earlier output and, again, every normaliser is >= 1. relu uses 0 throughout.
//
// Causal runs in sub-blocks: the earlier ones through the state, the current one as a masked product. The
// backward recomputes the features; causal takes a forward pass over the sub-blocks for dq (prefix state)
// and a reverse pass for dk, dv (a suffix state of the queries' weights times [dnum | dden]), both per
// (batch, head).
#include "cpu/dense_tiles.h"
#include "cpu/softmax_grad.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string_view>
#include <type_traits>
#include <vector>

#include "common.h"

namespace fastattn {
namespace {

using cpu::gemm;
using cpu::HeadView;

constexpr int64_t kTile = 64;
constexpr double kReluEpsilon = 1e-3;  // fastattn.reference.RELU_KERNEL_EPSILON
constexpr int64_t kInnerChunk = 128;

// Sums partial (m x n) into C, times alpha: C = alpha partial, or C += alpha partial when `add`.
FASTATTN_VECTOR_CLONES void add_partial(const float* partial, int64_t m, int64_t n, float alpha, bool add, float* c, int64_t ldc) {
  for (int64_t r = 0; r < m; ++r) {
    float* row = c + r * ldc;
    const float* part = partial + r * n;
    if (add) {
      for (int64_t col = 0; col < n; ++col) row[col] += alpha * part[col];
    } else {
      for (int64_t col = 0; col < n; ++col) row[col] = alpha * part[col];
    }
  }
}

// Passes over a row of m features, compiled per ISA level: the extension's baseline is SSE2, and at that
// width these passes took longer than the bf16 tile products. Maxima keep sixteen partial results (max_of's
// order, which skips NaN).
constexpr int64_t kMaxLanes = 16;

// Halving the partials, so that the first steps are vector operations too.
template <typename T>
inline T max_of_partials(T* partial) {
  for (int64_t width = kMaxLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) partial[l] = partial[l + width] > partial[l] ? partial[l + width] : partial[l];
  }
  return partial[0];
}

// row[f] = transform(f) for f < n; returns the maximum of the new row.
template <typename T, typename Transform>
inline T transform_and_max(T* row, int64_t n, const Transform& transform) {
  T partial[kMaxLanes];
  std::fill(partial, partial + kMaxLanes, -std::numeric_limits<T>::infinity());
  int64_t f = 0;
  for (; f + kMaxLanes <= n; f += kMaxLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kMaxLanes; ++l) {
      row[f + l] = transform(f + l);
      partial[l] = row[f + l] > partial[l] ? row[f + l] : partial[l];
    }
  }
  for (int64_t l = 0; f < n; ++f, ++l) {
    row[f] = transform(f);
    partial[l] = row[f] > partial[l] ? row[f] : partial[l];
  }
  return max_of_partials(partial);
}

// row -= value; returns the row's maximum.
template <typename T>
FASTATTN_VECTOR_CLONES T subtract_and_max(T* row, int64_t n, T value) {
  return transform_and_max(row, n, [&](int64_t f) { return row[f] - value; });
}

// row = ((row - offset) - row_max) + (feature_max - peak) (see FeatureMap::query_phi); returns the row's maximum.
template <typename T>
FASTATTN_VECTOR_CLONES T gaps_and_max(T* row, T offset, const T* feature_max, int64_t n, T row_max, T peak) {
  return transform_and_max(row, n,
                           [&](int64_t f) { return ((row[f] - offset) - row_max) + (feature_max[f] - peak); });
}

// out = exp((in - offset) - shift), shift per element.
template <typename T>
FASTATTN_VECTOR_CLONES void exp_of_difference(const T* in, T offset, const T* shift, T* out, int64_t n) {
  for (int64_t f = 0; f < n; ++f) out[f] = cpu::exp_acc((in[f] - offset) - shift[f]);
}

// base = row - row_max; returns the maximum over f of base_f + (prefix_f - stab), c_i of kSubBlock (NaN is
// skipped, as max_of does).
template <typename T>
FASTATTN_VECTOR_CLONES T query_base_and_peak(T* base, const T* row, T row_max, const T* prefix, T stab, int64_t n) {
  T partial[kMaxLanes];
  std::fill(partial, partial + kMaxLanes, -std::numeric_limits<T>::infinity());
  const auto step = [&](int64_t f, int64_t l) {
    base[f] = row[f] - row_max;
    const T gap = base[f] + (prefix[f] - stab);
    partial[l] = gap > partial[l] ? gap : partial[l];
  };
  int64_t f = 0;
  for (; f + kMaxLanes <= n; f += kMaxLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kMaxLanes; ++l) step(f + l, l);
  }
  for (int64_t l = 0; f < n; ++f, ++l) step(f, l);
  return max_of_partials(partial);
}

// out = exp(base + (shift - offset)), shift per element (a query's weights, see kSubBlock).
template <typename T>
FASTATTN_VECTOR_CLONES void exp_of_shifted_sum(const T* base, const T* shift, T offset, T* out, int64_t n) {
  for (int64_t f = 0; f < n; ++f) out[f] = cpu::exp_acc(base[f] + (shift[f] - offset));
}

// out = max(previous, row) element by element (a NaN in row is skipped); returns the maximum of out.
template <typename T>
FASTATTN_VECTOR_CLONES T running_max_and_max(T* out, const T* previous, const T* row, int64_t n) {
  return transform_and_max(out, n, [&](int64_t f) { return row[f] > previous[f] ? row[f] : previous[f]; });
}

// running = max(running, row - offset) element by element (a NaN is skipped).
template <typename T>
FASTATTN_VECTOR_CLONES void max_into(T* running, const T* row, T offset, int64_t n) {
  for (int64_t f = 0; f < n; ++f) {
    const T value = row[f] - offset;
    running[f] = value > running[f] ? value : running[f];
  }
}

// row *= factors element by element.
template <typename T>
FASTATTN_VECTOR_CLONES void multiply_into(T* row, const T* factors, int64_t n) {
  for (int64_t f = 0; f < n; ++f) row[f] *= factors[f];
}

inline double as_double(double x) { return x; }
inline double as_double(float x) { return x; }
inline double as_double(c10::BFloat16 x) { return cpu::widen(x.x); }

// |x|^2 (float, double or bfloat16 elements), summed in double (see FeatureMap::logits) in eight partial sums.
template <typename T>
FASTATTN_VECTOR_CLONES double squared_norm(const T* x, int64_t n) {
  double partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    for (int l = 0; l < 8; ++l) partial[l] += as_double(x[c + l]) * as_double(x[c + l]);
  }
  double total = 0;
  for (; c < n; ++c) total += as_double(x[c]) * as_double(x[c]);
  for (int l = 0; l < 8; ++l) total += partial[l];
  return total;
}

// Thread scratch of at least n elements. Grows only: products of alternating shapes would otherwise
// re-initialise their buffers at every call (a tenth of the bf16 time did so).
template <typename T>
T* scratch(std::vector<T>& buffer, int64_t n) {
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// The rows (k x n float, leading dimension ld) of every matrix of a (..., k, n) float tensor pair-interleaved in
// bfloat16 (cpu::pair_rows): (..., k rounded up to even, n). The B operands of bf16 tile products that stay
// the same for many tiles (projections, states), rounded once per call.
at::Tensor paired_operands(const at::Tensor& t) {
  const at::Tensor src = t.contiguous();
  const int64_t k = t.size(-2), n = t.size(-1), matrices = t.numel() / std::max<int64_t>(1, k * n);
  std::vector<int64_t> sizes = t.sizes().vec();
  sizes[sizes.size() - 2] = k + k % 2;
  at::Tensor result = at::empty(sizes, t.options().dtype(at::kBFloat16));
  const float* in = src.const_data_ptr<float>();
  c10::BFloat16* out = result.data_ptr<c10::BFloat16>();
  at::parallel_for(0, matrices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) cpu::pair_rows(in + i * k * n, n, k, n, out + i * (k + k % 2) * n, n);
  });
  return result;
}

// Row r of a bf16 product's A operand (k elements): rounded to bfloat16 into a row of an even length, a zero
// pad column when k is odd.
void round_operand_row(const float* row, int64_t k, c10::BFloat16* a_row) {
  cpu::narrow_operand_row(row, reinterpret_cast<uint16_t*>(a_row), k);
  if (k % 2 == 1) a_row[k] = c10::BFloat16(0.0f);
}

// tile_product's bf16 products: A rounded to bfloat16 in rows of an even length (round_operand_row), or given
// so (a_rows, not transposed), B rounded and pair-interleaved (cpu::product), or given so (b_pairs: B's rows
// paired at their leading dimension ldb, as paired_operands does). One product over the whole inner
// dimension, added into C directly: float's chunks and separate sums bound the rounding of long float32
// sums, far below that of operands rounded to bfloat16.
void bf16_tile_product(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
                       const float* a, int64_t lda, const float* b, int64_t ldb, bool accumulate, float* c,
                       int64_t ldc, const c10::BFloat16* b_pairs, const c10::BFloat16* a_rows) {
  thread_local std::vector<c10::BFloat16> a_rows_buffer, b_converted_buffer;
  thread_local std::vector<float> partial_buffer;
  const int64_t k_even = k + k % 2;
  if (a_rows == nullptr) {
    c10::BFloat16* narrowed = scratch(a_rows_buffer, m * k_even);
    if (transpose_a) {
      cpu::narrow_transposed_operand(a, lda, k, m, reinterpret_cast<uint16_t*>(narrowed), k_even);
    } else {
      for (int64_t r = 0; r < m; ++r) round_operand_row(a + r * lda, k, narrowed + r * k_even);
    }
    a_rows = narrowed;
  }
  int64_t pairs_ld = ldb;
  if (b_pairs == nullptr) {
    pairs_ld = n;
    c10::BFloat16* b_converted = scratch(b_converted_buffer, k_even * n);
    if (transpose_b) {
      cpu::pair_transposed_operand(b, ldb, n, k, reinterpret_cast<uint16_t*>(b_converted), n);
    } else {
      cpu::pair_rows(b, ldb, k, n, b_converted, n);
    }
    b_pairs = b_converted;
  }
  if (alpha == 1.0f) {
    cpu::product(m, n, k_even, a_rows, k_even, b_pairs, pairs_ld, c, ldc, accumulate);
    return;
  }
  float* partial = scratch(partial_buffer, m * n);
  cpu::product(m, n, k_even, a_rows, k_even, b_pairs, pairs_ld, partial, n, false);
  add_partial(partial, m, n, alpha, accumulate, c, ldc);
}

// Row-major C (m x n) = alpha op(A) op(B), added to C when `accumulate`. Float goes to cpu::product
// (oneDNN's small-matrix kernels, several times faster than BLAS on these tiles) with transposed operands
// copied into thread scratch; double (gradcheck) to BLAS. A product that is added is added by oneDNN,
// which adds C to the finished sum over the inner dimension (in chunks of kInnerChunk), so that sums over
// the sequence round as sums of the tiles' sums, not as one long dot product (the block-sparse kernel's
// test_deterministic_whatever_the_thread_count relies on the same). alpha != 1 goes through scratch.
// A thread that ran float products calls release_products<T>() when its work is done.
//
// With `bf16` (bfloat16 inputs on a CPU with bf16 units, cpu::bf16_products), float operands are rounded to
// bfloat16 once per tile, A in rows and B pair-interleaved, and multiplied with float32 accumulation.
// b_pairs, where given, is B already pair-interleaved for bf16 products (paired_operands); a_rows, where given,
// is A (not transposed) already rounded for them, in rows of k rounded up to even (round_operand_row): the
// passes that compute a tile's rows narrow each while it is in the L1 cache.
template <typename T>
void tile_product(bool bf16, bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                  int64_t lda, const T* b, int64_t ldb, bool accumulate, T* c, int64_t ldc,
                  const c10::BFloat16* b_pairs = nullptr, const c10::BFloat16* a_rows = nullptr) {
  if constexpr (!std::is_same_v<T, float>) {
    gemm(transpose_a, transpose_b, m, n, k, alpha, a, lda, b, ldb, T(accumulate ? 1 : 0), c, ldc);
  } else if (bf16) {
    TORCH_INTERNAL_ASSERT(a_rows == nullptr || !transpose_a);
    bf16_tile_product(transpose_a, transpose_b, m, n, k, alpha, a, lda, b, ldb, accumulate, c, ldc, b_pairs, a_rows);
  } else {
    thread_local std::vector<float> a_t_buffer, b_t_buffer, partial_buffer;
    if (transpose_a) {
      float* a_t = scratch(a_t_buffer, m * k);
      cpu::transpose(a, lda, k, m, 1.0f, a_t, k);
      a = a_t;
      lda = k;
    }
    if (transpose_b) {
      float* b_t = scratch(b_t_buffer, k * n);
      cpu::transpose(b, ldb, n, k, 1.0f, b_t, n);
      b = b_t;
      ldb = n;
    }
    for (int64_t first = 0; first < k; first += kInnerChunk) {
      const int64_t depth = std::min(kInnerChunk, k - first);
      const bool add = accumulate || first > 0;
      if (alpha == 1.0f) {
        cpu::product(m, n, depth, a + first, lda, b + first * ldb, ldb, c, ldc, add);
        continue;
      }
      float* partial = scratch(partial_buffer, m * n);
      cpu::product(m, n, depth, a + first, lda, b + first * ldb, ldb, partial, n, false);
      add_partial(partial, m, n, alpha, add, c, ldc);
    }
  }
}

// a . b over n elements, in sixteen partial sums.
template <typename T>
FASTATTN_VECTOR_CLONES T dot_of(const T* a, const T* b, int64_t n) {
  T partial[16] = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    for (int64_t l = 0; l < 16; ++l) partial[l] += a[j + l] * b[j + l];
  }
  T sum = 0;
  for (; j < n; ++j) sum += a[j] * b[j];
  for (int64_t l = 0; l < 16; ++l) sum += partial[l];
  return sum;
}

// sums += row * weight element by element.
template <typename T>
FASTATTN_VECTOR_CLONES void add_scaled(T* sums, const T* row, T weight, int64_t n) {
  for (int64_t i = 0; i < n; ++i) sums[i] += row[i] * weight;
}

// What a pass that makes feature rows also does with each row r, while it is in the L1 cache: its dot product
// with dot_with into dots[r * dots_stride] (a normaliser), and sums += weight(r) row (a normaliser column's
// gradient or sum). With bf16 products, in the exp's own pass (cpu::exp_of_difference_bf16).
template <typename T>
struct RowUse {
  const T* dot_with = nullptr;
  T* dots = nullptr;
  int64_t dots_stride = 0;
  T* sums = nullptr;
  const T* weights = nullptr;  // weight(r) = weights[r * weights_stride], or 1 where null
  int64_t weights_stride = 0;

  T weight(int64_t r) const { return weights == nullptr ? T(1) : weights[r * weights_stride]; }
  void apply(int64_t r, const T* row, int64_t n) const {
    if (dot_with != nullptr) dots[r * dots_stride] = dot_of(row, dot_with, n);
    if (sums != nullptr) add_scaled(sums, row, weight(r), n);
  }
};

// Whether a non-causal state holds no key, from its normaliser column (m elements, `stride` apart): all 0 then,
// while every unpadded key adds to it (softmax: 1 in the features its logits peak at; relu: eps at least).
template <typename T>
bool holds_no_key(const T* normalisers, int64_t m, int64_t stride) {
  for (int64_t f = 0; f < m; ++f) {
    if (normalisers[f * stride] != 0) return false;
  }
  return true;
}

// column[i * stride] = sums[i], or += when `accumulate`.
template <typename T>
void write_column(const T* sums, int64_t m, bool accumulate, T* column, int64_t stride) {
  for (int64_t i = 0; i < m; ++i) column[i * stride] = accumulate ? column[i * stride] + sums[i] : sums[i];
}

// Products with a B of D + 1 columns whose last one is a normaliser's (the 1 of [V | 1], or dden of
// [dnum | dden]) leave that column out of tile_product: oneDNN's kernels work in blocks of 16 columns, so a
// 65th column costs as much as 16 more (a bf16 brgemm of 64 x 65 x 256 took 1.45 times as long as one of
// 64 x 64 x 256). Its matrix-vector product is summed in float32 instead: by the passes that make the
// features, while a row is in the L1 cache (non-causal), or here.
template <typename T>
void tile_product_and_column(bool bf16, bool transpose_a, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
                             const T* b, int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  tile_product(bf16, transpose_a, false, m, n - 1, k, T(1), a, lda, b, ldb, accumulate, c, ldc);
  thread_local std::vector<T> buffer;
  T* sums = scratch(buffer, m + k);
  const T* column = b + n - 1;
  if (transpose_a) {
    std::fill(sums, sums + m, T(0));
    for (int64_t j = 0; j < k; ++j) add_scaled(sums, a + j * lda, column[j * ldb], m);
  } else {
    T* weights = sums + m;
    for (int64_t j = 0; j < k; ++j) weights[j] = column[j * ldb];
    for (int64_t i = 0; i < m; ++i) sums[i] = dot_of(a + i * lda, weights, k);
  }
  write_column(sums, m, accumulate, c + n - 1, ldc);
}

template <typename T>
void release_products() {
  if constexpr (std::is_same_v<T, float>) cpu::release_products();
}

bool is_softmax_kernel(std::string_view kernel) {
  TORCH_CHECK_VALUE(kernel == "softmax" || kernel == "relu", "kernel: expected 'softmax' or 'relu', got '", kernel,
                    "'");
  return kernel == "softmax";
}

void check_projection(const at::Tensor& projection, const at::Tensor& q) {
  TORCH_CHECK_TYPE(at::isFloatingType(projection.scalar_type()), "projection: expected a floating-point tensor, got ",
                   projection.scalar_type());
  TORCH_CHECK_VALUE(projection.device() == q.device(), "projection: expected device ", q.device(), ", got ",
                    projection.device());
  TORCH_CHECK_VALUE((projection.dim() == 2 || (projection.dim() == 3 && projection.size(0) == q.size(1))) &&
                        projection.size(-1) == q.size(3) && projection.size(-2) > 0,
                    "projection: expected shape (m, ", q.size(3), ") or (", q.size(1), ", m, ", q.size(3), "), got ",
                    projection.sizes());
}

// Feature map of one head: rows of x -> logits -> phi, and the way back from dphi to dx.
template <typename T>
struct FeatureMap {
  const T* weights;    // (m, D)
  const T* weights_t;  // (D, m), so that the logits are a plain product
  int64_t features, dim;
  T sqrt_scale;
  bool softmax;
  bool bf16_products;  // tile_product's bf16 argument
  // With bf16 products, weights_t times sqrt(scale) and weights pair-interleaved (paired_operands); else null.
  const c10::BFloat16 *weights_t_pairs, *weights_pairs;

  // x <- rows * sqrt(scale) (where x is not null: the backward's d logits / dx reads them); products <- W x;
  // half_norm[r] <- |x_r|^2 / 2 (softmax) or 0 (relu). The logits are products - half_norm[r], a subtraction that
  // the passes reading them make on the way. With bf16 products, the bfloat16 rows themselves are the product's A
  // operand, against W^T sqrt(scale) rounded once (weights_t_pairs; Problem), so that no row is widened and
  // rounded again on the way, and the half norms are scale |row|^2 / 2.
  template <typename scalar_t>
  void logit_products(const scalar_t* src, int64_t row_stride, int64_t rows, T* x, T* products, T* half_norm) const {
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<T, float>) {
      if (bf16_products) {
        if (x != nullptr) cpu::load_rows(src, row_stride, rows, dim, sqrt_scale, x);
        bf16_row_products(src, row_stride, rows, products);
        const double half_scale = 0.5 * static_cast<double>(sqrt_scale) * sqrt_scale;
        for (int64_t r = 0; r < rows; ++r) {
          half_norm[r] = softmax ? static_cast<T>(half_scale * squared_norm(src + r * row_stride, dim)) : T(0);
        }
        return;
      }
    }
    thread_local std::vector<T> x_buffer;
    if (x == nullptr) x = scratch(x_buffer, rows * dim);
    cpu::load_rows(src, row_stride, rows, dim, sqrt_scale, x);
    tile_product(false, false, false, rows, features, dim, T(1), x, dim, weights_t, features, false, products,
                 features);
    for (int64_t r = 0; r < rows; ++r) {
      // Summed in double: |x|^2 / 2 is large next to the logits' spread, and its rounding error becomes a
      // relative error of every feature of the row.
      half_norm[r] = softmax ? static_cast<T>(0.5 * squared_norm(x + r * dim, dim)) : T(0);
    }
  }

  // logit_products, and logits <- products - half_norm; row_max <- max of each logit row (softmax), 0 (relu).
  template <typename scalar_t>
  void logits(const scalar_t* src, int64_t row_stride, int64_t rows, T* x, T* logits, T* row_max) const {
    logit_products(src, row_stride, rows, x, logits, row_max);
    for (int64_t r = 0; softmax && r < rows; ++r) {
      row_max[r] = subtract_and_max(logits + r * features, features, row_max[r]);
    }
  }

  // phi <- exp(logits - stabiliser[r]) (softmax) or relu(logits) + eps; zero rows where dropped[r].
  void phi(const T* logits, int64_t rows, const T* stabiliser, const bool* dropped, T* phi) const {
    for (int64_t r = 0; r < rows; ++r) {
      const T* lr = logits + r * features;
      T* pr = phi + r * features;
      if (dropped != nullptr && dropped[r]) {
        std::fill(pr, pr + features, T(0));
      } else if (softmax) {
        cpu::exp_shifted(lr, pr, features, stabiliser[r]);
      } else {
        relu_features(lr, pr);
      }
    }
  }

  // Non-causal softmax key features exp(logits - feature_max) from logit_products' results (zero rows where
  // dropped[r]); relu as phi(). Each row is rounded into narrowed too where it is not null (narrow_operand), and
  // used as `use` says.
  void key_phi(const T* products, const T* half_norm, int64_t rows, const T* feature_max, const bool* dropped,
               T* phi_out, c10::BFloat16* narrowed, const RowUse<T>& use = {}) const {
    for (int64_t r = 0; r < rows; ++r) {
      const T* lr = products + r * features;
      T* pr = phi_out + r * features;
      if (dropped != nullptr && dropped[r]) {
        std::fill(pr, pr + features, T(0));
        narrow_operand(pr, r, narrowed);
        use.apply(r, pr, features);
      } else if (softmax) {
        exp_features(lr, half_norm[r], feature_max, pr, r, narrowed, use);
      } else {
        relu_features(lr, pr);
        narrow_operand(pr, r, narrowed);
        use.apply(r, pr, features);
      }
    }
  }

  // Non-causal softmax query features against the keys' per-feature maxima: a_f = (logits_f - row_max) +
  // (feature_max_f - max feature_max), then exp(a_f - max a). Each difference is of two large numbers (both
  // about |x|^2 / 2) that are close for the features that matter, so nearly exact; logits_f + feature_max_f
  // would round at twice their magnitude. relu as phi(). From logit_products' results, which are overwritten
  // (softmax). narrowed, use: as key_phi's.
  void query_phi(T* products, const T* half_norm, int64_t rows, const T* feature_max, T* phi_out,
                 c10::BFloat16* narrowed, const RowUse<T>& use) const {
    const T peak = softmax ? cpu::max_of(feature_max, features) : T(0);
    for (int64_t r = 0; r < rows; ++r) {
      T* lr = products + r * features;
      T* pr = phi_out + r * features;
      if (softmax) {
        // The row's largest logit: rounding is monotonic, so the largest product rounds to it.
        const T row_max = cpu::max_of(lr, features) - half_norm[r];
        exp_features(lr, gaps_and_max(lr, half_norm[r], feature_max, features, row_max, peak), nullptr, pr, r,
                     narrowed, use);
      } else {
        relu_features(lr, pr);
        narrow_operand(pr, r, narrowed);
        use.apply(r, pr, features);
      }
    }
  }

  // dx <- d(phi)/dx^T dphi for rows not dropped, zero for dropped rows (dphi may be overwritten). narrowed: the
  // tile's scratch for the rows of d(logits) in bfloat16, see narrow_operand().
  void backward(T* dphi, const T* phi, const T* logits, const T* x, int64_t rows, const bool* dropped, T* dx,
                c10::BFloat16* narrowed = nullptr) const {
    if constexpr (std::is_same_v<T, float>) {
      if (softmax && narrowed != nullptr) {
        // With bf16 products, the logits' gradients go to the product only as its rounded A rows: made with
        // their row sums in one pass (cpu::multiply_sum_bf16), not stored in float.
        const int64_t operand_len = features + features % 2;
        std::vector<T> logit_sums(rows, T(0));
        for (int64_t r = 0; r < rows; ++r) {
          auto* operand = reinterpret_cast<uint16_t*>(narrowed + r * operand_len);
          if (dropped != nullptr && dropped[r]) {
            std::fill(operand, operand + operand_len, uint16_t(0));
          } else {
            logit_sums[r] = cpu::multiply_sum_bf16(dphi + r * features, phi + r * features, operand, features);
          }
        }
        dx_from_logit_grads(dphi, x, rows, dropped, dx, narrowed, logit_sums);
        return;
      }
    }
    logits_backward(dphi, x, rows, dropped, dx, narrowed, [&](int64_t r, T* dr) {
      const T* pr = phi + r * features;
      const T* lr = logits + r * features;
      if (softmax) {
        multiply_into(dr, pr, features);
      } else {
        for (int64_t f = 0; f < features; ++f) dr[f] = lr[f] <= 0 ? T(0) : dr[f];
      }
    });
  }

  // backward() from products = phi o dphi (overwritten), which are the logits' gradients for softmax; relu
  // divides phi (>= its epsilon) back out where the logit is positive.
  void backward_from_products(T* products, const T* phi, const T* logits, const T* x, int64_t rows,
                              const bool* dropped, T* dx) const {
    logits_backward(products, x, rows, dropped, dx, nullptr, [&](int64_t r, T* dr) {
      const T* pr = phi + r * features;
      const T* lr = logits + r * features;
      for (int64_t f = 0; !softmax && f < features; ++f) dr[f] = lr[f] <= 0 ? T(0) : dr[f] / pr[f];
    });
  }

  // Row r (features elements, just computed, so in the L1 cache) rounded into row r of narrowed, the A
  // operand rows of a bf16 product (tile_product's a_rows); nothing when narrowed is null (no bf16 products).
  void narrow_operand(const T* row, int64_t r, c10::BFloat16* narrowed) const {
    if constexpr (std::is_same_v<T, float>) {
      if (narrowed != nullptr) round_operand_row(row, features, narrowed + r * (features + features % 2));
    }
  }

 private:
  // products (rows x m) = rows of src (bfloat16, row_stride apart) times weights_t_pairs. An odd D is read from a
  // copy of the rows with a zero pad column, since the product reads one element past each row then.
  void bf16_row_products(const c10::BFloat16* src, int64_t row_stride, int64_t rows, T* products) const {
    if constexpr (std::is_same_v<T, float>) {
      if (dim % 2 == 1) {
        thread_local std::vector<c10::BFloat16> padded_buffer;
        c10::BFloat16* padded = scratch(padded_buffer, rows * (dim + 1));
        for (int64_t r = 0; r < rows; ++r) {
          std::copy(src + r * row_stride, src + r * row_stride + dim, padded + r * (dim + 1));
          padded[r * (dim + 1) + dim] = c10::BFloat16(0.0f);
        }
        src = padded;
        row_stride = dim + 1;
      }
      cpu::product(rows, features, dim + dim % 2, src, row_stride, weights_t_pairs, features, products, features,
                   false);
    }
  }

  // phi_row = exp((logits_row - offset) - shifts) (shifts null: exp(logits_row - offset)), rounded into row r of
  // narrowed too where it is not null (narrow_operand), and used as `use` says. With bf16 products (float, on a
  // CPU with AVX512-BF16) in one pass whose exp has a relative error within 7e-6 (cpu::exp_of_difference_bf16),
  // far below the 2^-9 to which the products round the features.
  void exp_features(const T* logits_row, T offset, const T* shifts, T* phi_row, int64_t r, c10::BFloat16* narrowed,
                    const RowUse<T>& use) const {
    if constexpr (std::is_same_v<T, float>) {
      if (bf16_products) {
        uint16_t* operand =
            narrowed == nullptr ? nullptr : reinterpret_cast<uint16_t*>(narrowed + r * (features + features % 2));
        const T dot = cpu::exp_of_difference_bf16(logits_row, offset, shifts, phi_row, operand, features, use.dot_with,
                                                  use.sums, use.weight(r));
        if (use.dot_with != nullptr) use.dots[r * use.dots_stride] = dot;
        return;
      }
    }
    if (shifts != nullptr) {
      exp_of_difference(logits_row, offset, shifts, phi_row, features);
    } else {
      cpu::exp_shifted(logits_row, phi_row, features, offset);
    }
    narrow_operand(phi_row, r, narrowed);
    use.apply(r, phi_row, features);
  }

  void relu_features(const T* logits_row, T* phi_row) const {
    // Compared as l <= 0, so that relu(NaN) is NaN (as torch's): a NaN must reach the outputs.
    for (int64_t f = 0; f < features; ++f) phi_row[f] = (logits_row[f] <= 0 ? T(0) : logits_row[f]) + T(kReluEpsilon);
  }

  // dx <- d(logits)/dx^T dlogits for rows not dropped, zero for dropped rows (dlogits of those are zeroed).
  // to_logit_grads(r, row) first turns row r of dlogits into the logits' gradients, where not dropped.
  template <typename ToLogitGrads>
  void logits_backward(T* dlogits, const T* x, int64_t rows, const bool* dropped, T* dx, c10::BFloat16* narrowed,
                       const ToLogitGrads& to_logit_grads) const {
    std::vector<T> logit_sums(rows, T(0));
    for (int64_t r = 0; r < rows; ++r) {
      T* dr = dlogits + r * features;
      if (dropped != nullptr && dropped[r]) {
        std::fill(dr, dr + features, T(0));
      } else {
        to_logit_grads(r, dr);
        if (softmax) logit_sums[r] = cpu::sum_of(dr, features);
      }
      narrow_operand(dr, r, narrowed);
    }
    dx_from_logit_grads(dlogits, x, rows, dropped, dx, narrowed, logit_sums);
  }

  // dx <- d(logits)/dx^T dlogits from the logits' gradients (the A rows in narrowed, where not null) and their
  // row sums (softmax), zero for dropped rows.
  void dx_from_logit_grads(const T* dlogits, const T* x, int64_t rows, const bool* dropped, T* dx,
                           const c10::BFloat16* narrowed, const std::vector<T>& logit_sums) const {
    // d logits / d x = W - x (softmax, from the -|x|^2/2) or W (relu); x carries sqrt(scale) once more.
    tile_product(bf16_products, false, false, rows, dim, features, sqrt_scale, dlogits, features, weights, dim, false,
                 dx, dim, weights_pairs, narrowed);
    for (int64_t r = 0; r < rows; ++r) {
      if (dropped != nullptr && dropped[r]) {
        std::fill(dx + r * dim, dx + (r + 1) * dim, T(0));  // not 0 * x, which is NaN where x is
        continue;
      }
      if (!softmax) continue;
      const T factor = sqrt_scale * logit_sums[r];
      for (int64_t c = 0; c < dim; ++c) dx[r * dim + c] -= factor * x[r * dim + c];
    }
  }
};

// Buffers of one task: a tile of queries and one of keys with their features, and the per-chunk products.
template <typename T>
struct Workspace {
  // Non-causal: q_logits and k_logits hold logit products, q_max and k_max their half norms (FeatureMap::
  // logit_products).
  std::vector<T> qx, q_logits, q_phi, q_base, q_max, kx, k_logits, k_phi, k_prefix, k_max, k_stab, values, numden, grads,
      scores, dphi, dx;
  bool k_dropped[kTile];
  bool q_dropped[kTile];
  bool bf16;  // tile_product's bf16 argument
  std::vector<c10::BFloat16> operand_rows;  // with bf16 products, a tile of features rounded (tile_product's a_rows)
  Workspace(int64_t features, int64_t dim, bool bf16_products)
      : qx(kTile * dim), q_logits(kTile * features), q_phi(kTile * features), q_base(kTile * features), q_max(kTile),
        kx(kTile * dim), k_logits(kTile * features), k_phi(kTile * features), k_prefix(kTile * features), k_max(kTile),
        k_stab(kTile), values(kTile * (dim + 1)), numden(kTile * (dim + 1)), grads(kTile * (dim + 1)),
        scores(kTile * kTile), dphi(kTile * features), dx(kTile * dim), bf16(bf16_products),
        operand_rows(bf16_products ? kTile * (features + features % 2) : 0) {}
  // FeatureMap's narrowed argument: operand_rows, or null without bf16 products.
  c10::BFloat16* narrowed() { return bf16 ? operand_rows.data() : nullptr; }
};

// rows of v into a (rows, D + 1) buffer whose last column is 1; zero rows where dropped[r] (padded keys are
// ignored: their phi is 0, and 0 * NaN in the products would not be 0).
template <typename scalar_t, typename T>
void load_values_with_ones(const scalar_t* src, int64_t row_stride, int64_t rows, int64_t dim, const bool* dropped,
                           T* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    T* out = dst + r * (dim + 1);
    if (dropped[r]) {
      std::fill(out, out + dim + 1, T(0));
      continue;
    }
    cpu::load_rows(src + r * row_stride, row_stride, 1, dim, T(1), out);
    out[dim] = 1;
  }
}

// [dnum | dden] of each query row from grad_out, out and the normaliser den: dnum = g / den and
// dden = -(g . out) / den; zeros where den == 0 (the row sees no key), and those rows marked dropped.
// Every other normaliser is >= 1 (softmax; see the stabilisers above) or >= m eps^2 (relu).
template <typename scalar_t, typename T>
void output_grads(const scalar_t* grad_out, const scalar_t* out, int64_t row_stride, const T* normaliser, int64_t rows,
                  int64_t dim, T* dst, bool* dropped) {
  thread_local std::vector<T> out_row_buffer;
  T* out_row = scratch(out_row_buffer, dim);
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* g = grad_out + r * row_stride;
    const scalar_t* o = out + r * row_stride;
    T* d = dst + r * (dim + 1);
    const T den = normaliser[r];
    dropped[r] = den == 0;
    if (dropped[r]) {
      std::fill(d, d + dim + 1, T(0));
      continue;
    }
    cpu::load_rows(g, row_stride, 1, dim, T(1) / den, d);
    cpu::load_rows(o, row_stride, 1, dim, T(1), out_row);
    // g . out cancels against dnum . v in the scores' gradient: summed in double
    d[dim] = static_cast<T>(-cpu::dot_in_double(d, out_row, dim));
  }
}

// Asks for rows [start, start + n) (those below len) of grad_out and out, which have the same strides, as
// Problem::prefetch does.
template <typename scalar_t>
void prefetch_output_rows(const scalar_t* grad_out, const scalar_t* out, const HeadView& view, int64_t b, int64_t h,
                          int64_t start, int64_t n, int64_t len, int64_t dim) {
  if (start >= len) return;
  const int64_t offset = view.offset(b, h) + start * view.row_stride, rows = std::min(n, len - start);
  cpu::prefetch_rows(grad_out + offset, view.row_stride, rows, dim);
  cpu::prefetch_rows(out + offset, view.row_stride, rows, dim);
}

// Zero rows of `rows` x `features` where dropped[r]: the queries that see no key, whose features (NaN where
// q is) must not reach the gradients of the keys.
template <typename T>
void zero_dropped_rows(T* values, int64_t rows, int64_t features, const bool* dropped) {
  for (int64_t r = 0; r < rows; ++r) {
    if (dropped[r]) std::fill(values + r * features, values + (r + 1) * features, T(0));
  }
}

template <typename scalar_t>
struct Problem {
  using T = at::opmath_type<scalar_t>;
  int64_t batch, heads, heads_per_kv, query_len, key_len, dim, features;
  bool softmax, causal;
  T sqrt_scale;
  const scalar_t *q, *k, *v;
  HeadView qv, kv, vv;
  const T* projection;
  at::Tensor projection_t;
  int64_t projection_head_stride;
  const bool* mask;
  bool bf16_products;  // bfloat16 inputs multiplied in bfloat16 (cpu::bf16_products)
  at::Tensor projection_t_pairs, projection_pairs;  // with bf16 products: paired_operands of the two

  Problem(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& projection_,
          bool softmax_, bool causal_, const std::optional<at::Tensor>& key_padding_mask, double scale)
      : batch(q_.size(0)), heads(q_.size(1)), heads_per_kv(q_.size(1) / k_.size(1)), query_len(q_.size(2)),
        key_len(k_.size(2)), dim(q_.size(3)),
        features(projection_.size(-2)), softmax(softmax_), causal(causal_), sqrt_scale(T(std::sqrt(scale))),
        q(q_.data_ptr<scalar_t>()), k(k_.data_ptr<scalar_t>()), v(v_.data_ptr<scalar_t>()), qv(q_), kv(k_), vv(v_),
        projection(projection_.data_ptr<T>()), projection_t(projection_.transpose(-1, -2).contiguous()),
        projection_head_stride(projection_.dim() == 3 ? features * dim : 0),
        mask(key_padding_mask ? key_padding_mask->data_ptr<bool>() : nullptr),
        bf16_products(std::is_same_v<scalar_t, c10::BFloat16> && cpu::bf16_products()) {
    if (bf16_products) {
      // sqrt(scale) goes into W^T here, since FeatureMap::logit_products multiplies the rows as they are.
      projection_t_pairs = paired_operands(projection_t * sqrt_scale);
      projection_pairs = paired_operands(projection_);
    }
  }

  FeatureMap<T> feature_map(int64_t h) const {
    return {projection + h * projection_head_stride, projection_t.data_ptr<T>() + h * projection_head_stride,
            features, dim, sqrt_scale, softmax, bf16_products,
            bf16_products ? projection_t_pairs.data_ptr<c10::BFloat16>() + h * paired_head_stride(dim) : nullptr,
            bf16_products ? projection_pairs.data_ptr<c10::BFloat16>() + h * paired_head_stride(features) : nullptr};
  }
  // The head stride of a paired projection whose matrices have `rows` rows (0 when shared by the heads).
  int64_t paired_head_stride(int64_t rows) const {
    return projection_head_stride == 0 ? 0 : (rows + rows % 2) * (features * dim / rows);
  }
  bool padded(int64_t b, int64_t j) const { return mask != nullptr && mask[b * key_len + j]; }
  // Whether a key before position `end` of batch element b is unpadded.
  bool any_key_before(int64_t b, int64_t end) const {
    if (mask == nullptr) return end > 0;
    const bool* row = mask + b * key_len;
    return std::find(row, row + end, false) != row + end;
  }
  // Rows of k and v from `start` that query head h reads: those of kv head h / heads_per_kv (grouped-query
  // attention; heads_per_kv is 1 without it).
  const scalar_t* keys(int64_t b, int64_t h, int64_t start) const {
    return k + kv.offset(b, h / heads_per_kv) + start * kv.row_stride;
  }
  const scalar_t* values(int64_t b, int64_t h, int64_t start) const {
    return v + vv.offset(b, h / heads_per_kv) + start * vv.row_stride;
  }
  // Asks the CPU to bring rows [start, start + n) (those in the sequence) of k and v where `of_keys`, and of q
  // where `of_queries`, into its caches: issued a tile ahead, so that loading them does not wait on memory
  // (non-causal, bf16: the loads' share of the profile fell from 6.5% to 3%; the causal sweeps' sub-blocks
  // showed no change).
  void prefetch(int64_t b, int64_t h, int64_t start, int64_t n, bool of_keys, bool of_queries) const {
    if (of_keys && start < key_len) {
      const int64_t rows = std::min(n, key_len - start);
      cpu::prefetch_rows(keys(b, h, start), kv.row_stride, rows, dim);
      cpu::prefetch_rows(values(b, h, start), vv.row_stride, rows, dim);
    }
    if (of_queries && start < query_len) {
      cpu::prefetch_rows(q + qv.offset(b, h) + start * qv.row_stride, qv.row_stride, std::min(n, query_len - start), dim);
    }
  }
};

// Keys [start, start + n) of head (b, h): padding flags, and logits (k_max takes their per-row maxima, unused),
// or non-causal logit products (see Workspace); w.kx the scaled rows where scaled_rows (the backward reads them).
template <typename scalar_t, typename T>
void key_logits(const Problem<scalar_t>& p, const FeatureMap<T>& map, int64_t b, int64_t h, int64_t start, int64_t n,
                Workspace<T>& w, bool scaled_rows) {
  T* kx = scaled_rows ? w.kx.data() : nullptr;
  if (p.causal) {
    map.logits(p.keys(b, h, start), p.kv.row_stride, n, kx, w.k_logits.data(), w.k_max.data());
  } else {
    map.logit_products(p.keys(b, h, start), p.kv.row_stride, n, kx, w.k_logits.data(), w.k_max.data());
  }
  for (int64_t r = 0; r < n; ++r) w.k_dropped[r] = p.padded(b, start + r);
}

// Non-causal query features of rows [start, start + n), against the keys' per-feature maxima; w.qx the scaled rows
// where scaled_rows (the backward reads them). narrowed, use: as FeatureMap::key_phi's.
template <typename scalar_t, typename T>
void query_features(const Problem<scalar_t>& p, const FeatureMap<T>& map, int64_t b, int64_t h, int64_t start,
                    int64_t n, Workspace<T>& w, const T* key_feature_max, c10::BFloat16* narrowed,
                    bool scaled_rows, const RowUse<T>& use) {
  map.logit_products(p.q + p.qv.offset(b, h) + start * p.qv.row_stride, p.qv.row_stride, n,
                     scaled_rows ? w.qx.data() : nullptr, w.q_logits.data(), w.q_max.data());
  map.query_phi(w.q_logits.data(), w.q_max.data(), n, key_feature_max, w.q_phi.data(), narrowed, use);
}

// Causal sweeps run over sub-blocks of kSubBlock rows, as keys and as queries at once.
//
// Softmax stabilisers: one per feature and key position, s_f(j) = the maximum of feature f's logit over
// the unpadded keys up to j (a running maximum), and M_j = max_f s_f(j). Query i's weight on key j is
// exp(A_if + (l_f(k_j) - M_i)) with A_if = (l_f(q_i) - max l(q_i)) - c_i, where
// c_i = max_f ((l_f(q_i) - max l(q_i)) + (s_f(i) - M_i)) makes every weight <= 1 and the one of query i's
// best feature on the key that set s_f(i) 1 (to rounding): the normaliser is >= 1 (to rounding), and only
// keys up to i enter.
// (Each difference is of two large logits that are close where it matters, so it is nearly exact.)
//
// Weights factor through any per-feature constant sigma_f: exp(A_if + (sigma_f - M_i)) exp(l_f(k_j) -
// sigma_f), both factors <= 1 when sigma_f lies between key j's logit and s_f(i). Earlier sub-blocks
// reach a query through the state sum_j exp(l_f(k_j) - sigma_f) [v_j | 1], sigma the running maxima at
// the end of the previous sub-block. The sub-block's own pairs (j <= i) factor through its final maxima
// s_f(last), as a masked product: key weights <= 1, query weights exp(A_if + (s_f(last) - M_i)) <=
// exp(s_f(last) - s_f(i)), at most the rise of feature f's maximum over the sub-block (from the previous
// sub-block's end, or from the first row that sees a key). After a sub-block with keys, these query
// weights are those against its maxima times exp(rise), a product per column instead of an exp per
// element. Where the rise is at most kRecordRise, a later key of the sub-block changes an earlier row's
// weights by rounding only: a weight that underflows on either side belongs to a pair weight below
// exp(kRecordRise - 87), and every normaliser is >= 1. A feature whose maximum rises more (a "record"
// feature: only inputs of huge magnitude make them past the first keys) is summed pair by pair, weight by
// weight. relu: the features relu(l) + eps, plain products, no records.
constexpr int64_t kSubBlock = 16;
static_assert(kSubBlock <= kTile, "a sub-block's rows live in a Workspace's tiles");
constexpr double kRecordRise = 20;

// The running maxima of the features after each sub-block of a head and -inf before the first (softmax), or
// m elements that are never read (relu).
int64_t causal_maxima_size(int64_t key_len, int64_t features, bool softmax) {
  return (softmax ? ceil_div(key_len, kSubBlock) + 1 : 1) * features;
}

// Keys [start, start + n) of head (b, h): logits and padding flags; softmax: the running maxima of each
// feature (k_prefix, n x m, continuing from `before`) and M_j (k_stab: -inf before any unpadded key);
// relu: the features (k_phi), and k_stab -inf before any unpadded key, 0 from it on (query_weights drops the
// rows that see no key, whose normaliser phi(q) . 0 would be NaN for a NaN query).
template <typename scalar_t, typename T>
FASTATTN_VECTOR_CLONES void causal_keys(const Problem<scalar_t>& p, const FeatureMap<T>& map, int64_t b, int64_t h,
                                        int64_t start, int64_t n, const T* before, Workspace<T>& w) {
  const int64_t m = p.features;
  key_logits(p, map, b, h, start, n, w, /*scaled_rows=*/true);
  if (!p.softmax) {
    const std::vector<T> no_shift(n, T(0));
    map.phi(w.k_logits.data(), n, no_shift.data(), w.k_dropped, w.k_phi.data());
    bool seen = p.any_key_before(b, start);
    for (int64_t r = 0; r < n; ++r) {
      seen = seen || !w.k_dropped[r];
      w.k_stab[r] = seen ? T(0) : -std::numeric_limits<T>::infinity();
    }
    return;
  }
  for (int64_t r = 0; r < n; ++r) {
    const T* previous = r == 0 ? before : w.k_prefix.data() + (r - 1) * m;
    T* prefix = w.k_prefix.data() + r * m;
    const T* lr = w.k_dropped[r] ? previous : w.k_logits.data() + r * m;
    w.k_stab[r] = running_max_and_max(prefix, previous, lr, m);
  }
}

// The features whose running maximum rises by more than kRecordRise over the sub-block (softmax, after
// causal_keys; none for relu, or where no row sees a key): from `before`, the maxima before the sub-block,
// where given, else from the first row that sees a key. A NaN maximum makes a record, whose pair weights
// carry the NaN to the rows that see it.
template <typename T>
std::vector<int64_t> record_features(const Workspace<T>& w, int64_t n, int64_t m, bool softmax, const T* before) {
  std::vector<int64_t> records;
  if (!softmax) return records;
  int64_t first = 0;
  while (first < n && w.k_stab[first] == -std::numeric_limits<T>::infinity()) ++first;
  if (first == n) return records;
  const T *low = before != nullptr ? before : w.k_prefix.data() + first * m, *after = w.k_prefix.data() + (n - 1) * m;
  for (int64_t f = 0; f < m; ++f) {
    if (!(after[f] - low[f] <= T(kRecordRise))) records.push_back(f);
  }
  return records;
}

// Queries [start, start + n) after causal_keys on the same rows: logits, and the base of their weights
// (q_base): softmax A_if (see kSubBlock), relu the features.
template <typename scalar_t, typename T>
FASTATTN_VECTOR_CLONES void causal_queries(const Problem<scalar_t>& p, const FeatureMap<T>& map, int64_t b, int64_t h,
                                           int64_t start, int64_t n, Workspace<T>& w) {
  const int64_t m = p.features;
  map.logits(p.q + p.qv.offset(b, h) + start * p.qv.row_stride, p.qv.row_stride, n, w.qx.data(), w.q_logits.data(),
             w.q_max.data());
  if (!p.softmax) {
    map.phi(w.q_logits.data(), n, w.q_max.data(), nullptr, w.q_base.data());
    return;
  }
  for (int64_t r = 0; r < n; ++r) {
    T* base = w.q_base.data() + r * m;
    const T peak = query_base_and_peak(base, w.q_logits.data() + r * m, w.q_max[r], w.k_prefix.data() + r * m,
                                       w.k_stab[r], m);
    // A row before any unpadded key sees none: its weights are never used (c_i would be NaN).
    if (!(w.k_stab[r] > -std::numeric_limits<T>::infinity())) continue;
    for (int64_t f = 0; f < m; ++f) base[f] -= peak;
  }
}

// Query weights in w.q_phi on keys stabilised by `sigma` (per feature): softmax exp(A_if + (sigma_f - M_i)),
// relu the features; zero rows where dropped[r] (dropped may be null) and rows that see no key.
template <typename T>
FASTATTN_VECTOR_CLONES void query_weights(Workspace<T>& w, int64_t n, int64_t m, bool softmax, const T* sigma,
                                          const bool* dropped) {
  for (int64_t r = 0; r < n; ++r) {
    T* out = w.q_phi.data() + r * m;
    const T* base = w.q_base.data() + r * m;
    const bool sees_no_key = w.k_stab[r] == -std::numeric_limits<T>::infinity();
    if ((dropped != nullptr && dropped[r]) || sees_no_key) {
      std::fill(out, out + m, T(0));
      continue;
    }
    if (softmax) {
      exp_of_shifted_sum(base, sigma, w.k_stab[r], out, m);
    } else {
      std::copy(base, base + m, out);
    }
  }
}

// Query weights in w.q_phi against the sub-block's final maxima `after` (see kSubBlock). Where `before` is
// given, w.q_phi holds the weights against it (query_weights), the maxima before the sub-block: softmax
// multiplies column f by exp(after_f - before_f), at most exp(kRecordRise) but in the columns of the
// records (record_features from `before`), which the caller zeroes; relu's weights stay as they are.
// Without `before`, query_weights against `after`.
template <typename T>
FASTATTN_VECTOR_CLONES void move_query_weights(Workspace<T>& w, int64_t n, int64_t m, bool softmax, const T* before,
                                               const T* after, const bool* dropped) {
  if (before == nullptr) return query_weights(w, n, m, softmax, after, dropped);
  if (!softmax) return;
  thread_local std::vector<T> factors_buffer;
  T* factors = scratch(factors_buffer, m);
  for (int64_t f = 0; f < m; ++f) factors[f] = cpu::exp_acc(after[f] - before[f]);
  for (int64_t r = 0; r < n; ++r) multiply_into(w.q_phi.data() + r * m, factors, m);
}

// Columns `columns` of rows (n x m) set to 0: the record features, left out of a sub-block's masked products.
template <typename T>
void zero_columns(T* rows, int64_t n, int64_t m, const std::vector<int64_t>& columns) {
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t f : columns) rows[r * m + f] = 0;
  }
}

// Key weights in w.k_phi against per-feature stabilisers `sigma` (softmax: exp(l - sigma), zero for padded
// keys; relu: the features, as they are).
template <typename T>
FASTATTN_VECTOR_CLONES void key_weights(Workspace<T>& w, int64_t n, int64_t m, bool softmax, const T* sigma) {
  if (!softmax) return;
  for (int64_t r = 0; r < n; ++r) {
    T* out = w.k_phi.data() + r * m;
    if (w.k_dropped[r]) {
      std::fill(out, out + m, T(0));
      continue;
    }
    exp_of_difference(w.k_logits.data() + r * m, T(0), sigma, out, m);
  }
}

// The weights of the sub-block's pairs through record feature f: weights (n x n), row i (query), column j
// (key) = exp(A_if + (l_f(k_j) - M_i)) for keys j <= i that are not dropped, 0 elsewhere and in the rows
// where query_dropped[i] (query_dropped may be null). Each row is computed over kSubBlock keys at once and
// masked (a vector operation; a NaN from a row that sees no key is masked too).
template <typename T>
FASTATTN_VECTOR_CLONES void record_pair_weights(const Workspace<T>& w, int64_t n, int64_t m, int64_t f,
                                                const bool* query_dropped, T* weights) {
  T key_logits[kSubBlock];
  int32_t key_kept[kSubBlock];
  for (int64_t j = 0; j < kSubBlock; ++j) {
    key_kept[j] = j < n && !w.k_dropped[j];
    key_logits[j] = j < n ? w.k_logits[j * m + f] : T(0);
  }
  for (int64_t i = 0; i < n; ++i) {
    const T base = w.q_base[i * m + f], stab = w.k_stab[i];
    const int32_t row_kept = query_dropped == nullptr || !query_dropped[i];
    T row[kSubBlock];
#pragma omp simd
    for (int64_t j = 0; j < kSubBlock; ++j) {
      const T weight = cpu::exp_acc(base + (key_logits[j] - stab));
      row[j] = (j <= i) & key_kept[j] & row_kept ? weight : T(0);
    }
    std::copy(row, row + n, weights + i * n);
  }
}

// The sub-block's pairs through its record features (none: nothing to do): their weights, summed over the
// records, are added to pair_weights (n x n), and visit(f, weights) is called with each record's own weights
// (record_pair_weights).
template <typename T, typename Visit>
void add_record_pairs(const Workspace<T>& w, int64_t n, int64_t m, const std::vector<int64_t>& records,
                      const bool* query_dropped, T* pair_weights, std::vector<T>& weights, const Visit& visit) {
  for (int64_t f : records) {
    record_pair_weights(w, n, m, f, query_dropped, weights.data());
    for (int64_t i = 0; i < n * n; ++i) pair_weights[i] += weights[i];
    visit(f, weights.data());
  }
}

// Rows f of a state (m x (D + 1)) times exp(low_f - high_f) <= 1 (low <= high): a state of keys moving to a
// larger stabiliser (exp(l - s)), or one of queries moving to a smaller one (exp(... + s)).
template <typename T>
FASTATTN_VECTOR_CLONES void decay_rows(T* state, int64_t m, int64_t dim, const T* low, const T* high) {
  for (int64_t f = 0; f < m; ++f) {
    if (low[f] == high[f]) continue;
    const T decay = cpu::exp_acc(low[f] - high[f]);
    for (int64_t c = 0; c <= dim; ++c) state[f * (dim + 1) + c] *= decay;
  }
}

// scores (n x n) = a b^T, zero above the diagonal (j > i): the sub-block's pairs that may enter.
template <typename T>
void causal_products(bool bf16, int64_t n, int64_t k, const T* a, const T* b, T* scores) {
  tile_product(bf16, false, true, n, n, k, T(1), a, k, b, k, false, scores, n);
  for (int64_t i = 0; i < n; ++i) std::fill(scores + i * n + i + 1, scores + (i + 1) * n, T(0));
}

// out (n x m) += transposed^T o weights, transposed (m x n): the products of a state with the sub-block's
// rows come out transposed (state x rows^T), which is cheaper than transposing the state for each sub-block.
template <typename T>
FASTATTN_VECTOR_CLONES void add_transposed_times(const T* transposed, const T* weights, int64_t n, int64_t m,
                                                 T* out) {
  // Transposed first (in registers, cpu::transpose): read in place, the columns of `transposed` are strided.
  thread_local std::vector<T> rows_buffer;
  T* rows = scratch(rows_buffer, n * m);
  cpu::transpose(transposed, n, m, n, T(1), rows, m);
  for (int64_t i = 0; i < n * m; ++i) out[i] += rows[i] * weights[i];
}

// Causal forward of head (b, h): outputs (write_outputs(start, n) turns the first n rows of w.numden into
// them), the stabilisers M_j and the final state.
template <typename scalar_t, typename WriteOutputs>
FASTATTN_VECTOR_CLONES void forward_causal(const Problem<scalar_t>& p, int64_t b, int64_t h,
                                           Workspace<at::opmath_type<scalar_t>>& w,
                                           at::opmath_type<scalar_t>* stab_ptr, at::opmath_type<scalar_t>* state,
                                           const WriteOutputs& write_outputs) {
  using T = at::opmath_type<scalar_t>;
  const int64_t m = p.features, dim = p.dim, bh = b * p.heads + h;
  const auto map = p.feature_map(h);
  std::vector<T> sigma(m, -std::numeric_limits<T>::infinity()), record_weights(kSubBlock * kSubBlock);
  bool have_state = false;
  std::fill(state, state + m * (dim + 1), T(0));
  for (int64_t start = 0; start < p.key_len; start += kSubBlock) {
    const int64_t n = std::min(kSubBlock, p.key_len - start);
    causal_keys(p, map, b, h, start, n, sigma.data(), w);
    for (int64_t r = 0; r < n; ++r) {
      const bool finite = w.k_stab[r] > -std::numeric_limits<T>::infinity();
      stab_ptr[bh * p.key_len + start + r] = p.softmax && finite ? w.k_stab[r] : T(0);
    }
    load_values_with_ones(p.values(b, h, start), p.vv.row_stride, n, dim, w.k_dropped, w.values.data());
    causal_queries(p, map, b, h, start, n, w);
    const T* before = have_state ? sigma.data() : nullptr;  // the maxima of the earlier keys
    const std::vector<int64_t> records = record_features(w, n, m, p.softmax, before);
    const T* after = p.softmax ? w.k_prefix.data() + (n - 1) * m : sigma.data();
    key_weights(w, n, m, p.softmax, after);
    std::fill(w.numden.begin(), w.numden.begin() + n * (dim + 1), T(0));
    // Earlier sub-blocks through the state, against the maxima before this one; the sub-block's own pairs
    // against its final maxima, as a masked product without the record features, plus the records' pair weights.
    if (have_state) {
      query_weights(w, n, m, p.softmax, sigma.data(), nullptr);
      tile_product_and_column(w.bf16, false, n, dim + 1, m, w.q_phi.data(), m, state, dim + 1, false,
                              w.numden.data(), dim + 1);
    }
    move_query_weights(w, n, m, p.softmax, before, after, nullptr);
    zero_columns(w.q_phi.data(), n, m, records);
    causal_products(w.bf16, n, m, w.q_phi.data(), w.k_phi.data(), w.scores.data());
    add_record_pairs(w, n, m, records, nullptr, w.scores.data(), record_weights, [](int64_t, const T*) {});
    tile_product_and_column(w.bf16, false, n, dim + 1, n, w.scores.data(), n, w.values.data(), dim + 1, true,
                            w.numden.data(), dim + 1);
    write_outputs(start, n);
    if (std::all_of(w.k_dropped, w.k_dropped + n, [](bool dropped) { return dropped; })) continue;
    if (have_state) decay_rows(state, m, dim, sigma.data(), after);
    std::copy(after, after + m, sigma.begin());
    tile_product_and_column(w.bf16, true, m, dim + 1, n, w.k_phi.data(), m, w.values.data(), dim + 1, have_state,
                            state, dim + 1);
    have_state = true;
  }
}

// Causal backward of head (b, h), forward direction: dq from d(weights) o weights: the state's part is
// ([dnum | dden] state^T) o (its query weights), the sub-block's pairs as in the forward, with
// g_ij = [dnum_i | dden_i] . [v_j | 1]. Softmax: where `maxima` is not null, the running maxima after each
// sub-block J go to maxima[(J + 1) m ...] (backward_causal_keys' first pass, done on the way).
template <typename scalar_t>
FASTATTN_VECTOR_CLONES void backward_causal_queries(const Problem<scalar_t>& p, int64_t b, int64_t h,
                                                    const scalar_t* go_ptr, const scalar_t* out_ptr, const HeadView& ov,
                                                    const HeadView& gov, const at::opmath_type<scalar_t>* norm_ptr,
                                                    scalar_t* gq_ptr, const HeadView& gqv,
                                                    Workspace<at::opmath_type<scalar_t>>& w,
                                                    std::vector<at::opmath_type<scalar_t>>& state,
                                                    at::opmath_type<scalar_t>* maxima) {
  using T = at::opmath_type<scalar_t>;
  const int64_t m = p.features, dim = p.dim, bh = b * p.heads + h;
  const auto map = p.feature_map(h);
  std::vector<T> sigma(m, -std::numeric_limits<T>::infinity()), pair_grads(kSubBlock * m),
      record_weights(kSubBlock * kSubBlock);
  bool have_state = false;
  for (int64_t start = 0; start < p.key_len; start += kSubBlock) {
    const int64_t n = std::min(kSubBlock, p.key_len - start);
    causal_keys(p, map, b, h, start, n, sigma.data(), w);
    load_values_with_ones(p.values(b, h, start), p.vv.row_stride, n, dim, w.k_dropped, w.values.data());
    causal_queries(p, map, b, h, start, n, w);
    output_grads(go_ptr + gov.offset(b, h) + start * gov.row_stride, out_ptr + ov.offset(b, h) + start * ov.row_stride,
                 ov.row_stride, norm_ptr + bh * p.query_len + start, n, dim, w.grads.data(), w.q_dropped);
    const T* before = have_state ? sigma.data() : nullptr;  // the maxima of the earlier keys
    const std::vector<int64_t> records = record_features(w, n, m, p.softmax, before);
    const T* after = p.softmax ? w.k_prefix.data() + (n - 1) * m : sigma.data();
    key_weights(w, n, m, p.softmax, after);
    causal_products(w.bf16, n, dim + 1, w.grads.data(), w.values.data(), w.scores.data());  // g_ij, j <= i
    std::fill(w.dphi.begin(), w.dphi.begin() + n * m, T(0));
    if (have_state) {
      query_weights(w, n, m, p.softmax, sigma.data(), w.q_dropped);
      tile_product(w.bf16, false, true, m, n, dim + 1, T(1), state.data(), dim + 1, w.grads.data(), dim + 1,
                   false, pair_grads.data(), n);
      add_transposed_times(pair_grads.data(), w.q_phi.data(), n, m, w.dphi.data());
    }
    move_query_weights(w, n, m, p.softmax, before, after, w.q_dropped);
    zero_columns(w.q_phi.data(), n, m, records);
    tile_product(w.bf16, false, false, n, m, n, T(1), w.scores.data(), n, w.k_phi.data(), m, false,
                 pair_grads.data(), m);
    for (int64_t i = 0; i < n * m; ++i) w.dphi[i] += w.q_phi[i] * pair_grads[i];
    // The records: d(weights)_if += sum_j g_ij e_ijf.
    for (int64_t f : records) {
      record_pair_weights(w, n, m, f, w.q_dropped, record_weights.data());
      for (int64_t i = 0; i < n; ++i) {
        w.dphi[i * m + f] += dot_of(w.scores.data() + i * n, record_weights.data() + i * n, n);
      }
    }
    map.backward_from_products(w.dphi.data(), w.q_base.data(), w.q_logits.data(), w.qx.data(), n, w.q_dropped,
                               w.dx.data());
    cpu::store_rows(w.dx.data(), n, dim, gq_ptr + gqv.offset(b, h) + start * gqv.row_stride, gqv.row_stride);
    if (maxima != nullptr && p.softmax) std::copy(after, after + m, maxima + (start / kSubBlock + 1) * m);
    if (std::all_of(w.k_dropped, w.k_dropped + n, [](bool dropped) { return dropped; })) continue;
    if (have_state) decay_rows(state.data(), m, dim, sigma.data(), after);
    std::copy(after, after + m, sigma.begin());
    tile_product_and_column(w.bf16, true, m, dim + 1, n, w.k_phi.data(), m, w.values.data(), dim + 1, have_state,
                            state.data(), dim + 1);
    have_state = true;
  }
}

// Causal backward of head (b, h), reverse direction: dk, dv. Later sub-blocks reach a key through the
// suffix state R = sum over their queries of exp(A_if + (rho_f - M_i)) [dnum_i | dden_i], rho the running
// maxima at the end of the key's sub-block (so that both factors stay <= 1), read with exp(l - rho);
// the sub-block's own pairs as in the forward. maxima (causal_maxima_size elements, -inf first): the running
// maxima at each sub-block's end, maxima[(J + 1) m ...] after sub-block J, which have_maxima says
// backward_causal_queries has written, else a first pass over the keys finds. gk_ptr, gv_ptr: per query
// head, of type grad_t.
template <typename scalar_t, typename grad_t>
FASTATTN_VECTOR_CLONES void backward_causal_keys(const Problem<scalar_t>& p, int64_t b, int64_t h,
                                                 const scalar_t* go_ptr, const scalar_t* out_ptr, const HeadView& ov,
                                                 const HeadView& gov, const at::opmath_type<scalar_t>* norm_ptr,
                                                 grad_t* gk_ptr, const HeadView& gkv, grad_t* gv_ptr,
                                                 const HeadView& gvv, Workspace<at::opmath_type<scalar_t>>& w,
                                                 std::vector<at::opmath_type<scalar_t>>& suffix,
                                                 std::vector<at::opmath_type<scalar_t>>& maxima, bool have_maxima) {
  using T = at::opmath_type<scalar_t>;
  const int64_t m = p.features, dim = p.dim, bh = b * p.heads + h;
  const auto map = p.feature_map(h);
  const int64_t blocks = ceil_div(p.key_len, kSubBlock);
  for (int64_t block = 0; p.softmax && !have_maxima && block < blocks; ++block) {
    const int64_t start = block * kSubBlock, n = std::min(kSubBlock, p.key_len - start);
    causal_keys(p, map, b, h, start, n, maxima.data() + block * m, w);
    std::copy(w.k_prefix.data() + (n - 1) * m, w.k_prefix.data() + n * m, maxima.data() + (block + 1) * m);
  }
  const auto maxima_after = [&](int64_t block) { return maxima.data() + (p.softmax ? (block + 1) * m : 0); };
  std::vector<T> dv(kSubBlock * dim), pair_grads(kSubBlock * m), pair_weights(kSubBlock * kSubBlock),
      record_weights(kSubBlock * kSubBlock), record_grads(kSubBlock), suffix_weights(kSubBlock * m);
  bool have_suffix = false;
  for (int64_t block = blocks - 1; block >= 0; --block) {
    const int64_t start = block * kSubBlock, n = std::min(kSubBlock, p.key_len - start);
    const T *before = maxima_after(block - 1), *after = maxima_after(block);
    causal_keys(p, map, b, h, start, n, before, w);
    load_values_with_ones(p.values(b, h, start), p.vv.row_stride, n, dim, w.k_dropped, w.values.data());
    causal_queries(p, map, b, h, start, n, w);
    output_grads(go_ptr + gov.offset(b, h) + start * gov.row_stride, out_ptr + ov.offset(b, h) + start * ov.row_stride,
                 ov.row_stride, norm_ptr + bh * p.query_len + start, n, dim, w.grads.data(), w.q_dropped);
    // The maxima before the sub-block where an earlier key set them (softmax: -inf before the first).
    const T* keys_before = !p.softmax || before[0] > -std::numeric_limits<T>::infinity() ? before : nullptr;
    const std::vector<int64_t> records = record_features(w, n, m, p.softmax, keys_before);
    key_weights(w, n, m, p.softmax, after);
    std::fill(dv.begin(), dv.begin() + n * dim, T(0));
    std::fill(w.dphi.begin(), w.dphi.begin() + n * m, T(0));
    // Later sub-blocks: dv_j = exp(l_j - rho) R_num, d(weights)_j = exp(l_j - rho) o (R [v_j | 1]).
    if (have_suffix) {
      tile_product(w.bf16, false, false, n, dim, m, T(1), w.k_phi.data(), m, suffix.data(), dim + 1, false,
                   dv.data(), dim);
      tile_product(w.bf16, false, true, m, n, dim + 1, T(1), suffix.data(), dim + 1, w.values.data(), dim + 1,
                   false, pair_grads.data(), n);
      add_transposed_times(pair_grads.data(), w.k_phi.data(), n, m, w.dphi.data());
    }
    causal_products(w.bf16, n, dim + 1, w.grads.data(), w.values.data(), w.scores.data());  // g_ij, j <= i
    // The sub-block's pairs against its final maxima, through the features other than the records (the key
    // weights of the records zeroed) and through the records: weights e (j <= i), dv += e^T dnum,
    // d(weights)_k += K o (g^T Q) for the former, d(weights)_jf += sum_i g_ij e_ijf for each record f.
    // The queries' weights against the maxima before the sub-block join the suffix state below.
    query_weights(w, n, m, p.softmax, before, w.q_dropped);
    std::copy(w.q_phi.begin(), w.q_phi.begin() + n * m, suffix_weights.begin());
    move_query_weights(w, n, m, p.softmax, keys_before, after, w.q_dropped);
    zero_columns(w.q_phi.data(), n, m, records);
    zero_columns(w.k_phi.data(), n, m, records);
    causal_products(w.bf16, n, m, w.q_phi.data(), w.k_phi.data(), pair_weights.data());
    add_record_pairs(w, n, m, records, w.q_dropped, pair_weights.data(), record_weights,
                     [&](int64_t f, const T* weights) {
                       std::fill(record_grads.begin(), record_grads.end(), T(0));
                       for (int64_t i = 0; i < n; ++i) {
                         for (int64_t j = 0; j < n; ++j) record_grads[j] += w.scores[i * n + j] * weights[i * n + j];
                       }
                       for (int64_t j = 0; j < n; ++j) w.dphi[j * m + f] += record_grads[j];
                     });
    tile_product(w.bf16, true, false, n, dim, n, T(1), pair_weights.data(), n, w.grads.data(), dim + 1, true,
                 dv.data(), dim);
    tile_product(w.bf16, true, false, n, m, n, T(1), w.scores.data(), n, w.q_phi.data(), m, false,
                 pair_grads.data(), m);
    for (int64_t i = 0; i < n * m; ++i) w.dphi[i] += w.k_phi[i] * pair_grads[i];
    for (int64_t r = 0; r < n; ++r) {
      if (w.k_dropped[r]) std::fill(dv.begin() + r * dim, dv.begin() + (r + 1) * dim, T(0));
    }
    cpu::store_rows(dv.data(), n, dim, gv_ptr + gvv.offset(b, h) + start * gvv.row_stride, gvv.row_stride);
    map.backward_from_products(w.dphi.data(), w.k_phi.data(), w.k_logits.data(), w.kx.data(), n, w.k_dropped,
                               w.dx.data());
    cpu::store_rows(w.dx.data(), n, dim, gk_ptr + gkv.offset(b, h) + start * gkv.row_stride, gkv.row_stride);
    if (block == 0) break;
    // This sub-block's queries join the suffix state, which moves to the maxima before the sub-block.
    if (have_suffix && p.softmax) decay_rows(suffix.data(), m, dim, before, after);
    tile_product_and_column(w.bf16, true, m, dim + 1, n, suffix_weights.data(), m, w.grads.data(), dim + 1, have_suffix,
                            suffix.data(), dim + 1);
    have_suffix = true;
  }
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& projection, bool softmax,
    bool causal, const std::optional<at::Tensor>& key_padding_mask, double scale) {
  using T = at::opmath_type<scalar_t>;
  const Problem<scalar_t> p(q, k, v, projection, softmax, causal, key_padding_mask, scale);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = new_output(q.sizes(), q.options());
  at::Tensor normaliser = new_output({p.batch, p.heads, p.query_len}, q.options().dtype(acc));
  at::Tensor key_stabiliser =
      new_output({p.batch, p.heads, causal ? p.key_len : p.features}, q.options().dtype(acc));
  at::Tensor state = new_output({p.batch, p.heads, p.features, p.dim + 1}, q.options().dtype(acc));
  const HeadView ov(out);
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  T *norm_ptr = normaliser.data_ptr<T>(), *stab_ptr = key_stabiliser.data_ptr<T>(), *state_ptr = state.data_ptr<T>();
  const int64_t m = p.features, dim = p.dim;

  // numden rows -> out rows (numerator / denominator, or 0) and the normaliser.
  auto write_outputs = [&](const Workspace<T>& w, int64_t bh, int64_t b, int64_t h, int64_t start, int64_t n,
                           std::vector<T>& rows) {
    for (int64_t r = 0; r < n; ++r) {
      const T* nd = w.numden.data() + r * (dim + 1);
      // A row that sees no key gives 0 (and saves normaliser 0, which the backward drops); any other
      // normaliser is >= 1 (softmax) or >= m eps^2 (relu). NaN (an input's) stays NaN.
      const T den = nd[dim];
      norm_ptr[bh * p.query_len + start + r] = den;
      const T inverse = T(1) / den;
      for (int64_t c = 0; c < dim; ++c) rows[r * dim + c] = den == 0 ? T(0) : nd[c] * inverse;
    }
    cpu::store_rows(rows.data(), n, dim, out_ptr + ov.offset(b, h) + start * ov.row_stride, ov.row_stride);
  };

  // Non-causal keys of head (b, h) into its state, against the per-feature maxima of their logits
  // (running over the tiles; the state's rows are rescaled when theirs grows); the final maxima are saved.
  // column_sums: m elements of scratch, for the normaliser column of the state (tile_product_and_column).
  auto sum_keys = [&](Workspace<T>& w, std::vector<T>& feature_max, std::vector<T>& column_sums, int64_t bh, int64_t b,
                      int64_t h) {
    const auto map = p.feature_map(h);
    T* head_state = state_ptr + bh * m * (dim + 1);
    std::fill(head_state, head_state + m * (dim + 1), T(0));
    std::fill(feature_max.begin(), feature_max.end(), -std::numeric_limits<T>::infinity());
    bool have_state = false;
    for (int64_t start = 0; start < p.key_len; start += kTile) {
      const int64_t n = std::min(kTile, p.key_len - start);
      p.prefetch(b, h, start + kTile, kTile, true, false);
      key_logits(p, map, b, h, start, n, w, /*scaled_rows=*/false);
      if (std::all_of(w.k_dropped, w.k_dropped + n, [](bool dropped) { return dropped; })) continue;
      if (softmax) {
        std::vector<T> tile_max(feature_max);
        for (int64_t r = 0; r < n; ++r) {
          if (!w.k_dropped[r]) max_into(tile_max.data(), w.k_logits.data() + r * m, w.k_max[r], m);
        }
        if (have_state) decay_rows(head_state, m, dim, feature_max.data(), tile_max.data());
        feature_max.swap(tile_max);
      }
      std::fill(column_sums.begin(), column_sums.end(), T(0));
      map.key_phi(w.k_logits.data(), w.k_max.data(), n, feature_max.data(), w.k_dropped, w.k_phi.data(), nullptr,
                  {.sums = column_sums.data()});
      load_values_with_ones(p.values(b, h, start), p.vv.row_stride, n, dim, w.k_dropped, w.values.data());
      tile_product(w.bf16, true, false, m, dim, n, T(1), w.k_phi.data(), m, w.values.data(), dim + 1, have_state,
                   head_state, dim + 1);
      write_column(column_sums.data(), m, have_state, head_state + dim, dim + 1);
      have_state = true;
    }
    for (int64_t f = 0; f < m; ++f) {
      stab_ptr[bh * m + f] = softmax && feature_max[f] > -std::numeric_limits<T>::infinity() ? feature_max[f] : T(0);
    }
  };

  // Keys (and, when causal, the queries of the same sub-block) per (batch, head), in order.
  cpu::parallel_tasks(p.batch * p.heads, [&](const auto& claim) {
    Workspace<T> w(m, dim, p.bf16_products);
    std::vector<T> rows(kTile * dim), feature_max(m), column_sums(m);
    for (int64_t bh = claim(); bh >= 0; bh = claim()) {
      const int64_t b = bh / p.heads, h = bh % p.heads;
      if (!causal) {
        sum_keys(w, feature_max, column_sums, bh, b, h);
        continue;
      }
      forward_causal(p, b, h, w, stab_ptr, state_ptr + bh * m * (dim + 1),
                     [&](int64_t start, int64_t n) { write_outputs(w, bh, b, h, start, n, rows); });
    }
    release_products<T>();
  });
  if (causal) return {out, normaliser, key_stabiliser, state};

  const int64_t query_tiles = ceil_div(p.query_len, kTile);
  const at::Tensor state_pairs = p.bf16_products ? paired_operands(state) : at::Tensor();
  cpu::parallel_tasks(p.batch * p.heads * query_tiles, [&](const auto& claim) {
    Workspace<T> w(m, dim, p.bf16_products);
    std::vector<T> rows(kTile * dim), normaliser_column(m);
    for (int64_t task = claim(); task >= 0; task = claim()) {
      const int64_t bh = task / query_tiles, b = bh / p.heads, h = bh % p.heads;
      const int64_t start = (task % query_tiles) * kTile, n = std::min(kTile, p.query_len - start);
      const auto map = p.feature_map(h);
      const T* head_state = state_ptr + bh * m * (dim + 1);
      for (int64_t f = 0; f < m; ++f) normaliser_column[f] = head_state[f * (dim + 1) + dim];
      p.prefetch(b, h, start + kTile, kTile, false, true);
      if (holds_no_key(normaliser_column.data(), m, 1)) {
        // 0 whatever the queries hold: a NaN one would make its normaliser phi(q) . 0 NaN.
        std::fill(w.numden.begin(), w.numden.begin() + n * (dim + 1), T(0));
        write_outputs(w, bh, b, h, start, n, rows);
        continue;
      }
      // The normaliser column apart (see tile_product_and_column).
      query_features(p, map, b, h, start, n, w, stab_ptr + bh * m, w.narrowed(), /*scaled_rows=*/false,
                     {.dot_with = normaliser_column.data(), .dots = w.numden.data() + dim, .dots_stride = dim + 1});
      tile_product(w.bf16, false, false, n, dim, m, T(1), w.q_phi.data(), m, head_state, dim + 1, false,
                   w.numden.data(), dim + 1,
                   p.bf16_products ? state_pairs.data_ptr<c10::BFloat16>() + bh * (m + m % 2) * (dim + 1) : nullptr,
                   w.narrowed());
      write_outputs(w, bh, b, h, start, n, rows);
    }
    release_products<T>();
  });
  return {out, normaliser, key_stabiliser, state};
}

template <typename T>
at::Tensor projection_in(const at::Tensor& projection) {
  return projection.to(c10::CppTypeToScalarType<T>::value).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> performer_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& projection,
    std::string_view kernel, bool causal, const std::optional<at::Tensor>& key_padding_mask, double scale) {
  const at::Tensor q = with_blas_strides(q_in), k = with_blas_strides(k_in), v = with_blas_strides(v_in);
  check_qkv(q, k, v, /*grouped_kv=*/true);
  check_key_padding_mask(key_padding_mask, q, k.size(2));
  check_projection(projection, q);
  const bool softmax = is_softmax_kernel(kernel);
  TORCH_CHECK_VALUE(!causal || q.size(2) == k.size(2), "causal: expected Nq == Nk, got Nq=", q.size(2), " and Nk=",
                    k.size(2));
  TORCH_CHECK_VALUE(scale > 0, "scale: expected a positive value, got ", scale);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "performer_fwd", [&] {
    using T = at::opmath_type<scalar_t>;
    result = forward_impl<scalar_t>(q, k, v, projection_in<T>(projection), softmax, causal, key_padding_mask, scale);
  });
  return result;
}

// Non-causal backward. Queries: dphi_q = [dnum | dden] state^T and d state = sum phi_q^T [dnum | dden]
// (split over query tiles, then added). Keys: dv = phi_k d_num_state, dphi_k = [V | 1] d state^T.
// state_t: the saved state transposed per head ((D + 1) x m). With bf16 products, the state and its gradient
// are B operands rounded once per head (paired_operands). grad_k, grad_v: per query head, of type grad_t.
template <typename scalar_t, typename grad_t>
void backward_global(const Problem<scalar_t>& p, const scalar_t* go_ptr, const scalar_t* out_ptr, const HeadView& ov,
                     const HeadView& gov, const at::opmath_type<scalar_t>* norm_ptr,
                     const at::opmath_type<scalar_t>* stab_ptr, const at::Tensor& state_t,
                     at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v) {
  using T = at::opmath_type<scalar_t>;
  const int64_t m = p.features, dim = p.dim, bh_count = p.batch * p.heads;
  const int64_t query_tiles = ceil_div(p.query_len, kTile);
  const int64_t splits = cpu::query_splits(bh_count, query_tiles);
  const int64_t tiles_per_split = ceil_div(query_tiles, splits);
  at::Tensor partial = at::empty({bh_count, splits, m, dim + 1}, grad_q.options().dtype(c10::CppTypeToScalarType<T>::value));
  T* partial_ptr = partial.data_ptr<T>();
  const T* state_t_ptr = state_t.const_data_ptr<T>();
  // (D + 1) x m per head, and (D + 1) rounded up to even x m paired.
  const int64_t state_t_pairs_size = (dim + 1 + (dim + 1) % 2) * m, state_pairs_size = (m + m % 2) * (dim + 1);
  const at::Tensor state_t_pairs = p.bf16_products ? paired_operands(state_t) : at::Tensor();
  const auto pairs_of = [&](const at::Tensor& pairs, int64_t bh, int64_t size) -> const c10::BFloat16* {
    return p.bf16_products ? pairs.const_data_ptr<c10::BFloat16>() + bh * size : nullptr;
  };
  const HeadView gqv(grad_q), gkv(grad_k), gvv(grad_v);
  scalar_t* gq_ptr = grad_q.data_ptr<scalar_t>();
  grad_t *gk_ptr = grad_k.data_ptr<grad_t>(), *gv_ptr = grad_v.data_ptr<grad_t>();

  cpu::parallel_tasks(bh_count * splits, [&](const auto& claim) {
    Workspace<T> w(m, dim, p.bf16_products);
    std::vector<T> normaliser_grads(m);
    for (int64_t task = claim(); task >= 0; task = claim()) {
      const int64_t bh = task / splits, b = bh / p.heads, h = bh % p.heads;
      const auto map = p.feature_map(h);
      const T* head_state_t = state_t_ptr + bh * m * (dim + 1);
      T* grad_state = partial_ptr + task * m * (dim + 1);
      std::fill(grad_state, grad_state + m * (dim + 1), T(0));
      std::fill(normaliser_grads.begin(), normaliser_grads.end(), T(0));
      const int64_t first_tile = (task % splits) * tiles_per_split;
      const int64_t last_tile = std::min(query_tiles, first_tile + tiles_per_split);
      // The queries of a head without keys have no gradient, and give none to the state (whatever they hold).
      const bool no_key = holds_no_key(head_state_t + dim * m, m, 1);
      for (int64_t tile = first_tile; tile < last_tile; ++tile) {
        const int64_t start = tile * kTile, n = std::min(kTile, p.query_len - start);
        if (no_key) {
          std::fill(w.dx.begin(), w.dx.begin() + n * dim, T(0));
          cpu::store_rows(w.dx.data(), n, dim, gq_ptr + gqv.offset(b, h) + start * gqv.row_stride, gqv.row_stride);
          continue;
        }
        p.prefetch(b, h, start + kTile, kTile, false, true);
        prefetch_output_rows(go_ptr, out_ptr, ov, b, h, start + kTile, kTile, p.query_len, dim);
        output_grads(go_ptr + gov.offset(b, h) + start * gov.row_stride, out_ptr + ov.offset(b, h) + start * ov.row_stride,
                     ov.row_stride, norm_ptr + bh * p.query_len + start, n, dim,
                     w.grads.data(), w.q_dropped);
        // d state's normaliser column, phi_q^T dden, apart (see tile_product_and_column). Every query of a head
        // with keys sees them all (its normaliser is not 0, so output_grads drops no row).
        query_features(p, map, b, h, start, n, w, stab_ptr + bh * m, nullptr, /*scaled_rows=*/true,
                       {.sums = normaliser_grads.data(), .weights = w.grads.data() + dim, .weights_stride = dim + 1});
        tile_product(w.bf16, false, false, n, m, dim + 1, T(1), w.grads.data(), dim + 1, head_state_t, m, false,
                     w.dphi.data(), m, pairs_of(state_t_pairs, bh, state_t_pairs_size));
        map.backward(w.dphi.data(), w.q_phi.data(), w.q_logits.data(), w.qx.data(), n, w.q_dropped, w.dx.data(),
                     w.narrowed());
        cpu::store_rows(w.dx.data(), n, dim, gq_ptr + gqv.offset(b, h) + start * gqv.row_stride, gqv.row_stride);
        zero_dropped_rows(w.q_phi.data(), n, m, w.q_dropped);
        tile_product(w.bf16, true, false, m, dim, n, T(1), w.q_phi.data(), m, w.grads.data(), dim + 1, true, grad_state,
                     dim + 1);
      }
      write_column(normaliser_grads.data(), m, false, grad_state + dim, dim + 1);
    }
    release_products<T>();
  });
  const at::Tensor grad_state_all = cpu::sum_in_order(partial, 1);
  const at::Tensor grad_state_t_all = grad_state_all.transpose(-1, -2).contiguous();
  const T *gs_ptr = grad_state_all.data_ptr<T>(), *gs_t_ptr = grad_state_t_all.data_ptr<T>();
  const at::Tensor grad_state_pairs = p.bf16_products ? paired_operands(grad_state_all) : at::Tensor();
  const at::Tensor grad_state_t_pairs = p.bf16_products ? paired_operands(grad_state_t_all) : at::Tensor();

  const int64_t key_tiles = ceil_div(p.key_len, kTile);
  cpu::parallel_tasks(bh_count * key_tiles, [&](const auto& claim) {
    Workspace<T> w(m, dim, p.bf16_products);
    for (int64_t task = claim(); task >= 0; task = claim()) {
      const int64_t bh = task / key_tiles, b = bh / p.heads, h = bh % p.heads;
      const int64_t start = (task % key_tiles) * kTile, n = std::min(kTile, p.key_len - start);
      const auto map = p.feature_map(h);
      const T* grad_state = gs_ptr + bh * m * (dim + 1);
      p.prefetch(b, h, start + kTile, kTile, true, false);
      key_logits(p, map, b, h, start, n, w, /*scaled_rows=*/true);
      map.key_phi(w.k_logits.data(), w.k_max.data(), n, stab_ptr + bh * m, w.k_dropped, w.k_phi.data(), w.narrowed());
      load_values_with_ones(p.values(b, h, start), p.vv.row_stride, n, dim, w.k_dropped,
                            w.values.data());
      tile_product(w.bf16, false, false, n, dim, m, T(1), w.k_phi.data(), m, grad_state, dim + 1, false, w.dx.data(), dim,
                   pairs_of(grad_state_pairs, bh, state_pairs_size), w.narrowed());
      // A padded key's zero features times a NaN gradient of the state (a NaN query's) would be NaN.
      for (int64_t r = 0; r < n; ++r) {
        if (w.k_dropped[r]) std::fill(w.dx.begin() + r * dim, w.dx.begin() + (r + 1) * dim, T(0));
      }
      cpu::store_rows(w.dx.data(), n, dim, gv_ptr + gvv.offset(b, h) + start * gvv.row_stride, gvv.row_stride);
      tile_product(w.bf16, false, false, n, m, dim + 1, T(1), w.values.data(), dim + 1, gs_t_ptr + bh * m * (dim + 1), m,
                   false, w.dphi.data(), m, pairs_of(grad_state_t_pairs, bh, state_t_pairs_size));
      map.backward(w.dphi.data(), w.k_phi.data(), w.k_logits.data(), w.kx.data(), n, w.k_dropped, w.dx.data(),
                   w.narrowed());
      cpu::store_rows(w.dx.data(), n, dim, gk_ptr + gkv.offset(b, h) + start * gkv.row_stride, gkv.row_stride);
    }
    release_products<T>();
  });
}

// (B, H, N, D) per query head -> (B, Hkv, N, D): the sum over each group of H / Hkv heads, in head order.
at::Tensor sum_over_groups(const at::Tensor& per_head, int64_t kv_heads) {
  return cpu::sum_in_order(per_head.unflatten(1, {kv_heads, per_head.size(1) / kv_heads}), 2);
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& projection, const at::Tensor& out, const at::Tensor& normaliser, const at::Tensor& key_stabiliser,
    const at::Tensor& state, bool softmax, bool causal, const std::optional<at::Tensor>& key_padding_mask,
    double scale) {
  using T = at::opmath_type<scalar_t>;
  const Problem<scalar_t> p(q, k, v, projection, softmax, causal, key_padding_mask, scale);
  at::Tensor grad_q = new_output(q.sizes(), q.options());
  at::Tensor grad_k = new_output(k.sizes(), k.options());
  at::Tensor grad_v = new_output(v.sizes(), v.options());
  const at::Tensor norm_c = normaliser.contiguous(), stab_c = key_stabiliser.contiguous(), state_c = state.contiguous();
  const HeadView ov(out), gov(grad_out);
  const scalar_t *go_ptr = grad_out.data_ptr<scalar_t>(), *out_ptr = out.data_ptr<scalar_t>();
  const T *norm_ptr = norm_c.data_ptr<T>(), *stab_ptr = stab_c.data_ptr<T>();
  // The gradients of the keys and values that each query head sees, of type grad_t: with grouped-query
  // attention they go to (B, H, Nk, D) buffers in the accumulation type, summed over each group below.
  const auto run = [&](auto grad_type, at::Tensor& grad_k_heads, at::Tensor& grad_v_heads) {
    using grad_t = typename decltype(grad_type)::type;
    if (!causal) {
      // The state and its gradient transposed per head, so that every tile product is a plain one.
      const at::Tensor state_t = state_c.transpose(-1, -2).contiguous();
      backward_global<scalar_t, grad_t>(p, go_ptr, out_ptr, ov, gov, norm_ptr, stab_ptr, state_t, grad_q,
                                        grad_k_heads, grad_v_heads);
      return;
    }
    const HeadView gqv(grad_q), gkv(grad_k_heads), gvv(grad_v_heads);
    scalar_t* gq_ptr = grad_q.data_ptr<scalar_t>();
    grad_t *gk_ptr = grad_k_heads.data_ptr<grad_t>(), *gv_ptr = grad_v_heads.data_ptr<grad_t>();
    const int64_t bh_count = p.batch * p.heads;
    // With at least two heads per thread, a task is a head: its forward direction (dq), which records the
    // running maxima, then its reverse one (dk, dv), which reads them. With fewer, tasks [0, BH) take the
    // forward directions and [BH, 2 BH) the reverse ones, which find the maxima in a pass of their own.
    const bool whole_heads = bh_count >= 2 * static_cast<int64_t>(at::get_num_threads());
    cpu::parallel_tasks(whole_heads ? bh_count : 2 * bh_count, [&](const auto& claim) {
      Workspace<T> w(p.features, p.dim, p.bf16_products);
      std::vector<T> running(p.features * (p.dim + 1));
      std::vector<T> maxima(causal_maxima_size(p.key_len, p.features, p.softmax),
                            -std::numeric_limits<T>::infinity());
      for (int64_t task = claim(); task >= 0; task = claim()) {
        const int64_t bh = task % bh_count, b = bh / p.heads, h = bh % p.heads;
        if (whole_heads || task < bh_count) {
          backward_causal_queries(p, b, h, go_ptr, out_ptr, ov, gov, norm_ptr, gq_ptr, gqv, w, running,
                                  whole_heads ? maxima.data() : nullptr);
        }
        if (whole_heads || task >= bh_count) {
          backward_causal_keys(p, b, h, go_ptr, out_ptr, ov, gov, norm_ptr, gk_ptr, gkv, gv_ptr, gvv, w, running,
                               maxima, whole_heads);
        }
      }
      release_products<T>();
    });
  };
  if (p.heads_per_kv == 1) {
    run(std::type_identity<scalar_t>{}, grad_k, grad_v);
    return {grad_q, grad_k, grad_v};
  }
  const std::vector<int64_t> per_head_shape{p.batch, p.heads, p.key_len, p.dim};
  at::Tensor grad_k_heads = at::empty(per_head_shape, grad_q.options().dtype(c10::CppTypeToScalarType<T>::value));
  at::Tensor grad_v_heads = at::empty_like(grad_k_heads);
  run(std::type_identity<T>{}, grad_k_heads, grad_v_heads);
  grad_k.copy_(sum_over_groups(grad_k_heads, k.size(1)));
  grad_v.copy_(sum_over_groups(grad_v_heads, v.size(1)));
  return {grad_q, grad_k, grad_v};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> performer_bwd(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& projection, const at::Tensor& out_in, const at::Tensor& normaliser,
    const at::Tensor& key_stabiliser, const at::Tensor& state, std::string_view kernel, bool causal,
    const std::optional<at::Tensor>& key_padding_mask, double scale) {
  const at::Tensor grad_out = with_blas_strides(grad_out_in), out = with_blas_strides(out_in);
  const at::Tensor q = with_blas_strides(q_in), k = with_blas_strides(k_in), v = with_blas_strides(v_in);
  check_qkv(q, k, v, /*grouped_kv=*/true);
  check_key_padding_mask(key_padding_mask, q, k.size(2));
  check_projection(projection, q);
  const bool softmax = is_softmax_kernel(kernel);
  for (const auto& [name, t] : {std::pair{"grad_out", &grad_out}, std::pair{"out", &out}}) {
    TORCH_CHECK_VALUE(t->sizes() == q.sizes() && t->stride(3) == 1 && t->scalar_type() == q.scalar_type(), name,
                      ": expected shape ", q.sizes(), ", dtype ", q.scalar_type(), " and unit last stride, got ",
                      t->sizes(), ", ", t->scalar_type(), ", strides ", t->strides());
  }
  TORCH_CHECK_VALUE(grad_out.strides() == out.strides(), "grad_out: expected the strides of out ", out.strides(),
                    ", got ", grad_out.strides());
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::vector<int64_t> state_shape{q.size(0), q.size(1), projection.size(-2), q.size(3) + 1};
  TORCH_CHECK_VALUE(normaliser.sizes() == q.sizes().slice(0, 3) && normaliser.scalar_type() == acc,
                    "normaliser: expected shape ", q.sizes().slice(0, 3), " and dtype ", acc, ", got ",
                    normaliser.sizes(), " and ", normaliser.scalar_type());
  const std::vector<int64_t> stabiliser_shape{q.size(0), q.size(1), causal ? k.size(2) : projection.size(-2)};
  TORCH_CHECK_VALUE(key_stabiliser.sizes() == at::IntArrayRef(stabiliser_shape) && key_stabiliser.scalar_type() == acc,
                    "key_stabiliser: expected shape ", stabiliser_shape, " and dtype ", acc, ", got ",
                    key_stabiliser.sizes(), " and ", key_stabiliser.scalar_type());
  TORCH_CHECK_VALUE(state.sizes() == at::IntArrayRef(state_shape) && state.scalar_type() == acc,
                    "state: expected shape ", state_shape, " and dtype ", acc, ", got ", state.sizes(), " and ",
                    state.scalar_type());
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "performer_bwd", [&] {
    using T = at::opmath_type<scalar_t>;
    result = backward_impl<scalar_t>(grad_out, q, k, v, projection_in<T>(projection), out, normaliser, key_stabiliser,
                                     state, softmax, causal, key_padding_mask, scale);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("performer_fwd", &performer_fwd);
  m.impl("performer_bwd", &performer_bwd);
}

}  // namespace fastattn
