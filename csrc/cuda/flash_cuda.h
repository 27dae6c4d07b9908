// Host entry points of the CUDA kernels: plain C++ and CUDA runtime, no torch headers.
#pragma once
#include <cuda_runtime.h>

#include "../attention_params.h"

namespace fastattn::cuda {

// Head dims with compiled kernels (one .cu per head dim and dtype, for parallel builds).
bool has_head_dim(int64_t head_dim);

// p.dtype must be fp16 or bf16 and p.head_dim one of has_head_dim's. Pointers 16-byte aligned,
// head-dim strides 1 and every other q/k/v/dout stride a multiple of 8 elements (the glue checks).
void forward(const AttentionParams& p, cudaStream_t stream);
// workspace: backward_workspace_floats(p) floats of device memory.
void backward(const AttentionBwdParams& p, float* workspace, cudaStream_t stream);
int64_t backward_workspace_floats(const AttentionBwdParams& p);

template <int D, typename T>
void run_fwd(const AttentionParams& p, cudaStream_t stream);
template <int D, typename T>
void run_bwd(const AttentionBwdParams& p, float* workspace, cudaStream_t stream);

}  // namespace fastattn::cuda
