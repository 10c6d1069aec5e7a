// tensorpress._C: thin bindings. Validates what crosses the boundary, then dispatches.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "core/tensor_view.h"
#include "svd/jacobi_cpu.h"
#include "svd/jacobi_sweeps.h"
#include "tt/tt_cpu.h"
#include "tt/tt_plan.h"
#if TENSORPRESS_WITH_CUDA
#include "core/cuda_info.h"
#endif

namespace py = pybind11;
using namespace tensorpress;

namespace {

std::vector<tt::CoreDims> parse_core_dims(const std::vector<int64_t>& flat) {
  require(!flat.empty() && flat.size() % 4 == 0,
          "core_dims: expected 4 integers (r_left, m, n, r_right) per core, got " +
              std::to_string(flat.size()) + " integers");
  std::vector<tt::CoreDims> cores;
  for (size_t i = 0; i < flat.size(); i += 4) cores.push_back({flat[i], flat[i + 1], flat[i + 2], flat[i + 3]});
  return cores;
}

tt::Plan plan_from(const std::vector<int64_t>& core_dims, const std::vector<int>& order) {
  try {
    return tt::make_plan(parse_core_dims(core_dims), order);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

void expect_shape(const TensorView& v, const std::vector<int64_t>& shape, const std::string& name) {
  require(v.shape == shape, name + ": expected shape " + shape_str(shape) + ", got " + shape_str(v.shape));
}

void expect_like(const TensorView& v, DType dtype, const std::string& name) {
  require(v.device == Device::CPU, name + ": expected a CPU tensor (the CUDA TT kernel is not built yet)");
  require(v.dtype == dtype, name + ": expected dtype " + dtype_name(dtype) + ", got " + dtype_name(v.dtype));
}

// Everything a TT call receives, borrowed and checked against the plan.
struct TTArgs {
  tt::Plan plan;
  std::vector<BorrowedTensor> held;
  DType dtype = DType::Other;
  int64_t batch = 0;

  const TensorView& add(const py::object& t, const std::string& name) {
    held.emplace_back(t, name);
    return held.back().view();
  }
};

template <typename T>
std::vector<T*> pointers(const std::vector<const TensorView*>& views) {
  std::vector<T*> out;
  for (const TensorView* v : views) out.push_back(v ? v->ptr<T>() : nullptr);
  return out;
}

void tt_forward(const py::object& x, const py::list& mats, const std::vector<int64_t>& core_dims,
                const std::vector<int>& order, const py::object& y, const py::object& workspace, int threads) {
  tt::Plan plan = plan_from(core_dims, order);
  BorrowedTensor xb(x, "x"), yb(y, "out"), wb(workspace, "workspace");
  const TensorView &xv = xb.view(), &yv = yb.view(), &wv = wb.view();
  require(xv.dtype == DType::Float32 || xv.dtype == DType::Float64,
          "x: expected dtype float32 or float64, got " + std::string(dtype_name(xv.dtype)));
  expect_like(xv, xv.dtype, "x");
  require(xv.shape.size() == 2 && xv.shape[1] == plan.in_features,
          "x: expected shape (batch, " + std::to_string(plan.in_features) + "), got " + shape_str(xv.shape));
  const int64_t batch = xv.shape[0];
  expect_like(yv, xv.dtype, "out");
  expect_shape(yv, {batch, plan.out_features}, "out");
  require(py::len(mats) == plan.steps.size(), "mats: expected " + std::to_string(plan.steps.size()) +
                                                   " step matrices, got " + std::to_string(py::len(mats)));
  std::vector<BorrowedTensor> held;
  held.reserve(plan.steps.size());
  std::vector<const TensorView*> mat_views;
  for (size_t t = 0; t < plan.steps.size(); ++t) {
    std::string name = "mats[" + std::to_string(t) + "]";
    held.emplace_back(mats[t], name);
    expect_like(held.back().view(), xv.dtype, name);
    expect_shape(held.back().view(), {plan.steps[t].K, plan.steps[t].N}, name);
    mat_views.push_back(&held.back().view());
  }
  const int elem = xv.dtype == DType::Float32 ? 4 : 8;
  tt::CpuSchedule sched = tt::cpu_schedule(plan, batch, threads, false, elem);
  expect_like(wv, xv.dtype, "workspace");
  require(wv.numel() >= sched.workspace, "workspace: expected at least " + std::to_string(sched.workspace) +
                                             " elements, got " + std::to_string(wv.numel()));
  py::gil_scoped_release release;
  if (xv.dtype == DType::Float32) {
    auto m = pointers<float>(mat_views);
    tt::forward_cpu<float>(plan, xv.ptr<float>(), {m.begin(), m.end()}, yv.ptr<float>(), batch,
                           wv.ptr<float>(), sched);
  } else {
    auto m = pointers<double>(mat_views);
    tt::forward_cpu<double>(plan, xv.ptr<double>(), {m.begin(), m.end()}, yv.ptr<double>(), batch,
                            wv.ptr<double>(), sched);
  }
}

void tt_backward(const py::object& x, const py::list& mats, const std::vector<int64_t>& core_dims,
                 const std::vector<int>& order, const py::object& grad_y, const py::object& grad_x,
                 const py::list& grad_mats, const py::object& workspace, int threads) {
  tt::Plan plan = plan_from(core_dims, order);
  BorrowedTensor xb(x, "x"), gyb(grad_y, "grad_out"), wb(workspace, "workspace");
  const TensorView &xv = xb.view(), &gyv = gyb.view(), &wv = wb.view();
  require(xv.dtype == DType::Float32 || xv.dtype == DType::Float64,
          "x: expected dtype float32 or float64, got " + std::string(dtype_name(xv.dtype)));
  expect_like(xv, xv.dtype, "x");
  require(xv.shape.size() == 2 && xv.shape[1] == plan.in_features,
          "x: expected shape (batch, " + std::to_string(plan.in_features) + "), got " + shape_str(xv.shape));
  const int64_t batch = xv.shape[0];
  expect_like(gyv, xv.dtype, "grad_out");
  expect_shape(gyv, {batch, plan.out_features}, "grad_out");
  const size_t n_steps = plan.steps.size();
  require(py::len(mats) == n_steps && py::len(grad_mats) == n_steps,
          "mats, grad_mats: expected " + std::to_string(n_steps) + " step matrices each");

  std::vector<BorrowedTensor> held;
  held.reserve(2 * n_steps + 1);
  std::vector<const TensorView*> mat_views, grad_views;
  for (size_t t = 0; t < n_steps; ++t) {
    const std::vector<int64_t> shape{plan.steps[t].K, plan.steps[t].N};
    std::string name = "mats[" + std::to_string(t) + "]";
    held.emplace_back(mats[t], name);
    expect_like(held.back().view(), xv.dtype, name);
    expect_shape(held.back().view(), shape, name);
    mat_views.push_back(&held.back().view());
    if (grad_mats[t].is_none()) {
      grad_views.push_back(nullptr);
    } else {
      name = "grad_mats[" + std::to_string(t) + "]";
      held.emplace_back(grad_mats[t], name);
      expect_like(held.back().view(), xv.dtype, name);
      expect_shape(held.back().view(), shape, name);
      grad_views.push_back(&held.back().view());
    }
  }
  const TensorView* gxv = nullptr;
  if (!grad_x.is_none()) {
    held.emplace_back(grad_x, "grad_x");
    gxv = &held.back().view();
    expect_like(*gxv, xv.dtype, "grad_x");
    expect_shape(*gxv, xv.shape, "grad_x");
  }
  const int elem = xv.dtype == DType::Float32 ? 4 : 8;
  tt::CpuSchedule sched = tt::cpu_schedule(plan, batch, threads, true, elem);
  expect_like(wv, xv.dtype, "workspace");
  require(wv.numel() >= sched.workspace, "workspace: expected at least " + std::to_string(sched.workspace) +
                                             " elements, got " + std::to_string(wv.numel()));
  py::gil_scoped_release release;
  if (xv.dtype == DType::Float32) {
    auto m = pointers<float>(mat_views);
    tt::backward_cpu<float>(plan, xv.ptr<float>(), {m.begin(), m.end()}, gyv.ptr<float>(),
                            gxv ? gxv->ptr<float>() : nullptr, pointers<float>(grad_views), batch,
                            wv.ptr<float>(), sched);
  } else {
    auto m = pointers<double>(mat_views);
    tt::backward_cpu<double>(plan, xv.ptr<double>(), {m.begin(), m.end()}, gyv.ptr<double>(),
                             gxv ? gxv->ptr<double>() : nullptr, pointers<double>(grad_views), batch,
                             wv.ptr<double>(), sched);
  }
}

py::dict permutation_dict(const tt::Permutation& p) {
  py::dict d;
  d["dims"] = p.dims;
  d["perm"] = p.perm;
  d["identity"] = p.identity();
  return d;
}

// The plan's geometry, for the cost model and the pure-PyTorch execution of the same plan.
py::dict tt_plan_info(const std::vector<int64_t>& core_dims, const std::vector<int>& order) {
  tt::Plan plan = plan_from(core_dims, order);
  py::list steps;
  for (const tt::Step& s : plan.steps) {
    py::dict d;
    d["core"] = s.core;
    d["before"] = permutation_dict(s.before);
    d["rows"] = s.rows;
    d["K"] = s.K;
    d["N"] = s.N;
    d["core_perm"] = std::vector<int>(s.core_perm.begin(), s.core_perm.end());
    d["flops"] = s.flops();
    steps.append(d);
  }
  py::dict info;
  info["steps"] = steps;
  info["final"] = permutation_dict(plan.final_perm);
  info["in_features"] = plan.in_features;
  info["out_features"] = plan.out_features;
  info["flops_per_sample"] = plan.flops_per_sample;
  info["permute_cost_per_sample"] = plan.permute_cost_per_sample;
  info["max_state"] = plan.max_state;
  return info;
}

int64_t tt_workspace_size(const std::vector<int64_t>& core_dims, const std::vector<int>& order,
                          int64_t batch, int threads, bool backward, int elem_bytes) {
  return tt::cpu_schedule(plan_from(core_dims, order), batch, threads, backward, elem_bytes).workspace;
}

// Batched one-sided Jacobi SVD: a (batch, m, n) -> u (batch, m, k), s (batch, k), vh (batch, k, n).
int svd_jacobi(const py::object& a, const py::object& u, const py::object& s, const py::object& vh,
               const py::object& workspace, double tol, int max_sweeps, int threads) {
  BorrowedTensor ab(a, "A"), ub(u, "U"), sb(s, "S"), vb(vh, "Vh"), wb(workspace, "workspace");
  const TensorView &av = ab.view(), &uv = ub.view(), &sv = sb.view(), &vv = vb.view(), &wv = wb.view();
  require(av.dtype == DType::Float32 || av.dtype == DType::Float64,
          "A: expected dtype float32 or float64, got " + std::string(dtype_name(av.dtype)));
  require(av.device == Device::CPU, "A: expected a CPU tensor (the CUDA Jacobi SVD is not built yet)");
  require(av.shape.size() == 3, "A: expected shape (batch, m, n), got " + shape_str(av.shape));
  const int64_t batch = av.shape[0], m = av.shape[1], n = av.shape[2], k = std::min(m, n);
  for (auto [view, name] : {std::pair{&uv, "U"}, {&sv, "S"}, {&vv, "Vh"}}) expect_like(*view, av.dtype, name);
  expect_shape(uv, {batch, m, k}, "U");
  expect_shape(sv, {batch, k}, "S");
  expect_shape(vv, {batch, k, n}, "Vh");
  require(wv.dtype == DType::Float64 && wv.device == Device::CPU, "workspace: expected a float64 CPU tensor");
  const int64_t need = svd::jacobi_workspace_size(m, n, threads);
  require(wv.numel() >= need, "workspace: expected at least " + std::to_string(need) + " elements, got " +
                                  std::to_string(wv.numel()));
  require(tol > 0 && max_sweeps >= 1, "tol, max_sweeps: expected tol > 0 and max_sweeps >= 1");
  const svd::JacobiParams params{tol, max_sweeps};
  py::gil_scoped_release release;
  if (av.dtype == DType::Float32)
    return svd::jacobi_svd_cpu<float>(av.ptr<float>(), uv.ptr<float>(), sv.ptr<float>(), vv.ptr<float>(), batch,
                                      m, n, params, wv.ptr<double>(), threads);
  return svd::jacobi_svd_cpu<double>(av.ptr<double>(), uv.ptr<double>(), sv.ptr<double>(), vv.ptr<double>(),
                                     batch, m, n, params, wv.ptr<double>(), threads);
}

py::dict build_info() {
  py::dict d;
  d["cxx_compiler"] = TENSORPRESS_CXX_COMPILER;
  d["blas"] = "OpenBLAS (scipy-openblas32)";
  d["jacobi_isa"] = svd::jacobi_isa();
#if TENSORPRESS_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = TENSORPRESS_CUDA_ARCHS;
  d["cuda_compiler"] = TENSORPRESS_CUDA_COMPILER;
  d["cuda_runtime"] = cuda_runtime_version();
  int n = cuda_device_count();
  d["cuda_device_count"] = n;
  py::list names;
  for (int i = 0; i < n; ++i) names.append(cuda_device_name(i));
  d["cuda_devices"] = names;
#else
  d["cuda"] = false;
  d["cuda_archs"] = "";
  d["cuda_compiler"] = "";
  d["cuda_runtime"] = "";
  d["cuda_device_count"] = 0;
  d["cuda_devices"] = py::list();
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "tensorpress native kernels (tensors cross through DLPack)";
  m.def("tt_forward", &tt_forward, py::arg("x"), py::arg("mats"), py::arg("core_dims"), py::arg("order"),
        py::arg("out"), py::arg("workspace"), py::arg("threads"));
  m.def("tt_backward", &tt_backward, py::arg("x"), py::arg("mats"), py::arg("core_dims"), py::arg("order"),
        py::arg("grad_out"), py::arg("grad_x"), py::arg("grad_mats"), py::arg("workspace"), py::arg("threads"));
  m.def("tt_plan_info", &tt_plan_info, py::arg("core_dims"), py::arg("order"));
  m.def("tt_workspace_size", &tt_workspace_size, py::arg("core_dims"), py::arg("order"), py::arg("batch"),
        py::arg("threads"), py::arg("backward"), py::arg("elem_bytes"));
  m.def("svd_jacobi", &svd_jacobi, py::arg("A"), py::arg("U"), py::arg("S"), py::arg("Vh"),
        py::arg("workspace"), py::arg("tol"), py::arg("max_sweeps"), py::arg("threads"));
  m.def("svd_jacobi_workspace_size", &svd::jacobi_workspace_size, py::arg("m"), py::arg("n"), py::arg("threads"));
  m.def("build_info", &build_info);
}
