// Kernels that check the CUDA emulator itself (built into _C_cuda_emu only): a correct one
// that uses every intrinsic, and deliberately broken ones, each with the defect the harness
// must catch (a missing barrier, a divergent barrier, an overrun of dynamic shared memory, a
// partial-warp mask, a launch asking more shared memory than allowed).
#include "testing/emu_selftest.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <stdexcept>
#include <type_traits>

#include "core/cuda_check.h"
#include "core/cuda_launch.h"

namespace tensorpress::testing {
namespace {

// out[blockIdx.x] = sum over the block of (blockIdx.x * n + threadIdx.x): warp shuffles for
// the warp sums, shared memory and barriers between the warps.
__global__ void block_sum_kernel(double* out) {
  TP_DYNAMIC_SHARED(double, partial);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  double v = double(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    double s = lane < warps ? partial[lane] : 0.0;
    __syncwarp();
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
    s = __shfl_sync(0xffffffffu, s, 0);
    if (lane == 0) out[blockIdx.x] = s;
  }
}

// Each thread reads its neighbour's slot with no barrier after the writes: a data race
// (ThreadSanitizer) that also reads the 0xFF poison (NaN) when the neighbour is late.
__global__ void missing_barrier_kernel(double* out) {
  TP_DYNAMIC_SHARED(double, slot);
  slot[threadIdx.x] = threadIdx.x;
  out[threadIdx.x] = slot[(threadIdx.x + 1) % blockDim.x];
}

__global__ void divergent_barrier_kernel(double* out) {
  if (threadIdx.x < blockDim.x / 2) __syncthreads();
  out[threadIdx.x] = 1.0;
}

__global__ void two_barriers_kernel(double* out) {
  if (threadIdx.x % 2 == 0)
    __syncthreads();
  else
    __syncthreads();
  out[threadIdx.x] = 1.0;
}

__global__ void smem_overrun_kernel(double* out) {
  TP_DYNAMIC_SHARED(double, slot);
  slot[threadIdx.x + 1] = 1.0;  // the launch gives blockDim.x slots: the last thread writes past them
  __syncthreads();
  out[threadIdx.x] = slot[threadIdx.x];
}

__global__ void partial_mask_kernel(double* out) { out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0, 1); }

// ---- tensor cores (nvcuda::wmma) ----
// A value in [-1, 1) with 24 significant bits (so tf32 and half rounding show), from (w, i, salt).
__device__ inline float pseudo(int w, int i, int salt) {
  uint32_t h =
      (static_cast<uint32_t>(w) * 7919u + static_cast<uint32_t>(i) * 104729u + static_cast<uint32_t>(salt) * 1299709u) *
      2654435761u;
  h ^= h >> 15;
  h *= 2246822519u;
  h ^= h >> 13;
  return static_cast<float>(h >> 8) * (1.0f / 8388608.0f) - 1.0f;
}
template <typename S>
__device__ inline S to_storage(float v) {
  return v;
}
template <>
__device__ inline __half to_storage<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ inline __nv_bfloat16 to_storage<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
__device__ inline float stored(float v) { return v; }
__device__ inline float stored(__half v) { return __half2float(v); }
__device__ inline float stored(__nv_bfloat16 v) { return __bfloat162float(v); }

enum WmmaDefect { kNoDefect, kMisaligned, kDivergentPointer, kBadLdm };
constexpr int kWmmaWarps = 4;

// Each warp w: D = A B + C with A (16 x K) row-major, B (K x 16) loaded column-major, C loaded
// row-major and D stored column-major, so every layout is exercised. out, per warp: A, B (row
// major, as stored: tf32 operands as given), C, D. round_tf32 converts the operand fragments
// with __float_to_tf32 (the documented way to feed fp32 data to tf32 tensor cores).
template <typename T, typename S, int K>
__global__ void wmma_product_kernel(double* out, bool round_tf32, int defect) {
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(32) S a_s[kWmmaWarps][16 * K + 16];
  __shared__ __align__(32) S b_s[kWmmaWarps][K * 16];
  __shared__ __align__(32) float c_s[kWmmaWarps][256];
  __shared__ __align__(32) float d_s[kWmmaWarps][256];
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  double* o = out + w * (32 * K + 512);
  for (int i = lane; i < 16 * K; i += 32) {
    a_s[w][i] = to_storage<S>(pseudo(w, i, 1));
    o[i] = stored(a_s[w][i]);
  }
  for (int i = lane; i < 16 * K; i += 32) {  // element (k, n) of B at b_s[n * K + k]
    const int k = i / 16, n = i % 16;
    b_s[w][n * K + k] = to_storage<S>(pseudo(w, i, 2));
    o[16 * K + i] = stored(b_s[w][n * K + k]);
  }
  for (int i = lane; i < 256; i += 32) o[32 * K + i] = c_s[w][i] = pseudo(w, i, 3);
  __syncthreads();  // (not __syncwarp: the partial-warp case must reach load_matrix_sync's own check)
  const S* a_ptr = a_s[w];
  unsigned lda = K;
  if (defect == kMisaligned) a_ptr += 1;
  if (defect == kDivergentPointer && lane % 2 == 1) a_ptr += 16;
  if (defect == kBadLdm) lda = K + 1;
  wmma::fragment<wmma::matrix_a, 16, 16, K, T, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, K, T, wmma::col_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, K, float> c;
  wmma::load_matrix_sync(a, a_ptr, lda);
  wmma::load_matrix_sync(b, b_s[w], K);
  wmma::load_matrix_sync(c, c_s[w], 16, wmma::mem_row_major);
  if constexpr (std::is_same<T, nvcuda::wmma::precision::tf32>::value) {
    if (round_tf32)
      for (int i = 0; i < a.num_elements; ++i) a.x[i] = wmma::__float_to_tf32(stored(a.x[i]));
    if (round_tf32)
      for (int i = 0; i < b.num_elements; ++i) b.x[i] = wmma::__float_to_tf32(stored(b.x[i]));
  }
  wmma::mma_sync(c, a, b, c);
  wmma::store_matrix_sync(d_s[w], c, 16, wmma::mem_col_major);
  __syncthreads();
  for (int i = lane; i < 256; i += 32) o[32 * K + 256 + i] = d_s[w][(i % 16) * 16 + i / 16];
}

template <typename T, typename S, int K>
void launch_wmma(int threads, std::vector<double>& out, bool round_tf32, int defect, cudaStream_t stream) {
  if (threads > 32 * kWmmaWarps) throw std::invalid_argument("threads: at most 128 for the wmma self-tests");
  out.assign(static_cast<size_t>((threads + 31) / 32) * (32 * K + 512), -1.0);
  TP_LAUNCH(1, threads, 0, stream, wmma_product_kernel<T, S, K>)(out.data(), round_tf32, defect);
}

void launch(const std::string& name, int threads, int blocks, std::vector<double>& out) {
  const size_t smem = static_cast<size_t>(threads) * sizeof(double);
  cudaStream_t stream = nullptr;
  if (name == "block_sum") {
    out.assign(blocks, -1.0);
    TP_LAUNCH(blocks, threads, 32 * sizeof(double), stream, block_sum_kernel)(out.data());
  } else if (name == "missing_barrier") {
    out.assign(threads, -1.0);
    TP_LAUNCH(1, threads, smem, stream, missing_barrier_kernel)(out.data());
  } else if (name == "divergent_barrier") {
    out.assign(threads, -1.0);
    TP_LAUNCH(1, threads, 0, stream, divergent_barrier_kernel)(out.data());
  } else if (name == "two_barriers") {
    out.assign(threads, -1.0);
    TP_LAUNCH(1, threads, 0, stream, two_barriers_kernel)(out.data());
  } else if (name == "smem_overrun") {
    out.assign(threads, -1.0);
    TP_LAUNCH(1, threads, smem, stream, smem_overrun_kernel)(out.data());
  } else if (name == "partial_mask") {
    out.assign(threads, -1.0);
    TP_LAUNCH(1, threads, 0, stream, partial_mask_kernel)(out.data());
  } else if (name == "wmma_f16") {
    launch_wmma<__half, __half, 16>(threads, out, false, kNoDefect, stream);
  } else if (name == "wmma_bf16") {
    launch_wmma<__nv_bfloat16, __nv_bfloat16, 16>(threads, out, false, kNoDefect, stream);
  } else if (name == "wmma_tf32") {
    launch_wmma<nvcuda::wmma::precision::tf32, float, 8>(threads, out, true, kNoDefect, stream);
  } else if (name == "wmma_tf32_raw") {  // fp32 data fed to tf32 fragments without conversion
    launch_wmma<nvcuda::wmma::precision::tf32, float, 8>(threads, out, false, kNoDefect, stream);
  } else if (name == "wmma_misaligned") {
    launch_wmma<__half, __half, 16>(threads, out, false, kMisaligned, stream);
  } else if (name == "wmma_divergent_pointer") {
    launch_wmma<__half, __half, 16>(threads, out, false, kDivergentPointer, stream);
  } else if (name == "wmma_bad_ldm") {
    launch_wmma<__half, __half, 16>(threads, out, false, kBadLdm, stream);
  } else if (name == "smem_over_default") {  // 64 KB without raising the kernel's attribute
    out.assign(threads, -1.0);
    TP_LAUNCH(1, threads, 64 * 1024, stream, block_sum_kernel)(out.data());
  } else {
    throw std::invalid_argument("name: unknown self-test " + name);
  }
  TP_CUDA_CHECK_LAUNCH(name.c_str(), stream);
}

}  // namespace

std::vector<double> emu_selftest(const std::string& name, int threads, int blocks) {
  std::vector<double> out;
  launch(name, threads, blocks, out);
  return out;
}

std::vector<uint16_t> emu_float_to_half(const std::vector<float>& v, bool bf16) {
  std::vector<uint16_t> out;
  for (float f : v) out.push_back(bf16 ? __float2bfloat16_rn(f).bits : __float2half_rn(f).bits);
  return out;
}

std::vector<float> emu_half_to_float(const std::vector<uint16_t>& v, bool bf16) {
  std::vector<float> out;
  for (uint16_t b : v) out.push_back(bf16 ? __bfloat162float(__nv_bfloat16{b}) : __half2float(__half{b}));
  return out;
}

}  // namespace tensorpress::testing
