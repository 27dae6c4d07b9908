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

}  // namespace

// Each takes the op's own tensors and the backend's name, then the call's fields in their order
// (fastattn.ops.python_backends rebuilds its Call from them).
TensorPair python_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::string_view backend,
                          const Call& call) {
  py::gil_scoped_acquire gil;
  return backends()[0](q, k, v, std::string(backend) FASTATTN_CALL_MEMBERS).cast<TensorPair>();
}

TensorTriple python_backward(const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                             const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                             std::string_view backend, const Call& call) {
  py::gil_scoped_acquire gil;
  return backends()[1](dout, dlse, q, k, v, out, lse, std::string(backend) FASTATTN_CALL_MEMBERS).cast<TensorTriple>();
}

TensorPair python_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
                          const std::optional<at::Tensor>& v_new, std::string_view backend, const Call& call) {
  py::gil_scoped_acquire gil;
  return backends()[2](q, k_cache, v_cache, cache_seqlens, k_new, v_new, std::string(backend) FASTATTN_CALL_MEMBERS)
      .cast<TensorPair>();
}

}  // namespace fastattn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using fastattn::OptTensor;
  namespace py = pybind11;
  m.def(
      "set_python_backends",
      [](py::object forward, py::object backward, py::object kvcache) {
        delete fastattn::python_backends;
        fastattn::python_backends = new py::tuple(py::make_tuple(forward, backward, kvcache));
      },
      "what the ops call for a backend written in Python: (forward, backward, kvcache)");
  m.def(
      "attention_forward",
      [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::string& backend FASTATTN_PY_CALL_PARAMS) {
        return fastattn::call_forward(q, k, v, backend, FASTATTN_CALL_FROM_PARAMS);
      },
      "fastattn::attention_forward through the dispatcher, in one call", py::call_guard<py::gil_scoped_release>());
  m.def(
      "attention_kvcache",
      [](const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
         const OptTensor& k_new, const OptTensor& v_new, const std::string& backend FASTATTN_PY_CALL_PARAMS) {
        return fastattn::call_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, backend,
                                      FASTATTN_CALL_FROM_PARAMS);
      },
      "fastattn::attention_kvcache through the dispatcher, in one call", py::call_guard<py::gil_scoped_release>());
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
