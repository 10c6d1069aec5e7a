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
//
// Both phases order a sweep's pairs in quads of four vectors (QuadSchedule): a quad's four
// rotations are applied to the accumulated rotations (and, in phase 2, to the vectors) in one
// pass, as "fast Givens" updates of two multiply-adds each (apply_fused), which halves the
// stores and the arithmetic of applying them pair by pair.
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
// exceeded kPhase1Last (see quad_sweeps); phase 2 takes over from there. That sweep leaves the
// pairs near kPhase1Last^2 ~ 1e-3 or below, small enough for phase 2's first-order steps
// (kMaxTan); 1e-2 takes one more float32 sweep on about half of the 64 x 64 groups with a
// decaying spectrum and saves no phase-2 round, 5e-2 starts to cost phase-2 rounds.
constexpr double kPhase1Tol = 1e-6, kPhase1Last = 3e-2;
constexpr int kPhase1MaxSweeps = 20;
// Vectors with squared norms below these (the input scaled so its largest entry is ~1) count as zero
// and are not rotated: in float32, noise far below the rounding of the largest entry; in
// double, far below anything a float32 matrix can hold. Keeps squares and products in range.
constexpr double kPhase1Null = 1e-12, kPhase2Null = 1e-150;

// Workspace layout of one group, in doubles (every piece starts on a 64-byte boundary). The
// double pieces (4 lanes) hold the group's two halves one after the other.
struct GroupLayout {
  int64_t x32, tau32, x2, tau2, y32, v32, norms32, x, w, v, norms, tmp, cs, d, scale, total;
};
// Slots per sweep of a QuadSchedule on count vectors (for the workspace layout).
static inline int64_t quad_slots(int64_t count) {
  const int64_t atoms = (count + 1) / 2;
  return count / 2 + 2 * atoms * (atoms - 1);
}
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
  g.x2 = take(square * kHalf);  // R1^T, then its QR's reflectors and R2
  g.tau2 = take(count * kHalf);
  g.y32 = take(square * kHalf);  // Y = R2^T, rotated by phase 1
  g.v32 = take(square * kHalf);  // phase 1 rotations, then V1
  g.norms32 = take(count * kHalf);
  // double (4 lanes, two halves)
  g.x = take(count * len * kLanes);  // the scaled input
  g.w = take(count * len * kLanes);  // W = X V
  g.v = take(square * kLanes);       // V
  g.norms = take(count * kLanes);    // ||w_j||^2
  g.tmp = take(square * kHalf);      // Newton-Schulz coefficients, Gram matrices (one half at a time)
  // one sweep's cosines and sines (float32 or double: 4 doubles per lane vector)
  g.cs = take(2 * quad_slots(count) * kHalf);
  g.d = take(3 * count *
             kHalf);       // fast Givens scales, their inverses, one round's products (float32 or half-group double)
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
        _mm256_storeu_ps(reinterpret_cast<float*>(out),
                         _mm256_sqrt_ps(_mm256_loadu_ps(reinterpret_cast<const float*>(in))));
      else
        _mm256_storeu_pd(reinterpret_cast<double*>(out),
                         _mm256_sqrt_pd(_mm256_loadu_pd(reinterpret_cast<const double*>(in))));
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

// The order of the pairs in a sweep as pairs of "atoms", for fused application of the
// rotations: atom k holds vectors 2k and 2k+1 (the last one alone when count is odd). A sweep
// pairs every atom's own two vectors (one round), then runs Schedule's rounds on the atoms:
// atoms {a0, a1} and {b0, b1} take two rounds of vector pairs, (a0,b0) (a1,b1) then (a0,b1)
// (a1,b0), so their four rotations touch only four vectors and apply_fused passes over them
// once instead of four times. Every pair once per sweep, in this order: slot k < own_pairs is
// atom k's own pair; slot own_pairs + 4q + i the i-th rotation of quad q (quads[4q..]: a0, a1,
// b0, b1, a1 or b1 -1 where an atom is alone). The quads of atom round r are
// [atoms.begin[r], atoms.begin[r+1]).
struct QuadSchedule {
  int64_t own_pairs, slots;
  Schedule atoms;
  std::vector<int32_t> quads;
  QuadSchedule(int64_t count, int64_t block)
      : own_pairs(count / 2), atoms((count + 1) / 2, std::max<int64_t>(1, block / 2)) {
    auto member = [&](int64_t atom, int64_t i) {
      return 2 * atom + i < count ? static_cast<int32_t>(2 * atom + i) : -1;
    };
    for (size_t p = 0; p < atoms.pairs.size(); ++p)
      for (int i = 0; i < 2; ++i) quads.push_back(member(atoms.pairs[p], i));
    slots = own_pairs + 2 * static_cast<int64_t>(atoms.pairs.size());
  }
  int64_t quad_count() const { return static_cast<int64_t>(quads.size() / 4); }
  // the vector pair of slot i of quad q (first > second never matters: a rotation of (a, b) by
  // t is the one of (b, a) by -t, and the slot records which is which)
  std::pair<int32_t, int32_t> quad_pair(int64_t q, int i) const {
    const int32_t* m = quads.data() + 4 * q;  // a0, a1, b0, b1
    static constexpr int first[4] = {0, 1, 0, 1}, second[4] = {2, 3, 3, 2};
    return {m[first[i]], m[second[i]]};
  }
};

// The rotation of a pair (w_a, w_b) with squared norms alpha, beta and product gamma that
// zeroes the product, as in jacobi.h (Golub & Van Loan, sym.schur2), for every lane at once
// and branch-free (so the divide / square-root chains of a round's pairs overlap): tangent t
// and cosine c, for vrotate(w_a, w_b, c, c * t). A lane rotates where gamma^2 > tol^2 alpha
// beta with both norms above `null` (smaller vectors are treated as zero: noise far below the
// largest entry, which the callers scale to ~1), else it gets t = 0, c = 1. Updates the norms
// (the rotation moves t * gamma of squared norm from w_a to w_b), sets `large` in lanes where
// the |cos| of the pair's angle exceeded `last` (tol2, last2: the squares), and returns
// whether any lane rotates.
template <typename V, typename M>
static inline bool pair_rotation(V& alpha, V& beta, const V& gamma, const V& tol2, const V& nullv, const V& last2,
                                 M& large, V* t_out, V* c_out) {
  using E = elem_t<V>;
  const V zero{}, one = splat<V>(1);
  const V zeta_big = splat<V>(E(std::is_same_v<E, float> ? 1e18 : 1e150));
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
  const V moved = t * gamma;
  const V na = alpha - moved;
  alpha = na > zero ? na : zero;
  beta = beta + moved;
  *t_out = t;
  *c_out = one / vsqrt(one + t * t);
  return any(rotate);
}

// The rotation of (a, b) by fast Givens multipliers (see fast_givens): a += -ma b, b += mb a.
template <typename V>
static inline void fast_rotate(V* a, V* b, int64_t n, const V& ma, const V& mb) {
  for (int64_t i = 0; i < n; ++i) {
    const V x = a[i], y = b[i];
    a[i] = x - ma * y;
    b[i] = y + mb * x;
  }
}

// A quad's four rotations by fast Givens multipliers m[0..8) (see fast_givens) in one pass:
// (a0, b0), (a1, b1), then (a0, b1), (a1, b0).
template <typename V>
static inline void apply_quad(V* a0, V* a1, V* b0, V* b1, int64_t n, const V* m) {
  const V m0 = m[0], m1 = m[1], m2 = m[2], m3 = m[3], m4 = m[4], m5 = m[5], m6 = m[6], m7 = m[7];
  for (int64_t i = 0; i < n; ++i) {
    const V p = a0[i], r = a1[i], q0 = b0[i], u = b1[i];
    const V p1 = p - m0 * q0, q1 = q0 + m1 * p;  // (a0, b0)
    const V r1 = r - m2 * u, u1 = u + m3 * r;    // (a1, b1)
    a0[i] = p1 - m4 * u1, b1[i] = u1 + m5 * p1;  // (a0, b1)
    a1[i] = r1 - m6 * q1, b0[i] = q1 + m7 * r1;  // (a1, b0)
  }
}

// The products <a0', b1'> and <a1', b0'> of a quad's vectors after its first two rotations,
// (a0, b0) by fast Givens multipliers m[0], m[1] and (a1, b1) by m[2], m[3], without storing
// them: apply_quad stores all four rotations at once, once the other two are known.
template <typename V>
static inline void dot_across_rotated(const V* a0, const V* a1, const V* b0, const V* b1, int64_t n, const V* m,
                                      V* dot01, V* dot10) {
  const V m0 = m[0], m1 = m[1], m2 = m[2], m3 = m[3];
  V x0{}, x1{}, y0{}, y1{};
  int64_t i = 0;
  auto step = [&](int64_t k, V& x, V& y) {
    const V p = a0[k], q = b0[k], r = a1[k], u = b1[k];
    const V p2 = p - m0 * q, q2 = q + m1 * p, r2 = r - m2 * u, u2 = u + m3 * r;
    x += p2 * u2;
    y += r2 * q2;
  };
  for (; i + 2 <= n; i += 2) step(i, x0, y0), step(i + 1, x1, y1);
  for (; i < n; ++i) step(i, x0, y0);
  *dot01 = x0 + x1;
  *dot10 = y0 + y1;
}

// The rotations of one sweep (slot i: tangent cs[2i], cosine cs[2i+1], as left by quad_sweeps
// or first_order_step) as "fast Givens" multipliers (Gentleman 1973), in place: vectors are
// held scaled, true w_j = d_j * stored w_j, so that a rotation of (a, b) updates the stored
// vectors by two multiply-adds per entry, a += -t (d_b / d_a) b, b += t (d_a / d_b) a (the
// old a), and multiplies d_a and d_b by the cosine. d starts at 1 and ends as each vector's
// scale, by which the caller multiplies the vectors once the rotations are applied (apply_fused
// does); quad_sweeps bounds how small d gets.
template <typename V>
static inline void fast_givens(const QuadSchedule& qs, V* cs, V* d, V* inv_d, int64_t count) {
  const V one = splat<V>(1);
  for (int64_t j = 0; j < count; ++j) d[j] = one, inv_d[j] = one;
  auto convert = [&](int64_t slot, int32_t a, int32_t b) {
    if (a < 0 || b < 0) return;
    const V t = cs[2 * slot], c = cs[2 * slot + 1];
    cs[2 * slot] = t * d[b] * inv_d[a];
    cs[2 * slot + 1] = t * d[a] * inv_d[b];
    const V inv_c = (one + t * t) * c;  // 1/c = sqrt(1 + t^2)
    d[a] *= c, d[b] *= c, inv_d[a] *= inv_c, inv_d[b] *= inv_c;
  };
  for (int64_t k = 0; k < qs.own_pairs; ++k) convert(k, 2 * k, 2 * k + 1);
  for (int64_t q = 0; q < qs.quad_count(); ++q)
    for (int i = 0; i < 4; ++i) {
      const auto [a, b] = qs.quad_pair(q, i);
      convert(qs.own_pairs + 4 * q + i, a, b);
    }
}

// Applies fast_givens' multipliers m to the count vectors v (each len long), then scales each
// vector by its d. A quad's four rotations take one pass over its four vectors: four loads,
// four stores and eight multiply-adds per entry, where rotating pair by pair takes sixteen
// operations and eight stores. Entries are independent of each other, so this runs block by
// block of entries, each block of all vectors staying in the cache while every rotation passes
// over it (blocks of 32: fewer and the per-rotation setup shows, more and they leave the L2
// cache; measured on 64 x 64). Applies the atoms' own pairs (unless own_active is null) and
// quads [q_begin, q_end); pairs and quads whose active flag is 0 (no lane rotates) are skipped.
template <typename V>
static inline void apply_fused(V* v, int64_t len, const QuadSchedule& qs, const V* m, const uint8_t* own_active,
                               const uint8_t* quad_active, int64_t q_begin, int64_t q_end, const V* d, int64_t count) {
  constexpr int64_t kBlock = 32;
  auto pair = [](V* a, V* b, int64_t n, const V& ma, const V& mb) {
    for (int64_t i = 0; i < n; ++i) {
      const V x = a[i], y = b[i];
      a[i] = x - ma * y;
      b[i] = y + mb * x;
    }
  };
  for (int64_t t0 = 0; t0 < len; t0 += kBlock) {
    const int64_t n = std::min(kBlock, len - t0);
    for (int64_t k = 0; own_active && k < qs.own_pairs; ++k)
      if (own_active[k]) pair(v + 2 * k * len + t0, v + (2 * k + 1) * len + t0, n, m[2 * k], m[2 * k + 1]);
    for (int64_t q = q_begin; q < q_end; ++q) {
      if (!quad_active[q]) continue;
      const int32_t* ids = qs.quads.data() + 4 * q;
      const V* mq = m + 2 * (qs.own_pairs + 4 * q);
      if (ids[1] < 0 || ids[3] < 0) {  // an atom alone: its rotations one by one
        for (int i = 0; i < 4; ++i) {
          const auto [a, b] = qs.quad_pair(q, i);
          if (a >= 0 && b >= 0) pair(v + a * len + t0, v + b * len + t0, n, mq[2 * i], mq[2 * i + 1]);
        }
        continue;
      }
      apply_quad(v + ids[0] * len + t0, v + ids[1] * len + t0, v + ids[2] * len + t0, v + ids[3] * len + t0, n, mq);
    }
  }
  for (int64_t j = 0; j < count; ++j)
    for (int64_t i = 0; i < len; ++i) v[j * len + i] *= d[j];
}

// Sweeps over the interleaved vectors w (count x len) and rotations v (count x count) until
// no lane rotates (or max_sweeps), in QuadSchedule's order, with pair_rotation's rotations;
// norms holds ||w_j||^2 per lane. Within a sweep w and v are held scaled as in fast_givens
// (true w_j = d_j * stored w_j; products of stored vectors are scaled back), so each rotation
// costs two multiply-adds per entry. Per atom round: one pass for the products of its quads'
// first-round pairs, their rotations, one pass for the products of the second-round pairs
// after the first-round rotations (dot_across_rotated, which stores nothing), their
// rotations, and one pass applying all four (apply_quad): four stores per entry and quad,
// where applying round by round takes eight. The sweep's rotations are recorded (cs: the
// multipliers per slot) and applied to v at its end (apply_fused), and w is scaled back. With `last` > 0 the sweeps
// also stop after one where no |cos| exceeded `last`: convergence is quadratic by then, so that sweep leaves the pairs
// near last^2 or below, and a sweep only to confirm it is saved (phase 1, which phase 2 checks anyway). cs: 2 *
// qs.slots vectors; d, inv_d, g: count each. Returns the sweeps run.
template <typename V>
static inline int quad_sweeps(V* w, int64_t count, int64_t len, V* v, V* norms, const QuadSchedule& qs, double tol,
                              double null, double last, int max_sweeps, V* cs, V* d, V* inv_d, V* g) {
  using E = elem_t<V>;
  const V zero{}, one = splat<V>(1);
  const V tol2 = splat<V>(E(tol * tol)), nullv = splat<V>(E(null)), last2 = splat<V>(E(last * last));
  for (int64_t j = 0; j < count; ++j) norms[j] = vdot(w + j * len, w + j * len, len);
  std::vector<uint8_t> own_active(qs.own_pairs), quad_active(qs.quad_count());
  std::vector<int32_t> taken((count + 1) / 2);  // quads per atom since the last flush
  constexpr int32_t kQuadsPerScale = 32;
  int sweep = 0;
  while (sweep < max_sweeps) {
    bool rotated = false;
    decltype(zero < zero) large{};
    for (int64_t j = 0; j < count; ++j) d[j] = one, inv_d[j] = one;
    // slot's rotation from the product of the stored vectors of its pair (a, b), as
    // multipliers: a, b < 0 (an atom alone) or no lane rotating leave the identity
    auto rotation = [&](int64_t slot, int32_t a, int32_t b, const V& stored_product) {
      cs[2 * slot] = zero, cs[2 * slot + 1] = zero;
      if (a < 0 || b < 0) return false;
      V t, c;
      if (!pair_rotation(norms[a], norms[b], stored_product * d[a] * d[b], tol2, nullv, last2, large, &t, &c))
        return false;
      rotated = true;
      cs[2 * slot] = t * d[b] * inv_d[a];
      cs[2 * slot + 1] = t * d[a] * inv_d[b];
      const V inv_c = (one + t * t) * c;  // 1/c = sqrt(1 + t^2)
      d[a] *= c, d[b] *= c, inv_d[a] *= inv_c, inv_d[b] *= inv_c;
      return true;
    };
    auto apply = [&](int64_t slot, int32_t a, int32_t b) {
      fast_rotate(w + a * len, w + b * len, len, cs[2 * slot], cs[2 * slot + 1]);
    };
    // the rotations so far to v, and both back to true scale: after at most kQuadsPerScale quads
    // per atom (each cosine >= 1/sqrt(2), so d >= 2^-(kQuadsPerScale + 1/2)), which keeps the
    // stored vectors and their products in float32's range however many vectors there are
    // (up to 64 vectors, 31 quads per atom and sweep: once, at the end of the sweep)
    int64_t pending = 0;  // first quad v has not received
    bool own_pending = true;
    std::fill(taken.begin(), taken.end(), 0);
    auto flush = [&](int64_t q_end) {
      apply_fused(v, count, qs, cs, own_pending ? own_active.data() : nullptr, quad_active.data(), pending, q_end, d,
                  count);
      for (int64_t j = 0; j < count; ++j) {
        for (int64_t i = 0; i < len; ++i) w[j * len + i] *= d[j];
        d[j] = one, inv_d[j] = one;
      }
      std::fill(taken.begin(), taken.end(), 0);
      pending = q_end, own_pending = false;
    };
    for (int64_t k = 0; k < qs.own_pairs; ++k) g[k] = vdot(w + 2 * k * len, w + (2 * k + 1) * len, len);
    for (int64_t k = 0; k < qs.own_pairs; ++k) {
      own_active[k] = rotation(k, 2 * k, 2 * k + 1, g[k]);
      if (own_active[k]) apply(k, 2 * k, 2 * k + 1);
    }
    for (int64_t r = 0; r < qs.atoms.rounds_count(); ++r) {
      const int64_t first = qs.atoms.begin[r], end = qs.atoms.begin[r + 1];
      for (int64_t q = first; q < end; ++q)
        for (int i = 0; i < 2; ++i) {
          const auto [a, b] = qs.quad_pair(q, i);
          g[2 * (q - first) + i] = a >= 0 && b >= 0 ? vdot(w + a * len, w + b * len, len) : zero;
        }
      for (int64_t q = first; q < end; ++q) {
        uint8_t act = 0;
        for (int i = 0; i < 2; ++i) {
          const auto [a, b] = qs.quad_pair(q, i);
          act |= rotation(qs.own_pairs + 4 * q + i, a, b, g[2 * (q - first) + i]) << i;
        }
        quad_active[q] = act;
      }
      for (int64_t q = first; q < end; ++q) {
        const int32_t* ids = qs.quads.data() + 4 * q;  // a0, a1, b0, b1
        const V* m = cs + 2 * (qs.own_pairs + 4 * q);
        V* dots = g + 2 * (q - first);
        if (ids[1] >= 0 && ids[3] >= 0) {
          if (quad_active[q])
            dot_across_rotated(w + ids[0] * len, w + ids[1] * len, w + ids[2] * len, w + ids[3] * len, len, m, &dots[0],
                               &dots[1]);
          else
            dots[0] = vdot(w + ids[0] * len, w + ids[3] * len, len),
            dots[1] = vdot(w + ids[1] * len, w + ids[2] * len, len);
          continue;
        }
        for (int i = 0; i < 2; ++i) {  // an atom alone
          const auto [a, b] = qs.quad_pair(q, i);
          if (quad_active[q] >> i & 1) apply(qs.own_pairs + 4 * q + i, a, b);
        }
        for (int i = 2; i < 4; ++i) {
          const auto [a, b] = qs.quad_pair(q, i);
          dots[i - 2] = a >= 0 && b >= 0 ? vdot(w + a * len, w + b * len, len) : zero;
        }
      }
      for (int64_t q = first; q < end; ++q)
        for (int i = 2; i < 4; ++i) {
          const auto [a, b] = qs.quad_pair(q, i);
          if (rotation(qs.own_pairs + 4 * q + i, a, b, g[2 * (q - first) + i - 2])) quad_active[q] |= 1 << i;
        }
      for (int64_t q = first; q < end; ++q) {
        const int32_t* ids = qs.quads.data() + 4 * q;
        if (ids[1] >= 0 && ids[3] >= 0) {
          if (quad_active[q])
            apply_quad(w + ids[0] * len, w + ids[1] * len, w + ids[2] * len, w + ids[3] * len, len,
                       cs + 2 * (qs.own_pairs + 4 * q));
          continue;
        }
        for (int i = 2; i < 4; ++i)
          if (quad_active[q] >> i & 1) {
            const auto [a, b] = qs.quad_pair(q, i);
            apply(qs.own_pairs + 4 * q + i, a, b);
          }
      }
      bool full = false;
      for (int64_t q = first; q < end; ++q)
        for (int k = 0; k < 4; k += 2) full |= ++taken[qs.quads[4 * q + k] / 2] >= kQuadsPerScale;
      if (full && end < qs.quad_count()) flush(end);
    }
    flush(qs.quad_count());
    // refresh the norms once per sweep so the cheap updates never drift far
    for (int64_t j = 0; j < count; ++j) norms[j] = vdot(w + j * len, w + j * len, len);
    ++sweep;
    if (!rotated || (last > 0 && !any(large))) break;
  }
  return sweep;
}

// The products of the phase changes, as small matrix products over interleaved vectors (one
// register per entry, lane by lane), register-blocked: a tile of 8-12 sums stays in registers,
// and the panel of `in` a tile reads stays in the L1 cache.

// out_j = sum_i coef[j][i] * in_i: coef is count x count, in and out have count vectors of len.
template <typename V>
static inline void combine(const V* coef, const V* in, V* out, int64_t count, int64_t len) {
  constexpr int64_t kJ = 3, kT = 4;
  for (int64_t t = 0; t < len; t += kT) {
    const int64_t nt = std::min(kT, len - t);
    int64_t j = 0;
    for (; j + kJ <= count && nt == kT; j += kJ) {
      const V* c0 = coef + j * count;
      const V* c1 = c0 + count;
      const V* c2 = c1 + count;
      V s00{}, s01{}, s02{}, s03{}, s10{}, s11{}, s12{}, s13{}, s20{}, s21{}, s22{}, s23{};
      for (int64_t i = 0; i < count; ++i) {
        const V* x = in + i * len + t;
        const V x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3];
        V c = c0[i];
        s00 += c * x0, s01 += c * x1, s02 += c * x2, s03 += c * x3;
        c = c1[i];
        s10 += c * x0, s11 += c * x1, s12 += c * x2, s13 += c * x3;
        c = c2[i];
        s20 += c * x0, s21 += c * x1, s22 += c * x2, s23 += c * x3;
      }
      V* o = out + j * len + t;
      o[0] = s00, o[1] = s01, o[2] = s02, o[3] = s03;
      o += len;
      o[0] = s10, o[1] = s11, o[2] = s12, o[3] = s13;
      o += len;
      o[0] = s20, o[1] = s21, o[2] = s22, o[3] = s23;
    }
    for (; j < count; ++j)  // edges
      for (int64_t u = t; u < t + nt; ++u) {
        V sum{};
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
          for (int64_t k = b; k < b + nb; ++k)
            g[i * count + k] = g[k * count + i] = vdot(in + i * len, in + k * len, len);
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
// pair_rotation): kOrthogonal. Else, where all of a sweep's rotations are small, the ones
// computed at once from the Gram matrix differ from those a sweep computes one after another
// only by products of two of them; applying them in QuadSchedule's order to w and v
// (apply_fused) is cheaper than a sweep's dot products and round-by-round rotations:
// kApplied. Declined where some |tan| exceeds kMaxTan (close singular values; the caller
// sweeps then). g receives the Gram matrix, norms the squared norms, cs the rotations; d and
// inv_d: count each.
enum class FirstOrder { kOrthogonal, kApplied, kDeclined };
constexpr double kMaxTan = 1e-3;
static inline FirstOrder first_order_step(VD* w, VD* v, int64_t count, int64_t len, const QuadSchedule& qs, double tol,
                                          double null, VD* g, VD* norms, VD* cs, VD* d, VD* inv_d) {
  {
    gram(w, count, len, g);
  }
  const VD zero{}, one = splat<VD>(1), tol2 = splat<VD>(tol * tol), nullv = splat<VD>(null);
  for (int64_t j = 0; j < count; ++j) norms[j] = g[j * count + j];
  std::vector<uint8_t> own_active(qs.own_pairs), quad_active(qs.quad_count());
  VD largest{};
  bool rotated = false;
  decltype(zero < zero) large{};
  // slot's rotation from the Gram matrix (the norms stay those of the Gram matrix)
  auto rotation = [&](int64_t slot, int32_t a, int32_t b) {
    cs[2 * slot] = zero, cs[2 * slot + 1] = one;
    if (a < 0 || b < 0) return false;
    VD alpha = norms[a], beta = norms[b];
    if (!pair_rotation(alpha, beta, g[a * count + b], tol2, nullv, zero, large, &cs[2 * slot], &cs[2 * slot + 1]))
      return false;
    const VD t = cs[2 * slot] < zero ? -cs[2 * slot] : cs[2 * slot];
    largest = t > largest ? t : largest;
    rotated = true;
    return true;
  };
  for (int64_t k = 0; k < qs.own_pairs; ++k) own_active[k] = rotation(k, 2 * k, 2 * k + 1);
  for (int64_t q = 0; q < qs.quad_count(); ++q) {
    uint8_t act = 0;
    for (int i = 0; i < 4; ++i) {
      const auto [a, b] = qs.quad_pair(q, i);
      act |= rotation(qs.own_pairs + 4 * q + i, a, b);
    }
    quad_active[q] = act;
  }
  if (!rotated) return FirstOrder::kOrthogonal;
  if (any(largest > splat<VD>(kMaxTan))) return FirstOrder::kDeclined;

  fast_givens(qs, cs, d, inv_d, count);
  apply_fused(v, count, qs, cs, own_active.data(), quad_active.data(), 0, qs.quad_count(), d, count);
  apply_fused(w, len, qs, cs, own_active.data(), quad_active.data(), 0, qs.quad_count(), d, count);
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
static inline VD half_to_double(const VF& x, int h) { return VD{x[4 * h], x[4 * h + 1], x[4 * h + 2], x[4 * h + 3]}; }

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
  {
    householder_qr(x, count, len, reinterpret_cast<VF*>(ws + g.tau32));
  }
  rows_of_r(x, count, len, x2);  // the columns of R1^T
  {
    householder_qr(x2, count, count, reinterpret_cast<VF*>(ws + g.tau2));
  }
  rows_of_r(x2, count, count, reinterpret_cast<VF*>(ws + g.y32));
}

// Phase 1: float32 sweeps on Y from the identity, then V1 = Q2 (their rotations) in v32.
// Returns the sweeps.
static inline int phase1_float(int64_t count, int64_t len, const QuadSchedule& sched, double tol, double last,
                               int max_sweeps, double* ws) {
  const GroupLayout g = group_layout(count, len);
  VF* v32 = reinterpret_cast<VF*>(ws + g.v32);
  std::fill(v32, v32 + count * count, VF{});
  for (int64_t j = 0; j < count; ++j) v32[j * count + j] = splat<VF>(1.0f);
  VF* d = reinterpret_cast<VF*>(ws + g.d);
  const int sweeps =
      quad_sweeps(reinterpret_cast<VF*>(ws + g.y32), count, count, v32, reinterpret_cast<VF*>(ws + g.norms32), sched,
                  tol, kPhase1Null, last, max_sweeps, reinterpret_cast<VF*>(ws + g.cs), d, d + count, d + 2 * count);
  apply_q(reinterpret_cast<const VF*>(ws + g.x2), reinterpret_cast<const VF*>(ws + g.tau2), count, v32);
  return sweeps;
}

// The start of phase 2, on the whole group: the Newton-Schulz step that re-orthonormalizes V1,
// V = V1 (3I - V1^T V1) / 2 = V1 - C / 2 with C = V1 E, E = V1^T V1 - I (its departure from
// orthogonality, a few float32 roundings, becomes its square). E comes from Gram matrices in
// double, half the group at a time (its entries are differences of sums near 1); C is a
// float32 product on all lanes at once: E is ~1e-6, so its rounding is ~1e-12, far below what
// the double phase needs, at half the cost of two double products. E goes to x2, C to y32
// (both free after phase 1).
static inline void newton_schulz_correction(int64_t count, int64_t len, double* ws) {
  const GroupLayout g = group_layout(count, len);
  const int64_t square = count * count;
  const VF* v32 = reinterpret_cast<const VF*>(ws + g.v32);
  VF* e32 = reinterpret_cast<VF*>(ws + g.x2);
  VD* v1 = reinterpret_cast<VD*>(ws + g.w);  // free until phase 2 rebuilds the vectors
  VD* gram_v1 = reinterpret_cast<VD*>(ws + g.tmp);
  for (int h = 0; h < 2; ++h) {
    for (int64_t e = 0; e < square; ++e) v1[e] = half_to_double(v32[e], h);
    gram(v1, count, count, gram_v1);
    for (int64_t i = 0; i < count; ++i)
      for (int64_t j = 0; j < count; ++j) {
        const VD e = gram_v1[i * count + j] - (i == j ? 1.0 : 0.0);
        for (int l = 0; l < kHalf; ++l) e32[i * count + j][kHalf * h + l] = static_cast<float>(e[l]);
      }
  }
  combine(e32, v32, reinterpret_cast<VF*>(ws + g.y32), count, count);
}

// Phase 2 on half h of the group (lanes 4h .. 4h+3), in double, after
// newton_schulz_correction: V = V1 - C / 2; W = X V from the scaled input; then rounds of
// first_order_step (sweeping where it declines) until W's columns are orthogonal to tolerance
// `tol`. Returns the rounds.
static inline int phase2_double(const float* x_in, int64_t count, int64_t len, const QuadSchedule& sched, double tol,
                                int max_sweeps, int h, double* ws) {
  const GroupLayout g = group_layout(count, len);
  const int64_t square = count * count;
  VD* x = reinterpret_cast<VD*>(ws + g.x) + h * count * len;
  VD* w = reinterpret_cast<VD*>(ws + g.w) + h * count * len;
  VD* v = reinterpret_cast<VD*>(ws + g.v) + h * square;
  VD* norms = reinterpret_cast<VD*>(ws + g.norms) + h * count;
  VD* tmp = reinterpret_cast<VD*>(ws + g.tmp);
  const VF* v32 = reinterpret_cast<const VF*>(ws + g.v32);
  const VF* c32 = reinterpret_cast<const VF*>(ws + g.y32);
  const VF* xf = reinterpret_cast<const VF*>(x_in);
  for (int64_t e = 0; e < square; ++e) v[e] = half_to_double(v32[e], h) - 0.5 * half_to_double(c32[e], h);
  VD down;
  for (int l = 0; l < kHalf; ++l) down[l] = std::ldexp(1.0, -static_cast<int>(ws[g.scale + kHalf * h + l]));
  for (int64_t e = 0; e < count * len; ++e) x[e] = half_to_double(xf[e], h) * down;
  {
    combine(v, x, w, count, len);
  }
  // each round checks all pairs from the Gram matrix, then makes the small rotations at once
  // or, where some is not small, sweeps
  VD* cs = reinterpret_cast<VD*>(ws + g.cs);
  for (int sweeps = 0; sweeps < max_sweeps; ++sweeps) {
    VD* d = reinterpret_cast<VD*>(ws + g.d);
    const FirstOrder step = first_order_step(w, v, count, len, sched, tol, kPhase2Null, tmp, norms, cs, d, d + count);
    if (step == FirstOrder::kOrthogonal) return sweeps;
    if (step == FirstOrder::kDeclined)
      quad_sweeps(w, count, len, v, norms, sched, tol, kPhase2Null, 0.0, 1, cs, d, d + count, d + 2 * count);
  }
  for (int64_t j = 0; j < count; ++j) norms[j] = vdot(w + j * len, w + j * len, len);  // not converged
  return max_sweeps;
}

// All phases on one group (x as for find_scales). Returns the sweeps of phases 1 and 2.
static inline int orthogonalize_group(const float* x, int64_t count, int64_t len, const JacobiParams& p, double* ws) {
  const QuadSchedule sched(count, schedule_block(count));
  find_scales(x, count, len, ws);
  phase0_qr(x, count, len, ws);
  const int first =
      phase1_float(count, len, sched, kPhase1Tol, kPhase1Last, std::min(p.max_sweeps, kPhase1MaxSweeps), ws);
  int second = 0;
  {
    newton_schulz_correction(count, len, ws);
  }
  for (int h = 0; h < 2; ++h)
    second = std::max(second, phase2_double(x, count, len, sched, p.tol, std::max(p.max_sweeps - first, 1), h, ws));
  return first + second;
}

// Lane l's results out of the workspace, unscaled, in jacobi_orthogonalize's layout: vectors w
// (count x len, norms sigma_j), rotations v (count x count) with w = x v, and norms sigma_j^2.
static inline void extract_lane(const double* ws, int64_t count, int64_t len, int l, double* w, double* v,
                                double* norms) {
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
