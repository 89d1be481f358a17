// Tile helpers of the CPU kernels that work on small dense tiles (Linformer, Performer): row-major GEMM
// through BLAS and through oneDNN's small-matrix kernels, transposes, an exp the compiler can vectorise, and loads/stores that convert between the
// input dtype and the accumulation type (float, or double for double inputs).
#pragma once

// Floating-point compares and conversions may then be reordered as if they raised no exception, which
// lets GCC vectorise the loops over exp_approx. Results are unchanged: this is not -ffast-math, and
// PyTorch itself is built with -fno-trapping-math. Include this header first.
#pragma GCC optimize("no-trapping-math")

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace fastattn::cpu {

// The Fortran BLAS of the MKL (or other BLAS) that libtorch_cpu links and exports. ATen's own
// cpublas::gemm overloads for float and double are not exported to extensions.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

// Row-major C (m x n) = alpha * op(A) op(B) + beta * C, with op(A) (m x k) and op(B) (k x n). BLAS is
// column-major, so it computes the transpose: C^T = op(B)^T op(A)^T. Called inside at::parallel_for, where
// the BLAS runs on the calling thread. With beta == 0, C is not read.
template <typename T>
inline void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                 int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const char op_b = transpose_b ? 'T' : 'N', op_a = transpose_a ? 'T' : 'N';
  const int rows = static_cast<int>(n), cols = static_cast<int>(m), inner = static_cast<int>(k);
  const int ld_b = static_cast<int>(ldb), ld_a = static_cast<int>(lda), ld_c = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&op_b, &op_a, &rows, &cols, &inner, &alpha, b, &ld_b, a, &ld_a, &beta, c, &ld_c);
  } else {
    static_assert(std::is_same_v<T, double>, "gemm: float or double");
    dgemm_(&op_b, &op_a, &rows, &cols, &inner, &alpha, b, &ld_b, a, &ld_a, &beta, c, &ld_c);
  }
}

// Row-major C (m x n) = A (m x k) B (k x n), added to C when `accumulate` (else C is not read). Float tiles
// go to oneDNN's small-matrix (batch-reduce GEMM) kernels through at::native::cpublas::brgemm, which on
// tiles of 64 to 256 rows and columns run several times faster than BLAS calls; a thread that used them
// calls release_products() when its work is done. Double (for gradcheck) goes to dgemm_.
inline void product(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                    float* c, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/false);
}

inline void product(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b, int64_t ldb,
                    double* c, int64_t ldc, bool accumulate) {
  gemm(false, false, m, n, k, 1.0, a, lda, b, ldb, accumulate ? 1.0 : 0.0, c, ldc);
}

inline void release_products() { at::native::cpublas::brgemm_release(/*is_vnni=*/false); }

// dst (cols x rows, leading dimension dst_ld) = multiplier * src^T, src (rows x cols, leading dimension
// src_ld), converting between the input dtype and the accumulation type. Walks 16 x 16 blocks so that
// both sides stay in cache lines already loaded.
template <typename In, typename Out, typename T>
inline void transpose(const In* src, int64_t src_ld, int64_t rows, int64_t cols, T multiplier, Out* dst,
                      int64_t dst_ld) {
  constexpr int64_t kBlock = 16;
  for (int64_t row_block = 0; row_block < rows; row_block += kBlock) {
    const int64_t row_end = std::min(rows, row_block + kBlock);
    for (int64_t col_block = 0; col_block < cols; col_block += kBlock) {
      const int64_t col_end = std::min(cols, col_block + kBlock);
      for (int64_t c = col_block; c < col_end; ++c) {
        for (int64_t r = row_block; r < row_end; ++r) {
          dst[c * dst_ld + r] = static_cast<Out>(static_cast<T>(src[r * src_ld + c]) * multiplier);
        }
      }
    }
  }
}

// exp(x) within about 1 ulp for x <= 88 (callers pass x <= 0), written without calls or branches so that the
// compiler vectorises loops over it (std::exp does not vectorise without -ffast-math). Below the smallest
// normal result (-inf included) it is exactly 0, as std::exp underflows: a clamped tiny value instead would
// weigh every far-below-the-maximum feature or score by it and, summed over many, swamp the true weights.
// NaN stays NaN.
inline float exp_approx(float x) {
  constexpr float kMin = -87.33654f;  // log of the smallest normal float
  const float clamped = x < kMin ? kMin : x;
  // Adding 1.5 * 2^23 rounds to the nearest integer in the default rounding mode.
  const float shifter = 12582912.0f;
  const float n = (clamped * 1.44269504088896341f + shifter) - shifter;
  const float r = (clamped - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float power;
  std::memcpy(&power, &bits, sizeof(power));
  return x < kMin ? 0.0f : p * power;
}

inline float exp_acc(float x) { return exp_approx(x); }
inline double exp_acc(double x) { return std::exp(x); }

// out[i] = exp(in[i] - shift) for a row (in may be out). On x86-64 the float loop is compiled for AVX-512,
// AVX2 and the baseline, and the loader picks the widest the CPU has (the extension is built without -mavx).
#if defined(__x86_64__) && defined(__GNUC__)
#define FASTATTN_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTATTN_VECTOR_CLONES
#endif
namespace {
[[maybe_unused]] FASTATTN_VECTOR_CLONES void exp_shifted(const float* in, float* out, int64_t n, float shift) {
  for (int64_t i = 0; i < n; ++i) out[i] = exp_approx(in[i] - shift);
}
[[maybe_unused]] void exp_shifted(const double* in, double* out, int64_t n, double shift) {
  for (int64_t i = 0; i < n; ++i) out[i] = std::exp(in[i] - shift);
}
}  // namespace

// Sum and maximum with eight independent partial results, so that the compiler vectorises them (a plain
// loop fixes the order of the float operations and stays scalar).
template <typename T>
inline T sum_of(const T* x, int64_t n) {
  T partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) partial[l] += x[i + l];
  }
  T total = 0;
  for (; i < n; ++i) total += x[i];
  for (int l = 0; l < 8; ++l) total += partial[l];
  return total;
}

template <typename T>
inline T max_of(const T* x, int64_t n) {
  T partial[8];
  std::fill(partial, partial + 8, -std::numeric_limits<T>::infinity());
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) partial[l] = x[i + l] > partial[l] ? x[i + l] : partial[l];
  }
  T result = -std::numeric_limits<T>::infinity();
  for (; i < n; ++i) result = x[i] > result ? x[i] : result;
  for (int l = 0; l < 8; ++l) result = partial[l] > result ? partial[l] : result;
  return result;
}

// bfloat16 <-> float rows as integer operations the compiler vectorises (c10's conversions are scalar
// calls here), bit for bit the same as c10: widening shifts the bits up, narrowing rounds to nearest even
// and turns NaN into the quiet NaN 0x7FC0.
namespace {
[[maybe_unused]] FASTATTN_VECTOR_CLONES void widen_row(const uint16_t* in, float* out, int64_t n, float multiplier) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(in[i]) << 16;
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    out[i] = value * multiplier;
  }
}
[[maybe_unused]] FASTATTN_VECTOR_CLONES void narrow_row(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &in[i], sizeof(bits));
    const uint32_t rounding_bias = ((bits >> 16) & 1u) + 0x7FFFu;
    const uint16_t rounded = static_cast<uint16_t>((bits + rounding_bias) >> 16);
    out[i] = in[i] != in[i] ? uint16_t{0x7FC0} : rounded;
  }
}
}  // namespace

// rows x cols from a strided source (unit stride along a row) into a contiguous buffer, times multiplier.
template <typename scalar_t, typename T>
inline void load_rows(const scalar_t* src, int64_t row_stride, int64_t rows, int64_t cols, T multiplier, T* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* in = src + r * row_stride;
    T* out = dst + r * cols;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<T, float>) {
      widen_row(reinterpret_cast<const uint16_t*>(in), out, cols, multiplier);
    } else {
      for (int64_t c = 0; c < cols; ++c) out[c] = static_cast<T>(in[c]) * multiplier;
    }
  }
}

template <typename scalar_t, typename T>
inline void store_rows(const T* src, int64_t rows, int64_t cols, scalar_t* dst, int64_t row_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* in = src + r * cols;
    scalar_t* out = dst + r * row_stride;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<T, float>) {
      narrow_row(in, reinterpret_cast<uint16_t*>(out), cols);
    } else {
      for (int64_t c = 0; c < cols; ++c) out[c] = static_cast<scalar_t>(in[c]);
    }
  }
}

// Runs tasks [0, count) on at::parallel_for's threads, each thread taking the next task when it is done
// with one: run(claim) is called once per thread (to set up its buffers) and loops on claim(), which
// returns the next task or -1. A static split (at::parallel_for's own) waits for its slowest thread,
// which on a shared machine is often one the OS has descheduled. Inside a parallel region the calling
// thread runs every task.
template <typename Run>
inline void parallel_tasks(int64_t count, const Run& run) {
  std::atomic<int64_t> next{0};
  const auto claim = [&]() -> int64_t {
    const int64_t task = next.fetch_add(1);
    return task < count ? task : -1;
  };
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { run(claim); });
}

// Strides of a (B, H, N, D) tensor with unit stride in D, and the start of head (b, h).
struct HeadView {
  int64_t batch_stride, head_stride, row_stride;
  explicit HeadView(const at::Tensor& t) : batch_stride(t.stride(0)), head_stride(t.stride(1)), row_stride(t.stride(2)) {}
  int64_t offset(int64_t b, int64_t h) const { return b * batch_stride + h * head_stride; }
};

// The accumulation dtype of the CPU kernels: double for double inputs, float otherwise.
inline at::ScalarType acc_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace fastattn::cpu
