#include "tt/tt_cpu.h"

#include <algorithm>
#include <cstring>

#include "core/blas.h"
#include "core/thread_pool.h"

namespace tensorpress::tt {
namespace {

// A block's intermediates (and, for the backward, all its saved states) should stay in
// the per-core L2 cache; this is the budget per worker.
constexpr int64_t kCacheBudgetBytes = 1 << 20;

// One step of the plan applied to `samples` consecutive per-sample states.
template <typename T>
struct StepKernel {
  const Step& s;
  const T* A;  // P x Q

  // out[o] = A in[o]
  void forward(const T* in, T* out, int64_t samples) const {
    const int64_t rows = samples * s.outer;
    if (s.R == 1) {  // all samples at once: OUT (rows x P) = IN (rows x Q) A^T
      blas::gemm(false, true, rows, s.P, s.Q, T(1), in, s.Q, A, s.Q, T(0), out, s.P);
      return;
    }
    for (int64_t o = 0; o < rows; ++o)
      blas::gemm(false, false, s.P, s.R, s.Q, T(1), A, s.Q, in + o * s.Q * s.R, s.R, T(0),
                 out + o * s.P * s.R, s.R);
  }

  // d_in[o] = A^T d_out[o]
  void backward_input(const T* d_out, T* d_in, int64_t samples) const {
    const int64_t rows = samples * s.outer;
    if (s.R == 1) {
      blas::gemm(false, false, rows, s.Q, s.P, T(1), d_out, s.P, A, s.Q, T(0), d_in, s.Q);
      return;
    }
    for (int64_t o = 0; o < rows; ++o)
      blas::gemm(true, false, s.Q, s.R, s.P, T(1), A, s.Q, d_out + o * s.P * s.R, s.R, T(0),
                 d_in + o * s.Q * s.R, s.R);
  }

  // dA += sum_o d_out[o] in[o]^T
  void backward_matrix(const T* d_out, const T* in, T* dA, int64_t samples) const {
    const int64_t rows = samples * s.outer;
    if (s.R == 1) {
      blas::gemm(true, false, s.P, s.Q, rows, T(1), d_out, s.P, in, s.Q, T(1), dA, s.Q);
      return;
    }
    for (int64_t o = 0; o < rows; ++o)
      blas::gemm(false, true, s.P, s.Q, s.R, T(1), d_out + o * s.P * s.R, s.R,
                 in + o * s.Q * s.R, s.R, T(1), dA, s.Q);
  }
};

int64_t mats_size(const Plan& plan) {
  int64_t n = 0;
  for (const Step& s : plan.steps) n += s.P * s.Q;
  return n;
}

}  // namespace

CpuSchedule cpu_schedule(const Plan& plan, int64_t batch, int threads, bool backward, int elem_bytes) {
  blas::use_single_threaded_gemm();
  CpuSchedule c;
  const int64_t per_sample = backward ? plan.saved_states + 2 * plan.max_state : 2 * plan.max_state;
  const int64_t budget = std::max<int64_t>(1, kCacheBudgetBytes / elem_bytes);
  threads = std::max(1, threads);
  const int64_t share = (batch + threads - 1) / std::max<int64_t>(1, threads);
  c.block = std::max<int64_t>(1, std::min<int64_t>(budget / std::max<int64_t>(1, per_sample), share));
  c.n_blocks = batch == 0 ? 0 : (batch + c.block - 1) / c.block;
  c.threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, c.n_blocks)));
  c.per_thread = c.block * per_sample;
  c.workspace = c.threads * c.per_thread + (backward ? c.threads * mats_size(plan) : 0);
  return c;
}

template <typename T>
void forward_cpu(const Plan& plan, const T* x, const std::vector<const T*>& mats, T* y,
                 int64_t batch, T* workspace, const CpuSchedule& c) {
  const int64_t N = plan.in_features, M = plan.out_features;
  const size_t n_steps = plan.steps.size();
  parallel_for(static_cast<int>(c.n_blocks), c.threads, [&](int block, int worker) {
    const int64_t b0 = block * c.block, nb = std::min(c.block, batch - b0);
    T* ping = workspace + worker * c.per_thread;
    T* pong = ping + c.block * plan.max_state;
    const T* in = x + b0 * N;
    for (size_t t = 0; t < n_steps; ++t) {
      T* out = (t + 1 == n_steps) ? y + b0 * M : (t % 2 == 0 ? ping : pong);
      StepKernel<T>{plan.steps[t], mats[t]}.forward(in, out, nb);
      in = out;
    }
  });
}

template <typename T>
void backward_cpu(const Plan& plan, const T* x, const std::vector<const T*>& mats, const T* grad_y,
                  T* grad_x, const std::vector<T*>& grad_mats, int64_t batch, T* workspace,
                  const CpuSchedule& c) {
  const int64_t N = plan.in_features, M = plan.out_features;
  const int n_steps = static_cast<int>(plan.steps.size());

  // The lowest step whose input gradient is still needed; below it the sweep stops.
  int lowest = n_steps;
  for (int t = 0; t < n_steps; ++t)
    if (grad_mats[t] != nullptr) { lowest = t; break; }
  if (grad_x != nullptr) lowest = 0;
  if (lowest == n_steps) return;

  // Per-worker partial sums of the matrix gradients, reduced in a fixed order at the end
  // (deterministic, no atomics).
  T* partials = workspace + c.threads * c.per_thread;
  const int64_t mats_total = mats_size(plan);
  std::memset(partials, 0, sizeof(T) * c.threads * mats_total);
  std::vector<int64_t> mat_offset(n_steps + 1, 0);
  for (int t = 0; t < n_steps; ++t) mat_offset[t + 1] = mat_offset[t] + plan.steps[t].P * plan.steps[t].Q;

  const int64_t blocks_per_worker = (c.n_blocks + c.threads - 1) / c.threads;
  parallel_for(c.threads, c.threads, [&](int worker, int) {
    T* base = workspace + worker * c.per_thread;
    T* partial = partials + worker * mats_total;
    for (int64_t block = worker * blocks_per_worker;
         block < std::min(c.n_blocks, (worker + 1) * blocks_per_worker); ++block) {
      const int64_t b0 = block * c.block, nb = std::min(c.block, batch - b0);
      // Recompute the forward states of this block (step t's input is states[t]).
      std::vector<const T*> states(n_steps);
      states[0] = x + b0 * N;
      T* cursor = base;
      for (int t = 0; t + 1 < n_steps; ++t) {
        StepKernel<T>{plan.steps[t], mats[t]}.forward(states[t], cursor, nb);
        states[t + 1] = cursor;
        cursor += c.block * plan.steps[t].out_size();
      }
      T* grad_a = cursor;
      T* grad_b = cursor + c.block * plan.max_state;
      const T* g = grad_y + b0 * M;
      for (int t = n_steps - 1; t >= lowest; --t) {
        StepKernel<T> step{plan.steps[t], mats[t]};
        if (grad_mats[t] != nullptr) step.backward_matrix(g, states[t], partial + mat_offset[t], nb);
        if (t == lowest && !(t == 0 && grad_x != nullptr)) break;
        T* dst = t == 0 ? grad_x + b0 * N : ((n_steps - 1 - t) % 2 == 0 ? grad_a : grad_b);
        step.backward_input(g, dst, nb);
        g = dst;
      }
    }
  });

  for (int t = 0; t < n_steps; ++t) {
    if (grad_mats[t] == nullptr) continue;
    const int64_t size = mat_offset[t + 1] - mat_offset[t];
    T* out = grad_mats[t];
    std::memcpy(out, partials + mat_offset[t], sizeof(T) * size);
    for (int w = 1; w < c.threads; ++w) {
      const T* p = partials + w * mats_total + mat_offset[t];
      for (int64_t i = 0; i < size; ++i) out[i] += p[i];
    }
  }
}

template void forward_cpu<float>(const Plan&, const float*, const std::vector<const float*>&, float*,
                                 int64_t, float*, const CpuSchedule&);
template void forward_cpu<double>(const Plan&, const double*, const std::vector<const double*>&, double*,
                                  int64_t, double*, const CpuSchedule&);
template void backward_cpu<float>(const Plan&, const float*, const std::vector<const float*>&,
                                  const float*, float*, const std::vector<float*>&, int64_t, float*,
                                  const CpuSchedule&);
template void backward_cpu<double>(const Plan&, const double*, const std::vector<const double*>&,
                                   const double*, double*, const std::vector<double*>&, int64_t,
                                   double*, const CpuSchedule&);

}  // namespace tensorpress::tt
