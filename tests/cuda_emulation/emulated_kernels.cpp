// The kernels of csrc/cuda compiled for the CPU (see cuda_shim.h), behind a C ABI for ctypes: each
// call fills the same params struct as the host code of csrc/cuda/*_api.cpp (contiguous tensors) and
// runs the grid one CTA at a time, with the kernel choice of csrc/cuda/*_launch.cuh.
#include <algorithm>
#include <cmath>
#include <iterator>
#include <limits>
#include <thread>
#include <vector>

#include "block_sparse_bwd_kernel.cuh"
#include "block_sparse_fwd_kernel.cuh"
#include "block_sparse_simt_kernel.cuh"
#include "linformer_projection_kernel.cuh"
#include "performer_causal_kernel.cuh"
#include "performer_kernel.cuh"

namespace fastattn::cuda {
alignas(16) unsigned char shared_memory[160 * 1024];
}  // namespace fastattn::cuda

namespace {

using namespace fastattn::cuda;

// CTAs that wrote shared memory past the bytes their launch requests (a kernel whose layout outgrew its traits).
int shared_memory_overruns = 0;

template <typename Params>
void run_grid(void (*kernel)(Params), dim3 grid, int threads, int shared_bytes, const Params& params) {
  if (shared_bytes > static_cast<int>(sizeof(shared_memory))) std::abort();
  const auto untouched = [](unsigned char byte) { return byte == 0xff; };
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        std::memset(shared_memory, 0xff, sizeof(shared_memory));  // NaN in every float type: unwritten reads show
        emulation::Cta cta(threads);
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            emulation::context = {{unsigned(t), 0, 0}, {x, y, z}, &cta, &cta.warps[t / 32], t % 32};
            kernel(params);
          });
        }
        for (auto& thread : pool) thread.join();
        if (!std::all_of(shared_memory + shared_bytes, std::end(shared_memory), untouched)) ++shared_memory_overruns;
      }
    }
  }
}

int tiles(int length, int tile) { return (length + tile - 1) / tile; }
unsigned tiles_of(int length, int tile) { return unsigned(tiles(length, tile)); }

template <typename Traits>
void fwd(const BlockSparseFwdParams& p) {
  const dim3 grid(tiles(p.query_len, Traits::kBlockM), p.heads, p.batch);
  if constexpr (std::is_same_v<typename Traits::Element, float>) {
    run_grid(block_sparse_fwd_simt_kernel<Traits>, grid, Traits::kThreads, Traits::kFwdSharedBytes, p);
  } else {
    run_grid(block_sparse_fwd_kernel<Traits>, grid, Traits::kThreads, Traits::kFwdSharedBytes, p);
  }
}

// Dkdv and Dq: the traits of the dK/dV and of the dQ kernel.
template <typename Dkdv, typename Dq>
void bwd(const BlockSparseBwdParams& p) {
  run_grid(block_sparse_bwd_preprocess_kernel<typename Dq::Element>, dim3(tiles(p.query_len, 8), p.heads, p.batch), 256,
           0, p);
  const dim3 key_grid(tiles(p.key_len, Dkdv::kBlockM), p.heads, p.batch);
  const dim3 query_grid(tiles(p.query_len, Dq::kBlockM), p.heads, p.batch);
  if constexpr (std::is_same_v<typename Dkdv::Element, float>) {
    run_grid(block_sparse_bwd_dkdv_simt_kernel<Dkdv>, key_grid, Dkdv::kThreads, Dkdv::kBwdSharedBytes, p);
    run_grid(block_sparse_bwd_dq_simt_kernel<Dq>, query_grid, Dq::kThreads, Dq::kBwdSharedBytes, p);
  } else {
    run_grid(block_sparse_bwd_dkdv_kernel<Dkdv>, key_grid, Dkdv::kThreads, Dkdv::kBwdDkdvSharedBytes, p);
    run_grid(block_sparse_bwd_dq_kernel<Dq>, query_grid, Dq::kThreads, Dq::kBwdDqSharedBytes, p);
  }
}

// The kernel sequence of csrc/cuda/block_sparse_launch.cuh, with its shapes (block_sparse_traits.h).
template <typename Element, int HeadDim>
void run(const BlockSparseBwdParams& p, bool backward) {
  if (backward) {
    with_bwd_traits<Element, HeadDim>(p.block_size, [&](auto dkdv, auto dq) {
      bwd<typename decltype(dkdv)::type, typename decltype(dq)::type>(p);
    });
  } else {
    with_fwd_traits<Element, HeadDim>(p.block_size, [&](auto traits) { fwd<typename decltype(traits)::type>(p); });
  }
}

template <typename Element>
void run_head_dim(const BlockSparseBwdParams& p, bool backward) {
  switch (p.head_dim) {
    case 32: return run<Element, 32>(p, backward);
    case 64: return run<Element, 64>(p, backward);
    default: return run<Element, 128>(p, backward);
  }
}

// The shape of one tensor-core kernel's traits: rows per CTA, columns per step, m16 tiles per warp.
template <typename Traits>
void write_shape(std::type_identity<Traits>, int* shape) {
  shape[0] = Traits::kBlockM, shape[1] = Traits::kBlockN, shape[2] = Traits::kRowTilesPerWarp;
}

template <typename Element, int HeadDim>
void shape_of(int kernel, int block_size, int* shape) {
  const auto write = [shape](auto traits) { write_shape(traits, shape); };
  switch (kernel) {
    case 0: return with_fwd_traits<Element, HeadDim>(block_size, write);
    case 1: return with_bwd_dq_traits<Element, HeadDim>(block_size, write);
    default: return with_bwd_dkdv_traits<Element, HeadDim>(block_size, write);
  }
}

template <typename Element>
void shape_of_head_dim(int head_dim, int kernel, int block_size, int* shape) {
  switch (head_dim) {
    case 32: return shape_of<Element, 32>(kernel, block_size, shape);
    case 64: return shape_of<Element, 64>(kernel, block_size, shape);
    default: return shape_of<Element, 128>(kernel, block_size, shape);
  }
}

}  // namespace

// The shape the launch templates choose for a tensor-core kernel (dtype 0 float16, 1 bfloat16; kernel 0 the
// forward, 1 dQ, 2 dK/dV): shape = {rows per CTA, columns per step, m16 tiles per warp}.
extern "C" void emulated_block_sparse_shape(int dtype, int head_dim, int block_size, int kernel, int* shape) {
  if (dtype == 0) return shape_of_head_dim<__half>(head_dim, kernel, block_size, shape);
  shape_of_head_dim<__nv_bfloat16>(head_dim, kernel, block_size, shape);
}

// dtype: 0 float16, 1 bfloat16, 2 float32. Tensors contiguous: q, out, grad_out, grad_q (B, H, Nq, D);
// k, v, grad_k, grad_v (B, H, Nk, D); lse, delta (B, H, Nq); CSR as in csrc/fastattn.cpp with
// layout_heads (1 or H) heads. Backward when grad_out is not null (then out and lse are inputs).
extern "C" void emulated_block_sparse(int dtype, const void* q, const void* k, const void* v, void* out, float* lse,
                                      const int32_t* row_offsets, const int32_t* col_indices,
                                      const int32_t* col_offsets, const int32_t* row_indices, int layout_heads,
                                      int nnz_max, const bool* key_padding_mask, int batch, int heads, int query_len,
                                      int key_len, int head_dim, int block_size, bool causal, float scale,
                                      const void* grad_out, void* grad_q, void* grad_k, void* grad_v, float* delta) {
  BlockSparseBwdParams p{};
  p.q = q, p.k = k, p.v = v, p.out = out, p.lse = lse;
  p.q_row_stride = p.out_row_stride = p.grad_out_row_stride = head_dim;
  p.q_head_stride = p.out_head_stride = p.grad_out_head_stride = int64_t(query_len) * head_dim;
  p.q_batch_stride = p.out_batch_stride = p.grad_out_batch_stride = int64_t(heads) * query_len * head_dim;
  p.k_row_stride = p.v_row_stride = head_dim;
  p.k_head_stride = p.v_head_stride = int64_t(key_len) * head_dim;
  p.k_batch_stride = p.v_batch_stride = int64_t(heads) * key_len * head_dim;
  const int query_blocks = (query_len + block_size - 1) / block_size;
  const int key_blocks = (key_len + block_size - 1) / block_size;
  p.row_offsets = row_offsets, p.col_indices = col_indices, p.col_offsets = col_offsets, p.row_indices = row_indices;
  p.row_offsets_head_stride = layout_heads == 1 ? 0 : query_blocks + 1;
  p.col_offsets_head_stride = layout_heads == 1 ? 0 : key_blocks + 1;
  p.col_indices_head_stride = p.row_indices_head_stride = layout_heads == 1 ? 0 : nnz_max;
  p.key_padding_mask = key_padding_mask;
  p.batch = batch, p.heads = heads, p.query_len = query_len, p.key_len = key_len, p.head_dim = head_dim;
  p.block_size = block_size, p.num_query_blocks = query_blocks, p.num_key_blocks = key_blocks;
  p.scale = scale, p.scale_log2 = scale * 1.4426950408889634f, p.causal = causal;
  p.grad_out = grad_out, p.grad_q = grad_q, p.grad_k = grad_k, p.grad_v = grad_v, p.delta = delta;
  const bool backward = grad_out != nullptr;
  switch (dtype) {
    case 0: return run_head_dim<__half>(p, backward);
    case 1: return run_head_dim<__nv_bfloat16>(p, backward);
    default: return run_head_dim<float>(p, backward);
  }
}

namespace {

template <typename Traits>
void linformer_projection(const LinformerProjectionParams& p) {
  const dim3 grid(tiles(p.projected_len, Traits::kRows), p.splits, p.batch * p.heads);
  if constexpr (std::is_same_v<typename Traits::Element, float>) {
    run_grid(linformer_projection_simt_kernel<Traits>, grid, Traits::kThreads, Traits::kSharedBytes, p);
  } else {
    run_grid(linformer_projection_kernel<Traits>, grid, Traits::kThreads, Traits::kSharedBytes, p);
  }
  if (p.splits > 1) {
    const int64_t count = int64_t(p.batch) * p.heads * p.projected_len * p.head_dim;
    constexpr int kThreads = kLinformerReduceThreads;
    run_grid(linformer_projection_reduce_kernel<kThreads>, dim3(tiles(int(count), kThreads)), kThreads, 0, p);
  }
}

template <typename Element>
void linformer_projection_head_dim(const LinformerProjectionParams& p) {
  constexpr bool kSimt = std::is_same_v<Element, float>;
  switch (p.head_dim) {
    case 32:
      return linformer_projection<
          std::conditional_t<kSimt, LinformerProjectionSimtTraits<32>, LinformerProjectionTraits<Element, 32>>>(p);
    case 64:
      return linformer_projection<
          std::conditional_t<kSimt, LinformerProjectionSimtTraits<64>, LinformerProjectionTraits<Element, 64>>>(p);
    default:
      return linformer_projection<
          std::conditional_t<kSimt, LinformerProjectionSimtTraits<128>, LinformerProjectionTraits<Element, 128>>>(p);
  }
}

}  // namespace

// K' = P_k K, V' = P_v V. k, v contiguous (B, H, Nk, D); proj_k, proj_v (proj_heads, kp, proj_row_stride)
// contiguous with proj_heads 1 (shared) or H, of which the first Nk columns are used. The keys are split
// into chunks of keys_per_split; k_partial and v_partial hold (splits, B, H, kp, D) floats, k_proj and
// v_proj (B, H, kp, D) (with one split the result is in the partials).
extern "C" void emulated_linformer_projection(int dtype, const void* k, const void* v, const void* proj_k,
                                              const void* proj_v, int proj_heads, int proj_row_stride,
                                              const bool* key_padding_mask, int batch, int heads, int key_len,
                                              int head_dim, int projected_len, int keys_per_split, float* k_partial,
                                              float* v_partial, float* k_proj, float* v_proj) {
  LinformerProjectionParams p{};
  p.k = k, p.v = v, p.proj_k = proj_k, p.proj_v = proj_v;
  p.k_partial = k_partial, p.v_partial = v_partial, p.k_proj = k_proj, p.v_proj = v_proj;
  p.split_stride = int64_t(batch) * heads * projected_len * head_dim;
  p.k_row_stride = p.v_row_stride = head_dim;
  p.k_head_stride = p.v_head_stride = int64_t(key_len) * head_dim;
  p.k_batch_stride = p.v_batch_stride = int64_t(heads) * key_len * head_dim;
  p.proj_k_row_stride = p.proj_v_row_stride = proj_row_stride;
  p.proj_k_head_stride = p.proj_v_head_stride = proj_heads == 1 ? 0 : int64_t(projected_len) * proj_row_stride;
  p.key_padding_mask = key_padding_mask;
  p.batch = batch, p.heads = heads, p.key_len = key_len, p.head_dim = head_dim, p.projected_len = projected_len;
  p.keys_per_split = keys_per_split;
  p.splits = (key_len + keys_per_split - 1) / keys_per_split;
  switch (dtype) {
    case 0: return linformer_projection_head_dim<__half>(p);
    case 1: return linformer_projection_head_dim<__nv_bfloat16>(p);
    default: return linformer_projection_head_dim<float>(p);
  }
}

namespace {

void performer_sum_splits(const float* partial, float* out, int64_t count, int splits) {
  constexpr int kThreads = kPerformerSumThreads;
  run_grid(performer_sum_splits_kernel<kThreads>, dim3(tiles(int(count), kThreads)), kThreads, 0,
           PerformerSplits{partial, out, count, splits});
}

// Causal: the kernel sequence of csrc/cuda/performer_launch.cuh with the workspaces of csrc/cuda/performer_api.cpp
// (poisoned with NaN) and its host steps (dden, relu's zero key_stabiliser and relu_keys_seen) done here in place
// of ATen.
template <typename Element, int HeadDim>
void performer_causal(PerformerParams p, bool backward) {
  using Traits = PerformerTraits<Element, HeadDim>;
  using Causal = PerformerCausalTraits<Traits>;
  const unsigned heads = unsigned(p.batch * p.heads);
  const int chunks = tiles(p.query_len, Traits::kRows);
  const int64_t rows = int64_t(heads) * p.query_len, columns = int64_t(heads) * p.features;
  const int64_t feature_tiles = tiles(p.features, Traits::kFeatures);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> chunk_max((chunks + 1) * columns, nan), running_max(rows, nan), query_max(rows, nan);
  std::vector<float> query_constant(rows, nan), dden(rows, nan);
  std::vector<float> shares(feature_tiles * rows * (HeadDim + 1), nan), grad_k_shares(feature_tiles * rows * HeadDim, nan);
  std::vector<float> grad_v_shares(feature_tiles * rows * HeadDim, nan), row_sums(feature_tiles * rows, nan);
  std::vector<float> key_row_sums(feature_tiles * rows, nan);
  p.chunk_max = chunk_max.data(), p.running_max = running_max.data(), p.query_max = query_max.data();
  p.query_constant = query_constant.data(), p.grad_den = dden.data();
  p.shares = shares.data(), p.grad_k_shares = grad_k_shares.data(), p.grad_v_shares = grad_v_shares.data();
  p.row_sum_shares = row_sums.data(), p.key_row_sum_shares = key_row_sums.data();
  if (backward) p.key_stabiliser = nullptr;
  if (!p.softmax) {
    if (!backward) std::fill(p.key_stabiliser, p.key_stabiliser + rows, 0.f);
    p.running_max = nullptr;
    if (!backward && p.key_padding_mask != nullptr) {  // relu_keys_seen
      for (int64_t row = 0; row < rows; ++row) {
        const int64_t batch = row / (int64_t(p.heads) * p.query_len), position = row % p.query_len;
        const bool *mask = p.key_padding_mask + batch * p.key_len, *end = mask + position + 1;
        running_max[row] = std::find(mask, end, false) != end ? 0.f : -std::numeric_limits<float>::infinity();
      }
      p.running_max = running_max.data();
    }
  }
  if (p.softmax) {
    PerformerParams chunk_maxima = p;
    chunk_maxima.key_max_partial = p.chunk_max + columns;
    chunk_maxima.keys_per_split = Traits::kRows, chunk_maxima.key_splits = chunks;
    run_grid(performer_key_max_kernel<Traits>, dim3(unsigned(feature_tiles), chunks, heads), Traits::kThreads,
             Traits::bytes(Traits::kKeyMaxFloats), chunk_maxima);
    constexpr int kThreads = kPerformerSumThreads;
    run_grid(performer_running_max_kernel<kThreads>, dim3(tiles(int(columns), kThreads)), kThreads, 0,
             PerformerSplits{nullptr, p.chunk_max, columns, chunks});
    run_grid(performer_causal_query_stabiliser_kernel<Traits>, dim3(chunks, 1, heads), Traits::kThreads,
             Traits::bytes(Causal::query_stabiliser_floats(p.features)), p);
  }
  const dim3 tile_grid(unsigned(feature_tiles), 1, heads);
  if (!backward) {
    run_grid(performer_causal_fwd_kernel<Traits>, tile_grid, Traits::kThreads, Traits::bytes(Causal::kFwdFloats), p);
    run_grid(performer_causal_output_kernel<Traits>, dim3(tiles_of(p.query_len, Traits::kRows), 1, heads),
             Traits::kThreads, 0, p);
    return;
  }
  const Element* grad_out = static_cast<const Element*>(p.grad_out);
  const Element* out = static_cast<const Element*>(p.out);
  for (int64_t row = 0; row < rows; ++row) {  // dden = -(dnum . out), dnum = grad_out / den in float32
    const float den = p.normaliser[row];
    double dot = 0;
    for (int c = 0; c < HeadDim; ++c) {
      dot += double(static_cast<float>(grad_out[row * HeadDim + c]) / den) * double(static_cast<float>(out[row * HeadDim + c]));
    }
    dden[row] = den == 0.f ? 0.f : float(-dot);
  }
  run_grid(performer_causal_bwd_query_kernel<Traits>, tile_grid, Traits::kThreads, Traits::bytes(Causal::kBwdFloats), p);
  run_grid(performer_causal_bwd_key_kernel<Traits>, tile_grid, Traits::kThreads, Traits::bytes(Causal::kBwdFloats), p);
  run_grid(performer_causal_grads_kernel<Traits>, dim3(tiles_of(p.query_len, Traits::kRows), 2, heads),
           Traits::kThreads, 0, p);
}

// The kernel sequence of csrc/cuda/performer_launch.cuh.
template <typename Element, int HeadDim>
void performer(const PerformerParams& p, bool backward) {
  using Traits = PerformerTraits<Element, HeadDim>;
  if (p.causal) return performer_causal<Element, HeadDim>(p, backward);
  const unsigned heads = unsigned(p.batch * p.heads);
  const int64_t state_count = int64_t(heads) * p.features * (HeadDim + 1);
  const dim3 query_grid(tiles(p.query_len, Traits::kRows), 1, heads);
  if (!backward) {
    const dim3 key_grid(tiles(p.features, Traits::kFeatures), p.key_splits, heads);
    if (p.softmax) {
      run_grid(performer_key_max_kernel<Traits>, key_grid, Traits::kThreads, Traits::bytes(Traits::kKeyMaxFloats), p);
    }
    run_grid(performer_state_kernel<Traits>, key_grid, Traits::kThreads, Traits::bytes(Traits::kStateFloats), p);
    if (p.key_splits > 1) performer_sum_splits(p.state_partial, p.state, state_count, p.key_splits);
    run_grid(performer_output_kernel<Traits>, query_grid, Traits::kThreads,
             Traits::bytes(Traits::output_floats(p.features)), p);
    return;
  }
  run_grid(performer_bwd_query_kernel<Traits>, query_grid, Traits::kThreads,
           Traits::bytes(Traits::bwd_query_floats(p.features)), p);
  const dim3 state_grid(tiles(p.features, Traits::kFeatures), p.query_splits, heads);
  run_grid(performer_bwd_state_kernel<Traits>, state_grid, Traits::kThreads, Traits::bytes(Traits::kBwdStateFloats), p);
  if (p.query_splits > 1) performer_sum_splits(p.grad_state_partial, p.grad_state, state_count, p.query_splits);
  run_grid(performer_bwd_key_kernel<Traits>, dim3(tiles(p.key_len, Traits::kRows), 1, heads), Traits::kThreads,
           Traits::bytes(Traits::kBwdKeyFloats), p);
}

template <typename Element>
void performer_head_dim(const PerformerParams& p, bool backward) {
  switch (p.head_dim) {
    case 32: return performer<Element, 32>(p, backward);
    case 64: return performer<Element, 64>(p, backward);
    default: return performer<Element, 128>(p, backward);
  }
}

}  // namespace

// Performer. q (B, H, Nq, D), k, v (B, H, Nk, D) contiguous; projection float32 (proj_heads, m, D)
// with proj_heads 1 (shared) or H. Forward (grad_out null): out, normaliser (B, H, Nq), key_stabiliser
// (B, H, m; causal: (B, H, Nk)), state (B, H, m, D + 1); workspaces key_max_partial (key splits, B, H, m) and state_partial
// (key splits, B, H, m, D + 1). Backward: the forward's saved tensors are inputs, and grad_q, grad_k, grad_v
// outputs; workspaces query_rows (B, H, Nq, 3), grad_state (B, H, m, D + 1) and grad_state_partial
// (query splits, B, H, m, D + 1).
extern "C" void emulated_performer(int dtype, const void* q, const void* k, const void* v, const float* projection,
                                   int proj_heads, const bool* key_padding_mask, int batch, int heads, int query_len,
                                   int key_len, int head_dim, int features, int keys_per_split,
                                   int queries_per_split, float sqrt_scale, bool softmax, bool causal, void* out,
                                   float* normaliser, float* key_stabiliser, float* state, float* key_max_partial,
                                   float* state_partial, const void* grad_out, void* grad_q, void* grad_k,
                                   void* grad_v, float* query_rows, float* grad_state, float* grad_state_partial) {
  PerformerParams p{};
  p.q = q, p.k = k, p.v = v, p.projection = projection;
  p.projection_head_stride = proj_heads == 1 ? 0 : int64_t(features) * head_dim;
  p.out = out, p.normaliser = normaliser, p.key_stabiliser = key_stabiliser, p.state = state;
  p.key_max_partial = key_max_partial, p.state_partial = state_partial;
  p.q_row_stride = head_dim, p.q_head_stride = int64_t(query_len) * head_dim;
  p.q_batch_stride = int64_t(heads) * query_len * head_dim;
  p.k_row_stride = p.v_row_stride = head_dim;
  p.k_head_stride = p.v_head_stride = int64_t(key_len) * head_dim;
  p.k_batch_stride = p.v_batch_stride = int64_t(heads) * key_len * head_dim;
  p.key_padding_mask = key_padding_mask;
  p.batch = batch, p.heads = heads, p.query_len = query_len, p.key_len = key_len, p.head_dim = head_dim;
  p.features = features;
  p.keys_per_split = keys_per_split, p.key_splits = (key_len + keys_per_split - 1) / keys_per_split;
  p.queries_per_split = queries_per_split;
  p.query_splits = (query_len + queries_per_split - 1) / queries_per_split;
  p.sqrt_scale = sqrt_scale, p.softmax = softmax, p.causal = causal;
  p.grad_out = grad_out, p.grad_q = grad_q, p.grad_k = grad_k, p.grad_v = grad_v;
  p.query_rows = query_rows, p.grad_state = grad_state, p.grad_state_partial = grad_state_partial;
  const bool backward = grad_out != nullptr;
  switch (dtype) {
    case 0: return performer_head_dim<__half>(p, backward);
    case 1: return performer_head_dim<__nv_bfloat16>(p, backward);
    default: return performer_head_dim<float>(p, backward);
  }
}

// How many CTAs so far wrote shared memory past their launch's request; the tests expect none.
extern "C" int emulated_shared_memory_overruns() { return shared_memory_overruns; }
