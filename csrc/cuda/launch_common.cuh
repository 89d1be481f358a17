// Host-side launch helpers shared by every mechanism's launch templates (*_launch.cuh).
#pragma once

#include <cuda_runtime_api.h>

#include <mutex>

namespace fastattn::cuda {

inline int tile_count(int length, int tile) { return (length + tile - 1) / tile; }

// Dynamic shared memory above 48 KB must be allowed per kernel, and per device (each device has its own
// context). Setting the attribute is a driver call that need not repeat on every launch, so it runs once
// per kernel and device; a kernel's request is a compile-time constant of its traits.
template <auto Kernel>
void allow_shared_bytes(int shared_bytes) {
  constexpr int kMaxDevices = 64;
  static std::once_flag allowed[kMaxDevices];
  int device = 0;
  cudaGetDevice(&device);
  const auto allow = [shared_bytes] {
    cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes);
  };
  if (device >= 0 && device < kMaxDevices) {
    std::call_once(allowed[device], allow);
  } else {
    allow();
  }
}

// Enqueues Kernel<<<grid, threads, shared_bytes, stream>>>(params); the caller checks the launch.
template <auto Kernel, typename Params>
void launch(dim3 grid, int threads, int shared_bytes, const Params& params, cudaStream_t stream) {
  if (shared_bytes > 48 * 1024) allow_shared_bytes<Kernel>(shared_bytes);
  Kernel<<<grid, threads, shared_bytes, stream>>>(params);
}

}  // namespace fastattn::cuda
