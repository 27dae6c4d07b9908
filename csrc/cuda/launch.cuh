// The kernels' launches on a CUDA stream: run_fwd and run_bwd, instantiated once per head dim
// and dtype (fwd_hdim*.cu, bwd_hdim*.cu).
#pragma once
#include <cuda_runtime.h>

#include "flash_bwd.cuh"
#include "flash_cuda.h"

namespace fastattn::cuda {

struct StreamLaunch {
  cudaStream_t stream;

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), Grid grid, int threads, int smem, const Args&... args) const {
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;  // no query or no key: CUDA refuses an empty grid
    // Above 48 KiB a kernel must opt in (set per launch, as FlashAttention does: it is cheap).
    if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    kernel<<<dim3(grid.x, grid.y, grid.z), threads, smem, stream>>>(args...);
  }
};

template <int D, typename T>
void run_fwd(const AttentionParams& p, cudaStream_t stream) {
  forward_steps<D, T>(p, StreamLaunch{stream});
}

template <int D, typename T>
void run_bwd(const AttentionBwdParams& p, float* workspace, cudaStream_t stream) {
  backward_steps<D, T>(p, workspace, StreamLaunch{stream});
}

}  // namespace fastattn::cuda
