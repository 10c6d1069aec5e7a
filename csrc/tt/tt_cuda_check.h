// Checking CUDA calls: every runtime call and every launch goes through these; a failure
// throws std::runtime_error (pybind11 turns it into RuntimeError) naming the call and place.
// (Shared by the TT and Jacobi CUDA sources; a candidate for csrc/core/.)
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace tensorpress {

inline void cuda_check(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(err) + " in " + what + " (" + file +
                             ":" + std::to_string(line) + ")");
}

// Makes `device` current for the scope and restores the caller's device afterwards.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int device) {
    cuda_check(cudaGetDevice(&previous_), "cudaGetDevice", __FILE__, __LINE__);
    if (previous_ != device) cuda_check(cudaSetDevice(device), "cudaSetDevice", __FILE__, __LINE__);
    else previous_ = -1;
  }
  ~CudaDeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);  // no throw from a destructor
  }
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

}  // namespace tensorpress

#define TP_CUDA_CHECK(expr) ::tensorpress::cuda_check((expr), #expr, __FILE__, __LINE__)
// After a launch: configuration errors show up here (execution errors surface on a later call).
#define TP_CUDA_CHECK_LAUNCH(name) ::tensorpress::cuda_check(cudaGetLastError(), name, __FILE__, __LINE__)
