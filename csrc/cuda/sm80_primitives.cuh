// Warp-level building blocks of the tensor-core kernels, written as inline PTX for sm80+:
// cp.async (global -> shared without registers), ldmatrix (shared -> mma fragments) and
// mma.sync.m16n8k16 with float32 accumulation, for half and bfloat16.
//
// Fragment layouts of mma.m16n8k16 (lane = threadIdx.x % 32, g = lane / 4, t = lane % 4):
//   A (16 x 16, row-major): a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..)
//   B (16 x 8, k x n):      b[0] = (k 2t..2t+1, n g), b[1] = (k 2t+8.., n g)
//   C (16 x 8, float):      c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, 2t..2t+1)
// so the C fragments of two adjacent n8 tiles are, once packed to 16 bits, the A fragment of a k16 slice.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace fastattn::cuda {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FASTATTN_SM80_UNAVAILABLE 1
#endif

template <typename T>
struct MmaType;
template <>
struct MmaType<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t packed) {
    return __half22float2(*reinterpret_cast<__half2*>(&packed));
  }
};
template <>
struct MmaType<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t packed) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&packed));
  }
};

#ifdef FASTATTN_SM80_EMULATION
// tests/cuda_emulation compiles the kernels for the CPU and supplies these collectives there (one OS
// thread per CUDA thread), so the kernels' logic is tested on machines without a GPU.
#include FASTATTN_SM80_EMULATION
#else
__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// Copies 16 bytes global -> shared asynchronously: the first `source_bytes` (0 to 16) from `global`, zeros
// for the rest (bytes past source_bytes are not read). Rows past the end of a sequence are filled with
// source_bytes = 0, the ragged last columns of a row with fewer than 16.
__device__ __forceinline__ void cp_async_16(void* shared, const void* global, int source_bytes) {
#ifndef FASTATTN_SM80_UNAVAILABLE
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared)), "l"(global),
               "r"(source_bytes));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifndef FASTATTN_SM80_UNAVAILABLE
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
#ifndef FASTATTN_SM80_UNAVAILABLE
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* shared) {
#ifndef FASTATTN_SM80_UNAVAILABLE
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(shared)));
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* shared) {
#ifndef FASTATTN_SM80_UNAVAILABLE
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(shared)));
#endif
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifndef FASTATTN_SM80_UNAVAILABLE
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
#ifndef FASTATTN_SM80_UNAVAILABLE
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
#endif  // FASTATTN_SM80_EMULATION

// A shared-memory tile of Rows x Cols 16-bit elements, row-major, each row padded by 8 elements
// (16 bytes) so that the 8 row addresses of one ldmatrix fall in distinct banks.
template <typename T, int Rows, int Cols>
struct SharedTile {
  static constexpr int kStride = Cols + 8;
  static constexpr int kElements = Rows * kStride;
  T* data;
  __device__ __forceinline__ T* at(int row, int col) const { return data + row * kStride + col; }
};

// Warp-level products on shared tiles. A is RowTiles m16 tiles of a row-major [m][k] tile (rows m0 + 16 i..
// for tile i); B comes either stored [n][k] ("nk": K for q.k^T) or stored [k][n] ("kn": V for p.v), the
// latter read transposed. Each B fragment is read from shared memory once for all RowTiles tiles: a warp
// that owns more rows reads B fewer times per row.

// Where the C fragment elements that `lane` holds lie in a warp's accumulator: c[e] of m16 tile i, n8 tile n
// is at row fragment_row(m0, i, e / 2, lane) = m0 + 16 i + g (+ 8) and column fragment_column(n, e, lane).
__device__ __forceinline__ int fragment_row(int m0, int row_tile, int half, int lane) {
  return m0 + 16 * row_tile + 8 * half + lane / 4;
}
__device__ __forceinline__ int fragment_column(int n8_tile, int element, int lane) {
  return 8 * n8_tile + 2 * (lane % 4) + element % 2;
}

// acc (RowTiles x 16 x N) += A[m0.., k] (RowTiles x 16 x K) * B^T where B is stored [n][k]: for S = Q K^T.
template <typename T, int N, int K, int RowTiles, typename TileA, typename TileB>
__device__ __forceinline__ void warp_gemm_a_smem_b_nk(float (&acc)[RowTiles][N / 8][4], const TileA& a, int m0,
                                                      const TileB& b, int n0, int lane) {
#pragma unroll
  for (int k = 0; k < K; k += 16) {
    uint32_t a_frags[RowTiles][4];
#pragma unroll
    for (int i = 0; i < RowTiles; ++i) ldmatrix_x4(a_frags[i], a.at(m0 + 16 * i + (lane % 16), k + (lane / 16) * 8));
#pragma unroll
    for (int n = 0; n < N; n += 16) {
      uint32_t b_frag[4];
      ldmatrix_x4(b_frag, b.at(n0 + n + (lane / 16) * 8 + (lane % 8), k + ((lane / 8) % 2) * 8));
#pragma unroll
      for (int i = 0; i < RowTiles; ++i) {
        mma_16816<T>(acc[i][n / 8], a_frags[i], b_frag[0], b_frag[1]);
        mma_16816<T>(acc[i][n / 8 + 1], a_frags[i], b_frag[2], b_frag[3]);
      }
    }
  }
}

// acc (RowTiles x 16 x N) += A (RowTiles x 16 x K, register fragments: k16 slice j of tile i in a_frags[i][j])
// * B where B is stored [k][n].
template <typename T, int N, int K, int RowTiles, typename TileB>
__device__ __forceinline__ void warp_gemm_a_regs_b_kn(float (&acc)[RowTiles][N / 8][4],
                                                      const uint32_t (&a_frags)[RowTiles][K / 16][4], const TileB& b,
                                                      int k0, int lane) {
#pragma unroll
  for (int k = 0; k < K; k += 16) {
#pragma unroll
    for (int n = 0; n < N; n += 16) {
      uint32_t b_frag[4];
      ldmatrix_x4_trans(b_frag, b.at(k0 + k + ((lane / 8) % 2) * 8 + (lane % 8), n + (lane / 16) * 8));
#pragma unroll
      for (int i = 0; i < RowTiles; ++i) {
        mma_16816<T>(acc[i][n / 8], a_frags[i][k / 16], b_frag[0], b_frag[1]);
        mma_16816<T>(acc[i][n / 8 + 1], a_frags[i][k / 16], b_frag[2], b_frag[3]);
      }
    }
  }
}

// The same for one m16 tile (acc 16 x N, A fragments a_frags[K / 16]).
template <typename T, int N, int K, typename TileB>
__device__ __forceinline__ void warp_gemm_a_regs_b_kn(float (&acc)[N / 8][4], const uint32_t (&a_frags)[K / 16][4],
                                                      const TileB& b, int k0, int lane) {
  warp_gemm_a_regs_b_kn<T, N, K>(reinterpret_cast<float(&)[1][N / 8][4]>(acc),
                                 reinterpret_cast<const uint32_t(&)[1][K / 16][4]>(a_frags), b, k0, lane);
}

// Packs a float accumulator (16 x N, as C fragments) into A fragments (N / 16 slices of k16).
template <typename T, int N>
__device__ __forceinline__ void accumulator_to_a_fragments(uint32_t (&a)[N / 16][4], const float (&c)[N / 8][4]) {
#pragma unroll
  for (int i = 0; i < N / 16; ++i) {
    a[i][0] = MmaType<T>::pack(c[2 * i][0], c[2 * i][1]);
    a[i][1] = MmaType<T>::pack(c[2 * i][2], c[2 * i][3]);
    a[i][2] = MmaType<T>::pack(c[2 * i + 1][0], c[2 * i + 1][1]);
    a[i][3] = MmaType<T>::pack(c[2 * i + 1][2], c[2 * i + 1][3]);
  }
}

// Loads Rows x Cols elements (row r from global row `row0 + r`, `row_stride` elements apart) into a
// shared tile with cp.async, 16 bytes per copy, zero-filling the rows where row_visible(r) is false and
// the columns at or past `valid_cols` (a 16-byte copy that straddles it reads only its valid prefix).
template <int Threads, typename T, int Rows, int Cols, typename RowVisible>
__device__ __forceinline__ void load_tile_async_if(const SharedTile<T, Rows, Cols>& tile, const T* global,
                                                   int64_t row_stride, RowVisible row_visible, int valid_cols,
                                                   int thread) {
  constexpr int kChunksPerRow = Cols * static_cast<int>(sizeof(T)) / 16;
  constexpr int kElementsPerChunk = 16 / static_cast<int>(sizeof(T));
#pragma unroll
  for (int chunk = thread; chunk < Rows * kChunksPerRow; chunk += Threads) {
    const int row = chunk / kChunksPerRow;
    const int col = (chunk % kChunksPerRow) * kElementsPerChunk;
    const int valid_elements = row_visible(row) ? min(kElementsPerChunk, max(valid_cols - col, 0)) : 0;
    cp_async_16(tile.at(row, col), valid_elements > 0 ? global + row * row_stride + col : global,
                valid_elements * static_cast<int>(sizeof(T)));
  }
}

// The same for whole rows: rows at or past `valid_rows` are zero-filled.
template <int Threads, typename T, int Rows, int Cols>
__device__ __forceinline__ void load_tile_async(const SharedTile<T, Rows, Cols>& tile, const T* global, int64_t row_stride,
                                                int valid_rows, int thread) {
  load_tile_async_if<Threads>(tile, global, row_stride, [valid_rows](int row) { return row < valid_rows; }, Cols,
                              thread);
}

// The A fragments (16 x K, k16 slice i in frags[i]) of rows m0.. and columns k0.. of a row-major shared tile.
template <int K, typename TileA>
__device__ __forceinline__ void load_a_fragments(uint32_t (&frags)[K / 16][4], const TileA& a, int m0, int k0,
                                                 int lane) {
#pragma unroll
  for (int k = 0; k < K; k += 16) ldmatrix_x4(frags[k / 16], a.at(m0 + (lane % 16), k0 + k + (lane / 16) * 8));
}

}  // namespace fastattn::cuda
