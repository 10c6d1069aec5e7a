// The Jacobi sweeps, built once per instruction set (the extension targets baseline x86-64;
// the vector loops run 4-8x wider with AVX2/AVX-512) and picked at run time: the per-matrix
// double sweeps of jacobi.h, and the batch-interleaved float32 ones of jacobi_lanes.h.
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

// One group of lanes::kLanes float32 matrices, interleaved (see lanes::orthogonalize_group).
int orthogonalize_group_generic(const float* x, int64_t count, int64_t len, const JacobiParams& p, double* ws);
int orthogonalize_group_avx2(const float* x, int64_t count, int64_t len, const JacobiParams& p, double* ws);
int orthogonalize_group_avx512(const float* x, int64_t count, int64_t len, const JacobiParams& p, double* ws);

// The variant in use: "avx512", "avx2" or "generic".
const char* jacobi_isa();

// The widest variants this CPU runs.
int orthogonalize(double* w, int64_t count, int64_t len, double* v, double* norms, const JacobiParams& p,
                  double* scratch);
int orthogonalize_group(const float* x, int64_t count, int64_t len, const JacobiParams& p, double* ws);

}  // namespace tensorpress::svd
