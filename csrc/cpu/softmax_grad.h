// The softmax backward of a row of recomputed probabilities, shared by the CPU kernels that recompute them
// (block-sparse, Linformer), and the ISA clones of their element-wise loops.
#pragma once

#include <cstdint>

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

// softmax_grad_row for a row of one key over queries j, whose deltas are deltas[j].
template <typename T>
FASTATTN_ISA_CLONES void softmax_grad_row_transposed(const T* p, T* dp, int64_t n, const T* deltas, T scale) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] == T(1) ? T(0) : scale * p[j] * (dp[j] - deltas[j]);
}

}  // namespace
}  // namespace fastattn::cpu
