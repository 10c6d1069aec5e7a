// tensorpress._C bindings: the TT-matrix contraction (CPU and CUDA entry points, the plan's
// geometry, the CUDA schedule and gather tables).
#include <string>
#include <tuple>
#include <utility>

#include "bindings/common.h"
#include "bindings/register.h"
#include "tt/tt_cpu.h"
#include "tt/tt_cuda_schedule.h"
#include "tt/tt_plan.h"
#if TENSORPRESS_WITH_CUDA
#include "core/cuda_info.h"
#endif

namespace tensorpress::bindings {
namespace {

#if TENSORPRESS_WITH_CUDA
void tt_forward_cuda(const py::object& x, const py::list& mats, const std::vector<int64_t>& core_dims,
                     const std::vector<int>& order, const py::object& y, const py::object& workspace,
                     const py::object& tables, const std::string& path, uintptr_t stream, bool tensor_cores);
void tt_backward_cuda(const py::object& x, const py::list& mats, const std::vector<int64_t>& core_dims,
                      const std::vector<int>& order, const py::object& grad_y, const py::object& grad_x,
                      const py::list& grad_mats, const py::object& workspace, const py::object& tables,
                      const std::string& path, uintptr_t stream, bool tensor_cores);
#endif

std::vector<tt::CoreDims> parse_core_dims(const std::vector<int64_t>& flat) {
  require(!flat.empty() && flat.size() % 4 == 0,
          "core_dims: expected 4 integers (r_left, m, n, r_right) per core, got " + std::to_string(flat.size()) +
              " integers");
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

tt::CudaSchedule cuda_schedule_checked(const tt::Plan& plan, int64_t batch, bool backward, int acc_bytes,
                                       const tt::CudaLimits& lim, const std::string& path, bool tensor_cores) {
  try {
    return tt::cuda_schedule(plan, batch, backward, acc_bytes, lim, path, tensor_cores);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
}

#if TENSORPRESS_WITH_CUDA
// The CPU kernels add the bias (and sum its gradient) per block; the CUDA ones leave it to
// the caller.
void refuse_bias_on_cuda(const py::object& bias, const char* name) {
  require(bias.is_none(), std::string(name) +
                              ": expected None for CUDA tensors (the CUDA kernels take no bias; "
                              "add it to the output)");
}
#endif

void tt_forward(const py::object& x, const py::list& mats, const std::vector<int64_t>& core_dims,
                const std::vector<int>& order, const py::object& y, const py::object& workspace, int threads,
                const py::object& tables, const std::string& path, const py::object& stream, const py::object& bias,
                bool tensor_cores) {
#if TENSORPRESS_WITH_CUDA
  if (on_cuda(x)) {
    refuse_bias_on_cuda(bias, "bias");
    return tt_forward_cuda(x, mats, core_dims, order, y, workspace, tables, path, stream_of(stream), tensor_cores);
  }
#else
  on_cuda(x);
  (void)tables, (void)path, (void)stream;
#endif
  require(!tensor_cores, "tensor_cores: expected False for CPU tensors (the tensor-core path is CUDA's)");
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
  Borrowed held;
  std::vector<const TensorView*> mat_views;
  for (size_t t = 0; t < plan.steps.size(); ++t)
    mat_views.push_back(&borrow_checked(held, mats[t], xv.dtype, {plan.steps[t].K, plan.steps[t].N},
                                        "mats[" + std::to_string(t) + "]"));
  const TensorView* bv = borrow_optional(held, bias, xv.dtype, {plan.out_features}, "bias");
  const int elem = xv.dtype == DType::Float32 ? 4 : 8;
  tt::CpuSchedule sched = tt::cpu_schedule(plan, batch, threads, false, elem);
  expect_like(wv, xv.dtype, "workspace");
  require(wv.numel() >= sched.workspace, "workspace: expected at least " + std::to_string(sched.workspace) +
                                             " elements, got " + std::to_string(wv.numel()));
  tt::ForwardCall call;
  call.plan = &plan;
  call.batch = batch;
  call.x = xv.data;
  for (const TensorView* v : mat_views) call.mats.push_back(v->data);
  call.bias = bv ? bv->data : nullptr;
  call.y = yv.data;
  call.workspace = wv.data;
  py::gil_scoped_release release;
  if (xv.dtype == DType::Float32)
    tt::forward_cpu<float>(call, sched);
  else
    tt::forward_cpu<double>(call, sched);
}

void tt_backward(const py::object& x, const py::list& mats, const std::vector<int64_t>& core_dims,
                 const std::vector<int>& order, const py::object& grad_y, const py::object& grad_x,
                 const py::list& grad_mats, const py::object& workspace, int threads, const py::object& tables,
                 const std::string& path, const py::object& stream, const py::object& grad_bias, bool tensor_cores) {
#if TENSORPRESS_WITH_CUDA
  if (on_cuda(x)) {
    refuse_bias_on_cuda(grad_bias, "grad_bias");
    return tt_backward_cuda(x, mats, core_dims, order, grad_y, grad_x, grad_mats, workspace, tables, path,
                            stream_of(stream), tensor_cores);
  }
#else
  on_cuda(x);
  (void)tables, (void)path, (void)stream;
#endif
  require(!tensor_cores, "tensor_cores: expected False for CPU tensors (the tensor-core path is CUDA's)");
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

  Borrowed held;
  std::vector<const TensorView*> mat_views, grad_views;
  for (size_t t = 0; t < n_steps; ++t) {
    const std::vector<int64_t> shape{plan.steps[t].K, plan.steps[t].N};
    const std::string index = "[" + std::to_string(t) + "]";
    mat_views.push_back(&borrow_checked(held, mats[t], xv.dtype, shape, "mats" + index));
    grad_views.push_back(borrow_optional(held, grad_mats[t], xv.dtype, shape, "grad_mats" + index));
  }
  const TensorView* gxv = borrow_optional(held, grad_x, xv.dtype, xv.shape, "grad_x");
  const TensorView* gbv = borrow_optional(held, grad_bias, xv.dtype, {plan.out_features}, "grad_bias");
  const int elem = xv.dtype == DType::Float32 ? 4 : 8;
  tt::CpuSchedule sched = tt::cpu_schedule(plan, batch, threads, true, elem);
  expect_like(wv, xv.dtype, "workspace");
  require(wv.numel() >= sched.workspace, "workspace: expected at least " + std::to_string(sched.workspace) +
                                             " elements, got " + std::to_string(wv.numel()));
  tt::BackwardCall call;
  call.plan = &plan;
  call.batch = batch;
  call.x = xv.data;
  for (const TensorView* v : mat_views) call.mats.push_back(v->data);
  call.grad_y = gyv.data;
  call.grad_x = gxv ? gxv->data : nullptr;
  for (const TensorView* v : grad_views) call.grad_mats.push_back(v ? v->data : nullptr);
  call.grad_bias = gbv ? gbv->data : nullptr;
  call.workspace = wv.data;
  py::gil_scoped_release release;
  if (xv.dtype == DType::Float32)
    tt::backward_cpu<float>(call, sched);
  else
    tt::backward_cpu<double>(call, sched);
}

// ---- CUDA TT: geometry (host logic, in every build) and the kernels (CUDA builds) ----
tt::CudaLimits limits_from(int64_t smem_per_block, int64_t smem_per_sm, int sm_count) {
  require(smem_per_block > 0 && smem_per_sm > 0 && sm_count > 0,
          "smem_per_block, smem_per_sm, sm_count: expected positive integers");
  tt::CudaLimits lim;
  lim.smem_per_block = smem_per_block;
  lim.smem_per_sm = smem_per_sm;
  lim.sm_count = sm_count;
  return lim;
}

// The schedule the CUDA kernels would run for this call, as a dict (for the dispatcher and
// its tests; computable without a GPU).
py::dict tt_cuda_schedule_info(const std::vector<int64_t>& core_dims, const std::vector<int>& order, int64_t batch,
                               bool backward, int acc_bytes, int64_t smem_per_block, int64_t smem_per_sm, int sm_count,
                               const std::string& path, bool tensor_cores) {
  require(batch >= 0, "batch: expected >= 0, got " + std::to_string(batch));
  require(acc_bytes == 4 || acc_bytes == 8, "acc_bytes: expected 4 or 8, got " + std::to_string(acc_bytes));
  const tt::Plan plan = plan_from(core_dims, order);
  const tt::CudaSchedule c = cuda_schedule_checked(
      plan, batch, backward, acc_bytes, limits_from(smem_per_block, smem_per_sm, sm_count), path, tensor_cores);
  py::dict d;
  d["path"] = tt::path_name(c.path);
  d["fits_fused"] = c.fits_fused;
  d["samples"] = c.samples;
  d["chunks"] = c.chunks;
  d["grid"] = c.grid;
  d["smem_bytes"] = c.smem_bytes;
  d["splits"] = c.splits;
  d["workspace"] = c.workspace;
  d["target_blocks"] = c.target_blocks;
  return d;
}

// The gather tables of a plan (int32 values; Python copies them to the device once per plan).
std::vector<int32_t> tt_cuda_tables(const std::vector<int64_t>& core_dims, const std::vector<int>& order) {
  const tt::Plan plan = plan_from(core_dims, order);
  try {
    return tt::make_tables(plan);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
}

#if TENSORPRESS_WITH_CUDA
py::dict tt_cuda_device_limits(int device) {
  require(device >= 0 && device < cuda_device_count(), "device: expected a CUDA device index below " +
                                                           std::to_string(cuda_device_count()) + ", got " +
                                                           std::to_string(device));
  const tt::CudaLimits& lim = device_limits(device);
  py::dict d;
  d["smem_per_block"] = lim.smem_per_block;
  d["smem_per_sm"] = lim.smem_per_sm;
  d["sm_count"] = lim.sm_count;
  return d;
}

// x's element type on CUDA and the accumulation type of mats / workspace / core gradients.
std::pair<tt::CudaDType, std::string> cuda_types(const py::object& x) {
  const std::string name = torch_dtype_name(x);
  if (name == "float32") return {tt::CudaDType::F32, "float32"};
  if (name == "float64") return {tt::CudaDType::F64, "float64"};
  if (name == "float16") return {tt::CudaDType::F16, "float32"};
  if (name == "bfloat16") return {tt::CudaDType::BF16, "float32"};
  throw py::type_error("x: expected dtype float32, float64, float16 or bfloat16, got " + name);
}

// Checks a CUDA operand: device, dtype (by torch name) and shape.
void expect_cuda(const py::object& t, const TensorView& v, int device, const std::string& dtype,
                 const std::vector<int64_t>* shape, const std::string& name) {
  require(v.device == kKernelDeviceKind && v.device_id == device,
          name + ": expected a tensor on cuda:" + std::to_string(device) + " like x");
  const std::string got = torch_dtype_name(t);
  if (got != dtype) throw py::type_error(name + ": expected dtype " + dtype + ", got " + got);
  if (shape) expect_shape(v, *shape, name);
}

struct CudaCallArgs {
  tt::Plan plan;
  tt::CudaSchedule sched;
  tt::CudaDType dtype;
  int device = 0;
  int64_t batch = 0;
  Borrowed held;
  const void* x = nullptr;  // x's data (the first tensor borrowed)
  std::vector<const void*> mats;
  const int32_t* tables = nullptr;
  void* workspace = nullptr;
};

// Validation shared by the CUDA forward and backward: x, mats, tables, workspace.
void check_cuda_common(CudaCallArgs& c, const py::object& x, const py::list& mats, const py::object& workspace,
                       const py::object& tables, const std::string& path, bool backward, bool tensor_cores) {
  const TensorView& xv = c.held.add(x, "x");
  c.x = xv.data;
  std::string acc;
  std::tie(c.dtype, acc) = cuda_types(x);
  c.device = xv.device_id;
  require(xv.shape.size() == 2 && xv.shape[1] == c.plan.in_features,
          "x: expected shape (batch, " + std::to_string(c.plan.in_features) + "), got " + shape_str(xv.shape));
  c.batch = xv.shape[0];
  require(py::len(mats) == c.plan.steps.size(), "mats: expected " + std::to_string(c.plan.steps.size()) +
                                                    " step matrices, got " + std::to_string(py::len(mats)));
  for (size_t t = 0; t < c.plan.steps.size(); ++t) {
    const std::string name = "mats[" + std::to_string(t) + "]";
    const TensorView& v = c.held.add(mats[t], name);
    const std::vector<int64_t> shape{c.plan.steps[t].K, c.plan.steps[t].N};
    expect_cuda(mats[t], v, c.device, acc, &shape, name);
    c.mats.push_back(v.data);
  }
  const TensorView& tv = c.held.add(tables, "tables");
  const std::vector<int64_t> tshape{tt::table_layout(c.plan).total};
  expect_cuda(tables, tv, c.device, "int32", &tshape, "tables");
  c.tables = static_cast<const int32_t*>(tv.data);
  const int acc_bytes = acc == "float64" ? 8 : 4;
  c.sched = cuda_schedule_checked(c.plan, c.batch, backward, acc_bytes, device_limits(c.device), path, tensor_cores);
  const TensorView& wv = c.held.add(workspace, "workspace");
  expect_cuda(workspace, wv, c.device, acc, nullptr, "workspace");
  require(wv.numel() >= c.sched.workspace, "workspace: expected at least " + std::to_string(c.sched.workspace) +
                                               " elements, got " + std::to_string(wv.numel()));
  c.workspace = wv.data;
}

// float64 has no tensor-core path here: asking for one is an error, never a silent fallback.
void refuse_fp64_tensor_cores(tt::CudaDType dtype, bool tensor_cores) {
  require(!(tensor_cores && dtype == tt::CudaDType::F64),
          "tensor_cores: expected False for float64 (the tensor-core path takes float32, float16 and bfloat16)");
}

void tt_forward_cuda(const py::object& x, const py::list& mats, const std::vector<int64_t>& core_dims,
                     const std::vector<int>& order, const py::object& y, const py::object& workspace,
                     const py::object& tables, const std::string& path, uintptr_t stream, bool tensor_cores) {
  CudaCallArgs c;
  c.plan = plan_from(core_dims, order);
  check_cuda_common(c, x, mats, workspace, tables, path, false, tensor_cores);
  refuse_fp64_tensor_cores(c.dtype, tensor_cores);
  const TensorView& yv = c.held.add(y, "out");
  const std::vector<int64_t> yshape{c.batch, c.plan.out_features};
  expect_cuda(y, yv, c.device, torch_dtype_name(x), &yshape, "out");
  tt::ForwardCall call;
  call.plan = &c.plan;
  call.batch = c.batch;
  call.x = c.x;
  call.mats = c.mats;
  call.y = yv.data;
  call.workspace = c.workspace;
  const tt::CudaLaunch launch{c.device, reinterpret_cast<void*>(stream), tensor_cores};
  py::gil_scoped_release release;
  tt::forward_cuda(c.dtype, call, c.tables, c.sched, launch);
}

void tt_backward_cuda(const py::object& x, const py::list& mats, const std::vector<int64_t>& core_dims,
                      const std::vector<int>& order, const py::object& grad_y, const py::object& grad_x,
                      const py::list& grad_mats, const py::object& workspace, const py::object& tables,
                      const std::string& path, uintptr_t stream, bool tensor_cores) {
  CudaCallArgs c;
  c.plan = plan_from(core_dims, order);
  const size_t n = c.plan.steps.size();
  check_cuda_common(c, x, mats, workspace, tables, path, true, tensor_cores);
  refuse_fp64_tensor_cores(c.dtype, tensor_cores);
  const std::string xdtype = torch_dtype_name(x), acc = xdtype == "float64" ? "float64" : "float32";
  tt::BackwardCall call;
  call.plan = &c.plan;
  call.batch = c.batch;
  call.x = c.x;
  call.mats = c.mats;
  call.workspace = c.workspace;
  const TensorView& gyv = c.held.add(grad_y, "grad_out");
  const std::vector<int64_t> yshape{c.batch, c.plan.out_features};
  expect_cuda(grad_y, gyv, c.device, xdtype, &yshape, "grad_out");
  call.grad_y = gyv.data;
  if (!grad_x.is_none()) {
    const TensorView& gxv = c.held.add(grad_x, "grad_x");
    const std::vector<int64_t> xshape{c.batch, c.plan.in_features};
    expect_cuda(grad_x, gxv, c.device, xdtype, &xshape, "grad_x");
    call.grad_x = gxv.data;
  }
  require(py::len(grad_mats) == n, "grad_mats: expected " + std::to_string(n) + " entries");
  const bool none = grad_mats[0].is_none();
  for (size_t t = 0; t < n; ++t) {
    const std::string name = "grad_mats[" + std::to_string(t) + "]";
    require(grad_mats[t].is_none() == none, name + ": expected all grad_mats to be tensors or all None");
    if (none) continue;
    const TensorView& gv = c.held.add(grad_mats[t], name);
    const std::vector<int64_t> shape{c.plan.steps[t].K, c.plan.steps[t].N};
    expect_cuda(grad_mats[t], gv, c.device, acc, &shape, name);
    call.grad_mats.push_back(gv.data);
  }
  const tt::CudaLaunch launch{c.device, reinterpret_cast<void*>(stream), tensor_cores};
  py::gil_scoped_release release;
  tt::backward_cuda(c.dtype, call, c.tables, c.sched, launch);
}
#endif

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
  py::dict moved;
  moved["copy"] = plan.permute_elements[tt::kCopy];
  moved["short_runs"] = plan.permute_elements[tt::kShortRuns];
  moved["transpose"] = plan.permute_elements[tt::kTranspose];
  info["permute_elements"] = moved;
  info["max_state"] = plan.max_state;
  return info;
}

int64_t tt_workspace_size(const std::vector<int64_t>& core_dims, const std::vector<int>& order, int64_t batch,
                          int threads, bool backward, int elem_bytes) {
  return tt::cpu_schedule(plan_from(core_dims, order), batch, threads, backward, elem_bytes).workspace;
}

}  // namespace

void register_tt(py::module_& m) {
  // CPU or CUDA by x's device; tables / path / stream / tensor_cores are used on CUDA only.
  m.def("tt_forward", &tt_forward, py::arg("x"), py::arg("mats"), py::arg("core_dims"), py::arg("order"),
        py::arg("out"), py::arg("workspace"), py::arg("threads"), py::arg("tables") = py::none(),
        py::arg("path") = "auto", py::arg("stream") = py::none(), py::arg("bias") = py::none(),
        py::arg("tensor_cores") = false);
  m.def("tt_backward", &tt_backward, py::arg("x"), py::arg("mats"), py::arg("core_dims"), py::arg("order"),
        py::arg("grad_out"), py::arg("grad_x"), py::arg("grad_mats"), py::arg("workspace"), py::arg("threads"),
        py::arg("tables") = py::none(), py::arg("path") = "auto", py::arg("stream") = py::none(),
        py::arg("grad_bias") = py::none(), py::arg("tensor_cores") = false);
  m.def("tt_cuda_schedule", &tt_cuda_schedule_info, py::arg("core_dims"), py::arg("order"), py::arg("batch"),
        py::arg("backward"), py::arg("acc_bytes"), py::arg("smem_per_block"), py::arg("smem_per_sm"),
        py::arg("sm_count"), py::arg("path") = "auto", py::arg("tensor_cores") = false);
  m.def("tt_cuda_tables", &tt_cuda_tables, py::arg("core_dims"), py::arg("order"));
#if TENSORPRESS_WITH_CUDA
  m.def("tt_cuda_device_limits", &tt_cuda_device_limits, py::arg("device"));
#endif
  m.def("tt_plan_info", &tt_plan_info, py::arg("core_dims"), py::arg("order"));
  m.def("tt_workspace_size", &tt_workspace_size, py::arg("core_dims"), py::arg("order"), py::arg("batch"),
        py::arg("threads"), py::arg("backward"), py::arg("elem_bytes"));
}

}  // namespace tensorpress::bindings
