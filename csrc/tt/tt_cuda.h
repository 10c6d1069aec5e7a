// TT-matrix contraction on CUDA: host entry points (no CUDA types, so bindings.cpp, compiled
// by the C++ compiler, can call them). Buffers are device pointers owned by the caller (torch
// allocates them); `stream` is the caller's cudaStream_t. Nothing here allocates or
// synchronizes; every CUDA call and launch is checked and a failure throws
// std::runtime_error.
#pragma once
#include <cstdint>
#include <vector>

#include "tt/tt_call.h"
#include "tt/tt_cuda_schedule.h"
#include "tt/tt_plan.h"

namespace tensorpress::tt {

// x / y / grad_y / grad_x element type. The step matrices, their gradients and the workspace
// are float64 for F64 and float32 otherwise (half types accumulate in float32).
enum class CudaDType { F32, F64, F16, BF16 };

// Reads the device's limits (shared memory, SM count). Throws without a usable device.
CudaLimits cuda_limits(int device);

// Where and how a call runs: the device, the caller's stream (cudaStream_t), and whether the
// tiled path's GEMMs run on the tensor cores (float accumulation, operands rounded to fp16 /
// bf16 as x, or to tf32 for F32, as torch's matmul does when TF32 is allowed; ignored for F64
// and by the fused path).
struct CudaLaunch {
  int device = 0;
  void* stream = nullptr;
  bool tensor_cores = false;
};

// The call's operands (tt_call.h; call.bias and grad_bias must be null: the caller adds the
// bias) as `dtype`; mats, their gradients and the workspace in the accumulation type; the
// tables from make_tables(plan) on the device.
void forward_cuda(CudaDType dtype, const ForwardCall& call, const int32_t* tables, const CudaSchedule& sched,
                  const CudaLaunch& launch);
void backward_cuda(CudaDType dtype, const BackwardCall& call, const int32_t* tables, const CudaSchedule& sched,
                   const CudaLaunch& launch);

}  // namespace tensorpress::tt
