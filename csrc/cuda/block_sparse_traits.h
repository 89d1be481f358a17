// Compile-time shapes of the block-sparse kernels. A CTA works on one tile of kTile query rows
// (forward, dQ) or key rows (dK/dV); each warp owns 16 of those rows in the tensor-core kernels.
// Block sizes (runtime) are multiples of kTile, so a tile never straddles two blocks of the layout.
#pragma once

#include "sm80_primitives.cuh"

namespace fastattn::cuda {

template <typename Element_, int HeadDim, int Tile>
struct TensorCoreTraits {
  using Element = Element_;
  static constexpr int kHeadDim = HeadDim;
  static constexpr int kTile = Tile;
  static constexpr int kWarps = Tile / 16;
  static constexpr int kThreads = kWarps * 32;
  using RowTile = SharedTile<Element, Tile, HeadDim>;
  static_assert(HeadDim % 16 == 0 && Tile % 16 == 0, "mma.m16n8k16 tiles");

  // The forward reads one tile of rows and one of keys and of values, with two slots of key flags (the
  // next tile's are written while the current ones are read).
  static constexpr int kFwdSharedBytes =
      3 * RowTile::kElements * static_cast<int>(sizeof(Element)) + 2 * Tile * static_cast<int>(sizeof(bool));
  // dQ: q, dO, V and two buffers of K, two slots of key flags. dK/dV: K, V, dO and two buffers of q with
  // their rows' lse and delta, one set of key flags.
  static constexpr int kBwdDqSharedBytes =
      5 * RowTile::kElements * static_cast<int>(sizeof(Element)) + 2 * Tile * static_cast<int>(sizeof(bool));
  static constexpr int kBwdDkdvSharedBytes = 5 * RowTile::kElements * static_cast<int>(sizeof(Element)) +
                                             4 * Tile * static_cast<int>(sizeof(float)) +
                                             Tile * static_cast<int>(sizeof(bool));
};

// float32 path (SIMT): a warp per row, 32 keys (or queries) per chunk, one per lane.
template <int HeadDim>
struct SimtTraits {
  using Element = float;
  static constexpr int kHeadDim = HeadDim;
  static constexpr int kTile = 32;
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

}  // namespace fastattn::cuda
