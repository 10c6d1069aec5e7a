// Host-side geometry of the CUDA TT contraction: the gather tables and the schedule (fused or
// tiled, samples per block, grid, workspace). Header-only, CUDA-free, so the CPU-only build
// compiles it and the CPU tests check exactly what the GPU kernels will be handed.
//
// Every step of a plan (tt_plan.h) multiplies the permuted state (rows x K) by a (K x N)
// matrix. The permutation puts the contracted axes innermost, so the source offset of
// element (r, k) of the permuted state splits as row_off[r] + col_off[k]: the kernels never
// materialize the permutation, they gather through these two small tables. The final
// permutation (state -> y) is a table fsrc[j] (y[j] = state[fsrc[j]]) and its inverse
// finv[p] (used to bring grad_y into the state layout).
#pragma once
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "tt/tt_plan.h"

namespace tensorpress::tt {

constexpr int kCudaMaxSteps = 16;                                 // plans have at most d <= 16 steps
constexpr int kCudaThreads = 256;                                 // threads per block of every TT kernel
constexpr int kCudaFusedMaxSamples = 32;                          // samples per block of the fused kernels
constexpr int kCudaTileM = 64, kCudaTileN = 64, kCudaTileK = 16;  // tiled GEMM tile
// The tiled path holds its intermediates in global memory; the batch goes through in chunks
// so the workspace stays bounded (elements of the accumulation type).
constexpr int64_t kCudaTiledWorkspaceCap = int64_t(1) << 25;
// Shared memory the fused kernels stage tensor-core operand tiles in (block_gemm_tc in
// tt_cuda.cu: a 64 x 32 A tile and a 32 x 64 B tile in the operand type, padded, the 64 x 64
// float output tile and the gather indices), at its largest (tf32 operands, 4 bytes), plus 32
// bytes to align it; reserved in the fused schedule only when the call uses tensor cores.
constexpr int64_t kCudaFusedTensorCoreStaging = 36096 + 32;
// The decode path (small batches) splits each step's contraction into at most this many
// slices, so a step with few output tiles still occupies every SM (see decode_split).
constexpr int64_t kCudaDecodeMaxSplits = 32;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Offsets (in int32 entries) of each table inside the one int32 buffer.
struct TableLayout {
  std::vector<int64_t> row_off, col_off;  // per step
  int64_t fsrc = 0, finv = 0;
  int64_t total = 0;
};

// dst-major offsets of a permutation: for dst index i (row-major over permuted dims), the
// source offset. Only used to build small tables (per-sample sizes).
inline std::vector<int64_t> gather_offsets(const Permutation& p) {
  const size_t nd = p.dims.size();
  std::vector<int64_t> src_stride(nd, 1);
  for (int i = static_cast<int>(nd) - 2; i >= 0; --i) src_stride[i] = src_stride[i + 1] * p.dims[i + 1];
  std::vector<int64_t> out(static_cast<size_t>(p.size()));
  std::vector<int64_t> idx(nd, 0);
  for (int64_t i = 0; i < static_cast<int64_t>(out.size()); ++i) {
    int64_t off = 0;
    for (size_t a = 0; a < nd; ++a) off += idx[a] * src_stride[p.perm[a]];
    out[i] = off;
    for (int a = static_cast<int>(nd) - 1; a >= 0; --a) {  // odometer over dst axes
      if (++idx[a] < p.dims[p.perm[a]]) break;
      idx[a] = 0;
    }
  }
  return out;
}

inline TableLayout table_layout(const Plan& plan) {
  TableLayout t;
  for (const Step& s : plan.steps) {
    t.row_off.push_back(t.total);
    t.total += s.rows;
    t.col_off.push_back(t.total);
    t.total += s.K;
  }
  t.fsrc = t.total;
  t.total += plan.out_features;
  t.finv = t.total;
  t.total += plan.out_features;
  return t;
}

// The int32 tables the kernels gather through (see the top of this file).
inline std::vector<int32_t> make_tables(const Plan& plan) {
  const TableLayout lay = table_layout(plan);
  std::vector<int32_t> tab(static_cast<size_t>(lay.total));
  for (size_t t = 0; t < plan.steps.size(); ++t) {
    const Step& s = plan.steps[t];
    if (s.before.size() > INT32_MAX) plan_error("cores: a per-sample state exceeds 2^31 elements");
    const std::vector<int64_t> off = gather_offsets(s.before);  // (rows x K), row-major
    // off[r*K + k] = row part + col part: the col part is off[k] (r = 0), the row part off[r*K]
    for (int64_t r = 0; r < s.rows; ++r) tab[lay.row_off[t] + r] = static_cast<int32_t>(off[r * s.K]);
    for (int64_t k = 0; k < s.K; ++k) tab[lay.col_off[t] + k] = static_cast<int32_t>(off[k]);
  }
  const std::vector<int64_t> f = gather_offsets(plan.final_perm);
  for (int64_t j = 0; j < plan.out_features; ++j) {
    tab[lay.fsrc + j] = static_cast<int32_t>(f[j]);
    tab[lay.finv + f[j]] = static_cast<int32_t>(j);
  }
  return tab;
}

// What the device offers (read once per device in Python through tt_cuda_device_limits).
struct CudaLimits {
  int64_t smem_per_block = 48 * 1024;  // opt-in maximum of dynamic shared memory per block
  int64_t smem_per_sm = 100 * 1024;
  int sm_count = 1;
};

enum class CudaPath { Fused, Tiled, Decode };
inline const char* path_name(CudaPath p) {
  return p == CudaPath::Fused ? "fused" : p == CudaPath::Decode ? "decode" : "tiled";
}

struct CudaSchedule {
  CudaPath path = CudaPath::Tiled;
  bool fits_fused = false;    // whether the fused kernel fits at one sample per block
  int64_t samples = 1;        // fused: samples per block; tiled: samples per chunk
  int64_t chunks = 0;         // fused: sample blocks; tiled: chunks of the batch
  int64_t grid = 0;           // fused: blocks launched (each loops over chunks)
  int64_t smem_bytes = 0;     // fused: dynamic shared memory per block
  int64_t splits = 1;         // tiled backward: split of the core-gradient reduction
  int64_t workspace = 0;      // elements of the accumulation type the caller provides
  int64_t target_blocks = 0;  // decode: the blocks each step's launch aims for (2 per SM)
};

// How the decode path splits one step (P x K times K x N): `splits` slices of the K range,
// `per` long (a multiple of the tile depth), so that output tiles x splits reaches `target`
// blocks; each slice writes its own partial product, which the next step sums as it reads
// its operand (and the final permutation as it writes y), in a fixed order.
struct SplitK {
  int64_t splits = 1, per = 1;
};
inline SplitK decode_split(int64_t P, int64_t K, int64_t N, int64_t target) {
  const int64_t tiles = ceil_div(P, kCudaTileM) * ceil_div(N, kCudaTileN);
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(kCudaDecodeMaxSplits, ceil_div(K, kCudaTileK)));
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>(most, ceil_div(target, std::max<int64_t>(1, tiles))));
  const int64_t per = ceil_div(ceil_div(K, want), kCudaTileK) * kCudaTileK;
  return {ceil_div(K, per), per};
}

// Elements of one decode buffer: the largest step output of `samples` samples times its splits.
inline int64_t decode_buffer(const Plan& plan, int64_t samples, int64_t target) {
  int64_t most = 0;
  for (const Step& s : plan.steps)
    most = std::max(most, decode_split(samples * s.rows, s.K, s.N, target).splits * samples * s.rows * s.N);
  return most;
}

inline int64_t mats_total(const Plan& plan) {
  int64_t n = 0;
  for (const Step& s : plan.steps) n += s.K * s.N;
  return n;
}

// Row stride of a step matrix staged in shared memory: odd, so the backward's reads down a
// column (stride ld across the threads of a warp) hit distinct banks.
inline int64_t smem_ld(int64_t N) { return N % 2 == 0 ? N + 1 : N; }

inline int64_t smem_mats_total(const Plan& plan) {
  int64_t n = 0;
  for (const Step& s : plan.steps) n += s.K * smem_ld(s.N);
  return n;
}

// Per-sample elements of the fused kernels' shared memory. Forward: the state in two
// buffers. Backward: every step's input (x included, copied in), then two gradient buffers.
inline int64_t fused_per_sample(const Plan& plan, bool backward) {
  if (!backward) return 2 * plan.max_state;
  int64_t n = 2 * plan.max_state;
  for (const Step& s : plan.steps) n += s.in_size();
  return n;
}

// Per-sample elements of the tiled path's global workspace (same structure, in global memory).
inline int64_t tiled_per_sample(const Plan& plan, bool backward) { return fused_per_sample(plan, backward); }

// The schedule for one call. `path` is "auto", "fused", "tiled" or "decode" (the Python
// dispatcher passes its choice; "fused" on a plan that does not fit is an error, never a
// silent change). "decode" is an inference path: a backward asked of it runs the tiled one.
// `tensor_cores`: the fused kernels stage operand tiles for the tensor cores (their shared
// memory holds kCudaFusedTensorCoreStaging more bytes).
inline CudaSchedule cuda_schedule(const Plan& plan, int64_t batch, bool backward, int acc_bytes, const CudaLimits& lim,
                                  const std::string& path, bool tensor_cores = false) {
  if (static_cast<int>(plan.steps.size()) > kCudaMaxSteps)
    plan_error("cores: the CUDA kernel handles at most " + std::to_string(kCudaMaxSteps) + " steps");
  if (path != "auto" && path != "fused" && path != "tiled" && path != "decode")
    plan_error("path: expected 'auto', 'fused', 'tiled' or 'decode', got '" + path + "'");
  CudaSchedule c;
  const int64_t sms = std::max(1, lim.sm_count);
  if (path == "decode" && !backward) {
    c.path = CudaPath::Decode;
    c.target_blocks = 2 * sms;
    // chunks bounded as the tiled path's, counting every split's partial products
    const int64_t per_sample = 2 * kCudaDecodeMaxSplits * std::max<int64_t>(1, plan.max_state);
    c.samples =
        std::max<int64_t>(1, std::min<int64_t>(std::max<int64_t>(batch, 1), kCudaTiledWorkspaceCap / per_sample));
    c.chunks = batch == 0 ? 0 : ceil_div(batch, c.samples);
    c.workspace = 2 * decode_buffer(plan, c.samples, c.target_blocks);
    const int64_t fixed = smem_mats_total(plan) * acc_bytes;
    const int64_t per = fused_per_sample(plan, false) * acc_bytes;
    c.fits_fused = per > 0 && lim.smem_per_block > fixed && (lim.smem_per_block - fixed) / per >= 1;
    return c;
  }
  const int64_t fixed = smem_mats_total(plan) * acc_bytes + (tensor_cores ? kCudaFusedTensorCoreStaging : 0);
  const int64_t per = fused_per_sample(plan, backward) * acc_bytes;
  const int64_t fit = per > 0 && lim.smem_per_block > fixed ? (lim.smem_per_block - fixed) / per : 0;
  c.fits_fused = fit >= 1;
  if (path == "fused" && !c.fits_fused)
    plan_error("path: 'fused' was asked for but one sample's intermediates (" + std::to_string(per) +
               " bytes) and the step matrices (" + std::to_string(fixed) + " bytes) exceed the " +
               std::to_string(lim.smem_per_block) + " bytes of shared memory per block");
  c.path = (path == "tiled" || path == "decode" || !c.fits_fused) ? CudaPath::Tiled : CudaPath::Fused;
  if (c.path == CudaPath::Fused) {
    // Enough blocks to fill every SM before packing more samples into one block.
    const int64_t want = std::max<int64_t>(1, ceil_div(batch, 2 * sms));
    c.samples = std::max<int64_t>(1, std::min<int64_t>({fit, int64_t(kCudaFusedMaxSamples), want}));
    c.chunks = batch == 0 ? 0 : ceil_div(batch, c.samples);
    c.smem_bytes = fixed + c.samples * per;
    const int64_t per_sm =
        std::max<int64_t>(1, std::min<int64_t>(8, lim.smem_per_sm / std::max<int64_t>(1, c.smem_bytes)));
    // the backward's per-block gradient partials live in the workspace: bound their number
    c.grid = std::min(c.chunks, sms * per_sm);
    c.workspace = backward ? c.grid * mats_total(plan) : 0;
  } else {
    const int64_t per_elems = tiled_per_sample(plan, backward);
    c.samples = std::max<int64_t>(
        1, std::min<int64_t>(std::max<int64_t>(batch, 1), kCudaTiledWorkspaceCap / std::max<int64_t>(1, per_elems)));
    c.chunks = batch == 0 ? 0 : ceil_div(batch, c.samples);
    c.grid = 0;
    c.workspace = c.samples * per_elems;
    if (backward) {
      // Split the reduction over (samples x rows) so the core-gradient GEMMs fill the GPU;
      // each split accumulates its own slice, summed in a fixed order at the end.
      int64_t tiles = 1;
      for (const Step& s : plan.steps) tiles = std::max(tiles, ceil_div(s.K, kCudaTileM) * ceil_div(s.N, kCudaTileN));
      c.splits = std::max<int64_t>(1, std::min<int64_t>(64, ceil_div(2 * sms, tiles)));
      c.workspace += c.splits * mats_total(plan);
    }
  }
  return c;
}

}  // namespace tensorpress::tt
