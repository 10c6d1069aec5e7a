// tensorpress._C bindings: the batched one-sided Jacobi SVD, CPU and CUDA.
#include <algorithm>
#include <utility>

#include "bindings/common.h"
#include "bindings/register.h"
#include "svd/jacobi_cpu.h"
#include "svd/jacobi_cuda.h"
#include "svd/jacobi_sweeps.h"

namespace tensorpress::bindings {
namespace {

// Batched one-sided Jacobi SVD: a (batch, m, n) -> u (batch, m, k), s (batch, k), vh (batch, k, n).
int svd_jacobi(const py::object& a, const py::object& u, const py::object& s, const py::object& vh,
               const py::object& workspace, double tol, int max_sweeps, int threads) {
  BorrowedTensor ab(a, "A"), ub(u, "U"), sb(s, "S"), vb(vh, "Vh"), wb(workspace, "workspace");
  const TensorView &av = ab.view(), &uv = ub.view(), &sv = sb.view(), &vv = vb.view(), &wv = wb.view();
  require(av.dtype == DType::Float32 || av.dtype == DType::Float64,
          "A: expected dtype float32 or float64, got " + std::string(dtype_name(av.dtype)));
  require(av.device == Device::CPU, "A: expected a CPU tensor (the CUDA Jacobi SVD is not built yet)");
  require(av.shape.size() == 3, "A: expected shape (batch, m, n), got " + shape_str(av.shape));
  const int64_t batch = av.shape[0], m = av.shape[1], n = av.shape[2], k = std::min(m, n);
  for (auto [view, name] : {std::pair{&uv, "U"}, {&sv, "S"}, {&vv, "Vh"}}) expect_like(*view, av.dtype, name);
  expect_shape(uv, {batch, m, k}, "U");
  expect_shape(sv, {batch, k}, "S");
  expect_shape(vv, {batch, k, n}, "Vh");
  require(wv.dtype == DType::Float64 && wv.device == Device::CPU, "workspace: expected a float64 CPU tensor");
  const int64_t need = svd::jacobi_workspace_size(m, n, threads);
  require(wv.numel() >= need,
          "workspace: expected at least " + std::to_string(need) + " elements, got " + std::to_string(wv.numel()));
  require(tol > 0 && max_sweeps >= 1, "tol, max_sweeps: expected tol > 0 and max_sweeps >= 1");
  const svd::JacobiParams params{tol, max_sweeps};
  py::gil_scoped_release release;
  if (av.dtype == DType::Float32)
    return svd::jacobi_svd_cpu<float>(av.ptr<float>(), uv.ptr<float>(), sv.ptr<float>(), vv.ptr<float>(), batch, m, n,
                                      params, wv.ptr<double>(), threads);
  return svd::jacobi_svd_cpu<double>(av.ptr<double>(), uv.ptr<double>(), sv.ptr<double>(), vv.ptr<double>(), batch, m,
                                     n, params, wv.ptr<double>(), threads);
}

#if TENSORPRESS_WITH_CUDA
// Batched one-sided Jacobi SVD on CUDA, same conventions as svd_jacobi; asynchronous on
// `stream`, no workspace (each matrix lives in its block's shared memory).
void svd_jacobi_cuda(const py::object& a, const py::object& u, const py::object& s, const py::object& vh, double tol,
                     int max_sweeps, uintptr_t stream) {
  BorrowedTensor ab(a, "A"), ub(u, "U"), sb(s, "S"), vb(vh, "Vh");
  const TensorView &av = ab.view(), &uv = ub.view(), &sv = sb.view(), &vv = vb.view();
  require(av.dtype == DType::Float32 || av.dtype == DType::Float64,
          "A: expected dtype float32 or float64, got " + torch_dtype_name(a));
  require(av.device == kKernelDeviceKind, "A: expected a CUDA tensor");
  require(av.shape.size() == 3, "A: expected shape (batch, m, n), got " + shape_str(av.shape));
  const int64_t batch = av.shape[0], m = av.shape[1], n = av.shape[2], k = std::min(m, n);
  for (auto [view, name] : {std::pair{&uv, "U"}, {&sv, "S"}, {&vv, "Vh"}}) {
    require(view->device == kKernelDeviceKind && view->device_id == av.device_id,
            std::string(name) + ": expected a tensor on A's device");
    require(view->dtype == av.dtype, std::string(name) + ": expected dtype " + dtype_name(av.dtype));
  }
  expect_shape(uv, {batch, m, k}, "U");
  expect_shape(sv, {batch, k}, "S");
  expect_shape(vv, {batch, k, n}, "Vh");
  require(tol > 0 && max_sweeps >= 1, "tol, max_sweeps: expected tol > 0 and max_sweeps >= 1");
  const int64_t smem = svd::jacobi_cuda_smem_bytes(m, n);
  const tt::CudaLimits& lim = device_limits(av.device_id);
  require(smem <= lim.smem_per_block, "A: a " + std::to_string(m) + " x " + std::to_string(n) + " matrix needs " +
                                          std::to_string(smem) + " bytes of shared memory, the device has " +
                                          std::to_string(lim.smem_per_block) + " per block");
  py::gil_scoped_release release;
  svd::jacobi_svd_cuda(av.dtype == DType::Float64, av.data, uv.data, sv.data, vv.data, batch, m, n, tol, max_sweeps,
                       av.device_id, reinterpret_cast<void*>(stream));
}
#endif

}  // namespace

void register_svd(py::module_& m) {
  m.def("svd_jacobi", &svd_jacobi, py::arg("A"), py::arg("U"), py::arg("S"), py::arg("Vh"), py::arg("workspace"),
        py::arg("tol"), py::arg("max_sweeps"), py::arg("threads"));
  m.def("svd_jacobi_workspace_size", &svd::jacobi_workspace_size, py::arg("m"), py::arg("n"), py::arg("threads"));
  m.def("svd_jacobi_cuda_smem_bytes", &svd::jacobi_cuda_smem_bytes, py::arg("m"), py::arg("n"));
#if TENSORPRESS_WITH_CUDA
  m.def("svd_jacobi_cuda", &svd_jacobi_cuda, py::arg("A"), py::arg("U"), py::arg("S"), py::arg("Vh"), py::arg("tol"),
        py::arg("max_sweeps"), py::arg("stream"));
#endif
}

}  // namespace tensorpress::bindings
