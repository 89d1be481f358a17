// Block-sparse (BigBird) attention on the CPU, forward and backward, FlashAttention-2 style.
//
// Forward: one work item per (batch, head, query block); an online softmax runs over the key blocks
// that the CSR lists for that row, so only per-tile scratch exists (scores bs x run * bs, accumulator
// bs x D). Backward recomputes the probabilities from the saved log-sum-exp in one pass over the key
// blocks (the transposed CSR), five tile products per pair of blocks, in transposed form (S^T = K Q^T)
// so that every tile product is a plain row-major A B: dK and dV accumulate in scratch, and each pair's
// share of dQ is summed per query block in one fixed order (see backward_kernel). No atomics,
// deterministic results whatever the number of threads.
//
// The operands are first laid out for those products (O(N D) memory: the transposes K^T, Q^T, dO^T,
// bfloat16 converted to float32 or, with bf16 products, pair-interleaved). Float32 tiles are multiplied with oneDNN's batch-reduce GEMM
// micro-kernels through at::native::cpublas::brgemm (AVX-512 where the CPU has it, several times faster
// than BLAS calls on tiles this small); float64 (for gradcheck) with the dgemm_ that torch links. The
// element-wise loops (masked softmax, dS) are plain loops written for the compiler to vectorise, cloned
// per x86 ISA level so that one binary uses AVX-512 or AVX2 where it can; with bf16 products, which run
// only on AVX512-BF16 CPUs, the probabilities and dS are computed and rounded to their bfloat16 operands
// in one pass each (AVX-512 intrinsics, cpu::exp_scaled_sum_bf16, cpu::exp_shifted_bf16,
// cpu::softmax_grad_pair).
#include "cpu/dense_tiles.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "common.h"
#include "cpu/softmax_grad.h"


namespace fastattn {
namespace {

using cpu::softmax_grad_row_transposed;

// Row-major C (m x n) = A (m x k) B (k x n), added to C when `accumulate`.
void tile_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
               int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/false);
}

// bfloat16 operands, B pair-interleaved (see cpu::product), float32 accumulation.
void tile_gemm(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b_pairs,
               int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  cpu::product(m, n, k, a, lda, b_pairs, ldb, c, ldc, accumulate);
}

// Through column-major BLAS (cpu::product).
void tile_gemm(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b, int64_t ldb, double* c,
               int64_t ldc, bool accumulate) {
  cpu::product(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

// Rows of a (B, H, N, D) tensor transposed by one task.
constexpr int64_t kTransposeChunk = 256;

// Runs of consecutive blocks are multiplied as one tile of up to this many keys.
constexpr int64_t kRunColumns = 512;
// The backward's runs are of query blocks, of up to this many queries.
constexpr int64_t kBackwardRunRows = 256;

// Reductions keep kLanes partial results so that they vectorise without reassociating by -ffast-math.
constexpr int64_t kLanes = 16;

// The probabilities of a row of scores relative to its maximum: probs[j] = exp(scale * (row[j] - max)) for
// j < n (probs may be row); returns their sum. Scaling after the subtraction fuses the scaling into this pass
// without letting the compiler contract scale * row[j] - max into one fused multiply-add, whose unrounded
// product would make the maximum's own probability differ from exactly 1 (the backward's test of a
// saturated row).
template <typename T>
FASTATTN_ISA_CLONES T exp_scaled_sum(const T* row, int64_t n, T scale, T max, T* probs) {
  T lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      const T e = cpu::exp_acc(scale * (row[j + l] - max));
      probs[j + l] = e;
      lanes[l] += e;
    }
  }
  T sum = 0;
  for (; j < n; ++j) {
    probs[j] = cpu::exp_acc(scale * (row[j] - max));
    sum += probs[j];
  }
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// row[j] = exp(row[j] - shifts[j]) for j < n.
template <typename T>
FASTATTN_ISA_CLONES void exp_shifted(T* row, int64_t n, const T* shifts) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] = cpu::exp_acc(row[j] - shifts[j]);
}

template <typename T>
FASTATTN_ISA_CLONES void scale_row(T* row, int64_t n, T factor) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] *= factor;
}

template <typename scalar_t, typename accum_t>
FASTATTN_ISA_CLONES void store_rows(const accum_t* src, scalar_t* dst, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    cpu::narrow_row(src, reinterpret_cast<uint16_t*>(dst), count);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) dst[j] = static_cast<scalar_t>(src[j]);
  }
}

// The sizes, layout and options of one call.
struct Problem {
  int64_t batch, heads, kv_heads, query_len, key_len, dim, block;
  int64_t query_blocks, key_blocks, layout_heads;
  const int32_t *row_offsets, *col_indices, *col_offsets, *row_indices;
  int64_t row_offsets_stride, col_indices_stride, col_offsets_stride, row_indices_stride;
  bool causal;
  const bool* key_padding;  // (batch, key_len) or null
  double scale;
  int64_t run_blocks;  // the most consecutive key blocks multiplied as one tile

  int64_t layout_head(int64_t h) const { return layout_heads == 1 ? 0 : h; }
  // Grouped-query attention: query head h reads kv head h / (heads / kv_heads).
  int64_t group() const { return heads / kv_heads; }
  int64_t kv_head(int64_t h) const { return h / group(); }
  int64_t query_rows(int64_t query_block) const { return std::min(block, query_len - query_block * block); }
  // A causal pair of blocks where every key comes after every query contributes nothing.
  bool causally_empty(int64_t query_block, int64_t key_block) const {
    return causal && key_block * block > query_block * block + query_rows(query_block) - 1;
  }
};

// Sets to -inf the scores of padded keys and, on the causal diagonal, of keys after their query.
// scores: rows (queries from first_row) x cols (keys from first_col), leading dimension ld.
template <typename accum_t>
void mask_scores(const Problem& p, accum_t* scores, int64_t ld, int64_t rows, int64_t cols, int64_t b,
                 int64_t first_row, int64_t first_col) {
  constexpr accum_t neg_inf = -std::numeric_limits<accum_t>::infinity();
  if (p.key_padding != nullptr) {
    const bool* padded = p.key_padding + b * p.key_len + first_col;
    for (int64_t j = 0; j < cols; ++j) {
      if (!padded[j]) continue;
      for (int64_t i = 0; i < rows; ++i) scores[i * ld + j] = neg_inf;
    }
  }
  if (p.causal && first_col + cols - 1 > first_row) {
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t first_future = std::max<int64_t>(0, first_row + i + 1 - first_col);
      std::fill(scores + i * ld + std::min(first_future, cols), scores + i * ld + cols, neg_inf);
    }
  }
}

// mask_scores for transposed scores: rows are keys (from first_col), columns queries (from first_row).
template <typename accum_t>
void mask_scores_transposed(const Problem& p, accum_t* scores_t, int64_t ld, int64_t rows, int64_t cols, int64_t b,
                            int64_t first_row, int64_t first_col) {
  constexpr accum_t neg_inf = -std::numeric_limits<accum_t>::infinity();
  const bool* padded = p.key_padding != nullptr ? p.key_padding + b * p.key_len + first_col : nullptr;
  const bool diagonal = p.causal && first_col + cols - 1 > first_row;
  for (int64_t j = 0; j < cols; ++j) {
    accum_t* key_row = scores_t + j * ld;
    if (padded != nullptr && padded[j]) {
      std::fill(key_row, key_row + rows, neg_inf);
    } else if (diagonal) {
      const int64_t first_allowed = std::clamp<int64_t>(first_col + j - first_row, 0, rows);
      std::fill(key_row, key_row + first_allowed, neg_inf);
    }
  }
}

// Rows of dK and dV (cols x D each, keys from first_col) of padded keys set to 0: their P and dS are 0, but the
// products add 0 times a NaN query row (one that sees no key: all its keys are padded), or the exp of -inf
// minus a NaN log-sum-exp (a NaN query that sees keys), which are NaN.
template <typename accum_t>
void zero_padded_key_grads(const Problem& p, int64_t b, int64_t first_col, int64_t cols, accum_t* acc_k,
                           accum_t* acc_v) {
  if (p.key_padding == nullptr) return;
  const bool* padded = p.key_padding + b * p.key_len + first_col;
  for (int64_t j = 0; j < cols; ++j) {
    if (!padded[j]) continue;
    std::fill(acc_k + j * p.dim, acc_k + (j + 1) * p.dim, accum_t(0));
    std::fill(acc_v + j * p.dim, acc_v + (j + 1) * p.dim, accum_t(0));
  }
}

// Runs body(item, scratch) for every item in [0, count) on torch's intra-op threads, each thread with its
// own scratch of scratch_size elements. Threads take the next item from a shared counter: rows of a
// layout differ in cost (global rows list every block), so a static split would leave threads idle.
// Every item writes its own output tiles in a fixed order, so results do not depend on the scheduling.
template <typename accum_t, typename Body>
void for_each_item(int64_t count, int64_t scratch_size, const Body& body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const std::unique_ptr<accum_t[]> scratch(new accum_t[scratch_size]);
    for (int64_t item = next++; item < count; item = next++) body(item, scratch.get());
    if constexpr (std::is_same_v<accum_t, float>) cpu::release_products();
  });
}

// Consecutive key blocks of one head are one strided matrix, so the listed blocks are taken in runs: one
// tile product per run instead of one per block (BigBird's window is a run of 3, a global row one long
// run). Returns how many entries from list[first] (usable itself) form a run, at most `limit`.
template <typename Usable>
int64_t run_length(const int32_t* list, int64_t first, int64_t end, int64_t limit, const Usable& usable) {
  int64_t length = 1;
  while (first + length < end && length < limit && list[first + length] == list[first] + length &&
         usable(list[first + length])) {
    ++length;
  }
  return length;
}

// Calls visit(first_key, cols) for each run of key blocks that query block qb lists and may see.
template <typename Visit>
void for_each_key_run(const Problem& p, int64_t h, int64_t qb, const Visit& visit) {
  const int64_t lh = p.layout_head(h);
  const int32_t* offsets = p.row_offsets + lh * p.row_offsets_stride;
  const int32_t* listed = p.col_indices + lh * p.col_indices_stride;
  const auto usable = [&](int64_t kb) { return !p.causally_empty(qb, kb); };
  for (int64_t idx = offsets[qb], end = offsets[qb + 1], length = 1; idx < end; idx += length) {
    length = 1;
    if (!usable(listed[idx])) continue;
    length = run_length(listed, idx, end, p.run_blocks, usable);
    const int64_t first_key = listed[idx] * p.block;
    visit(first_key, std::min(length * p.block, p.key_len - first_key));
  }
}

// A (B, H, N, X) tensor of element type T, contiguous: the rows of one (batch, head).
template <typename T>
struct Heads {
  const T* data;
  int64_t head_size;
  explicit Heads(const at::Tensor& t) : data(t.const_data_ptr<T>()), head_size(t.size(2) * t.size(3)) {}
  const T* operator()(int64_t b, int64_t h, int64_t heads) const { return data + (b * heads + h) * head_size; }
};

at::Tensor in_accum_type(const at::Tensor& t) {
  return t.to(lse_dtype(t.scalar_type())).contiguous();
}

// The operands of the tile products in rows (A operands, and B operands of bf16 products taken along the
// rows): converted to the accumulation type, or kept in bfloat16 (op_t) for bf16 products.
template <typename op_t>
at::Tensor in_operand_type(const at::Tensor& t) {
  return std::is_same_v<op_t, c10::BFloat16> ? t.contiguous() : in_accum_type(t);
}

// A bfloat16 (B, H, N, D) tensor as B operands of bf16 products over its rows: (B, H, N rounded up to even, D)
// with rows 2i and 2i + 1 interleaved (cpu::pair_rows) and a zero pad row. Row r (even) starts at r * D.
at::Tensor paired_rows(const at::Tensor& t) {
  const at::Tensor src = t.contiguous();
  const int64_t heads = t.size(0) * t.size(1), len = t.size(2), dim = t.size(3);
  at::Tensor result = at::empty({t.size(0), t.size(1), len + len % 2, dim}, src.options());
  const c10::BFloat16* src_data = src.const_data_ptr<c10::BFloat16>();
  c10::BFloat16* dst = result.data_ptr<c10::BFloat16>();
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t head = begin; head < end; ++head) {
      cpu::pair_rows(src_data + head * len * dim, dim, len, dim, dst + head * result.size(2) * dim, dim);
    }
  });
  return result;
}

// In square blocks of kTransposeBlock so that both sides stay in few cache lines.
constexpr int64_t kTransposeBlock = 16;

// dst (cols x rows) = src (rows x cols) transposed, converted to T.
template <typename S, typename T>
FASTATTN_ISA_CLONES void transpose_tile(const S* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst,
                                        int64_t ld_dst) {
  for (int64_t i0 = 0; i0 < rows; i0 += kTransposeBlock) {
    const int64_t i1 = std::min(rows, i0 + kTransposeBlock);
    for (int64_t j0 = 0; j0 < cols; j0 += kTransposeBlock) {
      const int64_t j1 = std::min(cols, j0 + kTransposeBlock);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t i = i0; i < i1; ++i) dst[j * ld_dst + i] = static_cast<T>(src[i * ld_src + j]);
      }
    }
  }
}

// The leading dimension of a transposed (D, len) matrix: rows a power of two apart in memory would all fall
// in the same few cache sets, and a tile product reads D of them at once.
inline int64_t padded_ld(int64_t len) { return (len + 15) / 16 * 16 + 16; }

// Transposes src (rows x dim, leading dimension dim) into dst, columns ld apart: to (dim x rows) of type T,
// or, when kPaired, to the pair-interleaved B operand of bf16 products over dim (cpu::pair_columns). Column c
// of the result starts at dst + column_offset<kPaired>(c).
template <bool kPaired>
constexpr int64_t column_offset(int64_t c) {
  return kPaired ? 2 * c : c;
}
template <bool kPaired, typename S, typename T>
void transpose_operand(const S* src, int64_t rows, int64_t dim, T* dst, int64_t ld) {
  if constexpr (kPaired) {
    cpu::pair_columns(src, dim, rows, dim, dst, ld);
  } else {
    transpose_tile(src, dim, rows, dim, dst, ld);
  }
}

// A (B, H, N, D) tensor transposed to (B, H, D, N) in type T (transpose_operand), with columns padded_ld(N)
// apart. The padding is zero.
template <typename T, bool kPaired = false>
struct TransposedHeads {
  at::Tensor storage;
  const T* data;
  int64_t ld, head_size;
  template <typename scalar_t>
  static TransposedHeads of(const at::Tensor& t) {
    TransposedHeads result;
    const at::Tensor src = t.contiguous();
    const int64_t heads = t.size(0) * t.size(1), len = t.size(2), dim = t.size(3);
    result.ld = padded_ld(len);
    result.head_size = dim * result.ld;
    result.storage = at::empty({t.size(0), t.size(1), dim, result.ld}, t.options().dtype(c10::CppTypeToScalarType<T>::value));
    T* dst = result.storage.template data_ptr<T>();
    const scalar_t* src_data = src.const_data_ptr<scalar_t>();
    const int64_t ld = result.ld, head_size = result.head_size, chunks = ceil_div(len, kTransposeChunk);
    // Rows of the result (pairs of rows when kPaired), each of `width` elements per column.
    constexpr int64_t width = column_offset<kPaired>(1);
    at::parallel_for(0, heads * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t head = item / chunks, r0 = item % chunks * kTransposeChunk;
        const int64_t rows = std::min(kTransposeChunk, len - r0);
        T* dst_head = dst + head * head_size;
        transpose_operand<kPaired>(src_data + (head * len + r0) * dim, rows, dim, dst_head + column_offset<kPaired>(r0),
                                   ld);
        if (r0 + rows == len) {
          for (int64_t d = 0; d < dim / width; ++d) {
            std::fill(dst_head + (d * ld + len) * width, dst_head + (d + 1) * ld * width, T(0));
          }
        }
      }
    });
    result.data = dst;
    return result;
  }
  const T* operator()(int64_t b, int64_t h, int64_t heads) const { return data + (b * heads + h) * head_size; }
};

template <typename T>
FASTATTN_ISA_CLONES void add_rows(const T* src, T* dst, int64_t count) {
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) dst[j] += src[j];
}

// Products take operands of type op_t: the accumulation type, or bfloat16 (with bf16 products, where
// use_bf16_products says so): B operands then pair-interleaved, and the probabilities rounded to bfloat16
// once per tile for the product with V, as FlashAttention does on GPUs.
template <typename scalar_t, typename op_t>
void forward_kernel(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                    at::Tensor& lse) {
  using accum_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  constexpr bool kPaired = std::is_same_v<op_t, c10::BFloat16>;
  // The probabilities' elements: in place of the scores, or the bits of bfloat16 operands.
  using prob_t = std::conditional_t<kPaired, uint16_t, accum_t>;
  const at::Tensor q_c = in_operand_type<op_t>(q), v_c = kPaired ? paired_rows(v) : in_accum_type(v);
  const Heads<op_t> q_heads(q_c), v_heads(v_c);
  const auto kt_heads = TransposedHeads<op_t, kPaired>::template of<scalar_t>(k);
  const accum_t scale = static_cast<accum_t>(p.scale);
  scalar_t* out_data = out.data_ptr<scalar_t>();
  accum_t* lse_data = lse.data_ptr<accum_t>();
  const int64_t bs = p.block, dim = p.dim, ld = p.run_blocks * bs;

  // Scratch: scores (bs x run * bs), output accumulator, running max and sum, and with bf16 products the
  // probabilities in bfloat16 (bs x run * bs, ld even).
  const int64_t scratch_size = bs * ld + bs * dim + 2 * bs + (kPaired ? bs * ld / 2 : 0);
  // The columns of a run of keys in the scratch: rounded up to even for bf16 products.
  const auto padded_width = [](int64_t cols) { return kPaired ? cols + cols % 2 : cols; };
  struct KeyRun {
    int64_t first_key, cols;
  };
  for_each_item<accum_t>(p.batch * p.heads * p.query_blocks, scratch_size, [&](int64_t item, accum_t* scratch) {
    thread_local std::vector<KeyRun> runs;
    accum_t* scores = scratch;
    accum_t* acc = scores + bs * ld;
    accum_t* run_max = acc + bs * dim;
    accum_t* run_sum = run_max + bs;
    op_t* probs = kPaired ? reinterpret_cast<op_t*>(run_sum + bs) : reinterpret_cast<op_t*>(scores);
    const int64_t qb = item % p.query_blocks;
    const int64_t h = (item / p.query_blocks) % p.heads;
    const int64_t b = item / (p.query_blocks * p.heads);
    const int64_t r0 = qb * bs, rows = p.query_rows(qb);
    const op_t* q_tile = q_heads(b, h, p.heads) + r0 * dim;
    const op_t* k_t_head = kt_heads(b, p.kv_head(h), p.kv_heads);
    const op_t* v_head = v_heads(b, p.kv_head(h), p.kv_heads);
    std::fill(acc, acc + rows * dim, accum_t(0));
    std::fill(run_max, run_max + rows, -std::numeric_limits<accum_t>::infinity());
    std::fill(run_sum, run_sum + rows, accum_t(0));

    // The runs are taken in groups that fill the scratch's ld columns, each run's scores at an even column
    // (a run of odd width, the sequence's last block, is followed by a pad column of score -inf, which gives
    // the zero probability that meets V's zero pad row in the bf16 product): one softmax pass per row and
    // group instead of one per run, since BigBird's random and global blocks are runs of one block, whose
    // passes were a third slower per score than a whole row's, and a row is rescaled only between groups.
    runs.clear();
    for_each_key_run(p, h, qb, [&](int64_t c0, int64_t cols) { runs.push_back({c0, cols}); });
    for (size_t first = 0, last = 0; first < runs.size(); first = last) {
      int64_t width = 0;
      for (last = first; last < runs.size() && width + padded_width(runs[last].cols) <= ld; ++last) {
        width += padded_width(runs[last].cols);
      }
      for (size_t r = first, column = 0; r < last; column += padded_width(runs[r].cols), ++r) {
        const auto [c0, cols] = runs[r];
        accum_t* run_scores = scores + column;
        tile_gemm(rows, cols, dim, q_tile, dim, k_t_head + column_offset<kPaired>(c0), kt_heads.ld, run_scores, ld,
                  false);
        mask_scores(p, run_scores, ld, rows, cols, b, r0, c0);
        for (int64_t i = 0; padded_width(cols) != cols && i < rows; ++i) {
          run_scores[i * ld + cols] = -std::numeric_limits<accum_t>::infinity();
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        const accum_t* row = scores + i * ld;
        prob_t* prob_row = reinterpret_cast<prob_t*>(probs + i * ld);
        // max_of skips NaN scores: a NaN makes exp(s - max), and so the row's sum, NaN below. A run_max of NaN
        // (set here) stays NaN, std::max returning its first argument when the second is not larger.
        accum_t new_max = std::max(run_max[i], cpu::max_of(row, width));
        if (new_max == -std::numeric_limits<accum_t>::infinity()) {
          // No key of this group is visible, unless every visible one scored NaN (a NaN in q or k), which must
          // reach the row's output (not make it a row that sees no key).
          if (std::none_of(row, row + width, [](accum_t s) { return s != s; })) {
            std::fill(prob_row, prob_row + width, prob_t(0));
            continue;
          }
          new_max = std::numeric_limits<accum_t>::quiet_NaN();
        }
        accum_t row_sum;
        if constexpr (kPaired) {
          row_sum = cpu::exp_scaled_sum_bf16(row, width, scale, new_max, prob_row);
        } else {
          row_sum = exp_scaled_sum(row, width, scale, new_max, prob_row);
        }
        // Most groups leave a row's maximum as it was, and exp(0) is 1: the scalar exp is skipped then.
        const accum_t correction = new_max == run_max[i] ? accum_t(1) : cpu::exp_acc(scale * (run_max[i] - new_max));
        if (correction != accum_t(1)) scale_row(acc + i * dim, dim, correction);
        run_sum[i] = run_sum[i] * correction + row_sum;
        run_max[i] = new_max;
      }
      for (size_t r = first, column = 0; r < last; column += padded_width(runs[r].cols), ++r) {
        const auto [c0, cols] = runs[r];
        tile_gemm(rows, dim, padded_width(cols), probs + column, ld, v_head + c0 * dim, dim, acc, dim, true);
      }
    }

    const int64_t out_row = (b * p.heads + h) * p.query_len + r0;
    for (int64_t i = 0; i < rows; ++i) {
      const bool sees_a_key = run_sum[i] != 0;  // NaN (an input's) gives NaN outputs and lse
      scale_row(acc + i * dim, dim, sees_a_key ? accum_t(1) / run_sum[i] : accum_t(0));
      // The backward rounds scale * S before subtracting the log-sum-exp: so does scale * run_max here.
      lse_data[out_row + i] =
          sees_a_key ? scale * run_max[i] + std::log(run_sum[i]) : std::numeric_limits<accum_t>::infinity();
    }
    store_rows(acc, out_data + out_row * dim, rows * dim);
  });
}

// Products take operands of type op_t as in forward_kernel; with bf16 products, P^T and dS^T are rounded to
// bfloat16 once per tile.
template <typename scalar_t, typename op_t>
void backward_kernel(const Problem& p, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& grad_q,
                     at::Tensor& grad_k, at::Tensor& grad_v) {
  using accum_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  constexpr bool kPaired = std::is_same_v<op_t, c10::BFloat16>;
  // Q and dO are B operands over their rows (dK += dS^T Q, dV += P^T dO); K and V are A operands.
  const at::Tensor q_c = kPaired ? paired_rows(q) : in_accum_type(q);
  const at::Tensor do_c = kPaired ? paired_rows(grad_out) : in_accum_type(grad_out);
  const at::Tensor k_c = in_operand_type<op_t>(k), v_c = in_operand_type<op_t>(v), lse_c = lse.contiguous();
  const Heads<op_t> q_heads(q_c), k_heads(k_c), v_heads(v_c), do_heads(do_c);
  const at::Tensor q_in = q.contiguous(), do_in = grad_out.contiguous(), out_in = out.contiguous();
  const Heads<scalar_t> q_in_rows(q_in), do_in_rows(do_in);
  const accum_t* lse_data = lse_c.const_data_ptr<accum_t>();
  const int64_t bs = p.block, dim = p.dim;
  const accum_t scale = static_cast<accum_t>(p.scale);
  const int64_t rows_total = p.batch * p.heads * p.query_len;

  // delta_i = rowsum(dO_i * O_i), in double (cpu::dot_in_double), from the rows in the input dtype (bfloat16
  // ones widened a row at a time).
  at::Tensor delta = at::empty({rows_total}, lse.options());
  accum_t* delta_data = delta.data_ptr<accum_t>();
  const scalar_t* do_data = do_in.const_data_ptr<scalar_t>();
  const scalar_t* out_data = out_in.const_data_ptr<scalar_t>();
  at::parallel_for(0, rows_total, 64, [&](int64_t begin, int64_t end) {
    std::vector<accum_t> widened(std::is_same_v<scalar_t, accum_t> ? 0 : 2 * dim);
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t *do_row = do_data + row * dim, *out_row = out_data + row * dim;
      if constexpr (std::is_same_v<scalar_t, accum_t>) {
        delta_data[row] = static_cast<accum_t>(cpu::dot_in_double(do_row, out_row, dim));
      } else {
        cpu::widen_row(reinterpret_cast<const uint16_t*>(do_row), widened.data(), dim, 1.0f);
        cpu::widen_row(reinterpret_cast<const uint16_t*>(out_row), widened.data() + dim, dim, 1.0f);
        delta_data[row] = static_cast<accum_t>(cpu::dot_in_double(widened.data(), widened.data() + dim, dim));
      }
    }
  });

  scalar_t* grad_q_data = grad_q.data_ptr<scalar_t>();
  scalar_t* grad_k_data = grad_k.data_ptr<scalar_t>();
  scalar_t* grad_v_data = grad_v.data_ptr<scalar_t>();

  // One pass over the key blocks of a head, each over the query blocks that list it (the transposed CSR),
  // in transposed form: S^T = K Q^T, P^T = exp(scale S^T - lse), dV += P^T dO, dP^T = V dO^T,
  // dS^T = scale P^T (dP^T - delta), dK += dS^T Q, and the pair's share of dQ, dS K, which
  // dq_share(position, qb, rows) says where to write or add (a ShareTarget). Five tile products per pair of
  // blocks. S^T repeats the forward's products (the same exactly rounded terms summed in the same order), so
  // that P is exactly 1 where the forward's softmax saturated on one key.
  // Consecutive query blocks that list the key block are taken as one run (BigBird's window is a run of
  // 3), of up to run_rows queries: one tile product per run instead of one per pair.
  // Scratch: P^T and dP^T (dS^T in place) (bs x run_rows each), and with bf16 products P^T and dS^T in
  // bfloat16 (bs x run_rows each) and dS^T pair-interleaved as the B operand of K^T dS^T (bs rounded up to even
  // x run_rows).
  const int64_t run_blocks = std::max<int64_t>(1, kBackwardRunRows / bs), run_rows = run_blocks * bs;
  const int64_t pair_scratch = 2 * bs * run_rows + (kPaired ? (3 * bs + 1) * run_rows / 2 + 1 : 0);
  // Calls visit(first_position, length) for each run of the query blocks listed for key block kb (in the
  // transposed CSR of layout head lh) that may see it.
  const auto for_each_query_run = [&](int64_t lh, int64_t kb, const auto& visit) {
    const int32_t* offsets = p.col_offsets + lh * p.col_offsets_stride;
    const int32_t* listing = p.row_indices + lh * p.row_indices_stride;
    const auto usable = [&](int64_t qb) { return !p.causally_empty(qb, kb); };
    for (int64_t idx = offsets[kb], end = offsets[kb + 1], length = 1; idx < end; idx += length) {
      length = 1;
      if (!usable(listing[idx])) continue;
      length = run_length(listing, idx, end, run_blocks, usable);
      visit(idx, length);
    }
  };
  // The transposed operands of one head: Q^T and dO^T (dim x ld_q; B operands of K Q^T and V dO^T,
  // pair-interleaved with bf16 products), K^T (dim x ld_k; the A operand of K^T dS^T).
  struct TransposedOperands {
    const op_t *q_t, *do_t, *k_t;
    int64_t ld_q, ld_k;
  };
  // Where a run's share of dQ^T (dim x rows) goes: written at `data` (leading dimension ld), or added there.
  struct ShareTarget {
    accum_t* data;
    int64_t ld;
    bool accumulate;
  };
  // Query head h's share of dK and dV of key block kb is added to acc_k and acc_v (cols x D each): the
  // shares of the heads of a group (grouped-query attention) are summed there, in head order.
  const auto key_block_grads = [&](int64_t b, int64_t h, int64_t kb, const TransposedOperands& ops,
                                   accum_t* scratch, accum_t* acc_k, accum_t* acc_v, const auto& dq_share) {
    accum_t* probs_t = scratch;
    accum_t* dp_t = probs_t + bs * run_rows;
    // The operands of P^T dO, dS^T Q and K^T dS^T: P^T and dS^T themselves, or rounded to bfloat16.
    op_t* probs_op = reinterpret_cast<op_t*>(probs_t);
    op_t* ds_op = reinterpret_cast<op_t*>(dp_t);
    op_t* ds_pairs = ds_op;
    if constexpr (kPaired) {
      probs_op = reinterpret_cast<op_t*>(dp_t + bs * run_rows);
      ds_op = probs_op + bs * run_rows;
      ds_pairs = ds_op + bs * run_rows;
    }
    const int64_t c0 = kb * bs, cols = std::min(bs, p.key_len - c0);
    const op_t* k_tile = k_heads(b, p.kv_head(h), p.kv_heads) + c0 * dim;
    const op_t* k_t_tile = ops.k_t + c0;
    const op_t* v_tile = v_heads(b, p.kv_head(h), p.kv_heads) + c0 * dim;
    const op_t* q_head = q_heads(b, h, p.heads);
    const op_t* do_head = do_heads(b, h, p.heads);
    const int64_t head_row = (b * p.heads + h) * p.query_len;
    const int64_t lh = p.layout_head(h);
    const int32_t* listing = p.row_indices + lh * p.row_indices_stride;
    for_each_query_run(lh, kb, [&](int64_t idx, int64_t length) {
      const int64_t qb = listing[idx], r0 = qb * bs, rows = std::min(length * bs, p.query_len - r0);
      const int64_t ld = rows;
      // The inner dimension of bf16 products over the queries, and its leading dimension: rounded up to even
      // over zero pads.
      const int64_t inner_rows = kPaired ? rows + rows % 2 : rows;
      tile_gemm(cols, rows, dim, k_tile, dim, ops.q_t + column_offset<kPaired>(r0), ops.ld_q, probs_t, ld, false);
      mask_scores_transposed(p, probs_t, ld, rows, cols, b, r0, c0);
      const accum_t* lse_run = lse_data + head_row + r0;
      const accum_t* delta_run = delta_data + head_row + r0;
      for (int64_t j = 0; j < cols; ++j) {
        if constexpr (kPaired) {
          uint16_t* prob_row = reinterpret_cast<uint16_t*>(probs_op + j * inner_rows);
          cpu::exp_shifted_bf16(probs_t + j * ld, rows, scale, lse_run, /*shift_per_element=*/true, prob_row);
          if (rows % 2 == 1) prob_row[rows] = 0;
        } else {
          // Scaled in a pass of its own: fused into the exp, scale * S - lse would be contracted to a fused
          // multiply-add, unlike the forward's rounded scale * max (see exp_scaled_sum).
          scale_row(probs_t + j * ld, rows, scale);
          exp_shifted(probs_t + j * ld, rows, lse_run);
        }
      }
      tile_gemm(cols, dim, inner_rows, probs_op, inner_rows, do_head + r0 * dim, dim, acc_v, dim, true);
      tile_gemm(cols, rows, dim, v_tile, dim, ops.do_t + column_offset<kPaired>(r0), ops.ld_q, dp_t, ld, false);
      if constexpr (kPaired) {
        // dS^T as the A operand of dS^T Q (rows of inner_rows) and, pair-interleaved over its key rows, as the
        // B operand of K^T dS^T (pairs of rows of `rows`).
        uint16_t* ds_bits = reinterpret_cast<uint16_t*>(ds_op);
        for (int64_t j = 0; j < cols; j += 2) {
          const bool has_second = j + 1 < cols;
          const int64_t second = has_second ? j + 1 : j;
          cpu::softmax_grad_pair<cpu::Deltas::kPerColumn>(
              probs_t + j * ld, probs_t + second * ld, dp_t + j * ld, dp_t + second * ld, delta_run, rows, scale,
              has_second, ds_bits + j * inner_rows, ds_bits + second * inner_rows,
              reinterpret_cast<uint32_t*>(ds_pairs + j * rows));
          if (rows % 2 == 1) {
            ds_bits[j * inner_rows + rows] = 0;
            ds_bits[second * inner_rows + rows] = 0;
          }
        }
      } else {
        for (int64_t j = 0; j < cols; ++j) {
          softmax_grad_row_transposed(probs_t + j * ld, dp_t + j * ld, rows, delta_run, scale);
        }
      }
      tile_gemm(cols, dim, inner_rows, ds_op, inner_rows, q_head + r0 * dim, dim, acc_k, dim, true);
      // The run's share of dQ, transposed (dQ^T = K^T dS^T, dim x rows), so that dS^T needs no transposing.
      const ShareTarget share = dq_share(idx, qb, rows);
      tile_gemm(dim, rows, kPaired ? cols + cols % 2 : cols, k_t_tile, ops.ld_k, ds_pairs, ld, share.data, share.ld,
                share.accumulate);
    });
  };

  // dQ of a query block is the sum of its pairs' shares taken in one fixed order, key block by key block
  // as the transposed CSR lists them, whichever way the work is split, so the result does not depend on
  // the number of threads. With enough kv heads for every thread, one work item is a whole kv head: for each
  // of its query heads in order, its key blocks in order, each share added at once to a dQ accumulator of
  // the head, with the head's transposed operands, and dK, dV summed over the heads in accumulators of the
  // kv head (O(N D) scratch per thread, reused from head to head). With fewer kv heads than that, one work
  // item is a key block of a kv head: shares go to a buffer with a slot per listed pair (O(nnz_blocks bs D)
  // memory, linear in N for a fixed block count), which a second pass sums per query block in the same order.
  const int64_t heads_total = p.batch * p.heads, kv_heads_total = p.batch * p.kv_heads;
  const int64_t kv_len = p.key_len * dim;
  if (kv_heads_total >= 4 * static_cast<int64_t>(at::get_num_threads())) {
    const int64_t ld_q = padded_ld(p.query_len), ld_k = padded_ld(p.key_len), head_len = p.query_len * dim;
    // The transposed operands in op_t, counted in accum_t (ld_q and ld_k are even).
    const int64_t operand_size = dim * (2 * ld_q + ld_k) * sizeof(op_t) / sizeof(accum_t);
    for_each_item<accum_t>(kv_heads_total, pair_scratch + bs * dim + dim * ld_q + operand_size + 2 * kv_len,
                           [&](int64_t item, accum_t* scratch) {
      const int64_t kv_head = item % p.kv_heads, b = item / p.kv_heads;
      accum_t* dq_block = scratch + pair_scratch;  // a query block of dQ, bs x dim
      accum_t* dq_t = dq_block + bs * dim;  // dQ^T of the head, dim x ld_q
      op_t* q_t = reinterpret_cast<op_t*>(dq_t + dim * ld_q);
      op_t* do_t = q_t + dim * ld_q;
      op_t* k_t = do_t + dim * ld_q;
      accum_t* acc_k = dq_t + dim * ld_q + operand_size;  // dK and dV of the kv head, key_len x dim each
      accum_t* acc_v = acc_k + kv_len;
      transpose_tile(k_heads(b, kv_head, p.kv_heads), dim, p.key_len, dim, k_t, ld_k);
      // K^T dS^T reads a zero pad column of K^T when the last key block has an odd number of keys.
      if (kPaired && p.key_len % 2 == 1) {
        for (int64_t d = 0; d < dim; ++d) k_t[d * ld_k + p.key_len] = op_t(0);
      }
      std::fill(acc_k, acc_k + 2 * kv_len, accum_t(0));
      for (int64_t h = kv_head * p.group(); h < (kv_head + 1) * p.group(); ++h) {
        // Q^T and dO^T from the rows in the input dtype (q_heads and do_heads are pair-interleaved with bf16
        // products).
        transpose_operand<kPaired>(q_in_rows(b, h, p.heads), p.query_len, dim, q_t, ld_q);
        transpose_operand<kPaired>(do_in_rows(b, h, p.heads), p.query_len, dim, do_t, ld_q);
        const TransposedOperands ops{q_t, do_t, k_t, ld_q, ld_k};
        std::fill(dq_t, dq_t + dim * ld_q, accum_t(0));
        // Each share is added to dQ^T by its product: oneDNN's brgemm adds C to the finished sum over the
        // inner dimension, so dQ rounds as the sum of its shares, bit for bit as the slots' second pass
        // below sums them (test_deterministic_whatever_the_thread_count).
        const auto to_head_dq = [&](int64_t, int64_t qb, int64_t) { return ShareTarget{dq_t + qb * bs, ld_q, true}; };
        for (int64_t kb = 0; kb < p.key_blocks; ++kb) {
          key_block_grads(b, h, kb, ops, scratch, acc_k + kb * bs * dim, acc_v + kb * bs * dim, to_head_dq);
        }
        for (int64_t qb = 0; qb < p.query_blocks; ++qb) {
          const int64_t rows = p.query_rows(qb);
          transpose_tile(dq_t + qb * bs, ld_q, dim, rows, dq_block, dim);
          store_rows(dq_block, grad_q_data + (b * p.heads + h) * head_len + qb * bs * dim, rows * dim);
        }
      }
      zero_padded_key_grads(p, b, 0, p.key_len, acc_k, acc_v);
      store_rows(acc_k, grad_k_data + item * kv_len, kv_len);
      store_rows(acc_v, grad_v_data + item * kv_len, kv_len);
    });
    return;
  }

  // A run of length L starting at position idx writes its share, dim x (rows of the run), over the slots of
  // positions idx .. idx + L - 1.
  const int64_t capacity = p.row_indices_stride, share_size = bs * dim;
  at::Tensor shares = at::empty({heads_total * capacity * share_size}, lse.options());
  accum_t* shares_data = shares.data_ptr<accum_t>();
  const auto qt_heads = TransposedHeads<op_t, kPaired>::template of<scalar_t>(q);
  const auto kt_heads = TransposedHeads<op_t>::template of<scalar_t>(k);
  const auto dot_heads = TransposedHeads<op_t, kPaired>::template of<scalar_t>(grad_out);
  for_each_item<accum_t>(kv_heads_total * p.key_blocks, pair_scratch + 2 * bs * dim,
                         [&](int64_t item, accum_t* scratch) {
    const int64_t kb = item % p.key_blocks, kv_head = (item / p.key_blocks) % p.kv_heads;
    const int64_t b = item / (p.key_blocks * p.kv_heads);
    accum_t* acc_k = scratch + pair_scratch;  // dK and dV of the key block, bs x dim each
    accum_t* acc_v = acc_k + bs * dim;
    std::fill(acc_k, acc_k + 2 * bs * dim, accum_t(0));
    for (int64_t h = kv_head * p.group(); h < (kv_head + 1) * p.group(); ++h) {
      accum_t* head_shares = shares_data + (b * p.heads + h) * capacity * share_size;
      const auto to_slot = [&](int64_t idx, int64_t, int64_t rows) {
        return ShareTarget{head_shares + idx * share_size, rows, false};
      };
      const TransposedOperands ops{qt_heads(b, h, p.heads), dot_heads(b, h, p.heads),
                                   kt_heads(b, kv_head, p.kv_heads), qt_heads.ld, kt_heads.ld};
      key_block_grads(b, h, kb, ops, scratch, acc_k, acc_v, to_slot);
    }
    const int64_t first_key = (b * p.kv_heads + kv_head) * p.key_len + kb * bs;
    const int64_t cols = std::min(bs, p.key_len - kb * bs);
    zero_padded_key_grads(p, b, kb * bs, cols, acc_k, acc_v);
    store_rows(acc_k, grad_k_data + first_key * dim, cols * dim);
    store_rows(acc_v, grad_v_data + first_key * dim, cols * dim);
  });

  // For each layout head: the positions of the transposed CSR grouped by query block, in position order,
  // and where each position's share lies: the first position of its run (-1 where the pair is causally
  // empty), the run's number of rows and the position's first column in it.
  std::vector<int64_t> group_offsets(p.layout_heads * (p.query_blocks + 1), 0);
  std::vector<int64_t> group_positions(p.layout_heads * capacity);
  std::vector<int64_t> run_first(p.layout_heads * capacity, -1), run_width(p.layout_heads * capacity),
      run_column(p.layout_heads * capacity);
  for (int64_t lh = 0; lh < p.layout_heads; ++lh) {
    const int32_t* offsets = p.col_offsets + lh * p.col_offsets_stride;
    const int32_t* listing = p.row_indices + lh * p.row_indices_stride;
    int64_t* group = group_offsets.data() + lh * (p.query_blocks + 1);
    const int64_t base = lh * capacity;
    for (int64_t kb = 0; kb < p.key_blocks; ++kb) {
      for (int64_t idx = offsets[kb]; idx < offsets[kb + 1]; ++idx) ++group[listing[idx] + 1];
      for_each_query_run(lh, kb, [&](int64_t idx, int64_t length) {
        const int64_t width = std::min(length * bs, p.query_len - listing[idx] * bs);
        for (int64_t l = 0; l < length; ++l) {
          run_first[base + idx + l] = idx;
          run_width[base + idx + l] = width;
          run_column[base + idx + l] = l * bs;
        }
      });
    }
    for (int64_t qb = 0; qb < p.query_blocks; ++qb) group[qb + 1] += group[qb];
    std::vector<int64_t> filled(group, group + p.query_blocks);
    for (int64_t idx = 0; idx < offsets[p.key_blocks]; ++idx) group_positions[base + filled[listing[idx]]++] = idx;
  }
  for_each_item<accum_t>(heads_total * p.query_blocks, 2 * share_size, [&](int64_t item, accum_t* scratch) {
    const int64_t qb = item % p.query_blocks, h = (item / p.query_blocks) % p.heads;
    const int64_t b = item / (p.query_blocks * p.heads);
    const int64_t lh = p.layout_head(h), rows = p.query_rows(qb), base = lh * capacity;
    const accum_t* head_shares = shares_data + (b * p.heads + h) * capacity * share_size;
    const int64_t* group = group_offsets.data() + lh * (p.query_blocks + 1);
    accum_t* acc_t = scratch;  // dQ^T of the block, dim x bs
    accum_t* acc = acc_t + share_size;
    std::fill(acc_t, acc_t + share_size, accum_t(0));
    for (int64_t g = group[qb]; g < group[qb + 1]; ++g) {
      const int64_t idx = group_positions[base + g];
      if (run_first[base + idx] < 0) continue;
      const accum_t* share_t = head_shares + run_first[base + idx] * share_size + run_column[base + idx];
      const int64_t width = run_width[base + idx];
      for (int64_t d = 0; d < dim; ++d) add_rows(share_t + d * width, acc_t + d * bs, rows);
    }
    transpose_tile(acc_t, bs, dim, rows, acc, dim);
    store_rows(acc, grad_q_data + ((b * p.heads + h) * p.query_len + qb * bs) * dim, rows * dim);
  });
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& row_offsets,
                     const at::Tensor& col_indices, const at::Tensor& col_offsets, const at::Tensor& row_indices,
                     int64_t block_size, bool causal, const std::optional<at::Tensor>& key_padding_mask,
                     double scale) {
  check_qkv(q, k, v, /*grouped_kv=*/true);
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
  const int64_t max_blas_dim = std::numeric_limits<int>::max();
  TORCH_CHECK_VALUE(std::max({query_len, key_len, block_size, q.size(3)}) <= max_blas_dim / 2,
                    "q, k, block_size: lengths and tiles must fit 32-bit BLAS indices, got Nq=", query_len,
                    ", Nk=", key_len, ", block_size=", block_size);

  Problem p{};
  p.batch = q.size(0);
  p.heads = heads;
  p.kv_heads = k.size(1);
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
  p.run_blocks = std::max<int64_t>(1, kRunColumns / block_size);
  return p;
}

// bfloat16 inputs are multiplied in bfloat16 where the CPU can (cpu::bf16_products) and the pairs that its
// products read stay within whole blocks (even block size and head dim); else they are converted to float32.
bool use_bf16_products(const Problem& p, const at::Tensor& q) {
  return q.scalar_type() == at::kBFloat16 && p.block % 2 == 0 && p.dim % 2 == 0 && cpu::bf16_products();
}

// k or v with the rows of padded keys zeroed. A padded key is ignored: its scores are masked to -inf, but
// its rows still enter the tile products, where 0 * NaN (a NaN or inf in a padded position) would not be 0.
at::Tensor without_padded_keys(const at::Tensor& t, const std::optional<at::Tensor>& key_padding_mask) {
  if (!key_padding_mask.has_value()) return t;
  return t.masked_fill(key_padding_mask->view({t.size(0), 1, t.size(2), 1}), 0);
}

// q with the rows that see no key (log-sum-exp +inf) zeroed. Their probabilities are all 0, but the diagonal
// block's dK += dS^T Q still reads them for the later keys of their block, where 0 * NaN (a NaN query) is NaN.
at::Tensor without_rows_that_see_no_key(const at::Tensor& q, const at::Tensor& lse) {
  const at::Tensor sees_no_key = lse == std::numeric_limits<double>::infinity();
  if (!sees_no_key.any().item<bool>()) return q;
  return q.masked_fill(sees_no_key.unsqueeze(-1), 0);
}

std::tuple<at::Tensor, at::Tensor> block_sparse_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& row_offsets,
    const at::Tensor& col_indices, const at::Tensor& col_offsets, const at::Tensor& row_indices, int64_t block_size,
    bool causal, const std::optional<at::Tensor>& key_padding_mask, double scale) {
  const at::Tensor q = with_blas_strides(q_in), k = with_blas_strides(k_in), v = with_blas_strides(v_in);
  const Problem p = make_problem(q, k, v, row_offsets, col_indices, col_offsets, row_indices, block_size, causal,
                                 key_padding_mask, scale);
  at::Tensor out = new_output(q.sizes(), q.options());
  at::Tensor lse = new_output({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_dtype(q.scalar_type())));
  const at::Tensor keys = without_padded_keys(k, key_padding_mask), values = without_padded_keys(v, key_padding_mask);
  if (use_bf16_products(p, q)) {
    forward_kernel<c10::BFloat16, c10::BFloat16>(p, q, keys, values, out, lse);
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "block_sparse_fwd_cpu", [&] {
      forward_kernel<scalar_t, at::opmath_type<scalar_t>>(p, q, keys, values, out, lse);
    });
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const at::Tensor& row_offsets, const at::Tensor& col_indices,
    const at::Tensor& col_offsets, const at::Tensor& row_indices, int64_t block_size, bool causal,
    const std::optional<at::Tensor>& key_padding_mask, double scale) {
  const at::Tensor grad_out = with_blas_strides(grad_out_in), out = with_blas_strides(out_in);
  const at::Tensor q = with_blas_strides(q_in), k = with_blas_strides(k_in), v = with_blas_strides(v_in);
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
  const at::Tensor keys = without_padded_keys(k, key_padding_mask), values = without_padded_keys(v, key_padding_mask);
  const at::Tensor queries = without_rows_that_see_no_key(q, lse);
  if (use_bf16_products(p, q)) {
    backward_kernel<c10::BFloat16, c10::BFloat16>(p, grad_out, queries, keys, values, out, lse, grad_q, grad_k,
                                                  grad_v);
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "block_sparse_bwd_cpu", [&] {
      backward_kernel<scalar_t, at::opmath_type<scalar_t>>(p, grad_out, queries, keys, values, out, lse, grad_q,
                                                           grad_k, grad_v);
    });
  }
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("block_sparse_fwd", &block_sparse_fwd_cpu);
  m.impl("block_sparse_bwd", &block_sparse_bwd_cpu);
}

}  // namespace fastattn
