// Fused TT-matrix contraction on the CPU: forward and backward over blocks of samples.
#pragma once
#include <cstdint>
#include <vector>

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

// y (batch x M) = x (batch x N) W^T (+ bias, where not null).  mats[t] is step t's (K x N)
// core matrix.
template <typename T>
void forward_cpu(const Plan& plan, const T* x, const std::vector<const T*>& mats, const T* bias, T* y, int64_t batch,
                 T* workspace, const CpuSchedule& schedule);

// grad_x, grad_mats[t] and grad_bias (each skipped where null) from grad_y; recomputes the
// forward states per block from x instead of keeping them between forward and backward.
template <typename T>
void backward_cpu(const Plan& plan, const T* x, const std::vector<const T*>& mats, const T* grad_y, T* grad_x,
                  const std::vector<T*>& grad_mats, T* grad_bias, int64_t batch, T* workspace,
                  const CpuSchedule& schedule);

}  // namespace tensorpress::tt
