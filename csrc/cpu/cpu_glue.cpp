// pybind11 entry points of the CPU kernels: tensors in, AttentionParams to the kernel.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <chrono>
#include <utility>

#include "../params_from_tensors.h"
#include "../dropout_hash.h"
#include "flash_cpu.h"
#include "micro_kernels.h"

namespace fastattn {
namespace {

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

void cpu_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                 at::Tensor& lse, const MaskTensors& masks, bool causal, double scale,
                 double dropout_p, int64_t seed) {
  check_cpu(q, "q");
  cpu::forward(make_params(q, k, v, out, lse, masks, causal, scale, dropout_p, seed));
}

void cpu_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                  const std::optional<at::Tensor>& dlse, const MaskTensors& masks, bool causal,
                  double scale, double dropout_p, int64_t seed, at::Tensor& dq, at::Tensor& dk,
                  at::Tensor& dv) {
  check_cpu(q, "q");
  cpu::backward(make_bwd_params(dout, q, k, v, out, lse, dlse, masks, causal, scale, dropout_p,
                                seed, dq, dk, dv));
}

void cpu_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, at::Tensor& out,
                at::Tensor& lse, const at::Tensor& seqused_k, bool causal, double scale) {
  check_cpu(q, "q");
  AttentionParams p = make_params(q, k_cache, v_cache, out, lse, MaskTensors{}, causal, scale, 0.0, 0);
  TORCH_CHECK(seqused_k.scalar_type() == at::kInt && seqused_k.dim() == 1 && seqused_k.size(0) == q.size(0) &&
                  seqused_k.is_contiguous() && seqused_k.is_cpu(),
              "seqused_k must be a contiguous CPU (B,) int32 tensor");
  TORCH_CHECK(seqused_k.ge(0).all().item<bool>() && seqused_k.le(k_cache.size(2)).all().item<bool>(),
              "seqused_k entries must lie in [0, ", k_cache.size(2), "]");
  p.seqused_k = seqused_k.data_ptr<int32_t>();
  cpu::decode(p);
}

// The keep mask the kernels draw for `seed`, materialised (for tests), (B, H, Nq, Nk) bool.
at::Tensor dropout_keep_mask(int64_t seed, int64_t B, int64_t H, int64_t Nq, int64_t Nk,
                             double p) {
  at::Tensor keep = at::empty({B, H, Nq, Nk}, at::kBool);
  bool* out = keep.data_ptr<bool>();
  at::parallel_for(0, keep.numel(), 4096, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i)
      out[i] = dropout_keep(static_cast<uint64_t>(seed), static_cast<uint64_t>(i), static_cast<float>(p));
  });
  return keep;
}

// GFLOPS of call() (which runs once and returns the flops it did) in its best of 8 slices of
// seconds / 8: a shared machine only ever slows a slice down.
template <class Call>
double best_gflops(Call call, double seconds) {
  double best = 0;
  for (int slice = 0; slice < 8; ++slice) {
    call();
    const auto start = std::chrono::steady_clock::now();
    double flops = 0, elapsed = 0;
    while (elapsed < seconds / 8) {
      flops += call();
      elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    best = std::max(best, flops / elapsed / 1e9);
  }
  return best;
}

// One thread's GFLOPS on the active table: its GEMM on the score tile's shape (M keys x K head
// dims times K x N queries, in cache), and its FMA peak (fma_loop), timed in turns.
std::pair<double, double> cpu_micro_gflops(int64_t M, int64_t N, int64_t K, double seconds) {
  const cpu::MicroKernels& mk = cpu::micro_kernels();
  std::vector<float> A(M * K, 0.5f), B(K * N, 0.25f), C(M * N);
  double gemm = 0, peak = 0;
  for (int turn = 0; turn < 4; ++turn) {
    gemm = std::max(gemm, best_gflops([&] {
      mk.gemm(M, N, K, A.data(), K, 1, B.data(), N, C.data(), N, false);
      return 2.0 * M * N * K;
    }, seconds / 4));
    peak = std::max(peak, best_gflops([&] { return mk.fma_loop(1 << 14); }, seconds / 4));
  }
  return {gemm, peak};
}

// One thread's peak GFLOPS on the table of `isa`: fp32 FMAs, and its bf16 dot products (0 on a
// table without them).
std::pair<double, double> cpu_peak_gflops(const std::string& isa, double seconds) {
  const cpu::MicroKernels& mk = cpu::table(isa);
  const double fma = best_gflops([&] { return mk.fma_loop(1 << 14); }, seconds);
  const double bf16 = mk.bf16_dot_loop ? best_gflops([&] { return mk.bf16_dot_loop(1 << 12); }, seconds) : 0.0;
  return {fma, bf16};
}

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (const char* const* name = cpu::supported_isas(); *name != nullptr; ++name) names.emplace_back(*name);
  return names;
}

}  // namespace

void register_cpu(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<MaskTensors>(m, "MaskTensors")
      .def(py::init<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
                    std::optional<at::Tensor>, std::optional<at::Tensor>, int64_t, int64_t>(),
           py::arg("key_ranges") = py::none(), py::arg("key_padding") = py::none(),
           py::arg("attn_mask") = py::none(), py::arg("cu_seqlens_q") = py::none(),
           py::arg("cu_seqlens_k") = py::none(), py::arg("max_seqlen_q") = 0, py::arg("max_seqlen_k") = 0);
  m.def("cpu_forward", &cpu_forward, "fused attention forward on the CPU (writes out, lse)");
  m.def("cpu_backward", &cpu_backward, "fused attention backward on the CPU (writes dq, dk, dv)");
  m.def("cpu_decode", &cpu_decode, "attention of a few queries against a KV cache on the CPU (writes out, lse)");
  m.def("dropout_keep_mask", &dropout_keep_mask, "the kernels' dropout keep mask, materialised");
  m.def("cpu_isas", &cpu_isas, "micro-kernel ISAs this CPU runs, best first");
  m.def("cpu_micro_gflops", &cpu_micro_gflops, py::arg("M") = 128, py::arg("N") = 128, py::arg("K") = 64,
        py::arg("seconds") = 0.2, "(GEMM, FMA peak) GFLOPS of the active table, one thread");
  m.def("cpu_peak_gflops", &cpu_peak_gflops, py::arg("isa"), py::arg("seconds") = 0.05,
        "(fp32 FMA, bf16 dot product) peak GFLOPS of one thread on the table of isa (0: none)");
  m.def("cpu_isa", [] { return std::string(cpu::micro_kernels().isa); }, "the active CPU ISA");
  m.def("cpu_set_isa", [](const std::string& isa) { cpu::set_isa(isa); }, "force a CPU ISA");
}

}  // namespace fastattn
