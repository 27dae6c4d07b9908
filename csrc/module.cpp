// fastattn._C: one pybind11 module; each backend's glue registers its entry points.
#include <pybind11/pybind11.h>

namespace fastattn {
void register_cpu(pybind11::module_& m);
#ifdef FASTATTN_WITH_CUDA
void register_cuda(pybind11::module_& m);
#endif
}  // namespace fastattn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  fastattn::register_cpu(m);
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
