// Instantiation: backward, head dim 64, bf16.
#include "launch.cuh"

template void fastattn::cuda::run_bwd<64, __nv_bfloat16>(const fastattn::AttentionBwdParams&, float*, cudaStream_t);
