// Batched one-sided Jacobi SVD on the CPU: many small matrices in parallel, one per task for
// double, a group of lanes::kLanes per task for float32 (jacobi_lanes.h).
#pragma once
#include <cstdint>

#include "svd/jacobi.h"

namespace tensorpress::svd {

// Workspace (in doubles) for `threads` workers on m x n matrices.
int64_t jacobi_workspace_size(int64_t m, int64_t n, int threads);

// a: (batch, m, n) row-major; u: (batch, m, k); s: (batch, k); vh: (batch, k, n), k = min(m, n).
// Double accuracy whatever T is (float32 runs most sweeps in float32, then finishes them in
// double, see jacobi_lanes.h). Singular values sorted descending; each left singular
// vector's largest-magnitude entry is made positive; null directions are completed to an
// orthonormal basis. Returns the largest number of sweeps any matrix needed.
template <typename T>
int jacobi_svd_cpu(const T* a, T* u, T* s, T* vh, int64_t batch, int64_t m, int64_t n, const JacobiParams& params,
                   double* workspace, int threads);

}  // namespace tensorpress::svd
