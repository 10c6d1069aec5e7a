// TT-matrix contraction on CUDA: host entry points (no CUDA types, so bindings.cpp, compiled
// by the C++ compiler, can call them). Buffers are device pointers owned by the caller (torch
// allocates them); `stream` is the caller's cudaStream_t. Nothing here allocates or
// synchronizes; every CUDA call and launch is checked and a failure throws
// std::runtime_error.
#pragma once
#include <cstdint>
#include <vector>

#include "tt/tt_cuda_schedule.h"
#include "tt/tt_plan.h"

namespace tensorpress::tt {

// x / y / grad_y / grad_x element type. The step matrices, their gradients and the workspace
// are float64 for F64 and float32 otherwise (half types accumulate in float32).
enum class CudaDType { F32, F64, F16, BF16 };

// Reads the device's limits (shared memory, SM count). Throws without a usable device.
CudaLimits cuda_limits(int device);

// y (batch x M) = x (batch x N) W^T. mats[t] is step t's (K x N) matrix, tables from
// make_tables(plan) copied to the device. tensor_cores: the tiled path's GEMMs run on the
// tensor cores with float accumulation, their operands rounded to fp16 / bf16 (x's type) or
// to tf32 for F32 (as torch's matmul does when TF32 is allowed); ignored for F64 and by the
// fused path.
void forward_cuda(CudaDType dtype, const Plan& plan, const CudaSchedule& sched, const void* x,
                  const std::vector<const void*>& mats, const int32_t* tables, void* y, int64_t batch, void* workspace,
                  bool tensor_cores, int device, void* stream);

// grad_x (null: not needed) and every grad_mats[t] (empty vector: not needed) from grad_y;
// tensor_cores as for forward_cuda.
void backward_cuda(CudaDType dtype, const Plan& plan, const CudaSchedule& sched, const void* x,
                   const std::vector<const void*>& mats, const int32_t* tables, const void* grad_y, void* grad_x,
                   const std::vector<void*>& grad_mats, int64_t batch, void* workspace, bool tensor_cores, int device,
                   void* stream);

}  // namespace tensorpress::tt
