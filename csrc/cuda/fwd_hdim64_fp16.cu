// Instantiation: forward, head dim 64, fp16.
#include "launch.cuh"

template void fastattn::cuda::run_fwd<64, __half>(const fastattn::AttentionParams&, cudaStream_t);
