// Index math of the TT-matrix contraction y = x W^T, shared by the CPU and CUDA kernels.
//
// W (M x N) is held as cores G_k of shape (r_{k-1}, m_k, n_k, r_k), r_0 = r_d = 1.
// A plan absorbs the cores one at a time, in `order`, into a growing contiguous interval
// (it starts anywhere; each next core is a neighbour of the interval).
//
// The per-sample state is a tensor whose axes are named: n_k (input factor k, not yet
// contracted), m_k (output factor k, produced) and b_k (the bond between cores k and k+1,
// open while exactly one of them has been absorbed). It starts as x = [n_0 .. n_{d-1}].
// Absorbing core k is one GEMM over the whole block of samples:
//   1. permute the state so the axes the core contracts (n_k and any open bond to an
//      absorbed neighbour) are innermost, everything else (the "rows") outermost;
//   2. state (rows x K) * B_k (K x N), B_k = the core permuted to [contracted | produced];
//   3. the produced axes (a newly opened bond, m_k) are appended after the rows.
// A final permutation puts the m axes in order: y = [m_0 .. m_{d-1}].
// Permutations of an already suitable layout are identities and cost nothing.
#pragma once
#include <algorithm>
#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/permute.h"

namespace tensorpress::tt {

struct CoreDims {
  int64_t r_left, m, n, r_right;
};

// How strided_copy moves a permutation: long contiguous runs (memcpy), runs of < 16
// elements, or, where the innermost axis moves, 2-D blocked transposes against the axis that
// is contiguous in the source (a merged state always has one). Identities move nothing.
enum PermuteKind { kCopy = 0, kShortRuns = 1, kTranspose = 2, kPermuteKinds = 3 };

// A permutation of a per-sample state: dst axis i is src axis perm[i]; dims in src order.
struct Permutation {
  std::vector<int64_t> dims;
  std::vector<int> perm;
  bool identity() const {
    for (size_t i = 0; i < perm.size(); ++i)
      if (perm[i] != static_cast<int>(i)) return false;
    return true;
  }
  int64_t size() const {
    int64_t s = 1;
    for (int64_t v : dims) s *= v;
    return s;
  }
};

struct Step {
  int core;
  Permutation before;            // brings the contracted axes innermost
  int64_t rows, K, N;            // per sample: (rows x K) * (K x N)
  std::array<int, 4> core_perm;  // B = G.permute(core_perm).reshape(K, N), G axes (r_left, m, n, r_right)
  int64_t in_size() const { return rows * K; }
  int64_t out_size() const { return rows * N; }
  int64_t flops() const { return 2 * rows * K * N; }
};

struct Plan {
  std::vector<Step> steps;
  Permutation final_perm;  // the m axes into order, at the end
  int64_t in_features = 1, out_features = 1;
  int64_t max_state = 0;  // largest per-sample state anywhere in the sweep
  int64_t flops_per_sample = 0;
  // Elements the permutations move per sample, by how strided_copy (core/permute.h) runs
  // them; the cost model (python/tensorpress/ops/tt_plan.py) weighs each kind.
  std::array<int64_t, kPermuteKinds> permute_elements{};
};

inline void plan_error(const std::string& what) { throw std::invalid_argument(what); }

inline void count_permute(const Permutation& p, std::array<int64_t, kPermuteKinds>& elements) {
  if (p.identity()) return;
  const StridedCopy c = make_strided_copy(p.dims, p.perm);
  if (c.size.size() <= 1) {
    elements[kCopy] += c.numel;
    return;
  }
  if (c.stride.back() != 1)
    elements[kTranspose] += c.numel;
  else
    elements[c.size.back() >= 16 ? kCopy : kShortRuns] += c.numel;
}

inline void check_chain(const std::vector<CoreDims>& cores, const std::vector<int>& order) {
  const int d = static_cast<int>(cores.size());
  if (d < 1) plan_error("cores: expected at least one core");
  if (static_cast<int>(order.size()) != d)
    plan_error("order: expected " + std::to_string(d) + " core indices, got " + std::to_string(order.size()));
  for (int k = 0; k < d; ++k) {
    const CoreDims& c = cores[k];
    if (c.r_left < 1 || c.m < 1 || c.n < 1 || c.r_right < 1)
      plan_error("cores[" + std::to_string(k) + "]: every dimension must be >= 1");
    if (k + 1 < d && c.r_right != cores[k + 1].r_left)
      plan_error("cores[" + std::to_string(k) + "] and cores[" + std::to_string(k + 1) + "]: rank mismatch (" +
                 std::to_string(c.r_right) + " vs " + std::to_string(cores[k + 1].r_left) + ")");
  }
  if (cores.front().r_left != 1 || cores.back().r_right != 1)
    plan_error("cores: the boundary ranks r_0 and r_d must be 1");
  int lo = -1, hi = -1;
  for (int t = 0; t < d; ++t) {
    int k = order[t];
    if (k < 0 || k >= d) plan_error("order: core index " + std::to_string(k) + " out of range");
    if (t == 0) {
      lo = hi = k;
      continue;
    }
    if (k == lo - 1)
      lo = k;
    else if (k == hi + 1)
      hi = k;
    else
      plan_error("order: core " + std::to_string(k) + " is not adjacent to the absorbed interval [" +
                 std::to_string(lo) + ", " + std::to_string(hi) + "]");
  }
}

inline Plan make_plan(const std::vector<CoreDims>& cores, const std::vector<int>& order) {
  check_chain(cores, order);
  const int d = static_cast<int>(cores.size());
  // axis ids: n_k = k, m_k = d + k, bond b_k = 2d + k
  auto n_id = [](int k) { return k; };
  auto m_id = [d](int k) { return d + k; };
  auto b_id = [d](int k) { return 2 * d + k; };
  std::vector<int64_t> size(3 * d, 1);
  for (int k = 0; k < d; ++k) {
    size[n_id(k)] = cores[k].n;
    size[m_id(k)] = cores[k].m;
    if (k + 1 < d) size[b_id(k)] = cores[k].r_right;
  }

  Plan plan;
  std::vector<int> state;
  for (int k = 0; k < d; ++k) state.push_back(n_id(k)), plan.in_features *= cores[k].n;
  plan.max_state = plan.in_features;
  std::vector<bool> absorbed(d, false);

  for (int k : order) {
    const bool left_open = k > 0 && absorbed[k - 1];       // bond b_{k-1} is a state axis
    const bool right_open = k + 1 < d && absorbed[k + 1];  // bond b_k is a state axis
    auto is_contracted = [&](int id) {
      return id == n_id(k) || (left_open && id == b_id(k - 1)) || (right_open && id == b_id(k));
    };
    auto core_axis = [&](int id) { return id == n_id(k) ? 2 : id == m_id(k) ? 1 : id == b_id(k) ? 3 : 0; };

    Step s{};
    s.core = k;
    std::vector<int> rows_ids, contracted;
    std::vector<int> src_pos_rows, src_pos_contracted;
    for (size_t i = 0; i < state.size(); ++i) {
      if (is_contracted(state[i]))
        contracted.push_back(state[i]), src_pos_contracted.push_back(static_cast<int>(i));
      else
        rows_ids.push_back(state[i]), src_pos_rows.push_back(static_cast<int>(i));
    }
    for (int id : state) s.before.dims.push_back(size[id]);
    s.before.perm = src_pos_rows;
    s.before.perm.insert(s.before.perm.end(), src_pos_contracted.begin(), src_pos_contracted.end());

    std::vector<int> produced;
    if (k > 0 && !left_open) produced.push_back(b_id(k - 1));
    produced.push_back(m_id(k));
    if (k + 1 < d && !right_open) produced.push_back(b_id(k));

    // core layout: contracted axes in state order, then the rest of (r_left, m, r_right)
    // (n is always contracted and m always produced, so this is a permutation of 4 axes)
    int c = 0;
    for (int id : contracted) s.core_perm[c++] = core_axis(id);
    for (int axis : {0, 1, 3})
      if (std::find(s.core_perm.begin(), s.core_perm.begin() + c, axis) == s.core_perm.begin() + c)
        s.core_perm[c++] = axis;

    s.rows = s.K = s.N = 1;
    for (int id : rows_ids) s.rows *= size[id];
    for (int id : contracted) s.K *= size[id];
    // N counts the produced axes; boundary ranks (size 1) are among the core's output axes
    s.N = cores[k].m * (left_open ? 1 : cores[k].r_left) * (right_open ? 1 : cores[k].r_right);

    count_permute(s.before, plan.permute_elements);
    plan.flops_per_sample += s.flops();
    plan.max_state = std::max({plan.max_state, s.in_size(), s.out_size()});
    plan.steps.push_back(s);

    state = rows_ids;
    state.insert(state.end(), produced.begin(), produced.end());
    absorbed[k] = true;
  }

  for (int id : state) plan.final_perm.dims.push_back(size[id]), plan.out_features *= size[id];
  for (int k = 0; k < d; ++k)
    plan.final_perm.perm.push_back(static_cast<int>(std::find(state.begin(), state.end(), m_id(k)) - state.begin()));
  count_permute(plan.final_perm, plan.permute_elements);
  return plan;
}

}  // namespace tensorpress::tt
