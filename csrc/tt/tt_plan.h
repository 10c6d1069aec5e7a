// Index math of the TT-matrix contraction y = x W^T, shared by the CPU and CUDA kernels.
//
// W (M x N) is held as cores G_k of shape (r_{k-1}, m_k, n_k, r_k), r_0 = r_d = 1.
// A plan absorbs the cores one at a time into a growing contiguous interval [lo, hi]:
// `order` starts anywhere and each next core is the left or right neighbour of the
// interval. Per sample, the state after absorbing [lo, hi] is laid out row-major as
//     [ N_left = prod n_{<lo},  r_{lo-1},  M_int = prod m_{lo..hi},  r_hi,  N_right = prod n_{>hi} ]
// (starting from x = [N], ending at y = [M]). Every step is the same batched product
//     out[o] (P x R) = A (P x Q) * in[o] (Q x R),   o = 0 .. outer-1,
// where A is the core permuted into a (P x Q) matrix (batch-independent, done once):
//     First core s:  A = G_s as [r_{s-1} m_s r_s, n_s]       P = r_{s-1} m_s r_s, Q = n_s
//     Left  core k:  A = G_k as [r_{k-1} m_k, n_k r_k]       (G_k's own layout)
//     Right core k:  A = G_k as [m_k r_k, r_{k-1} n_k]
#pragma once
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace tensorpress::tt {

struct CoreDims {
  int64_t r_left, m, n, r_right;
};

enum class StepKind : int { First = 0, Left = 1, Right = 2 };

struct Step {
  int core;
  StepKind kind;
  int64_t outer, P, Q, R;  // per sample
  int64_t in_size() const { return outer * Q * R; }
  int64_t out_size() const { return outer * P * R; }
  int64_t flops() const { return 2 * outer * P * Q * R; }
};

struct Plan {
  std::vector<Step> steps;
  int64_t in_features = 1, out_features = 1;
  int64_t max_state = 0;        // largest per-sample state, intermediates and ends included
  int64_t saved_states = 0;     // per-sample size of the states the backward keeps (steps 1..T-1)
  int64_t flops_per_sample = 0;
};

inline void plan_error(const std::string& what) { throw std::invalid_argument(what); }

inline Plan make_plan(const std::vector<CoreDims>& cores, const std::vector<int>& order) {
  const int d = static_cast<int>(cores.size());
  if (d < 1) plan_error("cores: expected at least one core");
  if (static_cast<int>(order.size()) != d)
    plan_error("order: expected " + std::to_string(d) + " core indices, got " + std::to_string(order.size()));
  for (int k = 0; k < d; ++k) {
    const CoreDims& c = cores[k];
    if (c.r_left < 1 || c.m < 1 || c.n < 1 || c.r_right < 1)
      plan_error("cores[" + std::to_string(k) + "]: every dimension must be >= 1");
    if (k + 1 < d && c.r_right != cores[k + 1].r_left)
      plan_error("cores[" + std::to_string(k) + "] and cores[" + std::to_string(k + 1) +
                 "]: rank mismatch (" + std::to_string(c.r_right) + " vs " +
                 std::to_string(cores[k + 1].r_left) + ")");
  }
  if (cores.front().r_left != 1 || cores.back().r_right != 1)
    plan_error("cores: the boundary ranks r_0 and r_d must be 1");

  std::vector<int64_t> n_prefix(d + 1, 1), n_suffix(d + 1, 1);  // prod n_{<k}, prod n_{>=k}
  for (int k = 0; k < d; ++k) n_prefix[k + 1] = n_prefix[k] * cores[k].n;
  for (int k = d - 1; k >= 0; --k) n_suffix[k] = n_suffix[k + 1] * cores[k].n;

  Plan plan;
  plan.in_features = n_prefix[d];
  plan.max_state = plan.in_features;
  int lo = order[0], hi = order[0];
  if (lo < 0 || lo >= d) plan_error("order: core index out of range");
  int64_t m_int = 1;
  for (int t = 0; t < d; ++t) {
    Step s{};
    int k = order[t];
    const CoreDims& c = cores[k];
    if (t == 0) {
      s = {k, StepKind::First, n_prefix[k], c.r_left * c.m * c.r_right, c.n, n_suffix[k + 1]};
    } else if (k == lo - 1) {
      s = {k, StepKind::Left, n_prefix[k], c.r_left * c.m, c.n * c.r_right,
           m_int * cores[hi].r_right * n_suffix[hi + 1]};
      lo = k;
    } else if (k == hi + 1) {
      s = {k, StepKind::Right, n_prefix[lo] * cores[lo].r_left * m_int, c.m * c.r_right,
           c.r_left * c.n, n_suffix[k + 1]};
      hi = k;
    } else {
      plan_error("order: core " + std::to_string(k) + " is not adjacent to the absorbed interval [" +
                 std::to_string(lo) + ", " + std::to_string(hi) + "]");
    }
    m_int *= c.m;
    plan.steps.push_back(s);
    plan.flops_per_sample += s.flops();
    plan.max_state = std::max(plan.max_state, s.out_size());
    if (t + 1 < d) plan.saved_states += s.out_size();
  }
  plan.out_features = m_int;
  return plan;
}

}  // namespace tensorpress::tt
