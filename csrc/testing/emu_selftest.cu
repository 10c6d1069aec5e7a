// Kernels that check the CUDA emulator itself (built into _C_cuda_emu only): a correct one
// that uses every intrinsic, and deliberately broken ones, each with the defect the harness
// must catch (a missing barrier, a divergent barrier, an overrun of dynamic shared memory, a
// partial-warp mask, a launch asking more shared memory than allowed).
#include "testing/emu_selftest.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>

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
