// What every binding shares: argument checks that name the argument, the tensor-to-kernel
// device routing (CUDA, or the CPU emulation's "device"), the caller's stream, the device
// limits cache. Header-only: small inline helpers.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor_view.h"
#if TENSORPRESS_WITH_CUDA
#include <map>
#include <mutex>

#include "tt/tt_cuda.h"
#endif

namespace tensorpress::bindings {

namespace py = pybind11;

inline std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

inline void expect_shape(const TensorView& v, const std::vector<int64_t>& shape, const std::string& name) {
  require(v.shape == shape, name + ": expected shape " + shape_str(shape) + ", got " + shape_str(v.shape));
}

inline void expect_like(const TensorView& v, DType dtype, const std::string& name) {
  require(v.device == Device::CPU, name + ": expected a CPU tensor");
  require(v.dtype == dtype, name + ": expected dtype " + dtype_name(dtype) + ", got " + dtype_name(v.dtype));
}

// The torch dtype's name ("float16", "int32", ...): TensorView names only float32/float64.
inline std::string torch_dtype_name(const py::object& t) {
  std::string s = py::str(t.attr("dtype"));
  return s.rfind("torch.", 0) == 0 ? s.substr(6) : s;
}

// Borrows t and checks it is a CPU tensor of `dtype` and `shape`.
inline const TensorView& borrow_checked(Borrowed& held, const py::object& t, DType dtype,
                                        const std::vector<int64_t>& shape, const std::string& name) {
  const TensorView& v = held.add(t, name);
  expect_like(v, dtype, name);
  expect_shape(v, shape, name);
  return v;
}

// The same for an optional argument: nullptr for None.
inline const TensorView* borrow_optional(Borrowed& held, const py::object& t, DType dtype,
                                         const std::vector<int64_t>& shape, const std::string& name) {
  return t.is_none() ? nullptr : &borrow_checked(held, t, dtype, shape, name);
}

// The memory the CUDA entry points take: device memory, or host memory in the CPU emulation
// build (_C_cuda_emu, tests only: csrc/testing/cuda_emu.h), where CPU tensors play the GPU.
#if TENSORPRESS_CUDA_EMU
constexpr const char* kKernelDevice = "cpu";
constexpr Device kKernelDeviceKind = Device::CPU;
#else
constexpr const char* kKernelDevice = "cuda";
constexpr Device kKernelDeviceKind = Device::CUDA;
#endif

// The caller's stream (torch.cuda.current_stream(device).cuda_stream): required, never a
// silent default to the legacy stream 0 of a caller working on another stream.
inline uintptr_t stream_of(const py::object& stream) {
  require(!stream.is_none(),
          "stream: expected the caller's CUDA stream (torch.cuda.current_stream(x.device)"
          ".cuda_stream) for CUDA tensors, got None");
  return stream.cast<uintptr_t>();
}

// True for a CUDA tensor; raises where the build has no CUDA kernels.
inline bool on_cuda(const py::object& x) {
  if (!py::hasattr(x, "device") || std::string(py::str(x.attr("device").attr("type"))) != kKernelDevice) return false;
#if !TENSORPRESS_WITH_CUDA
  throw py::value_error(
      "x: got a CUDA tensor, but this build of tensorpress has no CUDA kernels "
      "(rebuild with nvcc on PATH or TENSORPRESS_CUDA=ON)");
#endif
  return true;
}

#if TENSORPRESS_WITH_CUDA
// The device limits, read once per device.
inline const tt::CudaLimits& device_limits(int device) {
  static std::mutex mu;
  static std::map<int, tt::CudaLimits> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it == cache.end()) it = cache.emplace(device, tt::cuda_limits(device)).first;
  return it->second;
}
#endif

}  // namespace tensorpress::bindings
