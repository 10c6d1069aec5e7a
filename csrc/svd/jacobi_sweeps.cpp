#include "svd/jacobi_sweeps.h"

namespace tensorpress::svd {

int orthogonalize_generic(double* w, int64_t count, int64_t len, double* v, double* norms, const JacobiParams& p,
                   double* scratch) {
  return jacobi_orthogonalize(w, count, len, v, norms, p, scratch);
}

int orthogonalize(double* w, int64_t count, int64_t len, double* v, double* norms, const JacobiParams& p,
                   double* scratch) {
#if defined(__x86_64__) && defined(TENSORPRESS_X86_VARIANTS)
  static const int level = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
  if (level == 2) return orthogonalize_avx512(w, count, len, v, norms, p, scratch);
  if (level == 1) return orthogonalize_avx2(w, count, len, v, norms, p, scratch);
#endif
  return orthogonalize_generic(w, count, len, v, norms, p, scratch);
}

}  // namespace tensorpress::svd
