#include "core/cuda_info.h"

#include <cuda_runtime.h>

namespace tensorpress {

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

std::string cuda_runtime_version() {
  int v = CUDART_VERSION;
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

std::string cuda_device_name(int device) {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    cudaGetLastError();
    return "";
  }
  return std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ")";
}

std::string cuda_driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess || v == 0) {
    cudaGetLastError();
    return "";
  }
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

std::string cuda_driver_required() {
  // minimum Linux drivers per major release, from NVIDIA's CUDA toolkit release notes
  switch (CUDART_VERSION / 1000) {
    case 11:
      return ">= 450.80.02 (CUDA 11.x)";
    case 12:
      return ">= 525.60.13 (CUDA 12.x)";
    case 13:
      return ">= 580.65.06 (CUDA 13.x)";
    default:
      return "a driver supporting CUDA " + cuda_runtime_version();
  }
}

}  // namespace tensorpress
