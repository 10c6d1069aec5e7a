// The Jacobi sweeps for double, built once per instruction set (the extension targets
// baseline x86-64; the vector loops run 4-8x wider with AVX2/AVX-512) and picked at run time.
#pragma once
#include <cstdint>

#include "svd/jacobi.h"

namespace tensorpress::svd {

int orthogonalize_generic(double* w, int64_t count, int64_t len, double* v, double* norms, const JacobiParams& p,
                   double* scratch);
int orthogonalize_avx2(double* w, int64_t count, int64_t len, double* v, double* norms, const JacobiParams& p,
                   double* scratch);
int orthogonalize_avx512(double* w, int64_t count, int64_t len, double* v, double* norms, const JacobiParams& p,
                   double* scratch);

// The variant in use: "avx512", "avx2" or "generic".
const char* jacobi_isa();

// The widest variant this CPU runs.
int orthogonalize(double* w, int64_t count, int64_t len, double* v, double* norms, const JacobiParams& p,
                   double* scratch);

}  // namespace tensorpress::svd
