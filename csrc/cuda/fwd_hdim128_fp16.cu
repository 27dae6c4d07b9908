// Instantiation: forward, head dim 128, fp16.
#include "launch.cuh"

template void fastattn::cuda::run_fwd<128, __half>(const fastattn::AttentionParams&, cudaStream_t);
