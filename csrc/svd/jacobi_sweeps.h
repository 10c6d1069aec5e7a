// The Jacobi sweeps, built once per instruction set (the extension targets baseline x86-64;
// the vector loops run 4-8x wider with AVX2/AVX-512) and picked at run time.
#pragma once
#include <cstdint>

#include "svd/jacobi.h"

namespace tensorpress::svd {

#define TP_JACOBI_DECLARE(suffix)                                                                  \
  int orthogonalize_##suffix(double* w, int64_t count, int64_t len, double* v, double* norms,      \
                             const JacobiParams& p, int64_t* pairs, double* rotations);          \
  int orthogonalize_##suffix(float* w, int64_t count, int64_t len, float* v, float* norms,         \
                             const JacobiParams& p, int64_t* pairs, float* rotations);
TP_JACOBI_DECLARE(generic)
TP_JACOBI_DECLARE(avx2)
TP_JACOBI_DECLARE(avx512)
#undef TP_JACOBI_DECLARE

// The widest variant this CPU runs.
int orthogonalize(double* w, int64_t count, int64_t len, double* v, double* norms, const JacobiParams& p,
                  int64_t* pairs, double* rotations);
int orthogonalize(float* w, int64_t count, int64_t len, float* v, float* norms, const JacobiParams& p,
                  int64_t* pairs, float* rotations);

// Defines orthogonalize_<suffix> for float and double in a translation unit built for that ISA.
#define TP_JACOBI_DEFINE(suffix)                                                                   \
  int orthogonalize_##suffix(double* w, int64_t count, int64_t len, double* v, double* norms,      \
                             const JacobiParams& p, int64_t* pairs, double* rotations) {         \
    return jacobi_orthogonalize(w, count, len, v, norms, p, pairs, rotations);                     \
  }                                                                                                \
  int orthogonalize_##suffix(float* w, int64_t count, int64_t len, float* v, float* norms,         \
                             const JacobiParams& p, int64_t* pairs, float* rotations) {          \
    return jacobi_orthogonalize(w, count, len, v, norms, p, pairs, rotations);                     \
  }

}  // namespace tensorpress::svd
