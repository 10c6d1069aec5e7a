// Checking CUDA calls: every runtime call and every launch goes through these; a failure
// throws std::runtime_error (pybind11 turns it into RuntimeError) naming the call and place.
#pragma once
#include <cuda_runtime.h>

#include <cstdlib>
#include <stdexcept>
#include <string>

namespace tensorpress {

inline void cuda_check(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(err) + " in " + what + " (" + file + ":" +
                             std::to_string(line) + ")");
}

// TENSORPRESS_CUDA_SYNC_CHECK=1: wait for every kernel right after its launch, so a fault is
// reported at the kernel that caused it instead of at some later call (slow; for debugging).
inline bool cuda_sync_check() {
  static const bool on = [] {
    const char* v = std::getenv("TENSORPRESS_CUDA_SYNC_CHECK");
    return v != nullptr && *v != '\0' && std::string(v) != "0";
  }();
  return on;
}

// After a launch: configuration errors show up at once; execution errors only with the
// synchronous check on (else on a later call).
inline void cuda_check_launch(const char* name, cudaStream_t stream, const char* file, int line) {
  cuda_check(cudaGetLastError(), name, file, line);
  if (cuda_sync_check()) cuda_check(cudaStreamSynchronize(stream), name, file, line);
}

// Makes `device` current for the scope and restores the caller's device afterwards.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int device) {
    cuda_check(cudaGetDevice(&previous_), "cudaGetDevice", __FILE__, __LINE__);
    if (previous_ != device)
      cuda_check(cudaSetDevice(device), "cudaSetDevice", __FILE__, __LINE__);
    else
      previous_ = -1;
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
#define TP_CUDA_CHECK_LAUNCH(name, stream) ::tensorpress::cuda_check_launch(name, stream, __FILE__, __LINE__)
