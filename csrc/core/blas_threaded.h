// Whole-matrix GEMM and triangular solves on OpenBLAS, split over our threads.
//
// torch's CPU BLAS (MKL) keeps to AVX2 on AMD processors, where OpenBLAS runs its AVX-512
// kernels at about twice the rate; tenBCD's updates (python/tensorpress/train) are mostly
// such products and solves. OpenBLAS is single-threaded in this extension (the fused kernels
// run one GEMM per worker), so these cut the output into one panel per thread instead.
#pragma once
#include <cstdint>

namespace tensorpress::blas {

// C (m x n, row-major, ldc = n) = alpha * op(A) op(B) + beta * C. A and B row-major with
// leading dimensions lda / ldb; op = transpose where ta / tb.
template <typename T>
void gemm_threaded(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                   int64_t ldb, T beta, T* c, int threads);

// B (m x n, row-major) <- op(A)^-1 B (left) or B op(A)^-1 (right), A triangular (lower
// unless `upper`), row-major with leading dimension lda; op = transpose where `trans`.
template <typename T>
void trsm_threaded(bool left, bool upper, bool trans, int64_t m, int64_t n, const T* a, int64_t lda, T* b, int threads);

}  // namespace tensorpress::blas
