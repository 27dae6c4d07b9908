// fastattn._C: importing it registers the fastattn:: ops (ops.cpp); this pybind11 module adds
// the CPU helpers, the CUDA entry points, and the bridge to the backends written in Python.
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "ops.h"

namespace fastattn {
#ifdef FASTATTN_WITH_CUDA
void register_cuda(pybind11::module_& m);
#endif

namespace {
namespace py = pybind11;

// (forward, backward, kvcache) of the backends written in Python, which fastattn.ops registers
// at import (set_python_backends) with the GIL held; read with the GIL held. Replaced only by a
// later registration, never freed at exit (the interpreter may be gone by then).
py::tuple* python_backends = nullptr;

const py::tuple& backends() {
  TORCH_CHECK(python_backends != nullptr, "fastattn.ops has not registered the Python backends: import fastattn");
  return *python_backends;
}

// fastattn.backends.Masks' fields, in its order: the masks, then the score modifiers.
py::object mask_args(const MaskTensors& m, const CallArgs& a) {
  return py::make_tuple(m.key_padding, m.key_ranges, m.attn_mask, m.cu_seqlens_q, m.cu_seqlens_k, m.max_seqlen_q,
                        m.max_seqlen_k, a.window_left, a.window_right, a.softcap, a.alibi_slopes, a.sinks,
                        a.bottom_right);
}
}  // namespace

TensorPair python_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const MaskTensors& masks,
                          const CallArgs& args, std::string_view backend) {
  py::gil_scoped_acquire gil;
  return backends()[0](q, k, v, mask_args(masks, args), args.causal, args.scale, args.dropout_p, args.seed,
                       std::string(backend))
      .cast<TensorPair>();
}

TensorTriple python_backward(const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                             const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                             const MaskTensors& masks, const CallArgs& args, std::string_view backend) {
  py::gil_scoped_acquire gil;
  return backends()[1](dout, dlse, q, k, v, out, lse, mask_args(masks, args), args.causal, args.scale,
                       args.dropout_p, args.seed, std::string(backend))
      .cast<TensorTriple>();
}

TensorPair python_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
                          const std::optional<at::Tensor>& v_new, const CallArgs& args, std::string_view backend) {
  py::gil_scoped_acquire gil;
  return backends()[2](q, k_cache, v_cache, cache_seqlens, k_new, v_new, mask_args(MaskTensors{}, args), args.causal,
                       args.scale, std::string(backend))
      .cast<TensorPair>();
}

}  // namespace fastattn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using OptTensor = std::optional<at::Tensor>;
  m.def(
      "set_python_backends",
      [](py::object forward, py::object backward, py::object kvcache) {
        delete fastattn::python_backends;
        fastattn::python_backends = new py::tuple(py::make_tuple(forward, backward, kvcache));
      },
      "what the ops call for a backend written in Python: (forward, backward, kvcache)");
  m.def(
      "attention_forward",
      [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& key_padding,
         const OptTensor& key_ranges, const OptTensor& attn_mask, const OptTensor& cu_seqlens_q,
         const OptTensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale,
         double dropout_p, int64_t seed, const std::string& backend, int64_t window_left, int64_t window_right,
         double softcap, const OptTensor& alibi_slopes, const OptTensor& sinks, bool bottom_right) {
        return fastattn::call_forward(
            q, k, v, key_padding, key_ranges, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
            scale, dropout_p, seed, backend,
            fastattn::score_mods(window_left, window_right, softcap, alibi_slopes, sinks, bottom_right));
      },
      "fastattn::attention_forward through the dispatcher, in one call", py::call_guard<py::gil_scoped_release>());
  m.def(
      "attention_kvcache",
      [](const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
         const OptTensor& k_new, const OptTensor& v_new, bool causal, double scale, const std::string& backend,
         int64_t window_left, int64_t window_right, double softcap, const OptTensor& alibi_slopes,
         const OptTensor& sinks) {
        return fastattn::call_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale, backend,
                                      fastattn::score_mods(window_left, window_right, softcap, alibi_slopes, sinks,
                                                           true));
      },
      "fastattn::attention_kvcache through the dispatcher, in one call", py::call_guard<py::gil_scoped_release>());
  pybind11::class_<fastattn::MaskTensors>(m, "MaskTensors")
      .def(pybind11::init<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
                          std::optional<at::Tensor>, std::optional<at::Tensor>, int64_t, int64_t>(),
           pybind11::arg("key_ranges") = pybind11::none(), pybind11::arg("key_padding") = pybind11::none(),
           pybind11::arg("attn_mask") = pybind11::none(), pybind11::arg("cu_seqlens_q") = pybind11::none(),
           pybind11::arg("cu_seqlens_k") = pybind11::none(), pybind11::arg("max_seqlen_q") = 0,
           pybind11::arg("max_seqlen_k") = 0);
  namespace py = pybind11;
  m.def("key_ranges", &fastattn::key_ranges, "the (3, B) int32 kernel form of a CPU (B, Nk) padding mask, in one pass");
  m.def("dropout_keep_mask", &fastattn::dropout_keep_mask, "the kernels' dropout keep mask, materialised");
  m.def("cpu_isas", &fastattn::cpu_isas, "micro-kernel ISAs this CPU runs, best first");
  m.def("cpu_isa", &fastattn::cpu_isa, "the active CPU ISA");
  m.def("cpu_set_isa", &fastattn::cpu_set_isa, "force a CPU ISA");
  m.def("cpu_micro_gflops", &fastattn::cpu_micro_gflops, py::arg("M") = 128, py::arg("N") = 128, py::arg("K") = 64,
        py::arg("seconds") = 0.2, "(GEMM, FMA peak) GFLOPS of the active table, one thread");
  m.def("cpu_peak_gflops", &fastattn::cpu_peak_gflops, py::arg("isa"), py::arg("seconds") = 0.05,
        "(fp32 FMA, bf16 dot product) peak GFLOPS of one thread on the table of isa (0: none)");
#ifdef FASTATTN_WITH_CUDA
  fastattn::register_cuda(m);
#endif
  m.attr("with_cuda") = pybind11::bool_(
#ifdef FASTATTN_WITH_CUDA
      true
#else
      false
#endif
  );
}
