// The operands of one TT contraction call, shared by the CPU (tt_cpu.h) and CUDA (tt_cuda.h)
// entry points: borrowed pointers, owned by the caller for the duration of the call. Element
// types are the entry point's (CPU: its template type; CUDA: CudaDType), hence void.
#pragma once
#include <cstdint>
#include <vector>

#include "tt/tt_plan.h"

namespace tensorpress::tt {

// y (batch x M) = x (batch x N) W^T (+ bias). mats[t] is step t's (K x N) matrix.
struct ForwardCall {
  const Plan* plan = nullptr;
  int64_t batch = 0;
  const void* x = nullptr;
  std::vector<const void*> mats;
  const void* bias = nullptr;  // CPU only (null: none); the CUDA kernels leave the bias to the caller
  void* y = nullptr;
  void* workspace = nullptr;
};

// grad_x, grad_mats[t] and grad_bias from grad_y; each output is skipped where null (all of
// grad_mats where the vector is empty).
struct BackwardCall {
  const Plan* plan = nullptr;
  int64_t batch = 0;
  const void* x = nullptr;
  std::vector<const void*> mats;
  const void* grad_y = nullptr;
  void* grad_x = nullptr;
  std::vector<void*> grad_mats;
  void* grad_bias = nullptr;  // CPU only
  void* workspace = nullptr;
};

}  // namespace tensorpress::tt
