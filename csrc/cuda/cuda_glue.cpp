// pybind11 entry points of the CUDA kernels: tensors in, AttentionParams to the kernels, on the
// current stream. The only CUDA file that includes torch headers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cstdint>

#include "../params_from_tensors.h"
#include "flash_cuda.h"

namespace fastattn {
namespace {

// What cp.async's 16-byte copies need: unit head-dim stride, 8-element-aligned other strides,
// a 16-byte aligned base.
void check_tile_layout(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.stride(3) == 1, name, " needs a unit head-dim stride, got ", t.stride(3));
  for (int d = 0; d < 3; ++d)
    TORCH_CHECK(t.size(d) == 1 || t.stride(d) % 8 == 0, name, " stride ", d, " must be a multiple of 8, got ",
                t.stride(d));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
}

void check_call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Call& call) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "the CUDA kernels take float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(cuda::has_head_dim(q.size(3)), "the CUDA kernels take head dims 64 and 128, got ", q.size(3));
  TORCH_CHECK(!call.attn_mask.has_value(), "the CUDA kernels take no attn_mask");
  TORCH_CHECK(!call.cu_seqlens_q.has_value() && !call.cu_seqlens_k.has_value(),
              "the CUDA kernels take no packed sequences (cu_seqlens)");
  TORCH_CHECK(call.dropout_p == 0.0, "the CUDA kernels have no dropout");
  TORCH_CHECK(call.window_left < 0 && call.window_right < 0 && call.softcap == 0.0 && !call.alibi_slopes && !call.sinks,
              "the CUDA kernels take no score modifiers");
  check_tile_layout(q, "q");
  check_tile_layout(k, "k");
  check_tile_layout(v, "v");
}

// The call's fields after the buffers, in their order (call.h), as fastattn.backends.cuda passes them.
void cuda_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                  at::Tensor& lse FASTATTN_PY_CALL_PARAMS) {
  const Call call = FASTATTN_CALL_FROM_PARAMS;
  check_call(q, k, v, call);
  check_tile_layout(out, "out");
  const c10::cuda::CUDAGuard guard(q.device());
  cuda::forward(make_params(q, k, v, out, lse, call),
                c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void cuda_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
                   at::Tensor& dq, at::Tensor& dk, at::Tensor& dv FASTATTN_PY_CALL_PARAMS) {
  const Call call = FASTATTN_CALL_FROM_PARAMS;
  check_call(q, k, v, call);
  check_tile_layout(dout, "dout");
  check_tile_layout(out, "out");
  const c10::cuda::CUDAGuard guard(q.device());
  const AttentionBwdParams p = make_bwd_params(dout, q, k, v, out, lse, dlse, call, dq, dk, dv);
  at::Tensor workspace = at::empty({cuda::backward_workspace_floats(p)}, lse.options());
  cuda::backward(p, workspace.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void register_cuda(pybind11::module_& m) {
  m.def("cuda_forward", &cuda_forward, "fused attention forward on tensor cores (writes out, lse)");
  m.def("cuda_backward", &cuda_backward, "fused attention backward on tensor cores (writes dq, dk, dv)");
}

}  // namespace fastattn
