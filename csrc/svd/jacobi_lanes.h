// One-sided Jacobi on a group of kLanes matrices at once, for float32 inputs on the CPU.
//
// The group is stored interleaved: entry t of vector j of every matrix sits in one vector
// register, lane l holding matrix l. Every matrix runs the same schedule of pairs, so a
// pair's dot product, its rotation and its application are plain vertical SIMD with no
// horizontal sums; a lane whose pair needs no rotation gets c = 1, s = 0.
//
// The vectors x_j (columns of X, len x count: the columns of A when tall, its rows when wide)
// go through three phases:
//  0. QR preconditioning in float32 (Drmac & Veselic): X = Q1 R1, R1^T = Q2 R2. One-sided
//     Jacobi on Y = R2^T = R1 Q2 needs far fewer sweeps than on X (64 x 64 with a decaying
//     spectrum: about 5 instead of 12), and X's right singular vectors are Q2 times Y's.
//  1. float32 sweeps on Y to a loose tolerance: cheap (twice the lanes of double), and they
//     do most of the rotating; V1 = Q2 (Y's rotations) approximates X's right singular vectors.
//  2. V1 re-orthonormalized in double (one Newton-Schulz step), the vectors rebuilt in double
//     from the input as W = X V1, and double rotations to the caller's tolerance. This starts
//     almost orthogonal, so its rotations are small and one round usually finishes
//     (first_order_step); it is a double one-sided Jacobi on X itself, so the result has that
//     accuracy (the float32 phases only choose its starting point).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "svd/jacobi.h"

// The baseline build (no AVX) returns these 32-byte vectors from functions it may not inline;
// they are all internal to one translation unit, so the ABI note does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace tensorpress::svd::lanes {

// Matrices per group: 8 float32 lanes fill an AVX2 register (the baseline and AVX-512 builds
// use the same layout, so the workspace does not depend on the instruction set).
constexpr int kLanes = 8;
// Natural alignment (the whole vector): the workspace is aligned to 64 bytes and every piece
// of it starts on a 64-byte boundary.
typedef float VF __attribute__((vector_size(kLanes * sizeof(float))));
// Phase 2 runs in double on half a group at a time: 4 lanes fill an AVX2 register, and half
// the working set stays in the L2 cache.
constexpr int kHalf = kLanes / 2;
typedef double VD __attribute__((vector_size(kHalf * sizeof(double))));

// Phase 1 rotates a pair while its |cos| exceeds kPhase1Tol, and stops after a sweep where none
// exceeded kPhase1Last (see lane_sweeps); phase 2 takes over from there.
constexpr double kPhase1Tol = 1e-6, kPhase1Last = 1e-2;
constexpr int kPhase1MaxSweeps = 20;
// Vectors with squared norms below these (the input scaled so its largest entry is ~1) count as zero
// and are not rotated: in float32, noise far below the rounding of the largest entry; in
// double, far below anything a float32 matrix can hold. Keeps squares and products in range.
constexpr double kPhase1Null = 1e-12, kPhase2Null = 1e-150;

// Workspace layout of one group, in doubles (every piece starts on a 64-byte boundary). The
// double pieces (4 lanes) hold the group's two halves one after the other.
struct GroupLayout {
  int64_t x32, tau32, x2, tau2, y32, v32, norms32, x, w, v, norms, tmp, cs, scale, total;
};
static inline int64_t round_up8(int64_t n) { return (n + 7) / 8 * 8; }
static inline GroupLayout group_layout(int64_t count, int64_t len) {
  GroupLayout g{};
  int64_t at = 0;
  auto take = [&](int64_t doubles) {
    const int64_t start = at;
    at += round_up8(doubles);
    return start;
  };
  const int64_t square = count * count;
  // float32 (8 lanes: 4 doubles per entry)
  g.x32 = take(count * len * kHalf);  // the scaled input, then QR's reflectors and R1
  g.tau32 = take(count * kHalf);
  g.x2 = take(square * kHalf);        // R1^T, then its QR's reflectors and R2
  g.tau2 = take(count * kHalf);
  g.y32 = take(square * kHalf);       // Y = R2^T, rotated by phase 1
  g.v32 = take(square * kHalf);       // phase 1 rotations, then V1
  g.norms32 = take(count * kHalf);
  // double (4 lanes, two halves)
  g.x = take(count * len * kLanes);   // the scaled input
  g.w = take(count * len * kLanes);   // W = X V
  g.v = take(square * kLanes);        // V
  g.norms = take(count * kLanes);     // ||w_j||^2
  g.tmp = take(square * kHalf);       // Newton-Schulz coefficients, Gram matrices (one half at a time)
  // one sweep's cosines and sines (float32 or double: 4 doubles per lane vector)
  g.cs = take(2 * (square - count) / 2 * kHalf);
  g.scale = take(kLanes);  // per lane: the input is scaled by 2^-scale
  g.total = at;
  return g;
}

template <typename V>
using elem_t = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V>()[0])>>;

template <typename V>
static inline V splat(elem_t<V> x) {
  return V{} + x;
}

template <typename M>
static inline bool any(const M& mask) {
  static_assert(sizeof(M) % 8 == 0);
  uint64_t words[sizeof(M) / 8];
  std::memcpy(words, &mask, sizeof(M));
  uint64_t acc = 0;
  for (uint64_t word : words) acc |= word;
  return acc != 0;
}

// Element-wise square root by the widest native instruction the build has.
template <typename V>
static inline V vsqrt(const V& x) {
  using E = elem_t<V>;
  V r;
#if defined(__AVX__)
  constexpr int chunk = 32;
#elif defined(__SSE2__)
  constexpr int chunk = 16;
#else
  constexpr int chunk = 0;
#endif
  if constexpr (chunk > 0 && sizeof(V) % chunk == 0) {
    for (size_t at = 0; at < sizeof(V); at += chunk) {
      unsigned char* out = reinterpret_cast<unsigned char*>(&r) + at;
      const unsigned char* in = reinterpret_cast<const unsigned char*>(&x) + at;
#if defined(__AVX__)
      if constexpr (std::is_same_v<E, float>)
        _mm256_storeu_ps(reinterpret_cast<float*>(out), _mm256_sqrt_ps(_mm256_loadu_ps(reinterpret_cast<const float*>(in))));
      else
        _mm256_storeu_pd(reinterpret_cast<double*>(out), _mm256_sqrt_pd(_mm256_loadu_pd(reinterpret_cast<const double*>(in))));
#elif defined(__SSE2__)
      if constexpr (std::is_same_v<E, float>)
        _mm_storeu_ps(reinterpret_cast<float*>(out), _mm_sqrt_ps(_mm_loadu_ps(reinterpret_cast<const float*>(in))));
      else
        _mm_storeu_pd(reinterpret_cast<double*>(out), _mm_sqrt_pd(_mm_loadu_pd(reinterpret_cast<const double*>(in))));
#endif
    }
  } else {
    for (size_t l = 0; l < sizeof(V) / sizeof(E); ++l) r[l] = std::sqrt(x[l]);
  }
  return r;
}

// <a_i, b_i> for every lane, four partial sums to hide the FMA latency.
template <typename V>
static inline V vdot(const V* a, const V* b, int64_t n) {
  V s0{}, s1{}, s2{}, s3{};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += a[i] * b[i];
    s1 += a[i + 1] * b[i + 1];
    s2 += a[i + 2] * b[i + 2];
    s3 += a[i + 3] * b[i + 3];
  }
  for (; i < n; ++i) s0 += a[i] * b[i];
  return (s0 + s1) + (s2 + s3);
}

template <typename V>
static inline void vrotate(V* a, V* b, int64_t n, const V& c, const V& s) {
  for (int64_t i = 0; i < n; ++i) {
    const V x = a[i], y = b[i];
    a[i] = c * x - s * y;
    b[i] = s * x + c * y;
  }
}

// The order of the pairs in a sweep, as rounds of disjoint pairs: round r's pairs are
// pairs[2*begin[r] ..] (first, second). Every pair once per sweep, as in jacobi.h, but
// blocked for the cache: the vectors are cut into blocks of `block`, and the blocks are
// paired by jacobi.h's round-robin schedule; a pair of blocks (I, J) runs its block^2 pairs
// as `block` rounds (I[k], J[(k + s) % block]), so 2 * block vectors are reused from the L1
// cache instead of all vectors streaming through it every round. Each block's own pairs
// (round-robin within the block) run in the first block round. One block: the plain
// round-robin schedule of jacobi.h.
struct Schedule {
  std::vector<int32_t> pairs, begin;
  Schedule(int64_t count, int64_t block) {
    block = std::max<int64_t>(1, std::min(block, count));
    const int64_t nblocks = (count + block - 1) / block;
    auto member = [&](int64_t blk, int64_t k) { return blk * block + k; };  // >= count: padding
    auto add = [&](int64_t a, int64_t b) {
      if (a > b) std::swap(a, b);
      if (b >= count) return;
      pairs.push_back(static_cast<int32_t>(a));
      pairs.push_back(static_cast<int32_t>(b));
    };
    auto close_round = [&] {
      if (begin.empty() || static_cast<int64_t>(pairs.size() / 2) > begin.back())
        begin.push_back(static_cast<int32_t>(pairs.size() / 2));
    };
    begin.push_back(0);
    for (int64_t br = 0; br < rounds(nblocks); ++br)
      for (int64_t bk = 0; bk < padded_count(nblocks) / 2; ++bk) {
        int64_t bi, bj;
        round_robin_pair(nblocks, br, bk, &bi, &bj);
        if (br == 0)  // the blocks' own pairs (a padding block bj has none)
          for (int64_t blk : {bi, bj}) {
            if (blk >= nblocks) continue;
            for (int64_t r = 0; r < rounds(block); ++r) {
              for (int64_t k = 0; k < padded_count(block) / 2; ++k) {
                int64_t a, b;
                round_robin_pair(block, r, k, &a, &b);
                if (b < block) add(member(blk, a), member(blk, b));
              }
              close_round();
            }
          }
        if (bj >= nblocks) continue;
        for (int64_t shift = 0; shift < block; ++shift) {
          for (int64_t k = 0; k < block; ++k) add(member(bi, k), member(bj, (k + shift) % block));
          close_round();
        }
      }
  }
  int64_t rounds_count() const { return static_cast<int64_t>(begin.size()) - 1; }
};

// Vectors per schedule block: two blocks of float32 (or half-group double) vectors, 32 bytes
// per entry, fill about half the 32 KiB L1 data cache.
static inline int64_t schedule_block(int64_t len) { return std::max<int64_t>(2, 16384 / (2 * 32 * len)); }

// Applies the rotations recorded in one sweep, in order, to the vectors v (each len long):
// rotation q mixes vectors pairs[2q], pairs[2q+1] by cosine cs[2q], sine cs[2q+1]. Entries t
// of the vectors are independent of each other, so this runs block by block over t, each
// block of all vectors staying in the cache while every rotation passes over it, instead of
// streaming all of v through the cache once per round (blocks of 32: fewer and the
// per-rotation setup shows, more and they leave the L2 cache; measured on 64 x 64).
template <typename V>
static inline void apply_recorded(V* v, int64_t len, const int32_t* pairs, const V* cs, int64_t n) {
  constexpr int64_t kBlock = 32;
  for (int64_t t0 = 0; t0 < len; t0 += kBlock) {
    const int64_t m = std::min(kBlock, len - t0);
    for (int64_t q = 0; q < n; ++q)
      vrotate(v + pairs[2 * q] * len + t0, v + pairs[2 * q + 1] * len + t0, m, cs[2 * q], cs[2 * q + 1]);
  }
}

// Sweeps over the interleaved vectors w (count x len) and rotations v (count x count) until
// no lane rotates (or max_sweeps); norms holds ||w_j||^2 per lane. A pair rotates where
// <w_a, w_b>^2 > tol^2 ||w_a||^2 ||w_b||^2, both norms above `null` (smaller vectors are
// treated as zero: noise far below the largest entry, which the callers scale to ~1). The
// rotation zeroes <w_a, w_b> as in jacobi.h (Golub & Van Loan, sym.schur2). Each round runs
// in three passes over its disjoint pairs: the dot products, the rotations (branch-free, so
// the long divide / square-root chains of consecutive pairs overlap), their application to
// w. The sweep's rotations are recorded (`cs`: 2 per pair of a sweep) and applied to v at its
// end (apply_recorded). With `last` > 0 the sweeps also stop after one where no |cos| exceeded
// `last`: convergence is quadratic by then, so that sweep leaves the pairs near last^2 or
// below, and a sweep only to confirm it is saved (phase 1, which phase 2 checks anyway).
// Returns the sweeps run.
template <typename V>
static inline int lane_sweeps(V* w, int64_t count, int64_t len, V* v, V* norms, const Schedule& sched, double tol,
                       double null, double last, int max_sweeps, V* cs) {
  using E = elem_t<V>;
  const V zero{}, one = splat<V>(1), tol2 = splat<V>(E(tol * tol)), nullv = splat<V>(E(null));
  const V last2 = splat<V>(E(last * last));
  const V zeta_big = splat<V>(E(std::is_same_v<E, float> ? 1e18 : 1e150));
  for (int64_t j = 0; j < count; ++j) norms[j] = vdot(w + j * len, w + j * len, len);
  const int64_t nrounds = sched.rounds_count();
  std::vector<int32_t> recorded(sched.pairs.size());  // the pairs rotated in this sweep
  int sweep = 0;
  while (sweep < max_sweeps) {
    int64_t n = 0;  // rotations recorded
    decltype(zero < zero) large{};  // lanes where some |cos| exceeded `last`
    for (int64_t r = 0; r < nrounds; ++r) {
      const int32_t* pair = sched.pairs.data() + 2 * sched.begin[r];
      const int64_t npairs = sched.begin[r + 1] - sched.begin[r];
      V* rcs = cs + 2 * n;  // this round's values, compacted to the rotating pairs below
      for (int64_t i = 0; i < npairs; ++i) rcs[2 * i] = vdot(w + pair[2 * i] * len, w + pair[2 * i + 1] * len, len);
      int64_t kept = 0;
      for (int64_t i = 0; i < npairs; ++i) {
        const int64_t a = pair[2 * i], b = pair[2 * i + 1];
        const V alpha = norms[a], beta = norms[b], gamma = rcs[2 * i];
        const V ab = alpha * beta, gamma2 = gamma * gamma;
        const auto rotate = (gamma2 > tol2 * ab) & (alpha > nullv) & (beta > nullv);
        large |= gamma2 > last2 * ab;
        const V zeta = (beta - alpha) / (E(2) * (rotate ? gamma : one));
        const V az = zeta < zero ? -zeta : zeta;
        // tan of the smaller rotation angle, 1 / (|zeta| + sqrt(1 + zeta^2)), or 1 / (2 |zeta|)
        // where zeta^2 would overflow (the same value to rounding)
        const auto big = az > zeta_big;
        const V small = big ? zero : az;
        V t = (big ? splat<V>(E(0.5)) : one) / (big ? az : az + vsqrt(one + small * small));
        t = zeta >= zero ? t : -t;
        t = rotate ? t : zero;
        const V c = one / vsqrt(one + t * t);
        // the rotation moves t * gamma of squared norm from w_a to w_b
        const V moved = t * gamma;
        const V na = alpha - moved;
        norms[a] = na > zero ? na : zero;
        norms[b] = beta + moved;
        if (!any(rotate)) continue;
        rcs[2 * kept] = c;  // kept <= i: never overwrites a gamma still to be read
        rcs[2 * kept + 1] = c * t;
        recorded[2 * (n + kept)] = static_cast<int32_t>(a);
        recorded[2 * (n + kept) + 1] = static_cast<int32_t>(b);
        ++kept;
      }
      for (int64_t i = 0; i < kept; ++i) {
        const int64_t a = recorded[2 * (n + i)], b = recorded[2 * (n + i) + 1];
        vrotate(w + a * len, w + b * len, len, rcs[2 * i], rcs[2 * i + 1]);
      }
      n += kept;
    }
    apply_recorded(v, count, recorded.data(), cs, n);
    // refresh the norms once per sweep so the cheap updates never drift far
    for (int64_t j = 0; j < count; ++j) norms[j] = vdot(w + j * len, w + j * len, len);
    ++sweep;
    if (n == 0 || (last > 0 && !any(large))) break;
  }
  return sweep;
}

// The products of the phase changes, as small matrix products over interleaved vectors (one
// register per entry, lane by lane), register-blocked: a tile of 8-12 sums stays in registers,
// and the panel of `in` a tile reads stays in the L1 cache.

// out_j = sum_i coef[j][i] * in_i: coef is count x count, in and out have count vectors of len.
static inline void combine(const VD* coef, const VD* in, VD* out, int64_t count, int64_t len) {
  constexpr int64_t kJ = 3, kT = 4;
  for (int64_t t = 0; t < len; t += kT) {
    const int64_t nt = std::min(kT, len - t);
    int64_t j = 0;
    for (; j + kJ <= count && nt == kT; j += kJ) {
      const VD* c0 = coef + j * count;
      const VD* c1 = c0 + count;
      const VD* c2 = c1 + count;
      VD s00{}, s01{}, s02{}, s03{}, s10{}, s11{}, s12{}, s13{}, s20{}, s21{}, s22{}, s23{};
      for (int64_t i = 0; i < count; ++i) {
        const VD* x = in + i * len + t;
        const VD x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3];
        VD c = c0[i];
        s00 += c * x0, s01 += c * x1, s02 += c * x2, s03 += c * x3;
        c = c1[i];
        s10 += c * x0, s11 += c * x1, s12 += c * x2, s13 += c * x3;
        c = c2[i];
        s20 += c * x0, s21 += c * x1, s22 += c * x2, s23 += c * x3;
      }
      VD* o = out + j * len + t;
      o[0] = s00, o[1] = s01, o[2] = s02, o[3] = s03;
      o += len;
      o[0] = s10, o[1] = s11, o[2] = s12, o[3] = s13;
      o += len;
      o[0] = s20, o[1] = s21, o[2] = s22, o[3] = s23;
    }
    for (; j < count; ++j)  // edges
      for (int64_t u = t; u < t + nt; ++u) {
        VD sum{};
        for (int64_t i = 0; i < count; ++i) sum += coef[j * count + i] * in[i * len + u];
        out[j * len + u] = sum;
      }
  }
}

// g[a][b] = <in_a, in_b> for all a, b (count vectors of len; g is count x count).
static inline void gram(const VD* in, int64_t count, int64_t len, VD* g) {
  constexpr int64_t kA = 2, kB = 4;
  for (int64_t a = 0; a < count; a += kA) {
    const int64_t na = std::min(kA, count - a);
    for (int64_t b = a - a % kB; b < count; b += kB) {  // b blocks from the one holding a
      const int64_t nb = std::min(kB, count - b);
      if (na == kA && nb == kB) {
        const VD *p0 = in + a * len, *p1 = p0 + len;
        const VD *q0 = in + b * len, *q1 = q0 + len, *q2 = q1 + len, *q3 = q2 + len;
        VD s00{}, s01{}, s02{}, s03{}, s10{}, s11{}, s12{}, s13{};
        for (int64_t t = 0; t < len; ++t) {
          const VD x0 = p0[t], x1 = p1[t], y0 = q0[t], y1 = q1[t], y2 = q2[t], y3 = q3[t];
          s00 += x0 * y0, s01 += x0 * y1, s02 += x0 * y2, s03 += x0 * y3;
          s10 += x1 * y0, s11 += x1 * y1, s12 += x1 * y2, s13 += x1 * y3;
        }
        const VD sums[2][4] = {{s00, s01, s02, s03}, {s10, s11, s12, s13}};
        for (int64_t i = 0; i < kA; ++i)
          for (int64_t k = 0; k < kB; ++k) g[(a + i) * count + b + k] = g[(b + k) * count + a + i] = sums[i][k];
      } else {
        for (int64_t i = a; i < a + na; ++i)
          for (int64_t k = b; k < b + nb; ++k) g[i * count + k] = g[k * count + i] = vdot(in + i * len, in + k * len, len);
      }
    }
  }
}

// Applies the Householder reflector I - tau h h^T, h = (1, tail[0..n)), to the vectors
// cols[0..m) (each starting at the reflector's first entry), up to four at a time: the
// reflector's entries are loaded once for all of them and the four dot-then-update chains
// overlap.
template <typename V>
static inline void apply_reflector(const V* tail, int64_t n, const V& tau, V* const* cols, int64_t m) {
  int64_t c = 0;
  for (; c + 4 <= m; c += 4) {
    V *p0 = cols[c], *p1 = cols[c + 1], *p2 = cols[c + 2], *p3 = cols[c + 3];
    V s0 = p0[0], s1 = p1[0], s2 = p2[0], s3 = p3[0];
    for (int64_t i = 0; i < n; ++i) {
      const V h = tail[i];
      s0 += h * p0[i + 1], s1 += h * p1[i + 1], s2 += h * p2[i + 1], s3 += h * p3[i + 1];
    }
    s0 *= tau, s1 *= tau, s2 *= tau, s3 *= tau;
    p0[0] -= s0, p1[0] -= s1, p2[0] -= s2, p3[0] -= s3;
    for (int64_t i = 0; i < n; ++i) {
      const V h = tail[i];
      p0[i + 1] -= s0 * h, p1[i + 1] -= s1 * h, p2[i + 1] -= s2 * h, p3[i + 1] -= s3 * h;
    }
  }
  for (; c < m; ++c) {
    V* p = cols[c];
    const V f = tau * (p[0] + vdot(tail, p + 1, n));
    p[0] -= f;
    for (int64_t i = 0; i < n; ++i) p[i + 1] -= f * tail[i];
  }
}

// One round of phase 2 on the vectors w (count x len) and rotations v: the Gram matrix (one
// blocked product) tells whether every pair is orthogonal to tolerance `tol` (as in
// lane_sweeps): kOrthogonal. Else, where all of a sweep's rotations are small, the ones
// computed at once from the Gram matrix differ from those a sweep computes one after another
// only by products of two of them; applying them in passes over w and v (apply_recorded) is
// cheaper than a sweep's dot products and round-by-round rotations: kApplied. Declined where
// some |tan| exceeds kMaxTan (close singular values; the caller sweeps then). g receives the
// Gram matrix, norms the squared norms, cs the rotations.
enum class FirstOrder { kOrthogonal, kApplied, kDeclined };
constexpr double kMaxTan = 1e-3;
static inline FirstOrder first_order_step(VD* w, VD* v, int64_t count, int64_t len, double tol,
                                          double null, VD* g, VD* norms, VD* cs) {
  gram(w, count, len, g);
  const VD zero{}, one = splat<VD>(1), tol2 = splat<VD>(tol * tol), nullv = splat<VD>(null);
  for (int64_t j = 0; j < count; ++j) norms[j] = g[j * count + j];
  std::vector<int32_t> pairs;
  VD largest{};
  for (int64_t a = 0; a < count; ++a)
    for (int64_t b = a + 1; b < count; ++b) {
      const VD alpha = norms[a], beta = norms[b], gamma = g[a * count + b];
      const auto rotate = (gamma * gamma > tol2 * (alpha * beta)) & (alpha > nullv) & (beta > nullv);
      if (!any(rotate)) continue;
      const VD zeta = (beta - alpha) / (2.0 * (rotate ? gamma : one));
      const VD az = zeta < zero ? -zeta : zeta;
      VD t = rotate ? one / (az + vsqrt(one + zeta * zeta)) : zero;  // |zeta| < 1e150 here
      largest = t > largest ? t : largest;
      t = zeta >= zero ? t : -t;
      const VD c = one / vsqrt(one + t * t);
      cs[pairs.size()] = c;
      cs[pairs.size() + 1] = c * t;
      pairs.push_back(static_cast<int32_t>(a));
      pairs.push_back(static_cast<int32_t>(b));
    }
  if (pairs.empty()) return FirstOrder::kOrthogonal;
  if (any(largest > splat<VD>(kMaxTan))) return FirstOrder::kDeclined;
  apply_recorded(v, count, pairs.data(), cs, static_cast<int64_t>(pairs.size() / 2));
  apply_recorded(w, len, pairs.data(), cs, static_cast<int64_t>(pairs.size() / 2));
  return FirstOrder::kApplied;
}

// Per lane, the power of two that brings the largest entry of the group's input x
// (interleaved float32, x[(j*len + t)*kLanes + l] = entry t of vector j of matrix l; lanes
// past the batch hold zeros) into [0.5, 1): squares and products then stay in range in
// float32, and scaling by it is exact.
static inline void find_scales(const float* x, int64_t count, int64_t len, double* ws) {
  const GroupLayout g = group_layout(count, len);
  const VF* xf = reinterpret_cast<const VF*>(x);
  VF amax{};
  for (int64_t e = 0; e < count * len; ++e) {
    const VF a = xf[e] < VF{} ? -xf[e] : xf[e];
    amax = a > amax ? a : amax;
  }
  for (int l = 0; l < kLanes; ++l) {
    int exponent = 0;
    if (amax[l] > 0) std::frexp(amax[l], &exponent);
    ws[g.scale + l] = exponent;
  }
}

// Lanes [4h, 4h + 4) of a float32 group vector, in double.
static inline VD half_to_double(const VF& x, int h) {
  return VD{x[4 * h], x[4 * h + 1], x[4 * h + 2], x[4 * h + 3]};
}

// Householder QR in place, LAPACK's geqrf convention: the count vectors x_j (each len long,
// count <= len) become R (R[i][j] = x_j[i], i <= j) and the reflectors H_j = I - tau_j h_j h_j^T,
// h_j = (0.., 1, x_j[j+1..]), with Q = H_0 H_1 ... H_{count-1}.
template <typename V>
static inline void householder_qr(V* x, int64_t count, int64_t len, V* tau) {
  const V zero{}, one = splat<V>(1);
  std::vector<V*> cols(count);
  for (int64_t j = 0; j < count; ++j) {
    V* xj = x + j * len;
    const int64_t below = len - j - 1;
    const V alpha = xj[j];
    const V tail = vdot(xj + j + 1, xj + j + 1, below);
    // beta = -sign(alpha) ||x_j[j..]||; lanes with (next to) nothing below the diagonal
    // reflect nothing: with squares near the underflow, tau would not match h
    const auto none = tail <= splat<V>(std::is_same_v<elem_t<V>, float> ? 1e-30f : 1e-290);
    const V norm = vsqrt(alpha * alpha + tail);
    const V beta = none ? alpha : alpha >= zero ? -norm : norm;
    tau[j] = none ? zero : (beta - alpha) / beta;
    const V to_h = none ? zero : one / (alpha - (none ? zero : beta));
    for (int64_t i = j + 1; i < len; ++i) xj[i] *= to_h;
    xj[j] = beta;
    for (int64_t c = j + 1; c < count; ++c) cols[c - j - 1] = x + c * len + j;
    apply_reflector(xj + j + 1, below, tau[j], cols.data(), count - j - 1);  // to the columns right of j
  }
}

// The rows of R (from householder_qr on count vectors of len) as count vectors: r_i[c] =
// R[i][c], zero left of the diagonal. These are the columns of R^T.
template <typename V>
static inline void rows_of_r(const V* x, int64_t count, int64_t len, V* r) {
  for (int64_t i = 0; i < count; ++i)
    for (int64_t c = 0; c < count; ++c) r[i * count + c] = c >= i ? x[c * len + i] : V{};
}

// m_j <- Q m_j for the count vectors m (each count long), Q from householder_qr on count
// vectors of count: the reflectors applied last to first, four vectors at a time held in the
// L1 cache.
template <typename V>
static inline void apply_q(const V* x, const V* tau, int64_t count, V* m) {
  V* cols[4];
  for (int64_t j = 0; j < count; j += 4) {
    const int64_t k = std::min<int64_t>(4, count - j);
    for (int64_t r = count - 1; r >= 0; --r) {
      for (int64_t c = 0; c < k; ++c) cols[c] = m + (j + c) * count + r;
      apply_reflector(x + r * count + r + 1, count - r - 1, tau[r], cols, k);
    }
  }
}

// Phase 0, in float32 on the whole group: X (scaled) = Q1 R1, R1^T = Q2 R2; writes Y = R2^T
// to y32 and keeps Q2's reflectors (x2, tau2).
static inline void phase0_qr(const float* x_in, int64_t count, int64_t len, double* ws) {
  const GroupLayout g = group_layout(count, len);
  VF* x = reinterpret_cast<VF*>(ws + g.x32);
  VF* x2 = reinterpret_cast<VF*>(ws + g.x2);
  const VF* xf = reinterpret_cast<const VF*>(x_in);
  double down[kLanes];
  for (int l = 0; l < kLanes; ++l) down[l] = std::ldexp(1.0, -static_cast<int>(ws[g.scale + l]));
  // exact in double; rounding to float loses only entries below float's range, which are far
  // below the largest (phase 2 works from the exact input)
  for (int64_t e = 0; e < count * len; ++e)
    for (int l = 0; l < kLanes; ++l) x[e][l] = static_cast<float>(double(xf[e][l]) * down[l]);
  householder_qr(x, count, len, reinterpret_cast<VF*>(ws + g.tau32));
  rows_of_r(x, count, len, x2);  // the columns of R1^T
  householder_qr(x2, count, count, reinterpret_cast<VF*>(ws + g.tau2));
  rows_of_r(x2, count, count, reinterpret_cast<VF*>(ws + g.y32));
}

// Phase 1: float32 sweeps on Y from the identity, then V1 = Q2 (their rotations) in v32.
// Returns the sweeps.
static inline int phase1_float(int64_t count, int64_t len, const Schedule& sched, double tol, double last, int max_sweeps,
                               double* ws) {
  const GroupLayout g = group_layout(count, len);
  VF* v32 = reinterpret_cast<VF*>(ws + g.v32);
  std::fill(v32, v32 + count * count, VF{});
  for (int64_t j = 0; j < count; ++j) v32[j * count + j] = splat<VF>(1.0f);
  const int sweeps = lane_sweeps(reinterpret_cast<VF*>(ws + g.y32), count, count, v32,
                                 reinterpret_cast<VF*>(ws + g.norms32), sched, tol, kPhase1Null, last, max_sweeps,
                                 reinterpret_cast<VF*>(ws + g.cs));
  apply_q(reinterpret_cast<const VF*>(ws + g.x2), reinterpret_cast<const VF*>(ws + g.tau2), count, v32);
  return sweeps;
}

// Phase 2 on half h of the group (lanes 4h .. 4h+3), in double: V1 re-orthonormalized by one
// Newton-Schulz step, V = V1 (3I - V1^T V1) / 2 (its departure from orthogonality, a few
// float32 roundings, becomes its square); W = X V from the scaled input; then rounds of
// first_order_step (sweeping where it declines) until W's columns are orthogonal to tolerance
// `tol`. Returns the rounds.
static inline int phase2_double(const float* x_in, int64_t count, int64_t len, const Schedule& sched, double tol,
                                int max_sweeps, int h, double* ws) {
  const GroupLayout g = group_layout(count, len);
  const int64_t square = count * count;
  VD* x = reinterpret_cast<VD*>(ws + g.x) + h * count * len;
  VD* w = reinterpret_cast<VD*>(ws + g.w) + h * count * len;
  VD* v = reinterpret_cast<VD*>(ws + g.v) + h * square;
  VD* norms = reinterpret_cast<VD*>(ws + g.norms) + h * count;
  VD* tmp = reinterpret_cast<VD*>(ws + g.tmp);
  const VF* v32 = reinterpret_cast<const VF*>(ws + g.v32);
  const VF* xf = reinterpret_cast<const VF*>(x_in);
  VD* v1 = w;  // w is free until the vectors are rebuilt
  for (int64_t e = 0; e < square; ++e) v1[e] = half_to_double(v32[e], h);
  gram(v1, count, count, tmp);
  for (int64_t i = 0; i < count; ++i)
    for (int64_t j = 0; j < count; ++j) tmp[i * count + j] = (i == j ? splat<VD>(1.5) : VD{}) - 0.5 * tmp[i * count + j];
  combine(tmp, v1, v, count, count);
  VD down;
  for (int l = 0; l < kHalf; ++l) down[l] = std::ldexp(1.0, -static_cast<int>(ws[g.scale + kHalf * h + l]));
  for (int64_t e = 0; e < count * len; ++e) x[e] = half_to_double(xf[e], h) * down;
  combine(v, x, w, count, len);
  // each round checks all pairs from the Gram matrix, then makes the small rotations at once
  // or, where some is not small, sweeps
  VD* cs = reinterpret_cast<VD*>(ws + g.cs);
  for (int sweeps = 0; sweeps < max_sweeps; ++sweeps) {
    const FirstOrder step = first_order_step(w, v, count, len, tol, kPhase2Null, tmp, norms, cs);
    if (step == FirstOrder::kOrthogonal) return sweeps;
    if (step == FirstOrder::kDeclined) lane_sweeps(w, count, len, v, norms, sched, tol, kPhase2Null, 0.0, 1, cs);
  }
  for (int64_t j = 0; j < count; ++j) norms[j] = vdot(w + j * len, w + j * len, len);  // not converged
  return max_sweeps;
}

// All phases on one group (x as for find_scales). Returns the sweeps of phases 1 and 2.
static inline int orthogonalize_group(const float* x, int64_t count, int64_t len, const JacobiParams& p, double* ws) {
  const Schedule sched(count, schedule_block(count));
  find_scales(x, count, len, ws);
  phase0_qr(x, count, len, ws);
  const int first = phase1_float(count, len, sched, kPhase1Tol, kPhase1Last, std::min(p.max_sweeps, kPhase1MaxSweeps), ws);
  int second = 0;
  for (int h = 0; h < 2; ++h)
    second = std::max(second, phase2_double(x, count, len, sched, p.tol, std::max(p.max_sweeps - first, 1), h, ws));
  return first + second;
}

// Lane l's results out of the workspace, unscaled, in jacobi_orthogonalize's layout: vectors w
// (count x len, norms sigma_j), rotations v (count x count) with w = x v, and norms sigma_j^2.
static inline void extract_lane(const double* ws, int64_t count, int64_t len, int l, double* w, double* v, double* norms) {
  const GroupLayout g = group_layout(count, len);
  const int h = l / kHalf, q = l % kHalf;
  const double up = std::ldexp(1.0, static_cast<int>(ws[g.scale + l]));
  const double* wh = ws + g.w + h * count * len * kHalf + q;
  const double* vh = ws + g.v + h * count * count * kHalf + q;
  const double* nh = ws + g.norms + h * count * kHalf + q;
  for (int64_t e = 0; e < count * len; ++e) w[e] = wh[e * kHalf] * up;
  for (int64_t e = 0; e < count * count; ++e) v[e] = vh[e * kHalf];
  for (int64_t j = 0; j < count; ++j) norms[j] = nh[j * kHalf] * up * up;
}

}  // namespace tensorpress::svd::lanes

#pragma GCC diagnostic pop
