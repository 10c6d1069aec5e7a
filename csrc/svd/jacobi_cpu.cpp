#include "svd/jacobi_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "core/thread_pool.h"
#include "svd/jacobi_sweeps.h"

namespace tensorpress::svd {
namespace {

// Removes from x its components along the orthonormal vectors q_0 .. q_{count-1} (modified
// Gram-Schmidt, twice for full accuracy) and returns the norm of what is left.
double orthogonalize_against(const double* q, int64_t count, int64_t len, double* x) {
  for (int pass = 0; pass < 2; ++pass)
    for (int64_t l = 0; l < count; ++l) {
      const double* ql = q + l * len;
      const double proj = dot(ql, x, len);
      for (int64_t i = 0; i < len; ++i) x[i] -= proj * ql[i];
    }
  return std::sqrt(dot(x, x, len));
}

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
    const double norm = orthogonalize_against(q, j, len, qj);
    for (int64_t i = 0; i < len; ++i) {
      qj[i] /= norm;
      covered[i] += qj[i] * qj[i];
    }
  }
}

}  // namespace

int64_t jacobi_workspace_size(int64_t m, int64_t n, int threads) {
  const int64_t k = std::min(m, n), len = std::max(m, n);
  // w (k x len), v (k x k), norms (k), sorted copies of w and v, the sweep's scratch
  return static_cast<int64_t>(std::max(threads, 1)) * (2 * k * len + 2 * k * k + 5 * k + 8);
}

template <typename T>
int jacobi_svd_cpu(const T* a, T* u, T* s, T* vh, int64_t batch, int64_t m, int64_t n,
                   const JacobiParams& params, double* workspace, int threads) {
  const bool tall = m >= n;
  const int64_t k = std::min(m, n), len = std::max(m, n);
  const int64_t per_thread = 2 * k * len + 2 * k * k + 5 * k + 8;
  std::atomic<int> max_sweeps{0};
  // Contiguous chunks per worker: each worker owns its slice of the workspace.
  const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, batch)));
  const int64_t chunk = (batch + workers - 1) / workers;
  parallel_for(workers, workers, [&](int worker, int) {
    double* w = workspace + worker * per_thread;
    double* v = w + k * len;
    double* norms = v + k * k;
    double* w_sorted = norms + k;
    double* v_sorted = w_sorted + k * len;
    double* scratch = v_sorted + k * k;
    std::vector<int64_t> order(k);
    for (int64_t item = worker * chunk; item < std::min(batch, (worker + 1) * chunk); ++item) {
      const T* ai = a + item * m * n;
      // vectors: columns of A (tall) or rows of A (wide)
      for (int64_t j = 0; j < k; ++j)
        for (int64_t t = 0; t < len; ++t) w[j * len + t] = tall ? double(ai[t * n + j]) : double(ai[j * n + t]);
      std::fill(v, v + k * k, 0.0);
      for (int64_t j = 0; j < k; ++j) v[j * k + j] = 1.0;
      const int sweeps = orthogonalize(w, k, len, v, norms, params, scratch);
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
        const double norm = orthogonalize_against(w_sorted, r, len, q);
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
