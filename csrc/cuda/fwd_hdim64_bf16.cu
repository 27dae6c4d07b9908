// Instantiation: forward, head dim 64, bf16.
#include "launch.cuh"

template void fastattn::cuda::run_fwd<64, __nv_bfloat16>(const fastattn::AttentionParams&, cudaStream_t);
