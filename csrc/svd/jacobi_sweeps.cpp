#include "svd/jacobi_sweeps.h"

#include "svd/jacobi_lanes.h"

// jacobi_lanes.h's templates are emitted at the end of this file, past the header's own
// suppression of the (inapplicable) note on returning 32-byte vectors without AVX.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace tensorpress::svd {

int orthogonalize_generic(double* w, int64_t count, int64_t len, double* v, double* norms, const JacobiParams& p,
                          double* scratch) {
  return jacobi_orthogonalize(w, count, len, v, norms, p, scratch);
}

int orthogonalize_group_generic(const float* x, int64_t count, int64_t len, const JacobiParams& p, double* ws) {
  return lanes::orthogonalize_group(x, count, len, p, ws);
}

namespace {
// 2: AVX-512, 1: AVX2, 0: baseline; fixed at the first call.
int isa_level() {
#if defined(__x86_64__) && defined(TENSORPRESS_X86_VARIANTS)
  static const int level = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
  return level;
#else
  return 0;
#endif
}
}  // namespace

const char* jacobi_isa() {
  static const char* names[] = {"generic", "avx2", "avx512"};
  return names[isa_level()];
}

int orthogonalize(double* w, int64_t count, int64_t len, double* v, double* norms, const JacobiParams& p,
                  double* scratch) {
#if defined(__x86_64__) && defined(TENSORPRESS_X86_VARIANTS)
  if (isa_level() == 2) return orthogonalize_avx512(w, count, len, v, norms, p, scratch);
  if (isa_level() == 1) return orthogonalize_avx2(w, count, len, v, norms, p, scratch);
#endif
  return orthogonalize_generic(w, count, len, v, norms, p, scratch);
}

int orthogonalize_group(const float* x, int64_t count, int64_t len, const JacobiParams& p, double* ws) {
#if defined(__x86_64__) && defined(TENSORPRESS_X86_VARIANTS)
  if (isa_level() == 2) return orthogonalize_group_avx512(x, count, len, p, ws);
  if (isa_level() == 1) return orthogonalize_group_avx2(x, count, len, p, ws);
#endif
  return orthogonalize_group_generic(x, count, len, p, ws);
}

}  // namespace tensorpress::svd
