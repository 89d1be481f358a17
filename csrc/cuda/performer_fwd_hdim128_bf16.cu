// One instantiation per file keeps each nvcc job small and lets the build run them in parallel.
#include "performer_launch.cuh"

namespace fastattn::cuda {
template void run_performer_fwd<__nv_bfloat16, 128>(const PerformerParams&, cudaStream_t);
}  // namespace fastattn::cuda
