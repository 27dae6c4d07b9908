// Instantiation: backward, head dim 64, fp16.
#include "launch.cuh"

template void fastattn::cuda::run_bwd<64, __half>(const fastattn::AttentionBwdParams&, float*, cudaStream_t);
