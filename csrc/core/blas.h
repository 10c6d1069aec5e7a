// Row-major GEMM through OpenBLAS (scipy-openblas32), for float and double.
// C = alpha * op(A) * op(B) + beta * C, all matrices row-major.
#pragma once
#include <cblas.h>

namespace tensorpress::blas {

inline CBLAS_TRANSPOSE tr(bool t) { return t ? CblasTrans : CblasNoTrans; }

inline void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
                 float beta, float* c, int ldc) {
  scipy_cblas_sgemm(CblasRowMajor, tr(ta), tr(tb), m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void gemm(bool ta, bool tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                 int ldb, double beta, double* c, int ldc) {
  scipy_cblas_dgemm(CblasRowMajor, tr(ta), tr(tb), m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Our threads each run single-threaded GEMMs; OpenBLAS must not spawn its own on top.
// This copy of OpenBLAS is ours alone (numpy and scipy bundle their own), so the setting
// is process-wide for it and touches nobody else.
inline void use_single_threaded_gemm() {
  static const bool done = [] {
    scipy_openblas_set_num_threads(1);
    return true;
  }();
  (void)done;
}

}  // namespace tensorpress::blas
