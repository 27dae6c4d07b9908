// Instantiation: forward, head dim 64, fp16.
#include "flash_fwd.cuh"
#include "flash_cuda.h"

template void fastattn::cuda::run_fwd<64, __half>(const fastattn::AttentionParams&, cudaStream_t);
