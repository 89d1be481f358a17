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
#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

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

// Row-major C (m x n) = A (m x k) B (k x n) in bfloat16 with float32 accumulation, added to C when
// `accumulate`: oneDNN's brgemm with AVX512-BF16 (vdpbf16ps) or AMX (tdpbf16ps) instructions. B is in the
// pair-interleaved (VNNI) layout those instructions read, element (r, c) at b[(r / 2) * 2 * ldb + 2 * c + r % 2]
// (see pair_rows and pair_columns); an odd k reads a zero pad row of B. Use only where bf16_products() holds.
inline void product(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b_pairs,
                    int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b_pairs, c, /*is_vnni=*/true);
}

inline void release_products() {
  at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  at::native::cpublas::brgemm_release(/*is_vnni=*/true);
}

// Whether bfloat16 inputs are multiplied in bfloat16 (product above) rather than converted to float32
// first: where the CPU has bfloat16 dot-product units (AVX512-BF16 or AMX) and oneDNN is enabled (torch's
// brgemm needs it). Elsewhere bf16 products would be emulated, slower than float32 ones. The environment
// variable FASTATTN_CPU_BF16_PRODUCTS=0 forces the float32 path (read per call, so tests can switch it).
inline bool bf16_products() {
  static const bool capable = [] {
    const auto capabilities = at::cpu::get_cpu_capabilities();
    const auto has = [&](const char* name) {
      const auto found = capabilities.find(name);
      return found != capabilities.end() && found->second.isBool() && found->second.toBool();
    };
    return has("avx512_bf16") || has("amx_bf16");
  }();
  const char* setting = std::getenv("FASTATTN_CPU_BF16_PRODUCTS");
  const bool forced_off = setting != nullptr && setting[0] == '0';
  return capable && !forced_off && at::globalContext().userEnabledMkldnn();
}

// The pair-interleaved B operand of src^T (src: rows x cols bfloat16, leading dimension src_ld, cols even):
// dst[(c / 2) * 2 * dst_ld + 2 * r + c % 2] = src[r][c]. The pairs of src's rows are moved whole, as
// 32-bit words, so this is a transpose of a (rows x cols / 2) matrix of words.
inline void pair_columns(const c10::BFloat16* src, int64_t src_ld, int64_t rows, int64_t cols, c10::BFloat16* dst,
                         int64_t dst_ld) {
  TORCH_INTERNAL_ASSERT(cols % 2 == 0 && src_ld % 2 == 0 && dst_ld >= rows);
  uint32_t word;
  static_assert(sizeof(word) == 2 * sizeof(c10::BFloat16));
  constexpr int64_t kBlock = 16;
  const int64_t words = cols / 2;
  for (int64_t row_block = 0; row_block < rows; row_block += kBlock) {
    const int64_t row_end = std::min(rows, row_block + kBlock);
    for (int64_t word_block = 0; word_block < words; word_block += kBlock) {
      const int64_t word_end = std::min(words, word_block + kBlock);
      for (int64_t w = word_block; w < word_end; ++w) {
        for (int64_t r = row_block; r < row_end; ++r) {
          std::memcpy(&word, src + r * src_ld + 2 * w, sizeof(word));
          std::memcpy(dst + w * 2 * dst_ld + 2 * r, &word, sizeof(word));
        }
      }
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// See FASTATTN_BF16_PRODUCTS_TARGET's section (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FASTATTN_AVX512_TARGET __attribute__((target("avx512f")))

// The mask of the first `count` of 16 lanes (none when count <= 0).
FASTATTN_AVX512_TARGET inline __mmask16 first_lanes(int64_t count) {
  if (count <= 0) return 0;
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1);
}

// 16 x 16 floats transposed in registers: block[r] holds row r on entry and column r on return (pairs of
// 32-bit lanes, then 64-bit ones, then 128-bit quarters).
FASTATTN_AVX512_TARGET inline void transpose_16x16(__m512* block) {
  __m512 half[16];
  for (int i = 0; i < 8; ++i) {
    half[2 * i] = _mm512_unpacklo_ps(block[2 * i], block[2 * i + 1]);
    half[2 * i + 1] = _mm512_unpackhi_ps(block[2 * i], block[2 * i + 1]);
  }
  // quarters[4 i + c], quarter q: column 4 q + c of rows 4 i .. 4 i + 3.
  __m512 quarters[16];
  for (int i = 0; i < 4; ++i) {
    const __m512d a0 = _mm512_castps_pd(half[4 * i]), a1 = _mm512_castps_pd(half[4 * i + 1]);
    const __m512d a2 = _mm512_castps_pd(half[4 * i + 2]), a3 = _mm512_castps_pd(half[4 * i + 3]);
    quarters[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
    quarters[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
    quarters[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
    quarters[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 low01 = _mm512_shuffle_f32x4(quarters[c], quarters[4 + c], 0x44);
    const __m512 high01 = _mm512_shuffle_f32x4(quarters[c], quarters[4 + c], 0xEE);
    const __m512 low23 = _mm512_shuffle_f32x4(quarters[8 + c], quarters[12 + c], 0x44);
    const __m512 high23 = _mm512_shuffle_f32x4(quarters[8 + c], quarters[12 + c], 0xEE);
    block[c] = _mm512_shuffle_f32x4(low01, low23, 0x88);
    block[4 + c] = _mm512_shuffle_f32x4(low01, low23, 0xDD);
    block[8 + c] = _mm512_shuffle_f32x4(high01, high23, 0x88);
    block[12 + c] = _mm512_shuffle_f32x4(high01, high23, 0xDD);
  }
}

// Loads rows r0 .. r0 + 15 (those below `rows`; zeros after) of columns c0 .. c0 + 15 (those below `cols`)
// into block, times multiplier, and transposes them.
FASTATTN_AVX512_TARGET inline void load_transposed_16x16(const float* src, int64_t src_ld, int64_t rows, int64_t cols,
                                                         int64_t r0, int64_t c0, float multiplier, __m512* block) {
  const __mmask16 columns = first_lanes(cols - c0);
  const __m512 scale = _mm512_set1_ps(multiplier);
  for (int64_t r = 0; r < 16; ++r) {
    block[r] = r0 + r < rows ? _mm512_mul_ps(scale, _mm512_maskz_loadu_ps(columns, src + (r0 + r) * src_ld + c0))
                             : _mm512_setzero_ps();
  }
  transpose_16x16(block);
}

// transpose() of float to float, in blocks of 16 x 16 moved through registers; multiplier * x rounds once,
// as there. Selected at load time where the CPU has AVX-512.
FASTATTN_AVX512_TARGET inline void transpose_floats(const float* src, int64_t src_ld, int64_t rows, int64_t cols,
                                                    float multiplier, float* dst, int64_t dst_ld) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const __mmask16 out_lanes = first_lanes(rows - r0);
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      __m512 block[16];
      load_transposed_16x16(src, src_ld, rows, cols, r0, c0, multiplier, block);
      for (int64_t c = 0; c < 16 && c0 + c < cols; ++c) {
        _mm512_mask_storeu_ps(dst + (c0 + c) * dst_ld + r0, out_lanes, block[c]);
      }
    }
  }
}
#pragma GCC diagnostic pop
#endif

// dst (cols x rows, leading dimension dst_ld) = multiplier * src^T, src (rows x cols, leading dimension
// src_ld), converting between the input dtype and the accumulation type. Walks 16 x 16 blocks so that
// both sides stay in cache lines already loaded.
template <typename In, typename Out, typename T>
inline void transpose(const In* src, int64_t src_ld, int64_t rows, int64_t cols, T multiplier, Out* dst,
                      int64_t dst_ld) {
  const auto transpose_as = [&](const auto& convert) {
    constexpr int64_t kBlock = 16;
    for (int64_t row_block = 0; row_block < rows; row_block += kBlock) {
      const int64_t row_end = std::min(rows, row_block + kBlock);
      for (int64_t col_block = 0; col_block < cols; col_block += kBlock) {
        const int64_t col_end = std::min(cols, col_block + kBlock);
        for (int64_t c = col_block; c < col_end; ++c) {
          for (int64_t r = row_block; r < row_end; ++r) dst[c * dst_ld + r] = convert(src[r * src_ld + c]);
        }
      }
    }
  };
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<In, float> && std::is_same_v<Out, float> && std::is_same_v<T, float>) {
    static const bool has_avx512 = __builtin_cpu_supports("avx512f");
    if (has_avx512) return transpose_floats(src, src_ld, rows, cols, multiplier, dst, dst_ld);
  }
#endif
  // Without a multiplier, elements of the same type move as they are (bfloat16 ones without a round trip
  // through float, which costs several times the move).
  if constexpr (std::is_same_v<In, Out>) {
    if (multiplier == T(1)) return transpose_as([](In x) { return x; });
  }
  transpose_as([multiplier](In x) { return static_cast<Out>(static_cast<T>(x) * multiplier); });
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

namespace {
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
// max_of for float rows, with sixteen partial results compiled per ISA level (GCC leaves the template's
// loop scalar). NaN is skipped as there.
[[maybe_unused]] FASTATTN_VECTOR_CLONES float max_of(const float* x, int64_t n) {
  constexpr int64_t kLanes = 16;
  float partial[kLanes];
  std::fill(partial, partial + kLanes, -std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) partial[l] = x[i + l] > partial[l] ? x[i + l] : partial[l];
  }
  float result = -std::numeric_limits<float>::infinity();
  for (; i < n; ++i) result = x[i] > result ? x[i] : result;
  for (int64_t l = 0; l < kLanes; ++l) result = partial[l] > result ? partial[l] : result;
  return result;
}
}  // namespace

// bfloat16 <-> float rows as integer operations the compiler vectorises (c10's conversions are scalar
// calls here), bit for bit the same as c10: widening shifts the bits up, narrowing rounds to nearest even
// and turns NaN into the quiet NaN 0x7FC0.
namespace {
inline float widen(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof(value));
  return value;
}
[[maybe_unused]] FASTATTN_VECTOR_CLONES void widen_row(const uint16_t* in, float* out, int64_t n, float multiplier) {
  for (int64_t i = 0; i < n; ++i) out[i] = widen(in[i]) * multiplier;
}
inline uint16_t narrow(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t rounding_bias = ((bits >> 16) & 1u) + 0x7FFFu;
  const uint16_t rounded = static_cast<uint16_t>((bits + rounding_bias) >> 16);
  return value != value ? uint16_t{0x7FC0} : rounded;
}
[[maybe_unused]] FASTATTN_VECTOR_CLONES void narrow_row(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = narrow(in[i]);
}
// narrow_row for the A operands of bf16 products, which run only where the CPU has AVX512-BF16
// (bf16_products()): its conversion instruction rounds to nearest even as narrow does, but flushes denormal
// inputs to zero (and keeps a NaN's payload), differences that do not matter in an operand of a product.
#if defined(__x86_64__) && defined(__GNUC__)
[[maybe_unused]] __attribute__((target("avx512f,avx512bf16"))) void narrow_operand_row(const float* in, uint16_t* out,
                                                                                     int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512bh pairs = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(in + i + 16), _mm512_loadu_ps(in + i));
    _mm512_storeu_si512(out + i, reinterpret_cast<const __m512i&>(pairs));
  }
  for (; i < n; ++i) out[i] = narrow(in[i]);
}
#else
[[maybe_unused]] void narrow_operand_row(const float* in, uint16_t* out, int64_t n) { narrow_row(in, out, n); }
#endif
// out[i] = the pair (first[i], second[i]) narrowed, first in the low half (pair_rows' layout).
[[maybe_unused]] FASTATTN_VECTOR_CLONES void narrow_pair_rows(const float* first, const float* second, uint32_t* out,
                                                               int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = narrow(first[i]) | static_cast<uint32_t>(narrow(second[i])) << 16;
}
// narrow_pair_rows for rows that are bfloat16 already (their bits).
[[maybe_unused]] FASTATTN_VECTOR_CLONES void interleave_pair_rows(const uint16_t* first, const uint16_t* second,
                                                                   uint32_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = first[i] | static_cast<uint32_t>(second[i]) << 16;
}

// out[i] = exp(in[i] - shift) for a row (in may be out); returns their sum, as sum_of would add them.
template <typename T>
T exp_shifted_sum(const T* in, T* out, int64_t n, T shift) {
  exp_shifted(in, out, n, shift);
  return sum_of(out, n);
}
}  // namespace

// The probabilities of softmax rows for bf16 products. These run only where the CPU has AVX512-BF16
// (bf16_products()), so on x86 they are written with its intrinsics: compilers vectorise neither the
// rounding instruction nor a row's sum well, and rows are short (a block of 64 keys). Their exp is within
// 7e-6 relative error (a degree-4 polynomial after vreduceps' range reduction), cheaper than
// exp_approx and far below the 2^-9 to which the products round the probabilities; it is
// exactly 1 at 0 (a saturated softmax's probability) and exactly 0 below the smallest normal result, and
// NaN stays NaN. Rounding to bfloat16 flushes denormal results to zero (see narrow_operand_row).
namespace {
#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12's AVX-512 intrinsics leave the pass-through operand of their unmasked forms uninitialised on
// purpose, which -Wall reports once they are inlined here (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FASTATTN_BF16_PRODUCTS_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

FASTATTN_BF16_PRODUCTS_TARGET inline __m512 exp_coarse(__m512 x) {
  // exp(x) = 2^t, t = x log2(e) = n + f with n = round(t) and f = t - n in [-1/2, 1/2] (vreduceps, exact). min
  // returns its second operand when one is NaN: x, so that NaN goes through.
  const __m512 t = _mm512_mul_ps(_mm512_min_ps(_mm512_set1_ps(88.0f), x), _mm512_set1_ps(1.44269504088896341f));
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEAREST_INT);
  const __m512 n = _mm512_sub_ps(t, f);
  // 2^f, a degree-4 polynomial fitted to its relative error on [-1/2, 1/2] (2.9e-6), exactly 1 at 0.
  __m512 p = _mm512_set1_ps(0.009585633873939514f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05590590462088585f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402404099702835f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931242942810059f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  // p * 2^n in one instruction, exact as a product by a power of two is, but for a denormal result (x within a
  // rounding of the cut-off below); 0 below the smallest normal result, which also takes -inf (whose f is NaN).
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_LT_OQ);
  return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~underflow), p, n);
}

// probs[j] = exp(scale * (row[j] - max)) rounded to bfloat16, for j < n; returns the sum of the unrounded
// values. Scaling after the subtraction cannot be contracted into one fused multiply-add with it, whose
// unrounded product would make the maximum's own probability differ from exactly 1.
[[maybe_unused]] FASTATTN_BF16_PRODUCTS_TARGET float exp_scaled_sum_bf16(const float* row, int64_t n, float scale,
                                                                         float max, uint16_t* probs) {
  const __m512 scales = _mm512_set1_ps(scale), maxima = _mm512_set1_ps(max);
  __m512 sums = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = first_lanes(n - j);
    const __m512 e = exp_coarse(_mm512_mul_ps(scales, _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, row + j), maxima)));
    sums = _mm512_mask_add_ps(sums, lanes, sums, e);
    _mm256_mask_storeu_epi16(probs + j, lanes, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(e)));
  }
  return _mm512_reduce_add_ps(sums);
}

// row[j] = exp(scale * row[j] - shift_j) for j < n, with shift_j = shifts[j] (shift_per_element) or shifts[0],
// and the results rounded to bfloat16 into probs[j] where probs is not null. scale * row[j] is rounded before
// the subtraction (an intrinsic with a rounding mode, which the compiler does not contract into a fused
// multiply-add), as the forward rounds scale * max: a saturated softmax's probability is then exactly 1.
[[maybe_unused]] FASTATTN_BF16_PRODUCTS_TARGET void exp_shifted_bf16(float* row, int64_t n, float scale,
                                                                     const float* shifts, bool shift_per_element,
                                                                     uint16_t* probs) {
  const __m512 scales = _mm512_set1_ps(scale), shift = _mm512_set1_ps(shifts[0]);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = first_lanes(n - j);
    const __m512 shift_j = shift_per_element ? _mm512_maskz_loadu_ps(lanes, shifts + j) : shift;
    const __m512 scaled = _mm512_mul_round_ps(scales, _mm512_maskz_loadu_ps(lanes, row + j), _MM_FROUND_CUR_DIRECTION);
    const __m512 e = exp_coarse(_mm512_sub_ps(scaled, shift_j));
    _mm512_mask_storeu_ps(row + j, lanes, e);
    if (probs != nullptr) _mm256_mask_storeu_epi16(probs + j, lanes, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(e)));
  }
}

// out[j] = exp((in[j] - offset) - shifts[j]) for j < n (shifts null: exp(in[j] - offset)), and, where operand is not
// null, the results rounded into operand[j] as narrow_operand_row does, with a zero pad when n is odd: a row of
// Performer features and their bf16 operand row in one pass, with exp_coarse's exp. In the same pass, where
// given: sums[j] += weight * out[j], and the sum of out[j] * dot_with[j], which it returns (else 0).
[[maybe_unused]] FASTATTN_BF16_PRODUCTS_TARGET float exp_of_difference_bf16(const float* in, float offset,
                                                                            const float* shifts, float* out,
                                                                            uint16_t* operand, int64_t n,
                                                                            const float* dot_with = nullptr,
                                                                            float* sums = nullptr, float weight = 1.0f) {
  const __m512 offsets = _mm512_set1_ps(offset), weights = _mm512_set1_ps(weight);
  __m512 dots = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = first_lanes(n - j);
    __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, in + j), offsets);
    if (shifts != nullptr) x = _mm512_sub_ps(x, _mm512_maskz_loadu_ps(lanes, shifts + j));
    const __m512 e = exp_coarse(x);
    _mm512_mask_storeu_ps(out + j, lanes, e);
    if (operand != nullptr) {
      _mm256_mask_storeu_epi16(operand + j, lanes, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(e)));
    }
    if (dot_with != nullptr) dots = _mm512_fmadd_ps(e, _mm512_maskz_loadu_ps(lanes, dot_with + j), dots);
    if (sums != nullptr) {
      _mm512_mask_storeu_ps(sums + j, lanes, _mm512_fmadd_ps(e, weights, _mm512_maskz_loadu_ps(lanes, sums + j)));
    }
  }
  if (operand != nullptr && n % 2 == 1) operand[n] = 0;
  return _mm512_reduce_add_ps(dots);
}

// operand[j] = a[j] * b[j] rounded as narrow_operand_row does, with a zero pad when n is odd; returns the sum of
// the unrounded products. Performer's logit gradients (d phi times phi) for the bf16 product with the
// projection, and their row sum, in one pass.
[[maybe_unused]] FASTATTN_BF16_PRODUCTS_TARGET float multiply_sum_bf16(const float* a, const float* b,
                                                                       uint16_t* operand, int64_t n) {
  __m512 sums = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = first_lanes(n - j);
    const __m512 product = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, a + j), _mm512_maskz_loadu_ps(lanes, b + j));
    sums = _mm512_add_ps(sums, product);
    _mm256_mask_storeu_epi16(operand + j, lanes, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(product)));
  }
  if (n % 2 == 1) operand[n] = 0;
  return _mm512_reduce_add_ps(sums);
}

// The A operand of a bf16 product from a transposed float matrix: dst (cols x rows rounded up to even,
// leading dimension dst_ld) = src^T (src: rows x cols, leading dimension src_ld) rounded to bfloat16 as
// narrow_operand_row does, with a zero pad column when rows is odd. Blocks of 16 x 16 are transposed in
// registers (transpose_16x16): element-wise moves cost more than the products they feed.
[[maybe_unused]] FASTATTN_BF16_PRODUCTS_TARGET void narrow_transposed_operand(const float* src, int64_t src_ld,
                                                                              int64_t rows, int64_t cols,
                                                                              uint16_t* dst, int64_t dst_ld) {
  const int64_t rows_even = rows + rows % 2;
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const __mmask16 out_lanes = first_lanes(rows_even - r0);
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      __m512 block[16];
      load_transposed_16x16(src, src_ld, rows, cols, r0, c0, 1.0f, block);
      for (int64_t c = 0; c < 16 && c0 + c < cols; ++c) {
        _mm256_mask_storeu_epi16(dst + (c0 + c) * dst_ld + r0, out_lanes,
                                 reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(block[c])));
      }
    }
  }
}

// The pair-interleaved B operand of src^T (src: rows x cols float, leading dimension src_ld), rounded to
// bfloat16 as narrow_operand_row does: dst[(c / 2) * 2 * dst_ld + 2 * r + c % 2] = src[r][c], a zero pad when
// cols is odd. A row's columns 2w and 2w + 1 narrow into one 32-bit word, so blocks of 16 rows x 16 words
// are transposed in registers (transpose_16x16).
[[maybe_unused]] FASTATTN_BF16_PRODUCTS_TARGET void pair_transposed_operand(const float* src, int64_t src_ld,
                                                                            int64_t rows, int64_t cols,
                                                                            uint16_t* dst, int64_t dst_ld) {
  const int64_t words = (cols + 1) / 2;
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const __mmask16 out_lanes = first_lanes(rows - r0);
    for (int64_t w0 = 0; w0 < words; w0 += 16) {
      const int64_t c0 = 2 * w0;
      const __mmask16 low_columns = first_lanes(cols - c0), high_columns = first_lanes(cols - c0 - 16);
      __m512 block[16];
      for (int64_t r = 0; r < 16; ++r) {
        if (r0 + r >= rows) {
          block[r] = _mm512_setzero_ps();
          continue;
        }
        const float* row = src + (r0 + r) * src_ld + c0;
        const __m512bh pairs = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(high_columns, row + 16),
                                                   _mm512_maskz_loadu_ps(low_columns, row));
        block[r] = reinterpret_cast<const __m512&>(pairs);
      }
      transpose_16x16(block);
      for (int64_t w = 0; w < 16 && w0 + w < words; ++w) {
        _mm512_mask_storeu_epi32(dst + (w0 + w) * 2 * dst_ld + 2 * r0, out_lanes, _mm512_castps_si512(block[w]));
      }
    }
  }
}

// narrow_pair_rows rounded as narrow_operand_row does, for the B operands of bf16 products: sixteen elements
// of both rows narrowed by one instruction (first's in the low half), then interleaved by one word permute.
[[maybe_unused]] FASTATTN_BF16_PRODUCTS_TARGET void narrow_pair_operand_rows(const float* first, const float* second,
                                                                             uint32_t* out, int64_t n) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                              6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = first_lanes(n - i);
    const __m512bh halves =
        _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(lanes, second + i), _mm512_maskz_loadu_ps(lanes, first + i));
    _mm512_mask_storeu_epi32(out + i, lanes,
                             _mm512_permutexvar_epi16(interleave, reinterpret_cast<const __m512i&>(halves)));
  }
}
#pragma GCC diagnostic pop
#else
// Elsewhere bf16 products do not run (bf16_products()); these keep the kernels compiling.
[[maybe_unused]] void pair_transposed_operand(const float* src, int64_t src_ld, int64_t rows, int64_t cols,
                                              uint16_t* dst, int64_t dst_ld) {
  for (int64_t c = 0; c < cols + cols % 2; ++c) {
    for (int64_t r = 0; r < rows; ++r) {
      dst[(c / 2) * 2 * dst_ld + 2 * r + c % 2] = c < cols ? narrow(src[r * src_ld + c]) : 0;
    }
  }
}
[[maybe_unused]] void narrow_pair_operand_rows(const float* first, const float* second, uint32_t* out, int64_t n) {
  narrow_pair_rows(first, second, out, n);
}
[[maybe_unused]] float exp_scaled_sum_bf16(const float* row, int64_t n, float scale, float max, uint16_t* probs) {
  float sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_approx(scale * (row[j] - max));
    probs[j] = narrow(e);
    sum += e;
  }
  return sum;
}
[[maybe_unused]] void narrow_transposed_operand(const float* src, int64_t src_ld, int64_t rows, int64_t cols,
                                                uint16_t* dst, int64_t dst_ld) {
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r = 0; r < rows + rows % 2; ++r) dst[c * dst_ld + r] = r < rows ? narrow(src[r * src_ld + c]) : 0;
  }
}
[[maybe_unused]] float exp_of_difference_bf16(const float* in, float offset, const float* shifts, float* out,
                                              uint16_t* operand, int64_t n, const float* dot_with = nullptr,
                                              float* sums = nullptr, float weight = 1.0f) {
  float dot = 0;
  for (int64_t j = 0; j < n; ++j) {
    out[j] = exp_approx((in[j] - offset) - (shifts != nullptr ? shifts[j] : 0.0f));
    if (operand != nullptr) operand[j] = narrow(out[j]);
    if (dot_with != nullptr) dot += out[j] * dot_with[j];
    if (sums != nullptr) sums[j] += weight * out[j];
  }
  if (operand != nullptr && n % 2 == 1) operand[n] = 0;
  return dot;
}
[[maybe_unused]] float multiply_sum_bf16(const float* a, const float* b, uint16_t* operand, int64_t n) {
  float sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    operand[j] = narrow(a[j] * b[j]);
    sum += a[j] * b[j];
  }
  if (n % 2 == 1) operand[n] = 0;
  return sum;
}
[[maybe_unused]] void exp_shifted_bf16(float* row, int64_t n, float scale, const float* shifts, bool shift_per_element,
                                       uint16_t* probs) {
  for (int64_t j = 0; j < n; ++j) {
    const float scaled = scale * row[j];
    row[j] = exp_approx(scaled - shifts[shift_per_element ? j : 0]);
    if (probs != nullptr) probs[j] = narrow(row[j]);
  }
}
#endif
}  // namespace

// The pair-interleaved B operand of product() from a (rows x cols) matrix `src` (leading dimension src_ld,
// bfloat16, or float rounded as narrow_operand_row does, so only where bf16_products() holds):
// dst[(r / 2) * 2 * dst_ld + 2 * c + r % 2] = src[r][c], a zero pad row when rows is odd.
template <typename In>
inline void pair_rows(const In* src, int64_t src_ld, int64_t rows, int64_t cols, c10::BFloat16* dst, int64_t dst_ld) {
  for (int64_t r = 0; r < rows; r += 2) {
    const In* first = src + r * src_ld;
    c10::BFloat16* out = dst + r * dst_ld;
    if constexpr (std::is_same_v<In, float>) {
      static const float zeros[256] = {};
      for (int64_t c0 = 0; c0 < cols; c0 += 256) {
        const int64_t n = std::min<int64_t>(256, cols - c0);
        const float* second = r + 1 < rows ? first + src_ld + c0 : zeros;
        narrow_pair_operand_rows(first + c0, second, reinterpret_cast<uint32_t*>(out + 2 * c0), n);
      }
    } else {
      static_assert(std::is_same_v<In, c10::BFloat16>, "pair_rows: float or bfloat16 rows");
      static const uint16_t zeros[256] = {};
      const auto* first_bits = reinterpret_cast<const uint16_t*>(first);
      for (int64_t c0 = 0; c0 < cols; c0 += 256) {
        const int64_t n = std::min<int64_t>(256, cols - c0);
        const uint16_t* second = r + 1 < rows ? first_bits + src_ld + c0 : zeros;
        interleave_pair_rows(first_bits + c0, second, reinterpret_cast<uint32_t*>(out + 2 * c0), n);
      }
    }
  }
}

// The pair-interleaved B operand of multiplier * src^T (src: rows x cols, float or bfloat16, leading dimension
// src_ld), rounded to bfloat16: dst[(c / 2) * 2 * dst_ld + 2 * r + c % 2] = multiplier * src[r][c], zero pads
// when cols is odd. For small matrices (per-head projections); pair_columns moves bfloat16 rows faster.
template <typename In>
inline void pair_transposed(const In* src, int64_t src_ld, int64_t rows, int64_t cols, float multiplier,
                            c10::BFloat16* dst, int64_t dst_ld) {
  for (int64_t c = 0; c < cols + cols % 2; ++c) {
    c10::BFloat16* out = dst + (c / 2) * 2 * dst_ld + c % 2;
    for (int64_t r = 0; r < rows; ++r) {
      out[2 * r] = c < cols ? c10::BFloat16(static_cast<float>(src[r * src_ld + c]) * multiplier) : c10::BFloat16(0.0f);
    }
  }
}

// rows x cols from a strided source (unit stride along a row) into a contiguous buffer, times multiplier.
template <typename scalar_t, typename T>
inline void load_rows(const scalar_t* src, int64_t row_stride, int64_t rows, int64_t cols, T multiplier, T* dst) {
  // Contiguous rows are one row: a call per short row (64 elements) cost as much as its conversion.
  if (row_stride == cols && rows > 1) return load_rows(src, rows * cols, 1, rows * cols, multiplier, dst);
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

// Asks the CPU to bring rows x cols of a strided source into its caches: the rows a later load_rows reads,
// issued a tile ahead, so that the load does not wait on memory.
template <typename scalar_t>
inline void prefetch_rows(const scalar_t* src, int64_t row_stride, int64_t rows, int64_t cols) {
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; c += kLine) __builtin_prefetch(src + r * row_stride + c);
  }
}

template <typename scalar_t, typename T>
inline void store_rows(const T* src, int64_t rows, int64_t cols, scalar_t* dst, int64_t row_stride) {
  if (row_stride == cols && rows > 1) return store_rows(src, 1, rows * cols, dst, rows * cols);  // see load_rows
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

// The number of parts into which a backward splits each head's sum over its query tiles (the gradients of
// Performer's state, of Linformer's projected keys and values): enough that heads x parts tasks keep
// kSplitTasks threads busy. It follows from the shape alone, and the parts are added in order (sum_in_order),
// so that the gradients have the same bits whatever the number of threads.
constexpr int64_t kSplitTasks = 16;
inline int64_t query_splits(int64_t heads, int64_t query_tiles) {
  return std::clamp<int64_t>(ceil_div(kSplitTasks, heads), 1, query_tiles);
}

// The sum of t over dimension dim, its slices added in index order (element-wise additions: the same bits
// whatever the number of threads, which at::sum does not promise); contiguous.
inline at::Tensor sum_in_order(const at::Tensor& t, int64_t dim) {
  at::Tensor total = t.select(dim, 0).clone(at::MemoryFormat::Contiguous);
  for (int64_t i = 1; i < t.size(dim); ++i) total.add_(t.select(dim, i));
  return total;
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
