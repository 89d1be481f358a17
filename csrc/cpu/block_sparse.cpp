// Block-sparse (BigBird) attention on the CPU, forward and backward, FlashAttention-2 style.
//
// Forward: one work item per (batch, head, query block); an online softmax runs over the key blocks
// that the CSR lists for that row, so only per-tile scratch exists (scores bs x bs, accumulator bs x D).
// Backward recomputes the probabilities from the saved log-sum-exp: dQ per query block over its key
// blocks, dK and dV per key block over the query blocks of the transposed CSR. Each output tile is
// written by exactly one work item: no atomics, deterministic results.
//
// Tiles are multiplied with the BLAS that torch links (sgemm_/dgemm_, as ATen/native/CPUBlas.cpp
// declares them); bfloat16 tiles are converted to float32 first and accumulate in float32. The
// element-wise loops (masked softmax, dS) are plain loops written for the compiler to vectorise, cloned
// per x86 ISA level so that one binary uses AVX-512 or AVX2 where the CPU has it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"

extern "C" void sgemm_(char* transa, char* transb, int* m, int* n, int* k, float* alpha, const float* a, int* lda,
                       const float* b, int* ldb, float* beta, float* c, int* ldc);
extern "C" void dgemm_(char* transa, char* transb, int* m, int* n, int* k, double* alpha, const double* a, int* lda,
                       const double* b, int* ldb, double* beta, double* c, int* ldc);

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTATTN_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTATTN_ISA_CLONES
#endif

namespace fastattn {
namespace {

// Row-major C (m x n) = alpha * op(A) op(B) + beta * C through column-major BLAS: C^T = op(B)^T op(A)^T.
template <typename T>
void gemm_row_major(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                    int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  char op_b = transpose_b ? 'T' : 'N';
  char op_a = transpose_a ? 'T' : 'N';
  int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
  int lda_i = static_cast<int>(ldb), ldb_i = static_cast<int>(lda), ldc_i = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&op_b, &op_a, &mi, &ni, &ki, &alpha, b, &lda_i, a, &ldb_i, &beta, c, &ldc_i);
  } else {
    dgemm_(&op_b, &op_a, &mi, &ni, &ki, &alpha, b, &lda_i, a, &ldb_i, &beta, c, &ldc_i);
  }
}

// exp for float32 (Cephes' polynomial on the range-reduced argument), written without calls or
// branches so that loops over it vectorise; exact 0 for x below the smallest normal result (-inf included).
inline float exp_float(float x) {
  constexpr float kMin = -87.33654f, kMax = 88.0f;
  float clamped = std::min(std::max(x, kMin), kMax);
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  float n = (clamped * 1.44269504088896341f + kRound) - kRound;
  float r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float power;
  std::memcpy(&power, &bits, sizeof(power));
  return x < kMin ? 0.0f : p * power;
}

inline double exp_accum(double x) { return std::exp(x); }
inline float exp_accum(float x) { return exp_float(x); }

// row[j] = exp(row[j] - shift) for j < n; returns the sum of the new values.
template <typename T>
FASTATTN_ISA_CLONES T exp_shifted_sum(T* row, int64_t n, T shift) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    T e = exp_accum(row[j] - shift);
    row[j] = e;
    sum += e;
  }
  return sum;
}

template <typename T>
FASTATTN_ISA_CLONES T row_max(const T* row, int64_t n) {
  T result = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : result)
  for (int64_t j = 0; j < n; ++j) result = std::max(result, row[j]);
  return result;
}

template <typename T>
FASTATTN_ISA_CLONES void scale_row(T* row, int64_t n, T factor) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] *= factor;
}

// ds[j] = p[j] * (dp[j] - delta), in place in dp.
template <typename T>
FASTATTN_ISA_CLONES void softmax_grad_row(const T* p, T* dp, int64_t n, T delta) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}

template <typename scalar_t, typename accum_t>
FASTATTN_ISA_CLONES void convert_rows(const scalar_t* src, int64_t src_stride, accum_t* dst, int64_t dst_stride,
                                      int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* s = src + i * src_stride;
    accum_t* d = dst + i * dst_stride;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) d[j] = static_cast<accum_t>(s[j]);
  }
}

template <typename scalar_t, typename accum_t>
FASTATTN_ISA_CLONES void store_rows(const accum_t* src, int64_t src_stride, scalar_t* dst, int64_t dst_stride,
                                    int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    const accum_t* s = src + i * src_stride;
    scalar_t* d = dst + i * dst_stride;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) d[j] = static_cast<scalar_t>(s[j]);
  }
}

// A (rows x dim) tile of q, k, v, out or grad_out in the accumulation type: the tensor's own memory
// when the types agree (rows have the tensor's stride), else a converted copy in `scratch`.
template <typename scalar_t, typename accum_t>
struct Tile {
  const accum_t* data;
  int64_t stride;
};

template <typename scalar_t, typename accum_t>
Tile<scalar_t, accum_t> load_tile(const scalar_t* src, int64_t src_stride, int64_t rows, int64_t dim,
                                  accum_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, accum_t>) {
    return {src, src_stride};
  } else {
    convert_rows(src, src_stride, scratch, dim, rows, dim);
    return {scratch, dim};
  }
}

// The shapes, strides and pointers of one call; strides in elements, per (batch, head, row).
template <typename scalar_t>
struct Operand {
  const scalar_t* data;
  int64_t batch_stride, head_stride, row_stride;

  explicit Operand(const at::Tensor& t)
      : data(t.const_data_ptr<scalar_t>()), batch_stride(t.stride(0)), head_stride(t.stride(1)),
        row_stride(t.stride(2)) {}
  const scalar_t* rows(int64_t b, int64_t h, int64_t row) const {
    return data + b * batch_stride + h * head_stride + row * row_stride;
  }
};

struct Problem {
  int64_t batch, heads, query_len, key_len, dim, block;
  int64_t query_blocks, key_blocks, layout_heads;
  const int32_t *row_offsets, *col_indices, *col_offsets, *row_indices;
  int64_t row_offsets_stride, col_indices_stride, col_offsets_stride, row_indices_stride;
  bool causal;
  const bool* key_padding;  // (batch, key_len) or null
  double scale;

  int64_t layout_head(int64_t h) const { return layout_heads == 1 ? 0 : h; }
  int64_t query_rows(int64_t query_block) const { return std::min(block, query_len - query_block * block); }
  int64_t key_cols(int64_t key_block) const { return std::min(block, key_len - key_block * block); }
  // A causal pair of blocks where every key comes after every query contributes nothing.
  bool causally_empty(int64_t query_block, int64_t key_block) const {
    return causal && key_block * block > query_block * block + query_rows(query_block) - 1;
  }
};

// Sets to -inf the scores of padded keys and, on the causal diagonal, of keys after their query.
template <typename accum_t>
void mask_scores(const Problem& p, accum_t* scores, int64_t rows, int64_t cols, int64_t b, int64_t first_row,
                 int64_t first_col) {
  constexpr accum_t neg_inf = -std::numeric_limits<accum_t>::infinity();
  if (p.key_padding != nullptr) {
    const bool* padded = p.key_padding + b * p.key_len + first_col;
    for (int64_t j = 0; j < cols; ++j) {
      if (!padded[j]) continue;
      for (int64_t i = 0; i < rows; ++i) scores[i * p.block + j] = neg_inf;
    }
  }
  if (p.causal && first_col + cols - 1 > first_row) {
    for (int64_t i = 0; i < rows; ++i) {
      int64_t first_future = std::max<int64_t>(0, first_row + i + 1 - first_col);
      std::fill(scores + i * p.block + std::min(first_future, cols), scores + i * p.block + cols, neg_inf);
    }
  }
}

// Per-thread scratch, reused by every work item of a parallel_for chunk.
template <typename accum_t>
struct Scratch {
  std::vector<accum_t> buffer;
  explicit Scratch(int64_t size) : buffer(size) {}
  accum_t* at(int64_t offset) { return buffer.data() + offset; }
};

template <typename scalar_t>
void forward_kernel(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                    at::Tensor& lse) {
  using accum_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const Operand<scalar_t> q_op(q), k_op(k), v_op(v);
  scalar_t* out_data = out.data_ptr<scalar_t>();
  accum_t* lse_data = lse.data_ptr<accum_t>();
  const int64_t bs = p.block, dim = p.dim;
  const accum_t scale = static_cast<accum_t>(p.scale);
  const int64_t tile = bs * dim;

  at::parallel_for(0, p.batch * p.heads * p.query_blocks, 1, [&](int64_t begin, int64_t end) {
    // q, k, v tiles (bf16 only), scores, output accumulator, running max and sum.
    Scratch<accum_t> scratch(3 * tile + bs * bs + tile + 2 * bs);
    accum_t *q_buf = scratch.at(0), *k_buf = scratch.at(tile), *v_buf = scratch.at(2 * tile);
    accum_t* scores = scratch.at(3 * tile);
    accum_t* acc = scores + bs * bs;
    accum_t* run_max = acc + tile;
    accum_t* run_sum = run_max + bs;

    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % p.query_blocks;
      const int64_t h = (item / p.query_blocks) % p.heads;
      const int64_t b = item / (p.query_blocks * p.heads);
      const int64_t r0 = qb * bs, rows = p.query_rows(qb);
      const auto q_tile = load_tile(q_op.rows(b, h, r0), q_op.row_stride, rows, dim, q_buf);
      std::fill(acc, acc + rows * dim, accum_t(0));
      std::fill(run_max, run_max + rows, -std::numeric_limits<accum_t>::infinity());
      std::fill(run_sum, run_sum + rows, accum_t(0));

      const int64_t lh = p.layout_head(h);
      const int32_t* offsets = p.row_offsets + lh * p.row_offsets_stride;
      const int32_t* cols_of = p.col_indices + lh * p.col_indices_stride;
      for (int64_t idx = offsets[qb]; idx < offsets[qb + 1]; ++idx) {
        const int64_t kb = cols_of[idx];
        if (p.causally_empty(qb, kb)) continue;
        const int64_t c0 = kb * bs, cols = p.key_cols(kb);
        const auto k_tile = load_tile(k_op.rows(b, h, c0), k_op.row_stride, cols, dim, k_buf);
        const auto v_tile = load_tile(v_op.rows(b, h, c0), v_op.row_stride, cols, dim, v_buf);
        gemm_row_major<accum_t>(false, true, rows, cols, dim, scale, q_tile.data, q_tile.stride, k_tile.data,
                                k_tile.stride, 0, scores, bs);
        mask_scores(p, scores, rows, cols, b, r0, c0);
        for (int64_t i = 0; i < rows; ++i) {
          accum_t* row = scores + i * bs;
          const accum_t new_max = std::max(run_max[i], row_max(row, cols));
          if (new_max == -std::numeric_limits<accum_t>::infinity()) {
            std::fill(row, row + cols, accum_t(0));
            continue;
          }
          const accum_t row_sum = exp_shifted_sum(row, cols, new_max);
          const accum_t correction = exp_accum(run_max[i] - new_max);
          if (correction != accum_t(1)) scale_row(acc + i * dim, dim, correction);
          run_sum[i] = run_sum[i] * correction + row_sum;
          run_max[i] = new_max;
        }
        gemm_row_major<accum_t>(false, false, rows, dim, cols, 1, scores, bs, v_tile.data, v_tile.stride, 1, acc,
                                dim);
      }

      const int64_t out_row = (b * p.heads + h) * p.query_len + r0;
      for (int64_t i = 0; i < rows; ++i) {
        const bool sees_a_key = run_sum[i] > 0;
        scale_row(acc + i * dim, dim, sees_a_key ? accum_t(1) / run_sum[i] : accum_t(0));
        lse_data[out_row + i] =
            sees_a_key ? run_max[i] + std::log(run_sum[i]) : std::numeric_limits<accum_t>::infinity();
      }
      store_rows(acc, dim, out_data + out_row * dim, dim, rows, dim);
    }
  });
}

// P = exp(scale * Q K^T - lse) of one (query block, key block) pair, masked, into `probs` (ld = block).
template <typename accum_t>
void recompute_probs(const Problem& p, const accum_t* q, int64_t q_stride, const accum_t* k, int64_t k_stride,
                     const accum_t* lse, accum_t* probs, int64_t rows, int64_t cols, int64_t b, int64_t r0,
                     int64_t c0) {
  gemm_row_major<accum_t>(false, true, rows, cols, p.dim, static_cast<accum_t>(p.scale), q, q_stride, k, k_stride,
                          0, probs, p.block);
  mask_scores(p, probs, rows, cols, b, r0, c0);
  for (int64_t i = 0; i < rows; ++i) exp_shifted_sum(probs + i * p.block, cols, lse[i]);
}

// dS = P * (dO V^T - delta) of one pair, into `dp` (ld = block).
template <typename accum_t>
void softmax_grad(const Problem& p, const accum_t* grad_out, int64_t grad_out_stride, const accum_t* v,
                  int64_t v_stride, const accum_t* probs, const accum_t* delta, accum_t* dp, int64_t rows,
                  int64_t cols) {
  gemm_row_major<accum_t>(false, true, rows, cols, p.dim, 1, grad_out, grad_out_stride, v, v_stride, 0, dp, p.block);
  for (int64_t i = 0; i < rows; ++i) softmax_grad_row(probs + i * p.block, dp + i * p.block, cols, delta[i]);
}

template <typename scalar_t>
void backward_kernel(const Problem& p, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& grad_q,
                     at::Tensor& grad_k, at::Tensor& grad_v) {
  using accum_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const Operand<scalar_t> q_op(q), k_op(k), v_op(v), do_op(grad_out), o_op(out);
  const at::Tensor lse_contiguous = lse.contiguous();
  const accum_t* lse_data = lse_contiguous.const_data_ptr<accum_t>();
  const int64_t bs = p.block, dim = p.dim;
  const accum_t scale = static_cast<accum_t>(p.scale);
  const int64_t tile = bs * dim;
  const int64_t rows_total = p.batch * p.heads * p.query_len;

  // delta_i = rowsum(dO_i * O_i), the softmax-gradient correction of every query row.
  at::Tensor delta = at::empty({rows_total}, lse.options());
  accum_t* delta_data = delta.data_ptr<accum_t>();
  at::parallel_for(0, rows_total, 64, [&](int64_t begin, int64_t end) {
    std::vector<accum_t> do_row(dim), o_row(dim);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row % p.query_len, bh = row / p.query_len;
      const int64_t b = bh / p.heads, h = bh % p.heads;
      convert_rows(do_op.rows(b, h, n), 0, do_row.data(), 0, 1, dim);
      convert_rows(o_op.rows(b, h, n), 0, o_row.data(), 0, 1, dim);
      accum_t sum = 0;
      for (int64_t d = 0; d < dim; ++d) sum += do_row[d] * o_row[d];
      delta_data[row] = sum;
    }
  });

  scalar_t* grad_q_data = grad_q.data_ptr<scalar_t>();
  scalar_t* grad_k_data = grad_k.data_ptr<scalar_t>();
  scalar_t* grad_v_data = grad_v.data_ptr<scalar_t>();

  // dQ per query block, over the key blocks its row lists.
  at::parallel_for(0, p.batch * p.heads * p.query_blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch<accum_t> scratch(4 * tile + 2 * bs * bs + tile);
    accum_t *q_buf = scratch.at(0), *do_buf = scratch.at(tile), *k_buf = scratch.at(2 * tile),
            *v_buf = scratch.at(3 * tile);
    accum_t* probs = scratch.at(4 * tile);
    accum_t* dp = probs + bs * bs;
    accum_t* acc = dp + bs * bs;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % p.query_blocks;
      const int64_t h = (item / p.query_blocks) % p.heads;
      const int64_t b = item / (p.query_blocks * p.heads);
      const int64_t r0 = qb * bs, rows = p.query_rows(qb);
      const int64_t first_row = (b * p.heads + h) * p.query_len + r0;
      const auto q_tile = load_tile(q_op.rows(b, h, r0), q_op.row_stride, rows, dim, q_buf);
      const auto do_tile = load_tile(do_op.rows(b, h, r0), do_op.row_stride, rows, dim, do_buf);
      std::fill(acc, acc + rows * dim, accum_t(0));
      const int64_t lh = p.layout_head(h);
      const int32_t* offsets = p.row_offsets + lh * p.row_offsets_stride;
      const int32_t* cols_of = p.col_indices + lh * p.col_indices_stride;
      for (int64_t idx = offsets[qb]; idx < offsets[qb + 1]; ++idx) {
        const int64_t kb = cols_of[idx];
        if (p.causally_empty(qb, kb)) continue;
        const int64_t c0 = kb * bs, cols = p.key_cols(kb);
        const auto k_tile = load_tile(k_op.rows(b, h, c0), k_op.row_stride, cols, dim, k_buf);
        const auto v_tile = load_tile(v_op.rows(b, h, c0), v_op.row_stride, cols, dim, v_buf);
        recompute_probs(p, q_tile.data, q_tile.stride, k_tile.data, k_tile.stride, lse_data + first_row, probs, rows,
                        cols, b, r0, c0);
        softmax_grad(p, do_tile.data, do_tile.stride, v_tile.data, v_tile.stride, probs, delta_data + first_row, dp,
                     rows, cols);
        gemm_row_major<accum_t>(false, false, rows, dim, cols, scale, dp, bs, k_tile.data, k_tile.stride, 1, acc, dim);
      }
      store_rows(acc, dim, grad_q_data + first_row * dim, dim, rows, dim);
    }
  });

  // dK and dV per key block, over the query blocks that list it (the transposed CSR).
  at::parallel_for(0, p.batch * p.heads * p.key_blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch<accum_t> scratch(4 * tile + 2 * bs * bs + 2 * tile);
    accum_t *q_buf = scratch.at(0), *do_buf = scratch.at(tile), *k_buf = scratch.at(2 * tile),
            *v_buf = scratch.at(3 * tile);
    accum_t* probs = scratch.at(4 * tile);
    accum_t* dp = probs + bs * bs;
    accum_t* acc_k = dp + bs * bs;
    accum_t* acc_v = acc_k + tile;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t kb = item % p.key_blocks;
      const int64_t h = (item / p.key_blocks) % p.heads;
      const int64_t b = item / (p.key_blocks * p.heads);
      const int64_t c0 = kb * bs, cols = p.key_cols(kb);
      const auto k_tile = load_tile(k_op.rows(b, h, c0), k_op.row_stride, cols, dim, k_buf);
      const auto v_tile = load_tile(v_op.rows(b, h, c0), v_op.row_stride, cols, dim, v_buf);
      std::fill(acc_k, acc_k + 2 * tile, accum_t(0));
      const int64_t lh = p.layout_head(h);
      const int32_t* offsets = p.col_offsets + lh * p.col_offsets_stride;
      const int32_t* rows_of = p.row_indices + lh * p.row_indices_stride;
      for (int64_t idx = offsets[kb]; idx < offsets[kb + 1]; ++idx) {
        const int64_t qb = rows_of[idx];
        if (p.causally_empty(qb, kb)) continue;
        const int64_t r0 = qb * bs, rows = p.query_rows(qb);
        const int64_t first_row = (b * p.heads + h) * p.query_len + r0;
        const auto q_tile = load_tile(q_op.rows(b, h, r0), q_op.row_stride, rows, dim, q_buf);
        const auto do_tile = load_tile(do_op.rows(b, h, r0), do_op.row_stride, rows, dim, do_buf);
        recompute_probs(p, q_tile.data, q_tile.stride, k_tile.data, k_tile.stride, lse_data + first_row, probs, rows,
                        cols, b, r0, c0);
        gemm_row_major<accum_t>(true, false, cols, dim, rows, 1, probs, bs, do_tile.data, do_tile.stride, 1, acc_v,
                                dim);
        softmax_grad(p, do_tile.data, do_tile.stride, v_tile.data, v_tile.stride, probs, delta_data + first_row, dp,
                     rows, cols);
        gemm_row_major<accum_t>(true, false, cols, dim, rows, scale, dp, bs, q_tile.data, q_tile.stride, 1, acc_k,
                                dim);
      }
      const int64_t first_key = (b * p.heads + h) * p.key_len + c0;
      store_rows(acc_k, dim, grad_k_data + first_key * dim, dim, cols, dim);
      store_rows(acc_v, dim, grad_v_data + first_key * dim, dim, cols, dim);
    }
  });
}

// Offsets start at 0, never decrease and stay within the indices; indices lie in [0, index_bound).
void check_csr_values(const char* offsets_name, const at::Tensor& offsets, const char* indices_name,
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

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& row_offsets,
                     const at::Tensor& col_indices, const at::Tensor& col_offsets, const at::Tensor& row_indices,
                     int64_t block_size, bool causal, const std::optional<at::Tensor>& key_padding_mask,
                     double scale) {
  check_qkv(q, k, v);
  TORCH_CHECK_VALUE(q.device().is_cpu(), "q: expected a CPU tensor, got device ", q.device());
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble ||
                       q.scalar_type() == at::kBFloat16,
                   "q: expected dtype float32, float64 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK_VALUE(block_size >= 1, "block_size: expected a positive int, got ", block_size);
  const int64_t query_len = q.size(2), key_len = k.size(2), heads = q.size(1);
  TORCH_CHECK_VALUE(!causal || query_len == key_len, "causal: expected Nq == Nk, got Nq=", query_len,
                    " and Nk=", key_len);
  check_key_padding_mask(key_padding_mask, q, key_len);
  const int64_t query_blocks = ceil_div(query_len, block_size), key_blocks = ceil_div(key_len, block_size);
  check_csr("row_offsets", row_offsets, "col_indices", col_indices, heads, query_blocks, q);
  check_csr("col_offsets", col_offsets, "row_indices", row_indices, heads, key_blocks, q);
  TORCH_CHECK_VALUE(col_offsets.size(0) == row_offsets.size(0), "col_offsets: expected ", row_offsets.size(0),
                    " heads (as row_offsets), got ", col_offsets.size(0));
  check_csr_values("row_offsets", row_offsets, "col_indices", col_indices, key_blocks);
  check_csr_values("col_offsets", col_offsets, "row_indices", row_indices, query_blocks);
  TORCH_CHECK_VALUE(scale > 0 && std::isfinite(scale), "scale: expected a positive finite float, got ", scale);
  const int64_t max_tile_dim = std::numeric_limits<int>::max();
  TORCH_CHECK_VALUE(block_size * std::max<int64_t>(q.size(3), block_size) <= max_tile_dim &&
                        q.stride(2) <= max_tile_dim && k.stride(2) <= max_tile_dim && v.stride(2) <= max_tile_dim,
                    "block_size, q, k, v: tiles and row strides must fit 32-bit BLAS indices");

  Problem p{};
  p.batch = q.size(0);
  p.heads = heads;
  p.query_len = query_len;
  p.key_len = key_len;
  p.dim = q.size(3);
  p.block = block_size;
  p.query_blocks = query_blocks;
  p.key_blocks = key_blocks;
  p.layout_heads = row_offsets.size(0);
  p.row_offsets = row_offsets.const_data_ptr<int32_t>();
  p.col_indices = col_indices.const_data_ptr<int32_t>();
  p.col_offsets = col_offsets.const_data_ptr<int32_t>();
  p.row_indices = row_indices.const_data_ptr<int32_t>();
  p.row_offsets_stride = row_offsets.size(1);
  p.col_indices_stride = col_indices.size(1);
  p.col_offsets_stride = col_offsets.size(1);
  p.row_indices_stride = row_indices.size(1);
  p.causal = causal;
  p.key_padding = key_padding_mask.has_value() ? key_padding_mask->const_data_ptr<bool>() : nullptr;
  p.scale = scale;
  return p;
}

std::tuple<at::Tensor, at::Tensor> block_sparse_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& row_offsets, const at::Tensor& col_indices,
                                                        const at::Tensor& col_offsets, const at::Tensor& row_indices,
                                                        int64_t block_size, bool causal,
                                                        const std::optional<at::Tensor>& key_padding_mask,
                                                        double scale) {
  const Problem p = make_problem(q, k, v, row_offsets, col_indices, col_offsets, row_indices, block_size, causal,
                                 key_padding_mask, scale);
  at::Tensor out = new_output(q.sizes(), q.options());
  at::Tensor lse = new_output({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_dtype(q.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "block_sparse_fwd_cpu",
                                 [&] { forward_kernel<scalar_t>(p, q, k, v, out, lse); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& row_offsets, const at::Tensor& col_indices, const at::Tensor& col_offsets,
    const at::Tensor& row_indices, int64_t block_size, bool causal, const std::optional<at::Tensor>& key_padding_mask,
    double scale) {
  const Problem p = make_problem(q, k, v, row_offsets, col_indices, col_offsets, row_indices, block_size, causal,
                                 key_padding_mask, scale);
  for (const auto& [name, t] : {std::pair{"grad_out", &grad_out}, std::pair{"out", &out}}) {
    TORCH_CHECK_VALUE(t->sizes() == q.sizes(), name, ": expected the shape of q ", q.sizes(), ", got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), name, ": expected dtype ", q.scalar_type(), ", got ",
                     t->scalar_type());
    TORCH_CHECK_VALUE(t->stride(3) == 1, name, ": expected unit stride in the last dim, got strides ", t->strides());
  }
  TORCH_CHECK_VALUE(lse.sizes() == q.sizes().slice(0, 3), "lse: expected shape ", q.sizes().slice(0, 3), ", got ",
                    lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == lse_dtype(q.scalar_type()), "lse: expected dtype ",
                   lse_dtype(q.scalar_type()), ", got ", lse.scalar_type());
  at::Tensor grad_q = new_output(q.sizes(), q.options());
  at::Tensor grad_k = new_output(k.sizes(), k.options());
  at::Tensor grad_v = new_output(v.sizes(), v.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "block_sparse_bwd_cpu", [&] {
    backward_kernel<scalar_t>(p, grad_out, q, k, v, out, lse, grad_q, grad_k, grad_v);
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("block_sparse_fwd", &block_sparse_fwd_cpu);
  m.impl("block_sparse_bwd", &block_sparse_bwd_cpu);
}

}  // namespace fastattn
