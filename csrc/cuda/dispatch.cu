// (head dim, dtype) -> the kernel instantiation compiled in its own .cu file.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "flash_bwd.cuh"
#include "flash_cuda.h"

namespace fastattn::cuda {

bool has_head_dim(int64_t head_dim) { return head_dim == 64 || head_dim == 128; }

void forward(const AttentionParams& p, cudaStream_t s) {
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.head_dim == 64) return bf16 ? run_fwd<64, __nv_bfloat16>(p, s) : run_fwd<64, __half>(p, s);
  return bf16 ? run_fwd<128, __nv_bfloat16>(p, s) : run_fwd<128, __half>(p, s);
}

void backward(const AttentionBwdParams& p, float* ws, cudaStream_t s) {
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.head_dim == 64) return bf16 ? run_bwd<64, __nv_bfloat16>(p, ws, s) : run_bwd<64, __half>(p, ws, s);
  return bf16 ? run_bwd<128, __nv_bfloat16>(p, ws, s) : run_bwd<128, __half>(p, ws, s);
}

int64_t backward_workspace_floats(const AttentionBwdParams& p) { return bwd_workspace_floats(p); }

}  // namespace fastattn::cuda
