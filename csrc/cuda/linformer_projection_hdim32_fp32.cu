// One instantiation per file keeps each nvcc job small and lets the build run them in parallel.
#include "linformer_launch.cuh"

namespace fastattn::cuda {
template void run_linformer_projection<float, 32>(const LinformerProjectionParams&, cudaStream_t);
}  // namespace fastattn::cuda
