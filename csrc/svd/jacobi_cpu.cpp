#include "svd/jacobi_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "core/blas.h"
#include "core/thread_pool.h"
#include "svd/jacobi_sweeps.h"

namespace tensorpress::svd {
namespace {

// Orthonormal vectors for the directions a rank-deficient matrix leaves undetermined:
// vectors [first, count) of q (each len long) become unit vectors orthogonal to all earlier
// ones. Each is the standard basis vector least covered by the vectors so far (largest
// residual 1 - sum_l q_l[i]^2), orthogonalized twice by Gram-Schmidt.
void complete_basis(double* q, int64_t first, int64_t count, int64_t len) {
  if (first >= count) return;
  std::vector<double> covered(len, 0.0);
  for (int64_t l = 0; l < first; ++l)
    for (int64_t i = 0; i < len; ++i) covered[i] += q[l * len + i] * q[l * len + i];
  for (int64_t j = first; j < count; ++j) {
    const int64_t pick = std::min_element(covered.begin(), covered.end()) - covered.begin();
    double* qj = q + j * len;
    std::fill(qj, qj + len, 0.0);
    qj[pick] = 1.0;
    for (int pass = 0; pass < 2; ++pass)
      for (int64_t l = 0; l < j; ++l) {
        const double* ql = q + l * len;
        const double proj = dot(ql, qj, len);
        for (int64_t i = 0; i < len; ++i) qj[i] -= proj * ql[i];
      }
    const double norm = std::sqrt(dot(qj, qj, len));
    for (int64_t i = 0; i < len; ++i) {
      qj[i] /= norm;
      covered[i] += qj[i] * qj[i];
    }
  }
}

// A worker's share of the workspace, carved in order (sizes in doubles).
struct JacobiBuffers {
  double *w, *v, *norms, *w_sorted, *v_sorted, *rotations, *product;
  int64_t* pairs;
  float *wf, *vf, *normsf, *rotationsf;  // the float32 first phase

  static int64_t doubles(int64_t k, int64_t len) {
    const int64_t pk = k + 2;                   // padded pair count
    const int64_t floats = k * len + k * k + k + pk;
    return 2 * k * len + 3 * k * k + k + pk + pk + (floats + 1) / 2;
  }
  JacobiBuffers(double* base, int64_t k, int64_t len) {
    const int64_t pk = k + 2;
    w = base;
    v = w + k * len;
    norms = v + k * k;
    w_sorted = norms + k;
    v_sorted = w_sorted + k * len;
    product = v_sorted + k * k;
    rotations = product + k * k;
    pairs = reinterpret_cast<int64_t*>(rotations + pk);
    wf = reinterpret_cast<float*>(rotations + 2 * pk);
    vf = wf + k * len;
    normsf = vf + k * k;
    rotationsf = normsf + k;
  }
};

// First phase for float32 inputs: sweeps in float (twice the SIMD width) until the vectors
// are orthogonal to ~1e-5, then w = V x recomputed in double from the input for the double
// sweeps, which converge in one or two more (quadratic convergence from a near-orthogonal
// start). The singular values keep double accuracy; V's deviation from orthogonality stays
// at float rounding (~1e-7), well inside what a float32 result can hold.
constexpr double kFloatPhaseTol = 1e-5;

}  // namespace

int64_t jacobi_workspace_size(int64_t m, int64_t n, int threads) {
  const int64_t k = std::min(m, n), len = std::max(m, n);
  return static_cast<int64_t>(std::max(threads, 1)) * JacobiBuffers::doubles(k, len);
}

template <typename T>
int jacobi_svd_cpu(const T* a, T* u, T* s, T* vh, int64_t batch, int64_t m, int64_t n,
                   const JacobiParams& params, double* workspace, int threads) {
  const bool tall = m >= n;
  const int64_t k = std::min(m, n), len = std::max(m, n);
  const int64_t per_thread = JacobiBuffers::doubles(k, len);
  constexpr bool float_phase = std::is_same_v<T, float>;
  std::atomic<int> max_sweeps{0};
  // Contiguous chunks per worker: each worker owns its slice of the workspace.
  const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, batch)));
  const int64_t chunk = (batch + workers - 1) / workers;
  parallel_for(workers, workers, [&](int worker, int) {
    JacobiBuffers buf(workspace + worker * per_thread, k, len);
    double *w = buf.w, *v = buf.v, *norms = buf.norms, *w_sorted = buf.w_sorted, *v_sorted = buf.v_sorted;
    std::vector<int64_t> order(k);
    for (int64_t item = worker * chunk; item < std::min(batch, (worker + 1) * chunk); ++item) {
      const T* ai = a + item * m * n;
      // vectors: columns of A (tall) or rows of A (wide)
      double* x = float_phase ? w_sorted : w;  // the float phase recomputes w from x
      for (int64_t j = 0; j < k; ++j)
        for (int64_t t = 0; t < len; ++t) x[j * len + t] = tall ? double(ai[t * n + j]) : double(ai[j * n + t]);
      std::fill(v, v + k * k, 0.0);
      for (int64_t j = 0; j < k; ++j) v[j * k + j] = 1.0;
      int sweeps = 0;
      if (float_phase) {
        for (int64_t i = 0; i < k * len; ++i) buf.wf[i] = float(x[i]);
        std::fill(buf.vf, buf.vf + k * k, 0.0f);
        for (int64_t j = 0; j < k; ++j) buf.vf[j * k + j] = 1.0f;
        JacobiParams coarse = params;
        coarse.tol = std::max(params.tol, kFloatPhaseTol);
        sweeps += orthogonalize(buf.wf, k, len, buf.vf, buf.normsf, coarse, buf.pairs, buf.rotationsf);
        // V accumulated in float drifts from orthogonal by ~1e-5 over many rotations; one
        // Newton-Schulz step, V <- 1.5 V - 0.5 (V V^T) V, squares that deviation away.
        for (int64_t i = 0; i < k * k; ++i) v_sorted[i] = double(buf.vf[i]);
        blas::gemm(false, true, k, k, k, 1.0, v_sorted, k, v_sorted, k, 0.0, v, k);      // G = V V^T
        blas::gemm(false, false, k, k, k, -0.5, v, k, v_sorted, k, 0.0, buf.product, k);
        for (int64_t i = 0; i < k * k; ++i) v[i] = 1.5 * v_sorted[i] + buf.product[i];
        blas::gemm(false, false, k, len, k, 1.0, v, k, x, len, 0.0, w, len);  // w = V x
      }
      sweeps += orthogonalize(w, k, len, v, norms, params, buf.pairs, buf.rotations);
      int seen = max_sweeps.load();
      while (sweeps > seen && !max_sweeps.compare_exchange_weak(seen, sweeps)) {}

      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return norms[x] > norms[y]; });
      const double sigma_max = k > 0 ? std::sqrt(norms[order[0]]) : 0.0;
      // below this the direction of w_j is noise: complete the basis instead
      const double cutoff = sigma_max * std::numeric_limits<double>::epsilon() * double(len) * 4;
      int64_t rank = 0;
      for (int64_t r = 0; r < k; ++r) {
        const int64_t j = order[r];
        const double sigma = std::sqrt(norms[j]);
        s[item * k + r] = T(sigma);
        if (sigma > cutoff && sigma > 0) {
          for (int64_t t = 0; t < len; ++t) w_sorted[r * len + t] = w[j * len + t] / sigma;
          rank = r + 1;
        }
        for (int64_t t = 0; t < k; ++t) v_sorted[r * k + t] = v[j * k + t];
      }
      // Vectors with sigma far below sigma_max may be noise of a numerically rank-deficient
      // matrix: re-orthogonalize those (twice, modified Gram-Schmidt, in order of decreasing
      // sigma); the ones that collapse are replaced by a completed basis. The rest are
      // orthogonal to the Jacobi tolerance already.
      int64_t trusted = rank;
      for (int64_t r = 0; r < rank; ++r)
        if (double(s[item * k + r]) < sigma_max * 1e-6) { trusted = r; break; }
      for (int64_t r = trusted; r < rank; ++r) {
        double* q = w_sorted + r * len;
        for (int pass = 0; pass < 2; ++pass)
          for (int64_t i = 0; i < r; ++i) {
            const double* qi = w_sorted + i * len;
            const double proj = dot(qi, q, len);
            for (int64_t t = 0; t < len; ++t) q[t] -= proj * qi[t];
          }
        const double norm = std::sqrt(dot(q, q, len));
        if (norm < 0.5) { rank = r; break; }
        for (int64_t t = 0; t < len; ++t) q[t] /= norm;
      }
      complete_basis(w_sorted, rank, k, len);

      // signs: the largest-magnitude entry of each left singular vector is positive (left
      // vectors: w_sorted rows when tall, v_sorted rows when wide)
      for (int64_t r = 0; r < k; ++r) {
        const double* left = tall ? w_sorted + r * len : v_sorted + r * k;
        double best = 0.0;
        for (int64_t t = 0; t < (tall ? len : k); ++t)
          if (std::abs(left[t]) > std::abs(best)) best = left[t];
        if (best < 0) {
          for (int64_t t = 0; t < len; ++t) w_sorted[r * len + t] = -w_sorted[r * len + t];
          for (int64_t t = 0; t < k; ++t) v_sorted[r * k + t] = -v_sorted[r * k + t];
        }
      }

      T* ui = u + item * m * k;
      T* vhi = vh + item * k * n;
      for (int64_t r = 0; r < k; ++r) {
        if (tall) {  // U[:, r] = w_sorted[r], Vh[r, :] = v_sorted[r]
          for (int64_t t = 0; t < m; ++t) ui[t * k + r] = T(w_sorted[r * len + t]);
          for (int64_t t = 0; t < n; ++t) vhi[r * n + t] = T(v_sorted[r * k + t]);
        } else {     // U[:, r] = v_sorted[r], Vh[r, :] = w_sorted[r]
          for (int64_t t = 0; t < m; ++t) ui[t * k + r] = T(v_sorted[r * k + t]);
          for (int64_t t = 0; t < n; ++t) vhi[r * n + t] = T(w_sorted[r * len + t]);
        }
      }
    }
  });
  return max_sweeps.load();
}

template int jacobi_svd_cpu<float>(const float*, float*, float*, float*, int64_t, int64_t, int64_t,
                                   const JacobiParams&, double*, int);
template int jacobi_svd_cpu<double>(const double*, double*, double*, double*, int64_t, int64_t, int64_t,
                                    const JacobiParams&, double*, int);

}  // namespace tensorpress::svd
