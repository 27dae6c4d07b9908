// Instantiation: backward, head dim 128, bf16.
#include "launch.cuh"

template void fastattn::cuda::run_bwd<128, __nv_bfloat16>(const fastattn::AttentionBwdParams&, float*, cudaStream_t);
