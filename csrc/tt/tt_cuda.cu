// TT-matrix contraction on CUDA: forward and backward, fused (one launch, everything in
// shared memory) or tiled (one gathered GEMM launch per step, intermediates in a global
// workspace). The geometry (steps, gather tables, schedule) comes from tt_plan.h and
// tt_cuda_schedule.h, shared with the CPU build.
//
// Every GEMM here has the form C(p, q) = sum_l A(p, l) B(l, q) where each operand element sits
// at base[map1(index1) + map2(index2)] (a `Map`): the permutations between steps are never
// materialized, the kernels gather through the plan's row/column offset tables.
#include "tt/tt_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <climits>
#include <string>
#include <type_traits>

#include "core/cuda_check.h"
#include "core/cuda_launch.h"

namespace tensorpress::tt {
namespace {

// ----------------------------------------------------------------------------- conversions
template <typename To, typename From>
__device__ __forceinline__ To cvt(From v) {
  return static_cast<To>(v);
}
template <>
__device__ __forceinline__ float cvt<float, __half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float cvt<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ __half cvt<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 cvt<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// ----------------------------------------------------------------------------- index maps
// off(i) = (i / inner) * outer + tab[i % inner] with a table, i * mul without.
struct Map {
  const int32_t* tab;
  int inner;
  int outer;
  int mul;
  __device__ __forceinline__ int at(int i) const {
    if (tab == nullptr) return i * mul;
    const int o = i / inner;
    return o * outer + tab[i - o * inner];
  }
};
__host__ __device__ inline Map lin(int mul) { return Map{nullptr, INT_MAX, 0, mul}; }
__host__ __device__ inline Map table(const int32_t* tab, int inner, int outer) { return Map{tab, inner, outer, 0}; }
__host__ __device__ inline Map table1(const int32_t* tab) { return Map{tab, INT_MAX, 0, 0}; }

// Walking a map along consecutive indices without a division per step.
struct Walk {
  int o = 0, r = 0;
  __device__ __forceinline__ int off(const Map& m) const { return m.tab ? o * m.outer + m.tab[r] : r * m.mul; }
  __device__ __forceinline__ void next(const Map& m) {
    if (++r == m.inner) r = 0, ++o;
  }
};

template <typename TC>
struct Out {
  TC* ptr;
  Map p, q;
  bool accumulate;
};

template <typename TC, typename Acc>
__device__ __forceinline__ void put(const Out<TC>& o, int p, int q, Acc v) {
  TC* d = o.ptr + o.p.at(p) + o.q.at(q);
  *d = o.accumulate ? cvt<TC>(static_cast<Acc>(cvt<Acc>(*d) + v)) : cvt<TC>(v);
}

// ----------------------------------------------------------------------------- in-block GEMM
// The whole block computes C = A B on operands already in shared memory (or cached global
// memory): each thread owns TP consecutive rows x TQ columns strided by the number of column
// threads, so a warp reads consecutive B entries (no bank conflicts when bq is unit-stride)
// and broadcasts A entries.
template <int TP, int TQ, typename Acc, typename TC>
__device__ void block_gemm_tiles(int P, int Q, int L, const Acc* A, Map ap, Map al, const Acc* B, Map bl, Map bq,
                                 const Out<TC>& out) {
  const int qthreads = (Q + TQ - 1) / TQ;
  const int tiles = ((P + TP - 1) / TP) * qthreads;
  for (int tile = threadIdx.x; tile < tiles; tile += blockDim.x) {
    const int qi = tile % qthreads, p0 = (tile / qthreads) * TP;
    int aoff[TP], boff[TQ];
#pragma unroll
    for (int i = 0; i < TP; ++i) aoff[i] = ap.at(min(p0 + i, P - 1));
#pragma unroll
    for (int c = 0; c < TQ; ++c) boff[c] = bq.at(min(qi + c * qthreads, Q - 1));
    Acc acc[TP][TQ];
#pragma unroll
    for (int i = 0; i < TP; ++i)
#pragma unroll
      for (int c = 0; c < TQ; ++c) acc[i][c] = Acc(0);
    Walk wa, wb;
    for (int l = 0; l < L; ++l) {
      const int oa = wa.off(al), ob = wb.off(bl);
      Acc a[TP], b[TQ];
#pragma unroll
      for (int i = 0; i < TP; ++i) a[i] = A[aoff[i] + oa];
#pragma unroll
      for (int c = 0; c < TQ; ++c) b[c] = B[ob + boff[c]];
#pragma unroll
      for (int i = 0; i < TP; ++i)
#pragma unroll
        for (int c = 0; c < TQ; ++c) acc[i][c] = fma(a[i], b[c], acc[i][c]);
      wa.next(al);
      wb.next(bl);
    }
#pragma unroll
    for (int i = 0; i < TP; ++i)
#pragma unroll
      for (int c = 0; c < TQ; ++c)
        if (p0 + i < P && qi + c * qthreads < Q) put(out, p0 + i, qi + c * qthreads, acc[i][c]);
  }
}

// Register tile by shape: 4 columns per thread only when there are enough columns, 4 rows
// only when that still leaves every thread of the block some work.
template <typename Acc, typename TC>
__device__ void block_gemm(int P, int Q, int L, const Acc* A, Map ap, Map al, const Acc* B, Map bl, Map bq,
                           const Out<TC>& out) {
  const bool wide = Q >= 64;
  const int qthreads = wide ? (Q + 3) / 4 : Q;
  const bool tall = ((P + 3) / 4) * qthreads >= static_cast<int>(blockDim.x);
  if (wide && tall)
    block_gemm_tiles<4, 4>(P, Q, L, A, ap, al, B, bl, bq, out);
  else if (wide)
    block_gemm_tiles<1, 4>(P, Q, L, A, ap, al, B, bl, bq, out);
  else if (tall)
    block_gemm_tiles<4, 1>(P, Q, L, A, ap, al, B, bl, bq, out);
  else
    block_gemm_tiles<1, 1>(P, Q, L, A, ap, al, B, bl, bq, out);
}

// ----------------------------------------------------------------------------- fused kernels
template <typename T, typename Acc>
struct FusedArgs {
  int n_steps;
  int rows[kCudaMaxSteps], K[kCudaMaxSteps], N[kCudaMaxSteps];
  int smem_off[kCudaMaxSteps];   // step matrix offset in shared memory (row stride smem_ld(N))
  int grad_off[kCudaMaxSteps];   // step matrix offset in a gradient partial (row stride N)
  int saved_off[kCudaMaxSteps];  // backward: per-sample offset of step t's saved input
  const Acc* mat[kCudaMaxSteps];
  const int32_t* ro[kCudaMaxSteps];
  const int32_t* co[kCudaMaxSteps];
  const int32_t* fsrc;
  const int32_t* finv;
  int in_features, out_features, max_state, smem_mats, mats_total, samples, saved_total;
  int64_t batch, chunks;
  const T* x;
  T* y;
  const T* gy;
  T* gx;
  Acc* partial;
  bool need_x, need_mats;
};

template <typename Acc>
__device__ __forceinline__ int ld_of(int N) {
  return N % 2 == 0 ? N + 1 : N;
}

// ----------------------------------------------------------------------------- tiled GEMM
// C(p, q) (+)= sum over this split's l of A(p, l) B(l, q), operands gathered from global
// memory through maps, one 64 x 64 tile per block, 4 x 4 outputs per thread. blockIdx.z is
// the split of the l range; split z writes C + z * c_split_stride. A may itself be the
// a_splits partial products of a split step (the decode path): A(p, l) is then their sum,
// taken in split order as the operand is read (the SIMT kernel only; the tensor-core kernel
// is never handed split operands).
template <typename TA, typename TB, typename TC>
struct TiledGemm {
  int P, Q, L, l_per_split;
  const TA* A;
  Map ap, al;
  const TB* B;
  Map bl, bq;
  TC* C;
  Map cp, cq;
  int64_t c_split_stride;
  bool accumulate;
  int a_splits = 1;
  int64_t a_split_stride = 0;
};

template <typename Acc, typename TA, typename TB, typename TC>
__device__ __forceinline__ Acc load_a(const TiledGemm<TA, TB, TC>& g, int off) {
  Acc v = cvt<Acc>(g.A[off]);
  for (int z = 1; z < g.a_splits; ++z) v += cvt<Acc>(g.A[z * g.a_split_stride + off]);
  return v;
}

template <typename TA, typename TB, typename TC, typename Acc>
__global__ void __launch_bounds__(kCudaThreads) tiled_gemm_kernel(const TiledGemm<TA, TB, TC> g) {
  constexpr int BM = kCudaTileM, BN = kCudaTileN, BK = kCudaTileK;
  static_assert(BM == 64 && BN == 64 && kCudaThreads == 256, "4 x 4 outputs per thread on a 16 x 16 grid");
  __shared__ Acc As[BK][BM + 1];
  __shared__ Acc Bs[BK][BN];
  __shared__ int arow[BM], bcol[BN], acol[BK], brow[BK];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int p0 = blockIdx.x * BM, q0 = blockIdx.y * BN;
  const int l_begin = blockIdx.z * g.l_per_split;
  const int l_end = min(g.L, l_begin + g.l_per_split);
  if (tid < BM)
    arow[tid] = g.ap.at(min(p0 + tid, g.P - 1));
  else if (tid < BM + BN)
    bcol[tid - BM] = g.bq.at(min(q0 + tid - BM, g.Q - 1));
  Acc acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[i][c] = Acc(0);
  for (int l0 = l_begin; l0 < l_end; l0 += BK) {
    __syncthreads();  // the previous tile has been consumed
    if (tid < BK)
      acol[tid] = l0 + tid < l_end ? g.al.at(l0 + tid) : 0;
    else if (tid < 2 * BK)
      brow[tid - BK] = l0 + tid - BK < l_end ? g.bl.at(l0 + tid - BK) : 0;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < BM * BK / kCudaThreads; ++i) {
      const int e = tid + i * kCudaThreads, pp = e / BK, ll = e % BK;
      As[ll][pp] = (p0 + pp < g.P && l0 + ll < l_end) ? load_a<Acc>(g, arow[pp] + acol[ll]) : Acc(0);
    }
#pragma unroll
    for (int i = 0; i < BN * BK / kCudaThreads; ++i) {
      const int e = tid + i * kCudaThreads, ll = e / BN, qq = e % BN;
      Bs[ll][qq] = (q0 + qq < g.Q && l0 + ll < l_end) ? cvt<Acc>(g.B[brow[ll] + bcol[qq]]) : Acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int ll = 0; ll < BK; ++ll) {
      Acc a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[ll][ty + 16 * i];
#pragma unroll
      for (int c = 0; c < 4; ++c) b[c] = Bs[ll][tx + 16 * c];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[i][c] = fma(a[i], b[c], acc[i][c]);
    }
  }
  const Out<TC> out{g.C + blockIdx.z * g.c_split_stride, g.cp, g.cq, g.accumulate};
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int p = p0 + ty + 16 * i, q = q0 + tx + 16 * c;
      if (p < g.P && q < g.Q) put(out, p, q, acc[i][c]);
    }
}

// ----------------------------------------------------------------------------- tensor-core tiled GEMM
// The tiled GEMM's contract on the tensor cores (nvcuda::wmma, float accumulation). Each
// block's operands are gathered through the maps as above, rounded to the operand type (fp16,
// bf16, or tf32 for float data) and staged row-major in shared memory; the 8 warps, in a 4 x 2
// grid, each own a 16 x 32 strip of the 64 x 64 tile (two 16 x 16 accumulators); the tile
// leaves through shared memory, so the output map and the accumulate flag work as above.
struct Tf32 {};  // float data on the tf32 tensor cores
template <typename Op>
struct TensorCoreOp {
  using storage = Op;  // shared-memory and fragment element type
  using frag = Op;     // the fragment's operand type parameter
  static constexpr int k = 16, pad = 8;
};
template <>
struct TensorCoreOp<Tf32> {
  using storage = float;
  using frag = nvcuda::wmma::precision::tf32;
  static constexpr int k = 8, pad = 4;
};
template <typename Op>
__device__ __forceinline__ typename TensorCoreOp<Op>::storage to_operand(float v) {
  if constexpr (std::is_same<Op, Tf32>::value)
    return nvcuda::wmma::__float_to_tf32(v);
  else
    return cvt<Op>(v);
}

// The tensor-core operand type for x's element type T (void: none, float64 stays on SIMT).
template <typename T>
struct TensorCoreOf {
  using type = void;
};
template <>
struct TensorCoreOf<float> {
  using type = Tf32;
};
template <>
struct TensorCoreOf<__half> {
  using type = __half;
};
template <>
struct TensorCoreOf<__nv_bfloat16> {
  using type = __nv_bfloat16;
};

constexpr int kTensorCoreTileK = 32;

// The tile both tensor-core GEMMs (tiled_gemm_tc_kernel, block_gemm_tc) stage: a 64 x BK A tile
// and a BK x 64 B tile in the operand type, row-major, rows padded by 16 bytes (bank spread;
// every fragment pointer stays 32-byte aligned), and the 64 x 64 float output tile; 8 warps in
// a 4 x 2 grid, each owning a 16 x 32 strip (two 16 x 16 accumulators).
template <typename Op>
struct TcTile {
  using S = typename TensorCoreOp<Op>::storage;
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, TensorCoreOp<Op>::k, float>;
  static constexpr int BM = kCudaTileM, BN = kCudaTileN, BK = kTensorCoreTileK, WK = TensorCoreOp<Op>::k;
  static constexpr int LDA = BK + TensorCoreOp<Op>::pad, LDB = BN + TensorCoreOp<Op>::pad, LDC = BN + 4;
  static_assert(BM == 64 && BN == 64 && kCudaThreads == 256, "8 warps of 16 x 32 outputs");
};

// acc += this warp's strip of the staged As (BM x BK) times Bs (BK x BN).
template <typename Op>
__device__ __forceinline__ void tc_mma(const typename TcTile<Op>::S* As, const typename TcTile<Op>::S* Bs,
                                       typename TcTile<Op>::Acc (&acc)[2], int wm, int wn) {
  namespace wmma = nvcuda::wmma;
  using T = TcTile<Op>;
  using F = typename TensorCoreOp<Op>::frag;
#pragma unroll
  for (int kk = 0; kk < T::BK; kk += T::WK) {
    wmma::fragment<wmma::matrix_a, 16, 16, T::WK, F, wmma::row_major> a;
    wmma::load_matrix_sync(a, As + wm * 16 * T::LDA + kk, T::LDA);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::fragment<wmma::matrix_b, 16, 16, T::WK, F, wmma::row_major> b;
      wmma::load_matrix_sync(b, Bs + kk * T::LDB + wn * 32 + j * 16, T::LDB);
      wmma::mma_sync(acc[j], a, b, acc[j]);
    }
  }
}

// The block's output tile leaves through shared memory (Cs, BM x LDC floats): the fragments
// stored, then every in-range (p0 + pp, q0 + qq) < (P, Q) written through the output map.
template <typename Op, typename TC>
__device__ __forceinline__ void tc_store(typename TcTile<Op>::Acc (&acc)[2], float* Cs, const Out<TC>& out, int p0,
                                         int q0, int P, int Q, int wm, int wn) {
  using T = TcTile<Op>;
#pragma unroll
  for (int j = 0; j < 2; ++j)
    nvcuda::wmma::store_matrix_sync(Cs + wm * 16 * T::LDC + wn * 32 + j * 16, acc[j], T::LDC,
                                    nvcuda::wmma::mem_row_major);
  __syncthreads();
  for (int e = threadIdx.x; e < T::BM * T::BN; e += kCudaThreads) {
    const int pp = e / T::BN, qq = e % T::BN;
    if (p0 + pp < P && q0 + qq < Q) put(out, p0 + pp, q0 + qq, Cs[pp * T::LDC + qq]);
  }
}

// Four consecutive float operands by one 16-byte load (zeros where !valid: nothing is read),
// rounded to the operand type into shared memory.
template <typename Op>
__device__ __forceinline__ void stage4(typename TensorCoreOp<Op>::storage* d, const void* src, bool valid) {
  float4 v{0.0f, 0.0f, 0.0f, 0.0f};
  if (valid) v = *reinterpret_cast<const float4*>(src);
  d[0] = to_operand<Op>(v.x);
  d[1] = to_operand<Op>(v.y);
  d[2] = to_operand<Op>(v.z);
  d[3] = to_operand<Op>(v.w);
}

// Whether an operand tile can be read as 16-byte vectors along its contiguous index: float
// data, unit stride along that index (no gather table), a row stride that keeps every row
// 16-byte aligned, and an aligned base. Otherwise (and for partial tiles) the scalar gather.
template <typename T>
__device__ __forceinline__ bool vector_rows(const T* base, const Map& rows, const Map& along) {
  if constexpr (!std::is_same<T, float>::value) {
    return false;
  } else {
    return rows.tab == nullptr && along.tab == nullptr && along.mul == 1 && rows.mul % 4 == 0 &&
           reinterpret_cast<uintptr_t>(base) % 16 == 0;
  }
}

template <typename TA, typename TB, typename TC, typename Op>
__global__ void __launch_bounds__(kCudaThreads) tiled_gemm_tc_kernel(const TiledGemm<TA, TB, TC> g) {
  using Tile = TcTile<Op>;
  using S = typename Tile::S;
  constexpr int BM = Tile::BM, BN = Tile::BN, BK = Tile::BK, LDA = Tile::LDA, LDB = Tile::LDB, LDC = Tile::LDC;
  __shared__ __align__(32) S As[BM * LDA];
  __shared__ __align__(32) S Bs[BK * LDB];
  __shared__ __align__(32) float Cs[BM * LDC];
  __shared__ int arow[BM], bcol[BN], acol[BK], brow[BK];
  const int tid = threadIdx.x, warp = tid / 32, wm = warp % 4, wn = warp / 4;
  const int p0 = blockIdx.x * BM, q0 = blockIdx.y * BN;
  const int l_begin = blockIdx.z * g.l_per_split;
  const int l_end = min(g.L, l_begin + g.l_per_split);
  if (tid < BM)
    arow[tid] = g.ap.at(min(p0 + tid, g.P - 1));
  else if (tid < BM + BN)
    bcol[tid - BM] = g.bq.at(min(q0 + tid - BM, g.Q - 1));
  typename Tile::Acc acc[2];
  nvcuda::wmma::fill_fragment(acc[0], 0.0f);
  nvcuda::wmma::fill_fragment(acc[1], 0.0f);
  // A(p, l) rows contiguous along l; B(l, q) rows contiguous along q (block-uniform tests)
  const bool a_vec = vector_rows(g.A, g.ap, g.al) && l_begin % 4 == 0;
  const bool b_vec = vector_rows(g.B, g.bl, g.bq) && q0 + BN <= g.Q;
  for (int l0 = l_begin; l0 < l_end; l0 += BK) {
    __syncthreads();  // the previous tile has been consumed
    if (tid < BK)
      acol[tid] = l0 + tid < l_end ? g.al.at(l0 + tid) : 0;
    else if (tid < 2 * BK)
      brow[tid - BK] = l0 + tid - BK < l_end ? g.bl.at(l0 + tid - BK) : 0;
    __syncthreads();
    const bool full_l = l0 + BK <= l_end;
    if (a_vec && full_l) {  // 4 consecutive l of one row per load
      for (int e = tid; e < BM * BK / 4; e += kCudaThreads) {
        const int pp = e / (BK / 4), ll = 4 * (e % (BK / 4));
        stage4<Op>(As + pp * LDA + ll, &g.A[arow[pp] + acol[ll]], p0 + pp < g.P);
      }
    } else {
#pragma unroll 2
      for (int i = 0; i < BM * BK / kCudaThreads; ++i) {
        const int e = tid + i * kCudaThreads, pp = e / BK, ll = e % BK;
        As[pp * LDA + ll] =
            to_operand<Op>((p0 + pp < g.P && l0 + ll < l_end) ? cvt<float>(g.A[arow[pp] + acol[ll]]) : 0.0f);
      }
    }
    if (b_vec) {  // 4 consecutive q of one row per load
      for (int e = tid; e < BK * BN / 4; e += kCudaThreads) {
        const int ll = e / (BN / 4), qq = 4 * (e % (BN / 4));
        stage4<Op>(Bs + ll * LDB + qq, &g.B[brow[ll] + bcol[qq]], l0 + ll < l_end);
      }
    } else {
#pragma unroll 2
      for (int i = 0; i < BN * BK / kCudaThreads; ++i) {
        const int e = tid + i * kCudaThreads, ll = e / BN, qq = e % BN;
        Bs[ll * LDB + qq] =
            to_operand<Op>((q0 + qq < g.Q && l0 + ll < l_end) ? cvt<float>(g.B[brow[ll] + bcol[qq]]) : 0.0f);
      }
    }
    __syncthreads();
    tc_mma<Op>(As, Bs, acc, wm, wn);
  }
  const Out<TC> out{g.C + blockIdx.z * g.c_split_stride, g.cp, g.cq, g.accumulate};
  tc_store<Op>(acc, Cs, out, p0, q0, g.P, g.Q, wm, wn);
}

// ----------------------------------------------------------------------------- fused kernels, tensor cores
// The in-block GEMM C = A B on the tensor cores, for the fused kernels' steps when the call
// uses them: the whole block walks C's 64 x 64 tiles; per tile, as in tiled_gemm_tc_kernel,
// operand tiles gathered through the maps are rounded to the operand type and staged
// row-major (`staging`: the block's dynamic shared memory after its buffers, 32-byte aligned,
// kCudaFusedTensorCoreStaging bytes), 8 warps of 16 x 32 with float accumulation, and the
// tile leaves through shared memory, so the output map and the accumulate flag work as in
// block_gemm.
template <typename Op, typename Acc, typename TC>
__device__ void block_gemm_tc(int P, int Q, int L, const Acc* A, Map ap, Map al, const Acc* B, Map bl, Map bq,
                              const Out<TC>& out, unsigned char* staging) {
  using Tile = TcTile<Op>;
  using S = typename Tile::S;
  constexpr int BM = Tile::BM, BN = Tile::BN, BK = Tile::BK, LDA = Tile::LDA, LDB = Tile::LDB, LDC = Tile::LDC;
  static_assert(
      (BM * LDA + BK * LDB) * sizeof(S) + (BM * LDC + BM + BN + 2 * BK) * 4 + 32 <= kCudaFusedTensorCoreStaging,
      "the staging fits the shared memory the schedule reserves");
  S* As = reinterpret_cast<S*>(staging);
  S* Bs = As + BM * LDA;
  float* Cs = reinterpret_cast<float*>(Bs + BK * LDB);
  int* arow = reinterpret_cast<int*>(Cs + BM * LDC);
  int* bcol = arow + BM;
  int* acol = bcol + BN;
  int* brow = acol + BK;
  const int tid = threadIdx.x, warp = tid / 32, wm = warp % 4, wn = warp / 4;
  const int tiles_q = (Q + BN - 1) / BN, tiles = ((P + BM - 1) / BM) * tiles_q;
  for (int tile = 0; tile < tiles; ++tile) {
    const int p0 = (tile / tiles_q) * BM, q0 = (tile % tiles_q) * BN;
    __syncthreads();  // the previous tile's epilogue is done with Cs and the index tables
    if (tid < BM)
      arow[tid] = ap.at(min(p0 + tid, P - 1));
    else if (tid < BM + BN)
      bcol[tid - BM] = bq.at(min(q0 + tid - BM, Q - 1));
    typename Tile::Acc acc[2];
    nvcuda::wmma::fill_fragment(acc[0], 0.0f);
    nvcuda::wmma::fill_fragment(acc[1], 0.0f);
    for (int l0 = 0; l0 < L; l0 += BK) {
      __syncthreads();  // the previous operand tiles have been consumed
      if (tid < BK)
        acol[tid] = l0 + tid < L ? al.at(l0 + tid) : 0;
      else if (tid < 2 * BK)
        brow[tid - BK] = l0 + tid - BK < L ? bl.at(l0 + tid - BK) : 0;
      __syncthreads();
      for (int e = tid; e < BM * BK; e += kCudaThreads) {
        const int pp = e / BK, ll = e % BK;
        As[pp * LDA + ll] =
            to_operand<Op>((p0 + pp < P && l0 + ll < L) ? static_cast<float>(A[arow[pp] + acol[ll]]) : 0.0f);
      }
      for (int e = tid; e < BK * BN; e += kCudaThreads) {
        const int ll = e / BN, qq = e % BN;
        Bs[ll * LDB + qq] =
            to_operand<Op>((q0 + qq < Q && l0 + ll < L) ? static_cast<float>(B[brow[ll] + bcol[qq]]) : 0.0f);
      }
      __syncthreads();
      tc_mma<Op>(As, Bs, acc, wm, wn);
    }
    tc_store<Op>(acc, Cs, out, p0, q0, P, Q, wm, wn);
  }
  __syncthreads();  // the caller may reuse the staging or read C
}

// The step GEMMs of the fused kernels: on the tensor cores in the TC instantiation (never for
// float64, whose operand type is void), else block_gemm. Two instantiations, so the SIMT one
// keeps its registers (the tensor-core code path doubles them: benchmarks/results/cuda_static.md).
template <bool TC, typename T, typename Acc, typename TCOut>
__device__ void fused_gemm(unsigned char* staging, int P, int Q, int L, const Acc* A, Map ap, Map al, const Acc* B,
                           Map bl, Map bq, const Out<TCOut>& out) {
  using Op = typename TensorCoreOf<T>::type;
  if constexpr (TC && !std::is_void<Op>::value)
    block_gemm_tc<Op>(P, Q, L, A, ap, al, B, bl, bq, out, staging);
  else
    block_gemm(P, Q, L, A, ap, al, B, bl, bq, out);
}

// Where the fused kernels' tensor-core staging starts: after `elems` accumulator elements of
// mats and buffers, at the next 32-byte aligned address (the fragments need it, the dynamic
// shared memory's base promises less; the schedule reserved the slack).
template <typename Acc>
__device__ __forceinline__ unsigned char* staging_after(unsigned char* smem, int64_t elems) {
  const uintptr_t end = reinterpret_cast<uintptr_t>(smem) + static_cast<uintptr_t>(elems) * sizeof(Acc);
  return smem + ((end + 31) / 32 * 32 - reinterpret_cast<uintptr_t>(smem));
}

// out (ns x rows x N) = gathered in (ns x rows x K) * mat (K x N, row stride ld).
template <bool TC, typename T, typename Acc>
__device__ void fused_step(const FusedArgs<T, Acc>& a, unsigned char* staging, int t, int ns, const Acc* in,
                           const Acc* mat, Acc* out) {
  const int rows = a.rows[t], K = a.K[t], N = a.N[t];
  fused_gemm<TC, T>(staging, ns * rows, N, K, in, table(a.ro[t], rows, rows * K), table1(a.co[t]), mat,
                    lin(ld_of<Acc>(N)), lin(1), Out<Acc>{out, lin(N), lin(1), false});
}

// ----------------------------------------------------------------------------- fused kernels
template <typename T, typename Acc>
__device__ void stage_mats(const FusedArgs<T, Acc>& a, Acc* mats) {
  for (int t = 0; t < a.n_steps; ++t) {
    const int K = a.K[t], N = a.N[t], ld = ld_of<Acc>(N);
    for (int i = threadIdx.x; i < K * N; i += blockDim.x) {
      const int k = i / N;
      mats[a.smem_off[t] + k * ld + (i - k * N)] = a.mat[t][i];
    }
  }
}

template <typename T, typename Acc, bool TC>
__global__ void __launch_bounds__(kCudaThreads) fused_forward_kernel(const FusedArgs<T, Acc> a) {
  TP_DYNAMIC_SHARED(unsigned char, smem_raw);
  Acc* mats = reinterpret_cast<Acc*>(smem_raw);
  Acc* buf0 = mats + a.smem_mats;
  Acc* buf1 = buf0 + a.samples * a.max_state;
  unsigned char* staging = staging_after<Acc>(smem_raw, a.smem_mats + 2 * int64_t(a.samples) * a.max_state);
  stage_mats(a, mats);  // visible after the barrier that follows the first input copy
  const int M = a.out_features;
  for (int64_t chunk = blockIdx.x; chunk < a.chunks; chunk += gridDim.x) {
    const int64_t b0 = chunk * a.samples;
    const int ns = static_cast<int>(min(static_cast<int64_t>(a.samples), a.batch - b0));
    const T* xs = a.x + b0 * a.in_features;
    for (int i = threadIdx.x; i < ns * a.in_features; i += blockDim.x) buf0[i] = cvt<Acc>(xs[i]);
    __syncthreads();
    Acc* cur = buf0;
    Acc* nxt = buf1;
    for (int t = 0; t < a.n_steps; ++t) {
      fused_step<TC>(a, staging, t, ns, cur, mats + a.smem_off[t], nxt);
      __syncthreads();
      Acc* tmp = cur;
      cur = nxt;
      nxt = tmp;
    }
    T* ys = a.y + b0 * M;
    for (int i = threadIdx.x; i < ns * M; i += blockDim.x) {
      const int s = i / M;
      ys[i] = cvt<T>(cur[s * M + a.fsrc[i - s * M]]);
    }
    __syncthreads();  // the next chunk overwrites the buffers
  }
}

// Backward of one block of samples at a time: recompute the forward keeping every step's
// input, then sweep back. Core gradients accumulate into this block's own partial (global
// memory, owned by the block: no atomics), summed over blocks by reduce_partials.
template <typename T, typename Acc, bool TC>
__global__ void __launch_bounds__(kCudaThreads) fused_backward_kernel(const FusedArgs<T, Acc> a) {
  TP_DYNAMIC_SHARED(unsigned char, smem_raw);
  Acc* mats = reinterpret_cast<Acc*>(smem_raw);
  Acc* saved = mats + a.smem_mats;
  Acc* g0 = saved + a.samples * a.saved_total;
  Acc* g1 = g0 + a.samples * a.max_state;
  Acc* partial = a.partial + static_cast<int64_t>(blockIdx.x) * a.mats_total;
  unsigned char* staging = staging_after<Acc>(
      smem_raw, a.smem_mats + int64_t(a.samples) * a.saved_total + 2 * int64_t(a.samples) * a.max_state);
  stage_mats(a, mats);
  if (a.need_mats)
    for (int i = threadIdx.x; i < a.mats_total; i += blockDim.x) partial[i] = Acc(0);
  const int M = a.out_features, n = a.n_steps;
  for (int64_t chunk = blockIdx.x; chunk < a.chunks; chunk += gridDim.x) {
    const int64_t b0 = chunk * a.samples;
    const int ns = static_cast<int>(min(static_cast<int64_t>(a.samples), a.batch - b0));
    const T* xs = a.x + b0 * a.in_features;
    for (int i = threadIdx.x; i < ns * a.in_features; i += blockDim.x) saved[i] = cvt<Acc>(xs[i]);
    __syncthreads();
    for (int t = 0; t + 1 < n; ++t) {
      fused_step<TC>(a, staging, t, ns, saved + a.samples * a.saved_off[t], mats + a.smem_off[t],
                     saved + a.samples * a.saved_off[t + 1]);
      __syncthreads();
    }
    const T* gys = a.gy + b0 * M;
    for (int i = threadIdx.x; i < ns * M; i += blockDim.x) {
      const int s = i / M;
      g0[i] = cvt<Acc>(gys[s * M + a.finv[i - s * M]]);
    }
    __syncthreads();
    Acc* g = g0;
    Acc* gn = g1;
    for (int t = n - 1; t >= 0; --t) {
      const int rows = a.rows[t], K = a.K[t], N = a.N[t], in_size = rows * K;
      const Acc* in = saved + a.samples * a.saved_off[t];
      if (a.need_mats)  // dB(k, j) += sum over (sample, row) of in(row, k) g(row, j)
        fused_gemm<TC, T>(staging, K, N, ns * rows, in, table1(a.co[t]), table(a.ro[t], rows, in_size), g, lin(N),
                          lin(1), Out<Acc>{partial + a.grad_off[t], lin(N), lin(1), true});
      if (t > 0 || a.need_x)  // d in(row, k) = sum_j g(row, j) B(k, j), scattered to the state layout
        fused_gemm<TC, T>(staging, ns * rows, K, N, g, lin(N), lin(1), mats + a.smem_off[t], lin(1), lin(ld_of<Acc>(N)),
                          Out<Acc>{gn, table(a.ro[t], rows, in_size), table1(a.co[t]), false});
      __syncthreads();
      Acc* tmp = g;
      g = gn;
      gn = tmp;
    }
    if (a.need_x) {
      T* gxs = a.gx + b0 * a.in_features;
      for (int i = threadIdx.x; i < ns * a.in_features; i += blockDim.x) gxs[i] = cvt<T>(g[i]);
      __syncthreads();
    }
  }
}

// ----------------------------------------------------------------------------- small kernels
// dst[i] = src[(i / M) * M + tab[i % M]]: the final permutation and its inverse; src may be
// the `splits` partial products of a split step (stride apart), summed in split order.
template <typename TS, typename TD>
__global__ void gather_rows_kernel(const TS* src, TD* dst, int64_t n, int M, const int32_t* tab, int splits,
                                   int64_t split_stride) {
  using Acc = typename AccOf<TD>::type;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t s = i / M, at = s * M + tab[i - s * M];
    Acc v = cvt<Acc>(src[at]);
    for (int z = 1; z < splits; ++z) v += cvt<Acc>(src[z * split_stride + at]);
    dst[i] = cvt<TD>(v);
  }
}

struct ReduceArgs {
  int n_steps, mats_total;
  int off[kCudaMaxSteps + 1];
  void* out[kCudaMaxSteps];
};

// grad_mats[t][i] = sum over `count` partials, in a fixed order (deterministic).
template <typename Acc>
__global__ void reduce_partials_kernel(const Acc* partial, int64_t count, const ReduceArgs r) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < r.mats_total; i += gridDim.x * blockDim.x) {
    Acc s = Acc(0);
    for (int64_t b = 0; b < count; ++b) s += partial[b * r.mats_total + i];
    int t = 0;
    while (i >= r.off[t + 1]) ++t;
    static_cast<Acc*>(r.out[t])[i - r.off[t]] = s;
  }
}

// ----------------------------------------------------------------------------- host side
int grid_for(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kCudaThreads), 4096)));
}

template <typename Kernel>
void allow_smem(Kernel kernel, int64_t bytes) {
  if (bytes > 48 * 1024)
    TP_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <typename T, typename Acc>
FusedArgs<T, Acc> fused_args(const Plan& plan, const CudaSchedule& sched, const std::vector<const void*>& mats,
                             const int32_t* tables, int64_t batch) {
  FusedArgs<T, Acc> a{};
  const TableLayout lay = table_layout(plan);
  a.n_steps = static_cast<int>(plan.steps.size());
  int smem = 0, grad = 0, saved = 0;
  for (int t = 0; t < a.n_steps; ++t) {
    const Step& s = plan.steps[t];
    a.rows[t] = static_cast<int>(s.rows);
    a.K[t] = static_cast<int>(s.K);
    a.N[t] = static_cast<int>(s.N);
    a.smem_off[t] = smem;
    a.grad_off[t] = grad;
    a.saved_off[t] = saved;
    smem += static_cast<int>(s.K * smem_ld(s.N));
    grad += static_cast<int>(s.K * s.N);
    saved += static_cast<int>(s.in_size());
    a.mat[t] = static_cast<const Acc*>(mats[t]);
    a.ro[t] = tables + lay.row_off[t];
    a.co[t] = tables + lay.col_off[t];
  }
  a.fsrc = tables + lay.fsrc;
  a.finv = tables + lay.finv;
  a.in_features = static_cast<int>(plan.in_features);
  a.out_features = static_cast<int>(plan.out_features);
  a.max_state = static_cast<int>(plan.max_state);
  a.smem_mats = smem;
  a.mats_total = grad;
  a.saved_total = saved;
  a.samples = static_cast<int>(sched.samples);
  a.batch = batch;
  a.chunks = sched.chunks;
  return a;
}

// One tiled GEMM on the tensor cores (operand type Op) when `tc`, else in SIMT arithmetic.
template <typename Op, typename TA, typename TB, typename TC>
void launch_tiled(const TiledGemm<TA, TB, TC>& g, int splits, bool tc, cudaStream_t stream, const char* what) {
  using Acc = typename AccOf<TC>::type;
  if (g.P <= 0 || g.Q <= 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(g.P, kCudaTileM)), static_cast<unsigned>(ceil_div(g.Q, kCudaTileN)),
                  static_cast<unsigned>(splits));
  if constexpr (!std::is_void<Op>::value) {
    if (tc) {
      TP_LAUNCH(grid, kCudaThreads, 0, stream, tiled_gemm_tc_kernel<TA, TB, TC, Op>)(g);
      TP_CUDA_CHECK_LAUNCH(what, stream);
      return;
    }
  }
  TP_LAUNCH(grid, kCudaThreads, 0, stream, tiled_gemm_kernel<TA, TB, TC, Acc>)(g);
  TP_CUDA_CHECK_LAUNCH(what, stream);
}

template <typename Acc>
ReduceArgs reduce_args(const Plan& plan, const std::vector<void*>& grad_mats) {
  ReduceArgs r{};
  r.n_steps = static_cast<int>(plan.steps.size());
  int off = 0;
  for (int t = 0; t < r.n_steps; ++t) {
    r.off[t] = off;
    off += static_cast<int>(plan.steps[t].K * plan.steps[t].N);
    r.out[t] = grad_mats[t];
  }
  r.off[r.n_steps] = off;
  for (int t = r.n_steps + 1; t <= kCudaMaxSteps; ++t) r.off[t] = INT_MAX;
  r.mats_total = off;
  return r;
}

template <typename Acc>
void reduce_partials(const Plan& plan, const Acc* partial, int64_t count, const std::vector<void*>& grad_mats,
                     cudaStream_t stream) {
  const ReduceArgs r = reduce_args<Acc>(plan, grad_mats);
  TP_LAUNCH(grid_for(r.mats_total), kCudaThreads, 0, stream, reduce_partials_kernel<Acc>)(partial, count, r);
  TP_CUDA_CHECK_LAUNCH("tt reduce_partials", stream);
}

// The decode path: the tiled SIMT GEMM per step, each step's K range split so that its
// launch has about target_blocks blocks (a small batch's steps have few output tiles: one
// block per tile would leave most SMs idle). Split z of a step writes its partial product to
// its own slice of the step's buffer; the next step sums the slices as it gathers its
// operand, and the final permutation sums the last step's, always in split order, so the
// result does not depend on the launch order of the blocks.
template <typename T, typename Acc>
void decode_forward(const Plan& plan, const CudaSchedule& sched, const T* x, const std::vector<const void*>& mats,
                    const int32_t* tables, T* y, int64_t batch, Acc* workspace, cudaStream_t stream) {
  const TableLayout lay = table_layout(plan);
  const int n = static_cast<int>(plan.steps.size());
  const int64_t Nin = plan.in_features, M = plan.out_features, Bc = sched.samples;
  Acc* buf[2] = {workspace, workspace + sched.workspace / 2};
  for (int64_t chunk = 0; chunk < sched.chunks; ++chunk) {
    const int64_t b0 = chunk * Bc;
    const int nb = static_cast<int>(std::min(Bc, batch - b0));
    const Acc* cur = nullptr;
    int cur_splits = 1;
    int64_t cur_stride = 0;
    for (int t = 0; t < n; ++t) {
      const Step& s = plan.steps[t];
      const int rows = static_cast<int>(s.rows), K = static_cast<int>(s.K), N = static_cast<int>(s.N);
      // the split of a full chunk, so every chunk fits the workspace decode_buffer sized
      const SplitK sk = decode_split(Bc * s.rows, s.K, s.N, sched.target_blocks);
      const Map ap = table(tables + lay.row_off[t], rows, rows * K), al = table1(tables + lay.col_off[t]);
      Acc* out = buf[t % 2];
      const int64_t stride = int64_t(nb) * rows * N;
      const Acc* mat = static_cast<const Acc*>(mats[t]);
      if (t == 0) {
        TiledGemm<T, Acc, Acc> g{
            nb * rows, N,      K,    static_cast<int>(sk.per), x + b0 * Nin, ap, al, mat, lin(N), lin(1), out, lin(N),
            lin(1),    stride, false};
        launch_tiled<void>(g, static_cast<int>(sk.splits), false, stream, "tt decode step");
      } else {
        TiledGemm<Acc, Acc, Acc> g{
            nb * rows, N,      K,    static_cast<int>(sk.per), cur, ap, al, mat, lin(N), lin(1), out, lin(N),
            lin(1),    stride, false};
        g.a_splits = cur_splits;
        g.a_split_stride = cur_stride;
        launch_tiled<void>(g, static_cast<int>(sk.splits), false, stream, "tt decode step");
      }
      cur = out;
      cur_splits = static_cast<int>(sk.splits);
      cur_stride = stride;
    }
    TP_LAUNCH(grid_for(nb * M), kCudaThreads, 0, stream, gather_rows_kernel<Acc, T>)(
        cur, y + b0 * M, nb * M, static_cast<int>(M), tables + lay.fsrc, cur_splits, cur_stride);
    TP_CUDA_CHECK_LAUNCH("tt gather_rows (decode output)", stream);
  }
}

template <typename T>
void forward_impl(const Plan& plan, const CudaSchedule& sched, const T* x, const std::vector<const void*>& mats,
                  const int32_t* tables, T* y, int64_t batch, void* workspace, bool tc, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  using Op = typename TensorCoreOf<T>::type;
  if (batch == 0) return;
  if (sched.path == CudaPath::Fused) {
    FusedArgs<T, Acc> a = fused_args<T, Acc>(plan, sched, mats, tables, batch);
    a.x = x;
    a.y = y;
    if constexpr (!std::is_void<Op>::value) {
      if (tc) {
        allow_smem(fused_forward_kernel<T, Acc, true>, sched.smem_bytes);
        TP_LAUNCH(static_cast<unsigned>(sched.grid), kCudaThreads, sched.smem_bytes, stream,
                  fused_forward_kernel<T, Acc, true>)(a);
        TP_CUDA_CHECK_LAUNCH("tt fused_forward_kernel (tensor cores)", stream);
        return;
      }
    }
    allow_smem(fused_forward_kernel<T, Acc, false>, sched.smem_bytes);
    TP_LAUNCH(static_cast<unsigned>(sched.grid), kCudaThreads, sched.smem_bytes, stream,
              fused_forward_kernel<T, Acc, false>)(a);
    TP_CUDA_CHECK_LAUNCH("tt fused_forward_kernel", stream);
    return;
  }
  if (sched.path == CudaPath::Decode) {
    decode_forward(plan, sched, x, mats, tables, y, batch, static_cast<Acc*>(workspace), stream);
    return;
  }
  const TableLayout lay = table_layout(plan);
  const int n = static_cast<int>(plan.steps.size());
  const int64_t Nin = plan.in_features, M = plan.out_features, Bc = sched.samples;
  Acc* buf[2] = {static_cast<Acc*>(workspace), static_cast<Acc*>(workspace) + Bc * plan.max_state};
  for (int64_t chunk = 0; chunk < sched.chunks; ++chunk) {
    const int64_t b0 = chunk * Bc;
    const int nb = static_cast<int>(std::min(Bc, batch - b0));
    const Acc* cur = nullptr;
    for (int t = 0; t < n; ++t) {
      const Step& s = plan.steps[t];
      const int rows = static_cast<int>(s.rows), K = static_cast<int>(s.K), N = static_cast<int>(s.N);
      const Map ap = table(tables + lay.row_off[t], rows, rows * K), al = table1(tables + lay.col_off[t]);
      Acc* out = buf[t % 2];
      const Acc* mat = static_cast<const Acc*>(mats[t]);
      if (t == 0)
        launch_tiled<Op>(TiledGemm<T, Acc, Acc>{nb * rows, N, K, K, x + b0 * Nin, ap, al, mat, lin(N), lin(1), out,
                                                lin(N), lin(1), 0, false},
                         1, tc, stream, "tt tiled forward step");
      else
        launch_tiled<Op>(TiledGemm<Acc, Acc, Acc>{nb * rows, N, K, K, cur, ap, al, mat, lin(N), lin(1), out, lin(N),
                                                  lin(1), 0, false},
                         1, tc, stream, "tt tiled forward step");
      cur = out;
    }
    TP_LAUNCH(grid_for(nb * M), kCudaThreads, 0, stream, gather_rows_kernel<Acc, T>)(
        cur, y + b0 * M, nb * M, static_cast<int>(M), tables + lay.fsrc, 1, int64_t(0));
    TP_CUDA_CHECK_LAUNCH("tt gather_rows (output)", stream);
  }
}

template <typename T>
void backward_impl(const Plan& plan, const CudaSchedule& sched, const T* x, const std::vector<const void*>& mats,
                   const int32_t* tables, const T* grad_y, T* grad_x, const std::vector<void*>& grad_mats,
                   int64_t batch, void* workspace, bool tc, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  using Op = typename TensorCoreOf<T>::type;
  const bool need_x = grad_x != nullptr, need_mats = !grad_mats.empty();
  if (!need_x && !need_mats) return;
  const int64_t mtotal = mats_total(plan);
  if (sched.path == CudaPath::Fused) {
    Acc* partial = static_cast<Acc*>(workspace);
    if (batch > 0) {
      FusedArgs<T, Acc> a = fused_args<T, Acc>(plan, sched, mats, tables, batch);
      a.x = x;
      a.gy = grad_y;
      a.gx = grad_x;
      a.partial = partial;
      a.need_x = need_x;
      a.need_mats = need_mats;
      bool launched = false;
      if constexpr (!std::is_void<Op>::value) {
        if (tc) {
          allow_smem(fused_backward_kernel<T, Acc, true>, sched.smem_bytes);
          TP_LAUNCH(static_cast<unsigned>(sched.grid), kCudaThreads, sched.smem_bytes, stream,
                    fused_backward_kernel<T, Acc, true>)(a);
          TP_CUDA_CHECK_LAUNCH("tt fused_backward_kernel (tensor cores)", stream);
          launched = true;
        }
      }
      if (!launched) {
        allow_smem(fused_backward_kernel<T, Acc, false>, sched.smem_bytes);
        TP_LAUNCH(static_cast<unsigned>(sched.grid), kCudaThreads, sched.smem_bytes, stream,
                  fused_backward_kernel<T, Acc, false>)(a);
        TP_CUDA_CHECK_LAUNCH("tt fused_backward_kernel", stream);
      }
    }
    if (need_mats) reduce_partials<Acc>(plan, partial, batch > 0 ? sched.grid : 0, grad_mats, stream);
    return;
  }

  const TableLayout lay = table_layout(plan);
  const int n = static_cast<int>(plan.steps.size());
  const int64_t Nin = plan.in_features, M = plan.out_features, Bc = sched.samples;
  // workspace: each step's saved input (step 0's slot unused: x is read in place), two
  // gradient buffers, then the split partials of the core gradients
  Acc* ws = static_cast<Acc*>(workspace);
  std::vector<Acc*> slot(n);
  int64_t used = 0;
  for (int t = 0; t < n; ++t) slot[t] = ws + used, used += Bc * plan.steps[t].in_size();
  Acc* gbuf[2] = {ws + used, ws + used + Bc * plan.max_state};
  Acc* partial = ws + used + 2 * Bc * plan.max_state;
  std::vector<int64_t> grad_off(n + 1, 0);
  for (int t = 0; t < n; ++t) grad_off[t + 1] = grad_off[t] + plan.steps[t].K * plan.steps[t].N;
  const int splits = static_cast<int>(sched.splits);

  for (int64_t chunk = 0; chunk < sched.chunks; ++chunk) {
    const int64_t b0 = chunk * Bc;
    const int nb = static_cast<int>(std::min(Bc, batch - b0));
    const T* xs = x + b0 * Nin;
    for (int t = 0; t + 1 < n; ++t) {  // recompute the forward, keeping every step's input
      const Step& s = plan.steps[t];
      const int rows = static_cast<int>(s.rows), K = static_cast<int>(s.K), N = static_cast<int>(s.N);
      const Map ap = table(tables + lay.row_off[t], rows, rows * K), al = table1(tables + lay.col_off[t]);
      const Acc* mat = static_cast<const Acc*>(mats[t]);
      if (t == 0)
        launch_tiled<Op>(TiledGemm<T, Acc, Acc>{nb * rows, N, K, K, xs, ap, al, mat, lin(N), lin(1), slot[1], lin(N),
                                                lin(1), 0, false},
                         1, tc, stream, "tt tiled backward recompute");
      else
        launch_tiled<Op>(TiledGemm<Acc, Acc, Acc>{nb * rows, N, K, K, slot[t], ap, al, mat, lin(N), lin(1), slot[t + 1],
                                                  lin(N), lin(1), 0, false},
                         1, tc, stream, "tt tiled backward recompute");
    }
    TP_LAUNCH(grid_for(nb * M), kCudaThreads, 0, stream, gather_rows_kernel<T, Acc>)(
        grad_y + b0 * M, gbuf[0], nb * M, static_cast<int>(M), tables + lay.finv, 1, int64_t(0));
    TP_CUDA_CHECK_LAUNCH("tt gather_rows (grad_out)", stream);
    int cur = 0;
    for (int t = n - 1; t >= 0; --t) {
      const Step& s = plan.steps[t];
      const int rows = static_cast<int>(s.rows), K = static_cast<int>(s.K), N = static_cast<int>(s.N);
      const int in_size = rows * K;
      const int32_t* ro = tables + lay.row_off[t];
      const int32_t* co = tables + lay.col_off[t];
      const Acc* g = gbuf[cur];
      if (need_mats) {
        const int L = nb * rows;
        const int per = static_cast<int>(ceil_div(ceil_div(L, splits), kCudaTileK) * kCudaTileK);
        Acc* c = partial + grad_off[t];
        if (t == 0)
          launch_tiled<Op>(TiledGemm<T, Acc, Acc>{K, N, L, per, xs, table1(co), table(ro, rows, in_size), g, lin(N),
                                                  lin(1), c, lin(N), lin(1), mtotal, chunk > 0},
                           splits, tc, stream, "tt tiled core gradient");
        else
          launch_tiled<Op>(TiledGemm<Acc, Acc, Acc>{K, N, L, per, slot[t], table1(co), table(ro, rows, in_size), g,
                                                    lin(N), lin(1), c, lin(N), lin(1), mtotal, chunk > 0},
                           splits, tc, stream, "tt tiled core gradient");
      }
      if (t > 0 || need_x) {
        const Acc* mat = static_cast<const Acc*>(mats[t]);
        const Map cp = table(ro, rows, in_size), cq = table1(co);
        if (t == 0)
          launch_tiled<Op>(TiledGemm<Acc, Acc, T>{nb * rows, K, N, N, g, lin(N), lin(1), mat, lin(1), lin(N),
                                                  grad_x + b0 * Nin, cp, cq, 0, false},
                           1, tc, stream, "tt tiled input gradient");
        else
          launch_tiled<Op>(TiledGemm<Acc, Acc, Acc>{nb * rows, K, N, N, g, lin(N), lin(1), mat, lin(1), lin(N),
                                                    gbuf[1 - cur], cp, cq, 0, false},
                           1, tc, stream, "tt tiled input gradient");
      }
      cur = 1 - cur;
    }
  }
  if (need_mats) reduce_partials<Acc>(plan, partial, sched.chunks > 0 ? splits : 0, grad_mats, stream);
}

}  // namespace

CudaLimits cuda_limits(int device) {
  CudaLimits lim;
  int v = 0;
  TP_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  lim.smem_per_block = v;
  TP_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  lim.smem_per_sm = v;
  TP_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  lim.sm_count = v;
  return lim;
}

void forward_cuda(CudaDType dtype, const ForwardCall& c, const int32_t* tables, const CudaSchedule& sched,
                  const CudaLaunch& launch) {
  CudaDeviceGuard guard(launch.device);
  auto st = static_cast<cudaStream_t>(launch.stream);
  const bool tc = launch.tensor_cores;
  switch (dtype) {
    case CudaDType::F32:
      return forward_impl<float>(*c.plan, sched, static_cast<const float*>(c.x), c.mats, tables,
                                 static_cast<float*>(c.y), c.batch, c.workspace, tc, st);
    case CudaDType::F64:
      return forward_impl<double>(*c.plan, sched, static_cast<const double*>(c.x), c.mats, tables,
                                  static_cast<double*>(c.y), c.batch, c.workspace, tc, st);
    case CudaDType::F16:
      return forward_impl<__half>(*c.plan, sched, static_cast<const __half*>(c.x), c.mats, tables,
                                  static_cast<__half*>(c.y), c.batch, c.workspace, tc, st);
    case CudaDType::BF16:
      return forward_impl<__nv_bfloat16>(*c.plan, sched, static_cast<const __nv_bfloat16*>(c.x), c.mats, tables,
                                         static_cast<__nv_bfloat16*>(c.y), c.batch, c.workspace, tc, st);
  }
}

void backward_cuda(CudaDType dtype, const BackwardCall& c, const int32_t* tables, const CudaSchedule& sched,
                   const CudaLaunch& launch) {
  CudaDeviceGuard guard(launch.device);
  auto st = static_cast<cudaStream_t>(launch.stream);
  const bool tc = launch.tensor_cores;
  switch (dtype) {
    case CudaDType::F32:
      return backward_impl<float>(*c.plan, sched, static_cast<const float*>(c.x), c.mats, tables,
                                  static_cast<const float*>(c.grad_y), static_cast<float*>(c.grad_x), c.grad_mats,
                                  c.batch, c.workspace, tc, st);
    case CudaDType::F64:
      return backward_impl<double>(*c.plan, sched, static_cast<const double*>(c.x), c.mats, tables,
                                   static_cast<const double*>(c.grad_y), static_cast<double*>(c.grad_x), c.grad_mats,
                                   c.batch, c.workspace, tc, st);
    case CudaDType::F16:
      return backward_impl<__half>(*c.plan, sched, static_cast<const __half*>(c.x), c.mats, tables,
                                   static_cast<const __half*>(c.grad_y), static_cast<__half*>(c.grad_x), c.grad_mats,
                                   c.batch, c.workspace, tc, st);
    case CudaDType::BF16:
      return backward_impl<__nv_bfloat16>(*c.plan, sched, static_cast<const __nv_bfloat16*>(c.x), c.mats, tables,
                                          static_cast<const __nv_bfloat16*>(c.grad_y),
                                          static_cast<__nv_bfloat16*>(c.grad_x), c.grad_mats, c.batch, c.workspace, tc,
                                          st);
  }
}

}  // namespace tensorpress::tt
