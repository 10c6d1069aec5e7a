// Fused TT-matrix contraction on the CPU: forward and backward over blocks of samples.
#pragma once
#include <cstdint>
#include <vector>

#include "tt/tt_call.h"
#include "tt/tt_plan.h"

namespace tensorpress::tt {

// How the batch is cut into blocks whose intermediates stay in cache, and the workspace
// (in elements of the compute type) the caller must provide.
struct CpuSchedule {
  int64_t block = 1;  // samples per block
  int64_t n_blocks = 0;
  int threads = 1;         // workers actually used
  int64_t per_thread = 0;  // workspace elements per worker
  int64_t workspace = 0;   // total elements (block buffers + per-worker gradient partials)
};

CpuSchedule cpu_schedule(const Plan& plan, int64_t batch, int threads, bool backward, int elem_bytes);

// The call's operands as T (float or double); `schedule` from cpu_schedule for this call.
// Forward: y = x W^T (+ bias). Backward: the gradients asked for, recomputing the forward
// states per block from x instead of keeping them between forward and backward.
template <typename T>
void forward_cpu(const ForwardCall& call, const CpuSchedule& schedule);
template <typename T>
void backward_cpu(const BackwardCall& call, const CpuSchedule& schedule);

}  // namespace tensorpress::tt
