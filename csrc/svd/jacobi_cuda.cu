// Batched one-sided Jacobi SVD on CUDA (see jacobi_cuda.h). The pairing is the round-robin
// schedule of jacobi.h: each round's pairs are disjoint, one warp per pair (dot product by
// warp shuffles, then the rotation of both vectors), rounds separated by block barriers.
// The finishing steps (sort, rank-deficient repair, basis completion, signs) follow
// jacobi_cpu.cpp step by step.
#include "svd/jacobi_cuda.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <stdexcept>
#include <string>

#include "core/cuda_check.h"
#include "core/cuda_launch.h"

namespace tensorpress::svd {
namespace {

constexpr int kMaxWarps = 8;

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ double warp_dot(const double* a, const double* b, int len, int lane) {
  double s = 0.0;
  for (int i = lane; i < len; i += 32) s = fma(a[i], b[i], s);
  return warp_sum(s);
}

// Round-robin pair k of round r (jacobi.h's round_robin_pair, on the device).
__device__ __forceinline__ void pair_of(int count, int r, int k, int* a, int* b) {
  const int n = count + (count & 1), m = n - 1;
  int x, y;
  if (k == 0) {
    x = n - 1;
    y = r;
  } else {
    x = (r + k) % m;
    y = (r - k + m) % m;
  }
  *a = min(x, y);
  *b = max(x, y);
}

// x -= sum_l <q_l, x> q_l over the vectors q_{order[0..count)}, twice; returns ||x||.
// One warp.
__device__ double orthogonalize_against(double* w, const int* order, int count, int len, double* x, int lane) {
  for (int pass = 0; pass < 2; ++pass)
    for (int l = 0; l < count; ++l) {
      const double* q = w + order[l] * len;
      const double proj = warp_dot(q, x, len, lane);
      for (int i = lane; i < len; i += 32) x[i] -= proj * q[i];
      __syncwarp();
    }
  return sqrt(warp_dot(x, x, len, lane));
}

template <typename T>
__global__ void jacobi_kernel(const T* a, T* u, T* s, T* vh, int m, int n, double tol, int max_sweeps) {
  const bool tall = m >= n;
  const int k = min(m, n), len = max(m, n);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  TP_DYNAMIC_SHARED(unsigned char, smem_raw);
  double* w = reinterpret_cast<double*>(smem_raw);  // k vectors of len
  double* v = w + k * len;                          // k x k rotations
  double* norms = v + k * k;
  double* covered = norms + k;                         // len (basis completion)
  int* order = reinterpret_cast<int*>(covered + len);  // sorted position -> vector
  __shared__ int rotated_by[kMaxWarps];                // per warp: a rotation this sweep (one writer each)
  __shared__ int rank, trusted;

  const int64_t item = blockIdx.x;
  const T* ai = a + item * m * n;
  for (int e = threadIdx.x; e < k * len; e += blockDim.x) {
    const int j = e / len, t = e - j * len;
    w[e] = static_cast<double>(tall ? ai[t * n + j] : ai[j * n + t]);
  }
  for (int e = threadIdx.x; e < k * k; e += blockDim.x) v[e] = (e / k == e % k) ? 1.0 : 0.0;
  __syncthreads();
  for (int j = warp; j < k; j += warps) {
    const double d = warp_dot(w + j * len, w + j * len, len, lane);
    if (lane == 0) norms[j] = d;
  }
  __syncthreads();
  // NaN or Inf anywhere (or squares overflowing): every output is NaN, a defined result (the
  // sweeps and the sort below assume finite norms)
  bool finite = true;
  for (int j = 0; j < k; ++j) finite = finite && isfinite(norms[j]);
  if (!finite) {
    const double nan = __longlong_as_double(0x7ff8000000000000LL);
    for (int r = threadIdx.x; r < k; r += blockDim.x) s[item * k + r] = static_cast<T>(nan);
    for (int e = threadIdx.x; e < m * k; e += blockDim.x) u[item * m * k + e] = static_cast<T>(nan);
    for (int e = threadIdx.x; e < k * n; e += blockDim.x) vh[item * k * n + e] = static_cast<T>(nan);
    return;  // the whole block: `finite` is the same in every thread
  }

  const int half = (k + (k & 1)) / 2, rounds = k + (k & 1) - 1;
  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    __syncthreads();
    if (threadIdx.x < kMaxWarps) rotated_by[threadIdx.x] = 0;
    __syncthreads();
    for (int r = 0; r < rounds; ++r) {
      for (int p = warp; p < half; p += warps) {
        int ia, ib;
        pair_of(k, r, p, &ia, &ib);
        if (ib >= k) continue;
        const double alpha = norms[ia], beta = norms[ib];
        if (alpha == 0.0 || beta == 0.0) continue;
        double* wa = w + ia * len;
        double* wb = w + ib * len;
        const double gamma = warp_dot(wa, wb, len, lane);
        if (fabs(gamma) <= tol * sqrt(alpha) * sqrt(beta)) continue;
        // the rotation that zeroes <w_a, w_b> (Golub & Van Loan, sym.schur2), as on the CPU
        const double zeta = (beta - alpha) / (2.0 * gamma);
        const double t = (zeta >= 0 ? 1.0 : -1.0) / (fabs(zeta) + sqrt(1.0 + zeta * zeta));
        const double c = 1.0 / sqrt(1.0 + t * t), sn = c * t;
        for (int i = lane; i < len; i += 32) {
          const double x = wa[i], y = wb[i];
          wa[i] = c * x - sn * y;
          wb[i] = sn * x + c * y;
        }
        double* va = v + ia * k;
        double* vb = v + ib * k;
        for (int i = lane; i < k; i += 32) {
          const double x = va[i], y = vb[i];
          va[i] = c * x - sn * y;
          vb[i] = sn * x + c * y;
        }
        if (lane == 0) {
          norms[ia] = fmax(alpha - t * gamma, 0.0);
          norms[ib] = beta + t * gamma;
          rotated_by[warp] = 1;
        }
      }
      __syncthreads();
    }
    // refresh the norms once per sweep so the cheap updates never drift far
    for (int j = warp; j < k; j += warps) {
      const double d = warp_dot(w + j * len, w + j * len, len, lane);
      if (lane == 0) norms[j] = d;
    }
    __syncthreads();
    int rotated = 0;
    for (int i = 0; i < warps; ++i) rotated |= rotated_by[i];
    if (!rotated) break;
  }
  __syncthreads();

  // order: a stable sort by decreasing norm, by counting
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    int pos = 0;
    // a total order even if a norm became NaN mid-way, so `order` is always a permutation
    for (int i = 0; i < k; ++i) {
      const bool ni = isnan(norms[i]), nj = isnan(norms[j]);
      pos += ni != nj ? ni : (ni || norms[i] == norms[j]) ? i < j : norms[i] > norms[j];
    }
    order[pos] = j;
  }
  __syncthreads();
  const double sigma_max = k > 0 ? sqrt(norms[order[0]]) : 0.0;
  // below this the direction of w_j is noise: complete the basis instead
  const double cutoff = sigma_max * DBL_EPSILON * double(len) * 4;
  if (threadIdx.x == 0) {
    int r = 0;
    while (r < k && sqrt(norms[order[r]]) > cutoff && norms[order[r]] > 0) ++r;
    rank = r;
    int tr = r;
    for (int q = 0; q < r; ++q)
      if (sqrt(norms[order[q]]) < sigma_max * 1e-6) {
        tr = q;
        break;
      }
    trusted = tr;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < rank * len; e += blockDim.x) {
    const int r = e / len, j = order[r];
    w[j * len + (e - r * len)] /= sqrt(norms[j]);
  }
  __syncthreads();

  // Vectors with sigma far below sigma_max may be noise of a numerically rank-deficient
  // matrix: re-orthogonalize those in order (one warp); the ones that collapse are replaced
  // by a completed basis.
  if (warp == 0 && trusted < rank) {
    int rk = rank;
    for (int r = trusted; r < rk; ++r) {
      double* q = w + order[r] * len;
      const double norm = orthogonalize_against(w, order, r, len, q, lane);
      if (norm < 0.5) {
        rk = r;
        break;
      }
      for (int i = lane; i < len; i += 32) q[i] /= norm;
      __syncwarp();
    }
    if (lane == 0) rank = rk;
  }
  __syncthreads();
  if (warp == 0 && rank < k) {
    // each new vector: the standard basis vector least covered so far, orthogonalized twice
    for (int i = lane; i < len; i += 32) {
      double c = 0.0;
      for (int l = 0; l < rank; ++l) c += w[order[l] * len + i] * w[order[l] * len + i];
      covered[i] = c;
    }
    __syncwarp();
    for (int r = rank; r < k; ++r) {
      double best = DBL_MAX;
      int pick = len;
      for (int i = lane; i < len; i += 32)
        if (covered[i] < best) best = covered[i], pick = i;
      for (int o = 16; o > 0; o >>= 1) {  // argmin, lowest index on ties (as min_element)
        const double ob = __shfl_xor_sync(0xffffffffu, best, o);
        const int op = __shfl_xor_sync(0xffffffffu, pick, o);
        if (ob < best || (ob == best && op < pick)) best = ob, pick = op;
      }
      double* q = w + order[r] * len;
      for (int i = lane; i < len; i += 32) q[i] = i == pick ? 1.0 : 0.0;
      __syncwarp();
      const double norm = orthogonalize_against(w, order, r, len, q, lane);
      for (int i = lane; i < len; i += 32) {
        q[i] /= norm;
        covered[i] += q[i] * q[i];
      }
      __syncwarp();
    }
  }
  __syncthreads();

  // signs: the largest-magnitude entry of each left singular vector is positive (the first
  // such entry, as on the CPU)
  for (int r = warp; r < k; r += warps) {
    const int j = order[r];
    const double* left = tall ? w + j * len : v + j * k;
    const int cnt = tall ? len : k;
    double best = 0.0;
    int at = cnt;
    for (int i = lane; i < cnt; i += 32)
      if (fabs(left[i]) > fabs(best)) best = left[i], at = i;
    for (int o = 16; o > 0; o >>= 1) {
      const double ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oa = __shfl_xor_sync(0xffffffffu, at, o);
      if (fabs(ob) > fabs(best) || (fabs(ob) == fabs(best) && oa < at)) best = ob, at = oa;
    }
    if (best < 0) {
      for (int i = lane; i < len; i += 32) w[j * len + i] = -w[j * len + i];
      for (int i = lane; i < k; i += 32) v[j * k + i] = -v[j * k + i];
    }
  }
  __syncthreads();

  T* ui = u + item * m * k;
  T* vhi = vh + item * k * n;
  for (int r = threadIdx.x; r < k; r += blockDim.x) s[item * k + r] = static_cast<T>(sqrt(norms[order[r]]));
  // U (m x k): U[t, r]; Vh (k x n): Vh[r, t]
  for (int e = threadIdx.x; e < m * k; e += blockDim.x) {
    const int t = e / k, r = e - t * k, j = order[r];
    ui[e] = static_cast<T>(tall ? w[j * len + t] : v[j * k + t]);
  }
  for (int e = threadIdx.x; e < k * n; e += blockDim.x) {
    const int r = e / n, t = e - r * n, j = order[r];
    vhi[e] = static_cast<T>(tall ? v[j * k + t] : w[j * len + t]);
  }
}

}  // namespace

void jacobi_svd_cuda(bool is_double, const void* a, void* u, void* s, void* vh, int64_t batch, int64_t m, int64_t n,
                     double tol, int max_sweeps, int device, void* stream) {
  if (batch == 0 || m == 0 || n == 0) return;
  CudaDeviceGuard guard(device);
  const int64_t k = std::min(m, n);
  const int64_t smem = jacobi_cuda_smem_bytes(m, n);
  const int warps = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxWarps, (k + 1) / 2)));
  if (batch > INT32_MAX) throw std::invalid_argument("A: at most 2^31 - 1 matrices per call");
  auto st = static_cast<cudaStream_t>(stream);
  const auto launch = [&](auto kernel, auto* ap, auto* up, auto* sp, auto* vp) {
    if (smem > 48 * 1024)
      TP_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    TP_LAUNCH(static_cast<unsigned>(batch), 32 * warps, smem, st, kernel)(ap, up, sp, vp, static_cast<int>(m),
                                                                          static_cast<int>(n), tol, max_sweeps);
    TP_CUDA_CHECK_LAUNCH("jacobi_kernel", st);
  };
  if (is_double)
    launch(jacobi_kernel<double>, static_cast<const double*>(a), static_cast<double*>(u), static_cast<double*>(s),
           static_cast<double*>(vh));
  else
    launch(jacobi_kernel<float>, static_cast<const float*>(a), static_cast<float*>(u), static_cast<float*>(s),
           static_cast<float*>(vh));
}

}  // namespace tensorpress::svd
