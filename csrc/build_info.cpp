// fastattn._C: the ops register themselves through TORCH_LIBRARY when this library loads; the module
// itself only reports how it was built, for `python -m fastattn.info`. setup.py defines the macros.
#include <pybind11/pybind11.h>

#ifndef FASTATTN_CUDA_ARCHS
#define FASTATTN_CUDA_ARCHS ""
#endif
#ifndef FASTATTN_TORCH_VERSION
#define FASTATTN_TORCH_VERSION "unknown"
#endif

PYBIND11_MODULE(_C, module) {
  pybind11::list backends;
  backends.append("cpu");
#ifdef FASTATTN_WITH_CUDA
  backends.append("cuda");
#endif
  module.attr("compiled_backends") = pybind11::tuple(backends);
  module.attr("cuda_archs") = FASTATTN_CUDA_ARCHS;
  module.attr("torch_version") = FASTATTN_TORCH_VERSION;
#if defined(__clang__)
  module.attr("compiler") = "clang " __clang_version__;
#elif defined(__GNUC__)
  module.attr("compiler") = "gcc " __VERSION__;
#else
  module.attr("compiler") = "unknown";
#endif
}
