// The softmax backward of a row of recomputed probabilities, shared by the CPU kernels that recompute them
// (block-sparse, Linformer), and the ISA clones of their element-wise loops.
#pragma once

#include <cstdint>

#include "cpu/dense_tiles.h"

// Loops marked so are compiled for AVX-512, AVX2 and the baseline, and the loader picks the widest the CPU
// has (the extension is built without -mavx).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTATTN_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTATTN_ISA_CLONES
#endif

namespace fastattn::cpu {
namespace {

// dS = scale * P * (dP - delta), in place in dp, for a row of one query (one delta). A probability of
// exactly 1 is a softmax saturated on one key (the only key the row sees, or the others below half an
// ulp in total): its exact gradient is below the rounding of dP - delta, two dot products rounded apart,
// so it is set to 0, as the reference's softmax backward gets it by cancellation.
template <typename T>
FASTATTN_ISA_CLONES void softmax_grad_row(const T* p, T* dp, int64_t n, T delta, T scale) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] == T(1) ? T(0) : scale * p[j] * (dp[j] - delta);
}

// The sum of p[j] * dp[j] in double, where the products of floats are exact: the delta of softmax_grad_row
// then adds no rounding of its own to dP - delta.
template <typename T>
FASTATTN_ISA_CLONES double dot_in_double(const T* p, const T* dp, int64_t n) {
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += static_cast<double>(p[j]) * static_cast<double>(dp[j]);
  return sum;
}

// softmax_grad_row for a row of one key over queries j, whose deltas are deltas[j].
template <typename T>
FASTATTN_ISA_CLONES void softmax_grad_row_transposed(const T* p, T* dp, int64_t n, const T* deltas, T scale) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] == T(1) ? T(0) : scale * p[j] * (dp[j] - deltas[j]);
}

// Where the deltas of softmax_grad_pair come from: one per row (a query's row), or one per column (a key's
// row over queries, as softmax_grad_row_transposed).
enum class Deltas { kPerRow, kPerColumn };

// The rows `first` and `second` of dS (softmax_grad_row of P and dP, the deltas per row: deltas[0] and
// deltas[1], or per column: deltas[j]) rounded to bfloat16, the operands of bf16 products, in one pass
// instead of three: rows first and second of an A operand (a_first, a_second), and the pair
// (first[j], second[j]) of the pair-interleaved B operand (pairs[j], cpu::pair_rows' layout). Without a
// second row (an odd count, has_second false) the second rows are zero and a_second is not written. As the
// probabilities of bf16 products (dense_tiles.h), written with AVX-512 intrinsics on x86.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC diagnostic push  // GCC bug 105593, as in dense_tiles.h
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <Deltas kDeltas>
FASTATTN_BF16_PRODUCTS_TARGET void softmax_grad_pair(const float* p_first, const float* p_second,
                                                     const float* dp_first, const float* dp_second,
                                                     const float* deltas, int64_t n, float scale, bool has_second,
                                                     uint16_t* a_first, uint16_t* a_second, uint32_t* pairs) {
  // Lane 2i of the pairs takes element i of the first row (lanes 0-15 of the rounded rows), lane 2i + 1
  // element i of the second (lanes 16-31).
  alignas(64) static constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                           8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  const __m512 scales = _mm512_set1_ps(scale), ones = _mm512_set1_ps(1.0f);
  const auto grad = [&](__mmask16 lanes, const float* p, const float* dp, __m512 delta) {
    const __m512 p_j = _mm512_maskz_loadu_ps(lanes, p);
    const __mmask16 saturated = _mm512_cmp_ps_mask(p_j, ones, _CMP_EQ_OQ);
    const __m512 difference = _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, dp), delta);
    return _mm512_maskz_mul_ps(static_cast<__mmask16>(~saturated), _mm512_mul_ps(scales, p_j), difference);
  };
  const __m512 delta_first = _mm512_set1_ps(deltas[0]);
  const __m512 delta_second = _mm512_set1_ps(kDeltas == Deltas::kPerRow && has_second ? deltas[1] : 0.0f);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = first_lanes(n - j);
    const __m512 column_deltas = kDeltas == Deltas::kPerColumn ? _mm512_maskz_loadu_ps(lanes, deltas + j) : delta_first;
    const __m512 ds_first = grad(lanes, p_first + j, dp_first + j, column_deltas);
    const __m512 ds_second = has_second ? grad(lanes, p_second + j, dp_second + j,
                                               kDeltas == Deltas::kPerColumn ? column_deltas : delta_second)
                                        : _mm512_setzero_ps();
    const __m512i rounded = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(ds_second, ds_first));
    _mm256_mask_storeu_epi16(a_first + j, lanes, _mm512_castsi512_si256(rounded));
    if (has_second) _mm256_mask_storeu_epi16(a_second + j, lanes, _mm512_extracti64x4_epi64(rounded, 1));
    _mm512_mask_storeu_epi32(pairs + j, lanes, _mm512_permutexvar_epi16(interleave, rounded));
  }
}
#pragma GCC diagnostic pop
#else
template <Deltas kDeltas>
void softmax_grad_pair(const float* p_first, const float* p_second, const float* dp_first, const float* dp_second,
                       const float* deltas, int64_t n, float scale, bool has_second, uint16_t* a_first,
                       uint16_t* a_second, uint32_t* pairs) {
  const auto grad = [scale](float p, float dp, float delta) { return p == 1.0f ? 0.0f : scale * p * (dp - delta); };
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t ds_first = narrow(grad(p_first[j], dp_first[j], kDeltas == Deltas::kPerRow ? deltas[0] : deltas[j]));
    const uint16_t ds_second =
        has_second ? narrow(grad(p_second[j], dp_second[j], kDeltas == Deltas::kPerRow ? deltas[1] : deltas[j])) : 0;
    a_first[j] = ds_first;
    if (has_second) a_second[j] = ds_second;
    pairs[j] = ds_first | static_cast<uint32_t>(ds_second) << 16;
  }
}
#endif

}  // namespace
}  // namespace fastattn::cpu
