#include "tt/tt_cpu.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "core/blas.h"
#include "core/permute.h"
#include "core/thread_pool.h"

namespace tensorpress::tt {
namespace {

// Per worker, a block's buffers (and, in the backward, its saved GEMM inputs) should stay in
// the core's L2 cache; larger blocks give larger GEMMs. Measured on a 1 MiB-L2 EPYC: 1 MiB
// for the forward and half that for the backward (whose GEMMs also stream the gradient
// partials) beat 2 MiB by 1.5-2x. TENSORPRESS_CPU_BLOCK_BYTES overrides the forward's
// figure (for tuning on other CPUs).
int64_t cache_budget_bytes(bool backward) {
  static const int64_t budget = [] {
    const char* env = std::getenv("TENSORPRESS_CPU_BLOCK_BYTES");
    const int64_t v = env ? std::atoll(env) : 0;
    return v > 0 ? v : int64_t(1) << 20;
  }();
  return backward ? budget / 2 : budget;
}

// The permutations of a plan, ready to run forwards and backwards.
struct Copies {
  std::vector<StridedCopy> before, before_inverse;
  StridedCopy final_copy, final_inverse;

  explicit Copies(const Plan& plan) {
    for (const Step& s : plan.steps) {
      before.push_back(make_strided_copy(s.before.dims, s.before.perm));
      before_inverse.push_back(
          make_strided_copy(permuted_dims(s.before.dims, s.before.perm), inverse_perm(s.before.perm)));
    }
    final_copy = make_strided_copy(plan.final_perm.dims, plan.final_perm.perm);
    final_inverse = make_strided_copy(permuted_dims(plan.final_perm.dims, plan.final_perm.perm),
                                      inverse_perm(plan.final_perm.perm));
  }
};

int64_t mats_size(const Plan& plan) {
  int64_t n = 0;
  for (const Step& s : plan.steps) n += s.K * s.N;
  return n;
}

// Per-sample elements the backward keeps: each step's GEMM input, except step 0's when it is
// x itself.
int64_t saved_per_sample(const Plan& plan) {
  int64_t n = 0;
  for (size_t t = 0; t < plan.steps.size(); ++t)
    if (t > 0 || !plan.steps[t].before.identity()) n += plan.steps[t].in_size();
  return n;
}

template <typename T>
T* other(T* p, T* a, T* b) {
  return p == a ? b : a;
}

// y[i, :] += bias for `rows` rows of `cols`: done per block, while the block's rows are in cache.
template <typename T>
void add_bias(T* __restrict y, const T* __restrict bias, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i, y += cols)
    for (int64_t j = 0; j < cols; ++j) y[j] += bias[j];
}

// sums[j] += sum_i g[i, j]: the bias gradient of a block.
template <typename T>
void add_column_sums(const T* __restrict g, T* __restrict sums, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i, g += cols)
    for (int64_t j = 0; j < cols; ++j) sums[j] += g[j];
}

}  // namespace

CpuSchedule cpu_schedule(const Plan& plan, int64_t batch, int threads, bool backward, int elem_bytes) {
  blas::use_single_threaded_gemm();
  CpuSchedule c;
  const int64_t per_sample = backward ? saved_per_sample(plan) + 3 * plan.max_state : 2 * plan.max_state;
  const int64_t budget = std::max<int64_t>(1, cache_budget_bytes(backward) / elem_bytes);
  threads = std::max(1, threads);
  const int64_t share = (batch + threads - 1) / threads;
  c.block = std::max<int64_t>(1, std::min<int64_t>(budget / std::max<int64_t>(1, per_sample), share));
  c.n_blocks = batch == 0 ? 0 : (batch + c.block - 1) / c.block;
  c.threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, c.n_blocks)));
  c.per_thread = c.block * per_sample;
  // the backward's per-worker partial sums: every step matrix, then the bias
  c.workspace = c.threads * c.per_thread + (backward ? c.threads * (mats_size(plan) + plan.out_features) : 0);
  return c;
}

template <typename T>
void forward_blocks(const Plan& plan, const T* x, const std::vector<const T*>& mats, const T* bias, T* y, int64_t batch,
                    T* workspace, const CpuSchedule& c) {
  const int64_t N_in = plan.in_features, M_out = plan.out_features;
  const size_t n_steps = plan.steps.size();
  const Copies copies(plan);
  const bool final_identity = plan.final_perm.identity();
  parallel_for(static_cast<int>(c.n_blocks), c.threads, [&](int block, int worker) {
    const int64_t b0 = block * c.block, nb = std::min(c.block, batch - b0);
    T* buf_a = workspace + worker * c.per_thread;
    T* buf_b = buf_a + c.block * plan.max_state;
    const T* state = x + b0 * N_in;
    for (size_t t = 0; t < n_steps; ++t) {
      const Step& s = plan.steps[t];
      const T* in = state;
      if (!s.before.identity()) {
        T* dst = other(const_cast<T*>(state), buf_a, buf_b);
        strided_copy(state, dst, copies.before[t], nb);
        in = dst;
      }
      T* out = (t + 1 == n_steps && final_identity) ? y + b0 * M_out : other(const_cast<T*>(in), buf_a, buf_b);
      blas::gemm(false, false, nb * s.rows, s.N, s.K, T(1), in, s.K, mats[t], s.N, T(0), out, s.N);
      state = out;
    }
    if (!final_identity) strided_copy(state, y + b0 * M_out, copies.final_copy, nb);
    if (bias != nullptr) add_bias(y + b0 * M_out, bias, nb, M_out);
  });
}

template <typename T>
void backward_blocks(const Plan& plan, const T* x, const std::vector<const T*>& mats, const T* grad_y, T* grad_x,
                     const std::vector<T*>& grad_mats, T* grad_bias, int64_t batch, T* workspace,
                     const CpuSchedule& c) {
  const int64_t N_in = plan.in_features, M_out = plan.out_features;
  const int n_steps = static_cast<int>(plan.steps.size());
  const Copies copies(plan);

  // The lowest step whose input gradient is still needed; below it the sweep stops.
  int lowest = n_steps;
  for (int t = 0; t < n_steps; ++t)
    if (grad_mats[t] != nullptr) {
      lowest = t;
      break;
    }
  if (grad_x != nullptr) lowest = 0;
  if (lowest == n_steps && grad_bias == nullptr) return;

  // Per-worker partial sums of the matrix (and bias) gradients, reduced in a fixed order at
  // the end (deterministic for a given thread count, no atomics).
  T* partials = workspace + c.threads * c.per_thread;
  const int64_t mats_total = mats_size(plan), partial_size = mats_total + M_out;
  std::memset(partials, 0, sizeof(T) * c.threads * partial_size);
  std::vector<int64_t> mat_offset(n_steps + 1, 0);
  for (int t = 0; t < n_steps; ++t) mat_offset[t + 1] = mat_offset[t] + plan.steps[t].K * plan.steps[t].N;

  const int64_t blocks_per_worker = (c.n_blocks + c.threads - 1) / c.threads;
  parallel_for(c.threads, c.threads, [&](int worker, int) {
    T* base = workspace + worker * c.per_thread;
    T* partial = partials + worker * partial_size;
    const int64_t first = worker * blocks_per_worker;
    const int64_t last = std::min(c.n_blocks, first + blocks_per_worker);
    for (int64_t block = first; block < last; ++block) {
      const int64_t b0 = block * c.block, nb = std::min(c.block, batch - b0);
      if (grad_bias != nullptr) add_column_sums(grad_y + b0 * M_out, partial + mats_total, nb, M_out);
      if (lowest == n_steps) continue;
      // Slots for each step's GEMM input, then three state-sized buffers.
      std::vector<T*> slot(n_steps, nullptr);
      T* cursor = base;
      for (int t = 0; t < n_steps; ++t)
        if (t > 0 || !plan.steps[t].before.identity()) slot[t] = cursor, cursor += c.block * plan.steps[t].in_size();
      T* scratch = cursor;
      T* grad_a = scratch + c.block * plan.max_state;
      T* grad_b = grad_a + c.block * plan.max_state;

      // Recompute this block's forward, keeping every step's (permuted) GEMM input.
      std::vector<const T*> saved(n_steps);
      const T* state = x + b0 * N_in;
      for (int t = 0; t < n_steps; ++t) {
        const Step& s = plan.steps[t];
        if (s.before.identity()) {
          saved[t] = state;
        } else {
          strided_copy(state, slot[t], copies.before[t], nb);
          saved[t] = slot[t];
        }
        if (t + 1 == n_steps) break;
        T* out = plan.steps[t + 1].before.identity() ? slot[t + 1] : scratch;
        blas::gemm(false, false, nb * s.rows, s.N, s.K, T(1), saved[t], s.K, mats[t], s.N, T(0), out, s.N);
        state = out;
      }

      // Sweep back: dB_t += T_t^T G;  dT_t = G B_t^T;  G_prev = inverse permutation of dT_t.
      const T* g = grad_y + b0 * M_out;
      if (!plan.final_perm.identity()) {
        strided_copy(g, grad_a, copies.final_inverse, nb);
        g = grad_a;
      }
      for (int t = n_steps - 1; t >= lowest; --t) {
        const Step& s = plan.steps[t];
        const int64_t rows = nb * s.rows;
        if (grad_mats[t] != nullptr)
          blas::gemm(true, false, s.K, s.N, rows, T(1), saved[t], s.K, g, s.N, T(1), partial + mat_offset[t], s.N);
        if (t == lowest && !(t == 0 && grad_x != nullptr)) break;
        T* dest = t == 0 ? grad_x + b0 * N_in : other(const_cast<T*>(g), grad_a, grad_b);
        if (s.before.identity()) {
          blas::gemm(false, true, rows, s.K, s.N, T(1), g, s.N, mats[t], s.N, T(0), dest, s.K);
        } else {
          blas::gemm(false, true, rows, s.K, s.N, T(1), g, s.N, mats[t], s.N, T(0), scratch, s.K);
          strided_copy(static_cast<const T*>(scratch), dest, copies.before_inverse[t], nb);
        }
        g = dest;
      }
    }
  });

  auto reduce = [&](T* out, int64_t offset, int64_t size) {
    std::memcpy(out, partials + offset, sizeof(T) * size);
    for (int w = 1; w < c.threads; ++w) {
      const T* p = partials + w * partial_size + offset;
      for (int64_t i = 0; i < size; ++i) out[i] += p[i];
    }
  };
  for (int t = 0; t < n_steps; ++t)
    if (grad_mats[t] != nullptr) reduce(grad_mats[t], mat_offset[t], mat_offset[t + 1] - mat_offset[t]);
  if (grad_bias != nullptr) reduce(grad_bias, mats_total, M_out);
}

template <typename T>
void forward_cpu(const ForwardCall& call, const CpuSchedule& schedule) {
  std::vector<const T*> mats;
  for (const void* m : call.mats) mats.push_back(static_cast<const T*>(m));
  forward_blocks<T>(*call.plan, static_cast<const T*>(call.x), mats, static_cast<const T*>(call.bias),
                    static_cast<T*>(call.y), call.batch, static_cast<T*>(call.workspace), schedule);
}

template <typename T>
void backward_cpu(const BackwardCall& call, const CpuSchedule& schedule) {
  std::vector<const T*> mats;
  for (const void* m : call.mats) mats.push_back(static_cast<const T*>(m));
  std::vector<T*> grad_mats(mats.size(), nullptr);  // empty: no step-matrix gradient asked for
  for (size_t t = 0; t < call.grad_mats.size(); ++t) grad_mats[t] = static_cast<T*>(call.grad_mats[t]);
  backward_blocks<T>(*call.plan, static_cast<const T*>(call.x), mats, static_cast<const T*>(call.grad_y),
                     static_cast<T*>(call.grad_x), grad_mats, static_cast<T*>(call.grad_bias), call.batch,
                     static_cast<T*>(call.workspace), schedule);
}

template void forward_cpu<float>(const ForwardCall&, const CpuSchedule&);
template void forward_cpu<double>(const ForwardCall&, const CpuSchedule&);
template void backward_cpu<float>(const BackwardCall&, const CpuSchedule&);
template void backward_cpu<double>(const BackwardCall&, const CpuSchedule&);

}  // namespace tensorpress::tt
