// Instantiation: backward, head dim 128, fp16.
#include "launch.cuh"

template void fastattn::cuda::run_bwd<128, __half>(const fastattn::AttentionBwdParams&, float*, cudaStream_t);
