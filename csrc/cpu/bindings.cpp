// The noisyops._C module: one PYBIND11_MODULE, each source file adds its functions.
#include <torch/extension.h>

namespace noisyops {
void register_stream(pybind11::module_& m);
void register_cpu_kernels(pybind11::module_& m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "noisyops C++ CPU kernels";
  noisyops::register_stream(m);
  noisyops::register_cpu_kernels(m);
}
