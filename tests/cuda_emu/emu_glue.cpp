// fastattn_cuda_emu: csrc/cuda's kernels run on CPU tensors by the emulation in cuda_emu.h, with
// the entry points of csrc/cuda/cuda_glue.cpp (tests/test_cuda.py puts it behind the `cuda`
// backend's Python code).
#include <torch/extension.h>

#include "../../csrc/cuda/flash_bwd.cuh"
#include "../../csrc/params_from_tensors.h"

namespace fastattn {
namespace {

uint64_t g_seed = 0;  // each launch draws its fiber order from the next seed

struct EmuLaunch {
  std::vector<std::pair<const void*, size_t>> buffers;

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), cuda::Grid grid, int threads, int smem, const Args&... args) const {
    emu::launch({grid.x, grid.y, grid.z}, threads, smem, g_seed++, buffers, [&] { kernel(args...); });
  }
};

// Where each tensor's elements lie: from its first to one past its last.
std::vector<std::pair<const void*, size_t>> buffers(std::initializer_list<const at::Tensor*> ts) {
  std::vector<std::pair<const void*, size_t>> out;
  for (const at::Tensor* t : ts) {
    int64_t last = 0;
    for (int64_t d = 0; d < t->dim(); ++d) last += (t->size(d) - 1) * t->stride(d);
    out.emplace_back(t->data_ptr(), (last + 1) * t->element_size());
  }
  return out;
}

template <typename Run>
void by_type(const at::Tensor& q, Run run) {
  TORCH_CHECK((q.size(3) == 64 || q.size(3) == 128) && (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16),
              "the emulated CUDA kernels take fp16/bf16 and head dims 64, 128");
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  if (q.size(3) == 64) return bf16 ? run(std::integral_constant<int, 64>{}, __nv_bfloat16{}) : run(std::integral_constant<int, 64>{}, __half{});
  return bf16 ? run(std::integral_constant<int, 128>{}, __nv_bfloat16{}) : run(std::integral_constant<int, 128>{}, __half{});
}

void emu_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                 at::Tensor& lse FASTATTN_PY_CALL_PARAMS) {
  const AttentionParams p = make_params(q, k, v, out, lse, FASTATTN_CALL_FROM_PARAMS);
  by_type(q, [&](auto d, auto t) { cuda::forward_steps<decltype(d)::value, decltype(t)>(p, EmuLaunch{buffers({&q, &k, &v})}); });
}

void emu_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
                  at::Tensor& dq, at::Tensor& dk, at::Tensor& dv FASTATTN_PY_CALL_PARAMS) {
  const AttentionBwdParams p = make_bwd_params(dout, q, k, v, out, lse, dlse, FASTATTN_CALL_FROM_PARAMS, dq, dk, dv);
  at::Tensor ws = at::empty({cuda::bwd_workspace_floats(p)}, lse.options());
  by_type(q, [&](auto d, auto t) {
    cuda::backward_steps<decltype(d)::value, decltype(t)>(p, ws.data_ptr<float>(), EmuLaunch{buffers({&q, &k, &v, &dout, &ws})});
  });
}

}  // namespace
}  // namespace fastattn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("cuda_forward", &fastattn::emu_forward);
  m.def("cuda_backward", &fastattn::emu_backward);
}
