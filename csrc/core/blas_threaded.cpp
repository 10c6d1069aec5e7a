#include "core/blas_threaded.h"

#include <algorithm>

#include "core/blas.h"
#include "core/thread_pool.h"

namespace tensorpress::blas {
namespace {

// Panels narrower than this run below OpenBLAS's good rate: fewer, wider ones instead.
constexpr int64_t kMinPanel = 64;

int panels(int64_t extent, int threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, extent / kMinPanel)));
}

inline void trsm(bool left, bool upper, bool trans, int m, int n, const float* a, int lda, float* b, int ldb) {
  scipy_cblas_strsm(CblasRowMajor, left ? CblasLeft : CblasRight, upper ? CblasUpper : CblasLower, tr(trans),
                    CblasNonUnit, m, n, 1.0f, a, lda, b, ldb);
}
inline void trsm(bool left, bool upper, bool trans, int m, int n, const double* a, int lda, double* b, int ldb) {
  scipy_cblas_dtrsm(CblasRowMajor, left ? CblasLeft : CblasRight, upper ? CblasUpper : CblasLower, tr(trans),
                    CblasNonUnit, m, n, 1.0, a, lda, b, ldb);
}

}  // namespace

template <typename T>
void gemm_threaded(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                   int64_t ldb, T beta, T* c, int threads) {
  use_single_threaded_gemm();
  // Panels of C's rows (A's rows) or, for a wide C, of its columns (B's columns).
  const bool by_rows = m >= n;
  const int64_t extent = by_rows ? m : n;
  const int parts = panels(extent, threads);
  parallel_for(parts, parts, [&](int p, int) {
    const int64_t lo = extent * p / parts, hi = extent * (p + 1) / parts;
    if (hi == lo) return;
    if (by_rows) {
      const T* a_panel = ta ? a + lo : a + lo * lda;  // op(A) rows lo..hi
      gemm(ta, tb, int(hi - lo), int(n), int(k), alpha, a_panel, int(lda), b, int(ldb), beta, c + lo * n, int(n));
    } else {
      const T* b_panel = tb ? b + lo * ldb : b + lo;  // op(B) columns lo..hi
      gemm(ta, tb, int(m), int(hi - lo), int(k), alpha, a, int(lda), b_panel, int(ldb), beta, c + lo, int(n));
    }
  });
}

template <typename T>
void trsm_threaded(bool left, bool upper, bool trans, int64_t m, int64_t n, const T* a, int64_t lda, T* b,
                   int threads) {
  use_single_threaded_gemm();
  // The columns of B are independent systems for a left solve, its rows for a right one.
  const int64_t extent = left ? n : m;
  const int parts = panels(extent, threads);
  parallel_for(parts, parts, [&](int p, int) {
    const int64_t lo = extent * p / parts, hi = extent * (p + 1) / parts;
    if (hi == lo) return;
    if (left)
      trsm(true, upper, trans, int(m), int(hi - lo), a, int(lda), b + lo, int(n));
    else
      trsm(false, upper, trans, int(hi - lo), int(n), a, int(lda), b + lo * n, int(n));
  });
}

template void gemm_threaded<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                                   int64_t, float, float*, int);
template void gemm_threaded<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t,
                                    const double*, int64_t, double, double*, int);
template void trsm_threaded<float>(bool, bool, bool, int64_t, int64_t, const float*, int64_t, float*, int);
template void trsm_threaded<double>(bool, bool, bool, int64_t, int64_t, const double*, int64_t, double*, int);

}  // namespace tensorpress::blas
