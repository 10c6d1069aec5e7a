// What the CUDA side of the build can see at run time. Safe without a GPU or a driver:
// the runtime is linked statically and reports "no device" instead of failing to load.
#pragma once
#include <string>

namespace tensorpress {

int cuda_device_count();             // 0 when there is no driver or no device
std::string cuda_runtime_version();  // e.g. "13.0"
std::string cuda_device_name(int device);
std::string cuda_driver_version();  // the installed driver's CUDA version ("12.4"), "" without one
// The driver the statically linked runtime needs (CUDA minor-version compatibility: any
// driver of the runtime's major release from its first version on), e.g. ">= 580 (CUDA 13.x)".
std::string cuda_driver_required();

}  // namespace tensorpress
