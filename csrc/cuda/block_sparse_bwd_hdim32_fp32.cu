// One instantiation per file keeps each nvcc job small and lets the build run them in parallel.
#include "block_sparse_launch.cuh"

namespace fastattn::cuda {
template void run_block_sparse_bwd<float, 32>(const BlockSparseBwdParams&, cudaStream_t);
}  // namespace fastattn::cuda
