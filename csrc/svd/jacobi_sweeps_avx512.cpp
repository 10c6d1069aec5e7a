// Compiled with the avx512 flags (see CMakeLists.txt); called only where the CPU has them.
#include "svd/jacobi_lanes.h"
#include "svd/jacobi_sweeps.h"

namespace tensorpress::svd {

int orthogonalize_avx512(double* w, int64_t count, int64_t len, double* v, double* norms, const JacobiParams& p,
                         double* scratch) {
  return jacobi_orthogonalize(w, count, len, v, norms, p, scratch);
}

int orthogonalize_group_avx512(const float* x, int64_t count, int64_t len, const JacobiParams& p, double* ws) {
  return lanes::orthogonalize_group(x, count, len, p, ws);
}

}  // namespace tensorpress::svd
