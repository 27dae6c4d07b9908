// Instantiation: forward, head dim 128, bf16.
#include "launch.cuh"

template void fastattn::cuda::run_fwd<128, __nv_bfloat16>(const fastattn::AttentionParams&, cudaStream_t);
