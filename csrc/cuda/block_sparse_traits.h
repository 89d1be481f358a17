// Compile-time shapes of the block-sparse kernels, and the shapes the launch templates choose.
#pragma once

#include <type_traits>

#include "sm80_primitives.cuh"

namespace fastattn::cuda {

// Tensor cores: a CTA owns kBlockM rows (queries in the forward and dQ, keys in dK/dV) and walks the other
// side kBlockN rows at a time. Each warp owns RowTilesPerWarp m16 tiles of rows, so it reads every fragment of
// the other side's tiles from shared memory once per 16 * RowTilesPerWarp rows (FlashAttention-2's forward:
// 128 rows, 4 warps of two m16 tiles). Block sizes (runtime) are multiples of kBlockM and kBlockN, so a tile
// never straddles two blocks of the layout.
template <typename Element_, int HeadDim, int BlockM, int BlockN, int RowTilesPerWarp>
struct TensorCoreTraits {
  using Element = Element_;
  static constexpr int kHeadDim = HeadDim;
  static constexpr int kBlockM = BlockM;
  static constexpr int kBlockN = BlockN;
  static constexpr int kRowTilesPerWarp = RowTilesPerWarp;
  static constexpr int kRowsPerWarp = 16 * RowTilesPerWarp;
  static constexpr int kWarps = BlockM / kRowsPerWarp;
  static constexpr int kThreads = kWarps * 32;
  using RowTile = SharedTile<Element, BlockM, HeadDim>;
  using ColumnTile = SharedTile<Element, BlockN, HeadDim>;
  static_assert(HeadDim % 16 == 0 && BlockN % 16 == 0 && BlockM % kRowsPerWarp == 0, "mma.m16n8k16 tiles");

  static constexpr int kRowTileBytes = RowTile::kElements * static_cast<int>(sizeof(Element));
  static constexpr int kColumnTileBytes = ColumnTile::kElements * static_cast<int>(sizeof(Element));
  // The forward reads one tile of rows and one of keys and of values, with two slots of key flags (the
  // next tile's are written while the current ones are read).
  static constexpr int kFwdSharedBytes =
      kRowTileBytes + 2 * kColumnTileBytes + 2 * BlockN * static_cast<int>(sizeof(bool));
  // dQ: q and dO rows, V and two buffers of K, two slots of key flags. dK/dV: K and V rows, dO and two buffers
  // of q with their rows' lse and delta, the key rows' flags.
  static constexpr int kBwdDqSharedBytes =
      2 * kRowTileBytes + 3 * kColumnTileBytes + 2 * BlockN * static_cast<int>(sizeof(bool));
  static constexpr int kBwdDkdvSharedBytes = 2 * kRowTileBytes + 3 * kColumnTileBytes +
                                             4 * BlockN * static_cast<int>(sizeof(float)) +
                                             BlockM * static_cast<int>(sizeof(bool));
};

// float32 path (SIMT): a warp per row, 32 keys (or queries) per chunk, one per lane.
template <int HeadDim>
struct SimtTraits {
  using Element = float;
  static constexpr int kHeadDim = HeadDim;
  static constexpr int kTile = 32;
  static constexpr int kBlockM = kTile;  // rows per CTA, as the launch templates read it
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsPerWarp = kTile / kWarps;
  static constexpr int kValuesPerLane = HeadDim / 32;
  // Tiles that lanes read by column (lane = row index) get one extra float per row: no bank conflicts.
  static constexpr int kPaddedStride = HeadDim + 1;
  static constexpr int kTileFloats = kTile * kPaddedStride;
  // The forward reads q, k and v tiles; the backward four (q, dO, k, v) and per-row statistics.
  static constexpr int kFwdSharedBytes =
      3 * kTileFloats * static_cast<int>(sizeof(float)) + kTile * static_cast<int>(sizeof(bool));
  static constexpr int kBwdSharedBytes = 4 * kTileFloats * static_cast<int>(sizeof(float)) +
                                         2 * kTile * static_cast<int>(sizeof(float)) +
                                         kTile * static_cast<int>(sizeof(bool));
  static_assert(HeadDim % 32 == 0, "each lane owns HeadDim / 32 columns");
};

// The shapes the launch templates (and the CPU emulation of the kernels) run, per dtype, head dim and block
// size: each with_*_traits calls `run` with std::type_identity of its kernel's traits.
//
// Each warp owns two m16 tiles (32 rows) where the kernel fits in registers without spills, in CTAs of 128
// rows (4 warps) when the block size is a multiple of 128 and that leaves two CTAs per SM, else of 64 rows
// (2 warps). Blocks of 32 keep 2 warps of one m16 tile: a one-warp CTA of 32 rows still holds whole tiles of
// the other side, so shared memory allows no more CTAs per SM, and the SM would hold half the warps.

// Rows per CTA, columns per step and m16 tiles per warp of a tensor-core kernel.
template <int BlockM, int BlockN, int RowTilesPerWarp>
struct TileShape {
  template <typename Element, int HeadDim>
  using Traits = TensorCoreTraits<Element, HeadDim, BlockM, BlockN, RowTilesPerWarp>;
};

// The SIMT traits for float32; for 16-bit types shape At128 at block sizes that are multiples of 128, At64 at
// multiples of 64, and 2 warps of one m16 tile at blocks of 32.
template <typename Element, int HeadDim, typename At128, typename At64, typename Run>
void with_traits(int block_size, Run run) {
  if constexpr (std::is_same_v<Element, float>) {
    run(std::type_identity<SimtTraits<HeadDim>>{});
  } else if (block_size % 128 == 0) {
    run(std::type_identity<typename At128::template Traits<Element, HeadDim>>{});
  } else if (block_size % 64 == 0) {
    run(std::type_identity<typename At64::template Traits<Element, HeadDim>>{});
  } else {
    run(std::type_identity<TensorCoreTraits<Element, HeadDim, 32, 32, 1>>{});
  }
}

// Forward: the key tile narrows to 32 at HeadDim 128, where the output accumulator alone takes 128 registers
// per thread (64 keys spill on sm_80).
template <typename Element, int HeadDim, typename Run>
void with_fwd_traits(int block_size, Run run) {
  constexpr int kKeyTile = HeadDim == 128 ? 32 : 64;
  with_traits<Element, HeadDim, TileShape<128, kKeyTile, 2>, TileShape<64, kKeyTile, 2>>(block_size, run);
}

// dQ holds its gradient and the P and dP tiles: 32 keys a step, 16 at HeadDim 128, where 128 rows would leave
// one CTA per sm_80 SM (shared memory: q and dO tiles of 128 x 128).
template <typename Element, int HeadDim, typename Run>
void with_bwd_dq_traits(int block_size, Run run) {
  using At64 = std::conditional_t<HeadDim == 128, TileShape<64, 16, 2>, TileShape<64, 32, 2>>;
  using At128 = std::conditional_t<HeadDim == 128, At64, TileShape<128, 32, 2>>;
  with_traits<Element, HeadDim, At128, At64>(block_size, run);
}

// dK/dV holds two gradients: at HeadDim 128 they alone would take 256 registers per thread for two m16 tiles,
// so it keeps 2 warps of one tile; at 64, 16 queries a step and 64 rows (four CTAs per SM, where 128 rows
// give two).
template <typename Element, int HeadDim, typename Run>
void with_bwd_dkdv_traits(int block_size, Run run) {
  using At64 = std::conditional_t<HeadDim == 128, TileShape<32, 32, 1>,
                                  std::conditional_t<HeadDim == 64, TileShape<64, 16, 2>, TileShape<64, 32, 2>>>;
  using At128 = std::conditional_t<HeadDim == 32, TileShape<128, 32, 2>, At64>;
  with_traits<Element, HeadDim, At128, At64>(block_size, run);
}

// Both: `run` is called with std::type_identity of the dK/dV kernel's traits and of the dQ kernel's.
template <typename Element, int HeadDim, typename Run>
void with_bwd_traits(int block_size, Run run) {
  with_bwd_dkdv_traits<Element, HeadDim>(block_size, [&](auto dkdv) {
    with_bwd_dq_traits<Element, HeadDim>(block_size, [&](auto dq) { run(dkdv, dq); });
  });
}

}  // namespace fastattn::cuda
