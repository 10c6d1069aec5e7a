#include "svd/jacobi_sweeps.h"

namespace tensorpress::svd {

TP_JACOBI_DEFINE(generic)

namespace {
int isa_level() {
#if defined(__x86_64__) && defined(TENSORPRESS_X86_VARIANTS)
  static const int level = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
  return level;
#else
  return 0;
#endif
}

template <typename T>
int dispatch(T* w, int64_t count, int64_t len, T* v, T* norms, const JacobiParams& p, int64_t* pairs, T* rotations) {
#if defined(__x86_64__) && defined(TENSORPRESS_X86_VARIANTS)
  if (isa_level() == 2) return orthogonalize_avx512(w, count, len, v, norms, p, pairs, rotations);
  if (isa_level() == 1) return orthogonalize_avx2(w, count, len, v, norms, p, pairs, rotations);
#endif
  return orthogonalize_generic(w, count, len, v, norms, p, pairs, rotations);
}
}  // namespace

int orthogonalize(double* w, int64_t count, int64_t len, double* v, double* norms, const JacobiParams& p,
                  int64_t* pairs, double* rotations) {
  return dispatch(w, count, len, v, norms, p, pairs, rotations);
}
int orthogonalize(float* w, int64_t count, int64_t len, float* v, float* norms, const JacobiParams& p,
                  int64_t* pairs, float* rotations) {
  return dispatch(w, count, len, v, norms, p, pairs, rotations);
}

}  // namespace tensorpress::svd
