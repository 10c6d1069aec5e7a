// Batched one-sided Jacobi SVD on CUDA: one small matrix per thread block, held in shared
// memory, many blocks in flight. Same conventions as the CPU driver (jacobi_cpu.h): computed
// in double whatever the input type, singular values sorted descending, the largest-magnitude
// entry of each left singular vector positive, null directions completed to an orthonormal
// basis.
#pragma once
#include <algorithm>
#include <cstdint>

namespace tensorpress::svd {

// Shared memory one m x n matrix needs (bytes): the vectors, the rotations, the norms, a
// basis-completion scratch and the sort order. The caller routes larger matrices elsewhere.
inline int64_t jacobi_cuda_smem_bytes(int64_t m, int64_t n) {
  const int64_t k = std::min(m, n), len = std::max(m, n);
  return (k * len + k * k + k + len) * int64_t(sizeof(double)) + k * int64_t(sizeof(int));
}

// a: (batch, m, n) row-major device memory; u: (batch, m, k); s: (batch, k); vh: (batch, k, n).
// is_double: the element type is double (else float). Asynchronous on `stream`; no allocation.
void jacobi_svd_cuda(bool is_double, const void* a, void* u, void* s, void* vh, int64_t batch, int64_t m, int64_t n,
                     double tol, int max_sweeps, int device, void* stream);

}  // namespace tensorpress::svd
