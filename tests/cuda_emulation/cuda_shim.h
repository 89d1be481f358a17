// Force-included (g++ -include) before csrc/cuda's kernel headers so that g++ compiles them for the
// CPU: every CUDA thread becomes an OS thread, a CTA's threads meet at a std::barrier for
// __syncthreads, and a warp's 32 threads meet at another for each warp collective (shuffles here,
// ldmatrix and mma in sm80_emulation.h), exchanging their operands through per-lane slots.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <vector>

namespace emulation {

struct Warp {
  std::barrier<> barrier{32};
  alignas(16) unsigned char slots[32][64];
};

struct Cta {
  explicit Cta(int threads) : barrier(threads), warps(new Warp[threads / 32]) {}
  std::barrier<> barrier;
  std::unique_ptr<Warp[]> warps;
};

// A 16-byte cp.async: it lands in shared memory only when a cp.async.wait_group retires its group,
// so a kernel that reads a tile before waiting for it reads the poison left there.
struct AsyncCopy {
  void* shared;
  const void* global;
  int source_bytes;  // read from global; the rest of the 16 bytes is zero-filled
};

struct ThreadContext {
  uint3 thread_index, block_index;
  Cta* cta;
  Warp* warp;
  int lane;
  std::vector<AsyncCopy> uncommitted;
  std::deque<std::vector<AsyncCopy>> committed;
};

inline thread_local ThreadContext context;

// Every lane of the warp deposits `mine`; `compute(value_of)` then runs on each lane, where
// value_of(l) is what lane l deposited. The second barrier keeps the slots until all have read them.
template <typename T, typename Compute>
auto exchange(const T& mine, Compute compute) {
  static_assert(sizeof(T) <= sizeof(Warp::slots[0]));
  Warp& warp = *context.warp;
  std::memcpy(warp.slots[context.lane], &mine, sizeof(T));
  warp.barrier.arrive_and_wait();
  auto result = compute([&warp](int lane) {
    T value;
    std::memcpy(&value, warp.slots[lane], sizeof(T));
    return value;
  });
  warp.barrier.arrive_and_wait();
  return result;
}

}  // namespace emulation

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#define threadIdx (::emulation::context.thread_index)
#define blockIdx (::emulation::context.block_index)

inline void __syncthreads() { emulation::context.cta->barrier.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  return emulation::exchange(value, [lane_mask](auto value_of) { return value_of(emulation::context.lane ^ lane_mask); });
}

inline float __shfl_sync(unsigned, float value, int source_lane) {
  return emulation::exchange(value, [source_lane](auto value_of) { return value_of(source_lane); });
}

inline float __log2f(float x) { return std::log2(x); }

using std::max;
using std::min;
