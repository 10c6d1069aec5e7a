// One-sided (Hestenes) Jacobi SVD of one small matrix, shared by the CPU and CUDA drivers.
//
// The matrix is held as `count` vectors of length `len` (row-major, vector j at w + j*len):
// the columns of A when A is tall, its rows when it is wide. Plane rotations make the vectors
// mutually orthogonal; the accumulated rotations form the other orthogonal factor. Then the
// vector norms are the singular values. One-sided Jacobi is accurate in the relative sense
// (small singular values of well-scaled matrices come out to high relative accuracy).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace tensorpress::svd {

struct JacobiParams {
  double tol;  // rotate a pair while |<w_p, w_q>| > tol * ||w_p|| ||w_q||
  int max_sweeps;
  bool sort_each_sweep = true;
};

// `static`: each translation unit that includes this (one per instruction set) keeps its own
// copies, so the linker can never mix an AVX-512 build of these into the baseline path.
template <typename T>
static inline T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename T>
static inline void rotate(T* a, T* b, int64_t n, T c, T s) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T x = a[i], y = b[i];
    a[i] = c * x - s * y;
    b[i] = s * x + c * y;
  }
}

// Reorders the vectors (and their rotation rows) by decreasing norm: selection sort with
// swaps, count is small.
template <typename T>
static void sort_by_norm(T* w, int64_t count, int64_t len, T* v, T* norms) {
  for (int64_t a = 0; a + 1 < count; ++a) {
    int64_t best = a;
    for (int64_t b = a + 1; b < count; ++b)
      if (norms[b] > norms[best]) best = b;
    if (best == a) continue;
    std::swap_ranges(w + a * len, w + (a + 1) * len, w + best * len);
    std::swap_ranges(v + a * count, v + (a + 1) * count, v + best * count);
    std::swap(norms[a], norms[best]);
  }
}

// The round-robin ("circle method") pairing: a sweep is `rounds(count)` rounds, each of
// `count_even / 2` disjoint pairs, covering every pair once. Disjoint pairs are independent:
// the CPU overlaps them (no dot -> rotation latency chain) and a GPU runs them in parallel.
static inline int64_t padded_count(int64_t count) { return count + (count & 1); }
static inline int64_t rounds(int64_t count) { return padded_count(count) - 1; }
// Pair k of round r; an index >= count is the padding slot (a pair with it is skipped).
static inline void round_robin_pair(int64_t count, int64_t r, int64_t k, int64_t* a, int64_t* b) {
  const int64_t n = padded_count(count), m = n - 1;
  if (k == 0) {
    *a = n - 1;
    *b = r;
  } else {
    *a = (r + k) % m;
    *b = (r - k + m) % m;
  }
  if (*a > *b) std::swap(*a, *b);
}

// Orthogonalizes the `count` vectors of w (each `len` long) in place and accumulates the
// rotations into v (count x count, row-major, vector j at v + j*count; must start as I).
// norms[j] receives ||w_j||^2 on exit. `scratch` holds 4 * count values. Returns the number
// of sweeps used.
template <typename T>
static int jacobi_orthogonalize(T* w, int64_t count, int64_t len, T* v, T* norms, const JacobiParams& p, T* scratch) {
  static_assert(sizeof(T) >= sizeof(int64_t), "scratch also holds the pairs' indices");
  for (int64_t j = 0; j < count; ++j) norms[j] = dot(w + j * len, w + j * len, len);
  const int64_t half = padded_count(count) / 2;
  int64_t* first = reinterpret_cast<int64_t*>(scratch);  // pair members of the current round
  int64_t* second = first + half;
  T* cosine = scratch + 2 * half;
  T* sine = cosine + half;
  int sweep = 0;
  for (; sweep < p.max_sweeps; ++sweep) {
    bool rotated = false;
    // de Rijk: vectors in norm order at the start of each sweep cut the number of sweeps
    if (p.sort_each_sweep) sort_by_norm(w, count, len, v, norms);
    for (int64_t r = 0; r < rounds(count); ++r) {
      int64_t active = 0;
      for (int64_t k = 0; k < half; ++k) {  // 1. the rotations of all pairs of this round
        int64_t a, b;
        round_robin_pair(count, r, k, &a, &b);
        if (b >= count) continue;
        const T alpha = norms[a], beta = norms[b];
        if (alpha == T(0) || beta == T(0)) continue;
        const T gamma = dot(w + a * len, w + b * len, len);
        if (std::abs(gamma) <= T(p.tol) * std::sqrt(alpha) * std::sqrt(beta)) continue;
        // the rotation that zeroes <w_a, w_b> (Golub & Van Loan, sym.schur2)
        const T zeta = (beta - alpha) / (T(2) * gamma);
        const T t = (zeta >= 0 ? T(1) : T(-1)) / (std::abs(zeta) + std::sqrt(T(1) + zeta * zeta));
        const T c = T(1) / std::sqrt(T(1) + t * t);
        first[active] = a;
        second[active] = b;
        cosine[active] = c;
        sine[active] = c * t;
        // the rotation moves t*gamma of squared norm from w_a to w_b
        norms[a] = std::max(alpha - t * gamma, T(0));
        norms[b] = beta + t * gamma;
        ++active;
      }
      for (int64_t i = 0; i < active; ++i) {  // 2. apply them (independent of each other)
        rotate(w + first[i] * len, w + second[i] * len, len, cosine[i], sine[i]);
        rotate(v + first[i] * count, v + second[i] * count, count, cosine[i], sine[i]);
      }
      rotated |= active > 0;
    }
    // refresh the norms once per sweep so the cheap updates never drift far
    for (int64_t j = 0; j < count; ++j) norms[j] = dot(w + j * len, w + j * len, len);
    if (!rotated) break;
  }
  return sweep;
}

}  // namespace tensorpress::svd
