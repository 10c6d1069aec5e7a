#include "svd/jacobi_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "core/thread_pool.h"
#include "svd/jacobi_lanes.h"
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

// Buffers of one worker, in doubles: the lane groups' workspace (float32 inputs), the group's
// interleaved input, and one matrix's vectors, rotations, norms and sorted copies.
struct WorkerLayout {
  int64_t group, x, w, v, norms, w_sorted, v_sorted, scratch, total;
};
WorkerLayout worker_layout(int64_t k, int64_t len) {
  WorkerLayout l{};
  int64_t at = 0;
  auto take = [&](int64_t doubles) {
    const int64_t start = at;
    at += lanes::round_up8(doubles);
    return start;
  };
  l.group = take(lanes::group_layout(k, len).total);
  l.x = take(k * len * lanes::kLanes / 2);  // float32
  l.w = take(k * len);
  l.v = take(k * k);
  l.norms = take(k);
  l.w_sorted = take(k * len);
  l.v_sorted = take(k * k);
  l.scratch = take(4 * k + 8);  // the per-matrix sweeps' scratch
  l.total = at;
  return l;
}

// The SVD outputs of one matrix (item `item` of the batch) from its orthogonalized vectors w
// (k x len), rotations v (k x k) and norms ||w_j||^2 (see jacobi_svd_cpu).
template <typename T>
void write_item(int64_t item, const double* w, const double* v, const double* norms, int64_t m, int64_t n,
                double* w_sorted, double* v_sorted, T* u, T* s, T* vh) {
  const bool tall = m >= n;
  const int64_t k = std::min(m, n), len = std::max(m, n);
  std::vector<int64_t> order(k);
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
      const double inv = 1.0 / sigma;
      for (int64_t t = 0; t < len; ++t) w_sorted[r * len + t] = w[j * len + t] * inv;
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
    if (double(s[item * k + r]) < sigma_max * 1e-6) {
      trusted = r;
      break;
    }
  for (int64_t r = trusted; r < rank; ++r) {
    double* q = w_sorted + r * len;
    const double norm = orthogonalize_against(w_sorted, r, len, q);
    if (norm < 0.5) {
      rank = r;
      break;
    }
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
    } else {  // U[:, r] = v_sorted[r], Vh[r, :] = w_sorted[r]
      for (int64_t t = 0; t < m; ++t) ui[t * k + r] = T(v_sorted[r * k + t]);
      for (int64_t t = 0; t < n; ++t) vhi[r * n + t] = T(w_sorted[r * len + t]);
    }
  }
}

// Vector j of A's matrix `item`: column j when tall, row j when wide.
template <typename T>
inline T vector_entry(const T* a, int64_t item, int64_t m, int64_t n, bool tall, int64_t j, int64_t t) {
  return tall ? a[item * m * n + t * n + j] : a[item * m * n + j * n + t];
}

// The group's interleaved input (see lanes::orthogonalize_group) from `count` matrices at a,
// lanes past them zero: entry (r, c) of every matrix is read in row order, and the kLanes
// values of one entry are stored together.
void gather_group(const float* a, int64_t count, int64_t m, int64_t n, float* x) {
  constexpr int kLanes = lanes::kLanes;
  const bool tall = m >= n;
  const int64_t len = std::max(m, n);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < n; ++c) {
      float* out = x + (tall ? c * len + r : r * len + c) * kLanes;  // vector j, entry t
      int l = 0;
      for (; l < count; ++l) out[l] = a[l * m * n + r * n + c];
      for (; l < kLanes; ++l) out[l] = 0.0f;
    }
}

// Records the largest sweep count seen.
void note_sweeps(std::atomic<int>& max_sweeps, int sweeps) {
  int seen = max_sweeps.load();
  while (sweeps > seen && !max_sweeps.compare_exchange_weak(seen, sweeps)) {
  }
}

}  // namespace

int64_t jacobi_workspace_size(int64_t m, int64_t n, int threads) {
  const int64_t k = std::min(m, n), len = std::max(m, n);
  // + 8: room to align each worker's slice to 64 bytes
  return static_cast<int64_t>(std::max(threads, 1)) * (worker_layout(k, len).total + 8);
}

template <typename T>
int jacobi_svd_cpu(const T* a, T* u, T* s, T* vh, int64_t batch, int64_t m, int64_t n, const JacobiParams& params,
                   double* workspace, int threads) {
  const bool tall = m >= n;
  const int64_t k = std::min(m, n), len = std::max(m, n);
  const WorkerLayout layout = worker_layout(k, len);
  // float32 goes through the batch-interleaved sweeps, kLanes matrices at a time
  constexpr bool grouped = std::is_same_v<T, float>;
  const int64_t per_task = grouped ? lanes::kLanes : 1;
  const int64_t tasks = (batch + per_task - 1) / per_task;
  std::atomic<int> max_sweeps{0};
  // Contiguous chunks per worker: each worker owns its slice of the workspace.
  const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tasks)));
  const int64_t chunk = (tasks + workers - 1) / workers;
  parallel_for(workers, workers, [&](int worker, int) {
    double* base = workspace + worker * (layout.total + 8);
    base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64 / sizeof(double);
    double* w = base + layout.w;
    double* v = base + layout.v;
    double* norms = base + layout.norms;
    double* w_sorted = base + layout.w_sorted;
    double* v_sorted = base + layout.v_sorted;
    for (int64_t task = worker * chunk; task < std::min(tasks, (worker + 1) * chunk); ++task) {
      if constexpr (grouped) {
        const int64_t first = task * lanes::kLanes, count = std::min<int64_t>(lanes::kLanes, batch - first);
        float* x = reinterpret_cast<float*>(base + layout.x);
        gather_group(a + first * m * n, count, m, n, x);
        note_sweeps(max_sweeps, orthogonalize_group(x, k, len, params, base + layout.group));
        for (int l = 0; l < count; ++l) {
          lanes::extract_lane(base + layout.group, k, len, l, w, v, norms);
          write_item(first + l, w, v, norms, m, n, w_sorted, v_sorted, u, s, vh);
        }
      } else {
        for (int64_t j = 0; j < k; ++j)
          for (int64_t t = 0; t < len; ++t) w[j * len + t] = double(vector_entry(a, task, m, n, tall, j, t));
        std::fill(v, v + k * k, 0.0);
        for (int64_t j = 0; j < k; ++j) v[j * k + j] = 1.0;
        note_sweeps(max_sweeps, orthogonalize(w, k, len, v, norms, params, base + layout.scratch));
        write_item(task, w, v, norms, m, n, w_sorted, v_sorted, u, s, vh);
      }
    }
  });
  return max_sweeps.load();
}

template int jacobi_svd_cpu<float>(const float*, float*, float*, float*, int64_t, int64_t, int64_t, const JacobiParams&,
                                   double*, int);
template int jacobi_svd_cpu<double>(const double*, double*, double*, double*, int64_t, int64_t, int64_t,
                                    const JacobiParams&, double*, int);

}  // namespace tensorpress::svd
