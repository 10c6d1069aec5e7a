// tensorpress._C: thin bindings, one file per area (csrc/bindings/): each validates what
// crosses the boundary (tensors through DLPack), then dispatches to the kernels.
#include "bindings/common.h"
#include "bindings/register.h"
#include "svd/jacobi_sweeps.h"
#if TENSORPRESS_CUDA_EMU
#include "testing/emu_selftest.h"
#endif
#if TENSORPRESS_WITH_CUDA
#include "core/cuda_info.h"
#endif

namespace tensorpress::bindings {
namespace {

py::dict build_info() {
  py::dict d;
  d["cxx_compiler"] = TENSORPRESS_CXX_COMPILER;
  d["blas"] = "OpenBLAS (scipy-openblas32)";
  d["jacobi_isa"] = svd::jacobi_isa();
#if TENSORPRESS_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = TENSORPRESS_CUDA_ARCHS;
  d["cuda_compiler"] = TENSORPRESS_CUDA_COMPILER;
  d["cuda_runtime"] = cuda_runtime_version();
  d["cuda_driver"] = cuda_driver_version();
  d["cuda_driver_required"] = cuda_driver_required();
  int n = cuda_device_count();
  d["cuda_device_count"] = n;
  py::list names;
  for (int i = 0; i < n; ++i) names.append(cuda_device_name(i));
  d["cuda_devices"] = names;
#else
  d["cuda"] = false;
  d["cuda_archs"] = "";
  d["cuda_compiler"] = "";
  d["cuda_runtime"] = "";
  d["cuda_driver"] = "";
  d["cuda_driver_required"] = "";
  d["cuda_device_count"] = 0;
  d["cuda_devices"] = py::list();
#endif
  return d;
}

}  // namespace
}  // namespace tensorpress::bindings

#ifndef TENSORPRESS_MODULE_NAME
#define TENSORPRESS_MODULE_NAME _C  // the emulation build names itself _C_cuda_emu
#endif

PYBIND11_MODULE(TENSORPRESS_MODULE_NAME, m) {
  using namespace tensorpress;
  namespace py = pybind11;
  m.doc() = "tensorpress native kernels (tensors cross through DLPack)";
  bindings::register_tt(m);
  bindings::register_svd(m);
  bindings::register_blas(m);
  m.def("build_info", &bindings::build_info);
#if TENSORPRESS_CUDA_EMU
  m.def("emu_selftest", &testing::emu_selftest, py::arg("name"), py::arg("threads"), py::arg("blocks") = 1);
  m.def("emu_float_to_half", &testing::emu_float_to_half, py::arg("values"), py::arg("bf16"));
  m.def("emu_half_to_float", &testing::emu_half_to_float, py::arg("bits"), py::arg("bf16"));
#endif
}
