// tensorpress._C: thin bindings. Validates what crosses the boundary, then dispatches.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/blas_threaded.h"
#include "core/tensor_view.h"
#include "svd/jacobi_cpu.h"
#include "svd/jacobi_cuda.h"
#include "svd/jacobi_sweeps.h"
#include "tt/tt_cpu.h"
#include "tt/tt_cuda_schedule.h"
#include "tt/tt_plan.h"
#if TENSORPRESS_CUDA_EMU
#include "testing/emu_selftest.h"
#endif
#if TENSORPRESS_WITH_CUDA
#include <map>
#include <mutex>

#include "core/cuda_info.h"
#include "tt/tt_cuda.h"
#endif

namespace py = pybind11;
using namespace tensorpress;

namespace {

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

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

void expect_shape(const TensorView& v, const std::vector<int64_t>& shape, const std::string& name) {
  require(v.shape == shape, name + ": expected shape " + shape_str(shape) + ", got " + shape_str(v.shape));
}

void expect_like(const TensorView& v, DType dtype, const std::string& name) {
  require(v.device == Device::CPU, name + ": expected a CPU tensor");
  require(v.dtype == dtype, name + ": expected dtype " + dtype_name(dtype) + ", got " + dtype_name(v.dtype));
}

// The torch dtype's name ("float16", "int32", ...): TensorView names only float32/float64.
std::string torch_dtype_name(const py::object& t) {
  std::string s = py::str(t.attr("dtype"));
  return s.rfind("torch.", 0) == 0 ? s.substr(6) : s;
}

tt::CudaSchedule cuda_schedule_checked(const tt::Plan& plan, int64_t batch, bool backward, int acc_bytes,
                                       const tt::CudaLimits& lim, const std::string& path) {
  try {
    return tt::cuda_schedule(plan, batch, backward, acc_bytes, lim, path);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
}

// Borrows t into `held` and checks it is a CPU tensor of `dtype` and `shape`. The view points
// into `held`: reserve room for every tensor first.
const TensorView& borrow_checked(std::vector<BorrowedTensor>& held, const py::object& t, DType dtype,
                                 const std::vector<int64_t>& shape, const std::string& name) {
  held.emplace_back(t, name);
  const TensorView& v = held.back().view();
  expect_like(v, dtype, name);
  expect_shape(v, shape, name);
  return v;
}

// The same for an optional argument: nullptr for None.
const TensorView* borrow_optional(std::vector<BorrowedTensor>& held, const py::object& t, DType dtype,
                                  const std::vector<int64_t>& shape, const std::string& name) {
  return t.is_none() ? nullptr : &borrow_checked(held, t, dtype, shape, name);
}

template <typename T>
std::vector<T*> pointers(const std::vector<const TensorView*>& views) {
  std::vector<T*> out;
  for (const TensorView* v : views) out.push_back(v ? v->ptr<T>() : nullptr);
  return out;
}

#if TENSORPRESS_WITH_CUDA
void tt_forward_cuda(const py::object& x, const py::list& mats, const std::vector<int64_t>& core_dims,
                     const std::vector<int>& order, const py::object& y, const py::object& workspace,
                     const py::object& tables, const std::string& path, uintptr_t stream, bool tensor_cores);
void tt_backward_cuda(const py::object& x, const py::list& mats, const std::vector<int64_t>& core_dims,
                      const std::vector<int>& order, const py::object& grad_y, const py::object& grad_x,
                      const py::list& grad_mats, const py::object& workspace, const py::object& tables,
                      const std::string& path, uintptr_t stream, bool tensor_cores);
#endif

// The memory the CUDA entry points take: device memory, or host memory in the CPU emulation
// build (_C_cuda_emu, tests only: csrc/testing/cuda_emu.h), where CPU tensors play the GPU.
#if TENSORPRESS_CUDA_EMU
constexpr const char* kKernelDevice = "cpu";
constexpr Device kKernelDeviceKind = Device::CPU;
#else
constexpr const char* kKernelDevice = "cuda";
constexpr Device kKernelDeviceKind = Device::CUDA;
#endif

// The caller's stream (torch.cuda.current_stream(device).cuda_stream): required, never a
// silent default to the legacy stream 0 of a caller working on another stream.
uintptr_t stream_of(const py::object& stream) {
  require(!stream.is_none(),
          "stream: expected the caller's CUDA stream (torch.cuda.current_stream(x.device)"
          ".cuda_stream) for CUDA tensors, got None");
  return stream.cast<uintptr_t>();
}

// True for a CUDA tensor; raises where the build has no CUDA kernels.
bool on_cuda(const py::object& x) {
  if (!py::hasattr(x, "device") || std::string(py::str(x.attr("device").attr("type"))) != kKernelDevice) return false;
#if !TENSORPRESS_WITH_CUDA
  throw py::value_error(
      "x: got a CUDA tensor, but this build of tensorpress has no CUDA kernels "
      "(rebuild with nvcc on PATH or TENSORPRESS_CUDA=ON)");
#endif
  return true;
}

// The CPU kernels add the bias (and sum its gradient) per block; the CUDA ones leave it to
// the caller.
void refuse_bias_on_cuda(const py::object& bias, const char* name) {
  require(bias.is_none(), std::string(name) +
                              ": expected None for CUDA tensors (the CUDA kernels take no bias; "
                              "add it to the output)");
}

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
  std::vector<BorrowedTensor> held;
  held.reserve(plan.steps.size() + 1);  // views point into it: no reallocation
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
  py::gil_scoped_release release;
  if (xv.dtype == DType::Float32) {
    auto m = pointers<float>(mat_views);
    tt::forward_cpu<float>(plan, xv.ptr<float>(), {m.begin(), m.end()}, bv ? bv->ptr<float>() : nullptr,
                           yv.ptr<float>(), batch, wv.ptr<float>(), sched);
  } else {
    auto m = pointers<double>(mat_views);
    tt::forward_cpu<double>(plan, xv.ptr<double>(), {m.begin(), m.end()}, bv ? bv->ptr<double>() : nullptr,
                            yv.ptr<double>(), batch, wv.ptr<double>(), sched);
  }
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

  std::vector<BorrowedTensor> held;
  held.reserve(2 * n_steps + 2);  // views point into it: no reallocation
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
  py::gil_scoped_release release;
  if (xv.dtype == DType::Float32) {
    auto m = pointers<float>(mat_views);
    tt::backward_cpu<float>(plan, xv.ptr<float>(), {m.begin(), m.end()}, gyv.ptr<float>(),
                            gxv ? gxv->ptr<float>() : nullptr, pointers<float>(grad_views),
                            gbv ? gbv->ptr<float>() : nullptr, batch, wv.ptr<float>(), sched);
  } else {
    auto m = pointers<double>(mat_views);
    tt::backward_cpu<double>(plan, xv.ptr<double>(), {m.begin(), m.end()}, gyv.ptr<double>(),
                             gxv ? gxv->ptr<double>() : nullptr, pointers<double>(grad_views),
                             gbv ? gbv->ptr<double>() : nullptr, batch, wv.ptr<double>(), sched);
  }
}

// ---- OpenBLAS GEMM / triangular solve over whole matrices (tensorpress.linalg.blas) ----
// Matrices arrive row-major contiguous; a transposed operand arrives as its stored matrix
// with the flag set.
const TensorView& blas_matrix(BorrowedTensor& held, DType dtype, const std::string& name) {
  const TensorView& v = held.view();
  require(v.device == Device::CPU, name + ": expected a CPU tensor");
  require(v.shape.size() == 2, name + ": expected a matrix, got " + std::to_string(v.shape.size()) + " dims");
  require(v.dtype == dtype,
          name + ": expected dtype " + std::string(dtype_name(dtype)) + ", got " + std::string(dtype_name(v.dtype)));
  return v;
}

void blas_gemm(const py::object& a, const py::object& b, const py::object& c, bool ta, bool tb, double alpha,
               double beta, int threads) {
  BorrowedTensor ab(a, "a"), bb(b, "b"), cb(c, "out");
  const TensorView& av = ab.view();
  require(av.dtype == DType::Float32 || av.dtype == DType::Float64,
          "a: expected dtype float32 or float64, got " + std::string(dtype_name(av.dtype)));
  blas_matrix(ab, av.dtype, "a");
  const TensorView &bv = blas_matrix(bb, av.dtype, "b"), &cv = blas_matrix(cb, av.dtype, "out");
  const int64_t m = ta ? av.shape[1] : av.shape[0], k = ta ? av.shape[0] : av.shape[1];
  const int64_t kb = tb ? bv.shape[1] : bv.shape[0], n = tb ? bv.shape[0] : bv.shape[1];
  require(kb == k,
          "b: expected " + std::to_string(k) + " rows in op(b) (the columns of op(a)), got " + std::to_string(kb));
  expect_shape(cv, {m, n}, "out");
  if (m == 0 || n == 0) return;
  py::gil_scoped_release release;
  if (av.dtype == DType::Float32)
    blas::gemm_threaded<float>(ta, tb, m, n, k, float(alpha), av.ptr<float>(), av.shape[1], bv.ptr<float>(),
                               bv.shape[1], float(beta), cv.ptr<float>(), threads);
  else
    blas::gemm_threaded<double>(ta, tb, m, n, k, alpha, av.ptr<double>(), av.shape[1], bv.ptr<double>(), bv.shape[1],
                                beta, cv.ptr<double>(), threads);
}

void blas_trsm(const py::object& a, const py::object& b, bool left, bool upper, bool trans, int threads) {
  BorrowedTensor ab(a, "A"), bb(b, "B");
  const TensorView& av = ab.view();
  require(av.dtype == DType::Float32 || av.dtype == DType::Float64,
          "A: expected dtype float32 or float64, got " + std::string(dtype_name(av.dtype)));
  blas_matrix(ab, av.dtype, "A");
  const TensorView& bv = blas_matrix(bb, av.dtype, "B");
  require(av.shape[0] == av.shape[1], "A: expected a square matrix, got " + shape_str(av.shape));
  const int64_t m = bv.shape[0], n = bv.shape[1];
  require(av.shape[0] == (left ? m : n), "A: expected size " + std::to_string(left ? m : n) + " (B's " +
                                             (left ? "rows" : "columns") + "), got " + shape_str(av.shape));
  if (m == 0 || n == 0) return;
  py::gil_scoped_release release;
  if (av.dtype == DType::Float32)
    blas::trsm_threaded<float>(left, upper, trans, m, n, av.ptr<float>(), av.shape[1], bv.ptr<float>(), threads);
  else
    blas::trsm_threaded<double>(left, upper, trans, m, n, av.ptr<double>(), av.shape[1], bv.ptr<double>(), threads);
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
                               const std::string& path) {
  require(batch >= 0, "batch: expected >= 0, got " + std::to_string(batch));
  require(acc_bytes == 4 || acc_bytes == 8, "acc_bytes: expected 4 or 8, got " + std::to_string(acc_bytes));
  const tt::Plan plan = plan_from(core_dims, order);
  const tt::CudaSchedule c =
      cuda_schedule_checked(plan, batch, backward, acc_bytes, limits_from(smem_per_block, smem_per_sm, sm_count), path);
  py::dict d;
  d["path"] = tt::path_name(c.path);
  d["fits_fused"] = c.fits_fused;
  d["samples"] = c.samples;
  d["chunks"] = c.chunks;
  d["grid"] = c.grid;
  d["smem_bytes"] = c.smem_bytes;
  d["splits"] = c.splits;
  d["workspace"] = c.workspace;
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
const tt::CudaLimits& device_limits(int device) {
  static std::mutex mu;
  static std::map<int, tt::CudaLimits> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it == cache.end()) it = cache.emplace(device, tt::cuda_limits(device)).first;
  return it->second;
}

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
  std::vector<BorrowedTensor> held;
  std::vector<const void*> mats;
  const int32_t* tables = nullptr;
  void* workspace = nullptr;
};

// Validation shared by the CUDA forward and backward: x, mats, tables, workspace.
void check_cuda_common(CudaCallArgs& c, const py::object& x, const py::list& mats, const py::object& workspace,
                       const py::object& tables, const std::string& path, bool backward, size_t extra) {
  c.held.reserve(mats.size() + 8 + extra);
  c.held.emplace_back(x, "x");
  const TensorView& xv = c.held.back().view();
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
    c.held.emplace_back(mats[t], name);
    const std::vector<int64_t> shape{c.plan.steps[t].K, c.plan.steps[t].N};
    expect_cuda(mats[t], c.held.back().view(), c.device, acc, &shape, name);
    c.mats.push_back(c.held.back().view().data);
  }
  c.held.emplace_back(tables, "tables");
  const std::vector<int64_t> tshape{tt::table_layout(c.plan).total};
  expect_cuda(tables, c.held.back().view(), c.device, "int32", &tshape, "tables");
  c.tables = static_cast<const int32_t*>(c.held.back().view().data);
  const int acc_bytes = acc == "float64" ? 8 : 4;
  c.sched = cuda_schedule_checked(c.plan, c.batch, backward, acc_bytes, device_limits(c.device), path);
  c.held.emplace_back(workspace, "workspace");
  const TensorView& wv = c.held.back().view();
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
  check_cuda_common(c, x, mats, workspace, tables, path, false, 1);
  refuse_fp64_tensor_cores(c.dtype, tensor_cores);
  c.held.emplace_back(y, "out");
  const std::vector<int64_t> yshape{c.batch, c.plan.out_features};
  expect_cuda(y, c.held.back().view(), c.device, torch_dtype_name(x), &yshape, "out");
  void* yp = c.held.back().view().data;
  const void* xp = c.held.front().view().data;
  py::gil_scoped_release release;
  tt::forward_cuda(c.dtype, c.plan, c.sched, xp, c.mats, c.tables, yp, c.batch, c.workspace, tensor_cores, c.device,
                   reinterpret_cast<void*>(stream));
}

void tt_backward_cuda(const py::object& x, const py::list& mats, const std::vector<int64_t>& core_dims,
                      const std::vector<int>& order, const py::object& grad_y, const py::object& grad_x,
                      const py::list& grad_mats, const py::object& workspace, const py::object& tables,
                      const std::string& path, uintptr_t stream, bool tensor_cores) {
  CudaCallArgs c;
  c.plan = plan_from(core_dims, order);
  const size_t n = c.plan.steps.size();
  check_cuda_common(c, x, mats, workspace, tables, path, true, n + 2);
  refuse_fp64_tensor_cores(c.dtype, tensor_cores);
  const std::string xdtype = torch_dtype_name(x), acc = xdtype == "float64" ? "float64" : "float32";
  c.held.emplace_back(grad_y, "grad_out");
  const std::vector<int64_t> yshape{c.batch, c.plan.out_features};
  expect_cuda(grad_y, c.held.back().view(), c.device, xdtype, &yshape, "grad_out");
  const void* gyp = c.held.back().view().data;
  void* gxp = nullptr;
  if (!grad_x.is_none()) {
    c.held.emplace_back(grad_x, "grad_x");
    const std::vector<int64_t> xshape{c.batch, c.plan.in_features};
    expect_cuda(grad_x, c.held.back().view(), c.device, xdtype, &xshape, "grad_x");
    gxp = c.held.back().view().data;
  }
  require(py::len(grad_mats) == n, "grad_mats: expected " + std::to_string(n) + " entries");
  std::vector<void*> gm;
  const bool none = grad_mats[0].is_none();
  for (size_t t = 0; t < n; ++t) {
    const std::string name = "grad_mats[" + std::to_string(t) + "]";
    require(grad_mats[t].is_none() == none, name + ": expected all grad_mats to be tensors or all None");
    if (none) continue;
    c.held.emplace_back(grad_mats[t], name);
    const std::vector<int64_t> shape{c.plan.steps[t].K, c.plan.steps[t].N};
    expect_cuda(grad_mats[t], c.held.back().view(), c.device, acc, &shape, name);
    gm.push_back(c.held.back().view().data);
  }
  const void* xp = c.held.front().view().data;
  py::gil_scoped_release release;
  tt::backward_cuda(c.dtype, c.plan, c.sched, xp, c.mats, c.tables, gyp, gxp, gm, c.batch, c.workspace, tensor_cores,
                    c.device, reinterpret_cast<void*>(stream));
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
  require(wv.numel() >= need,
          "workspace: expected at least " + std::to_string(need) + " elements, got " + std::to_string(wv.numel()));
  require(tol > 0 && max_sweeps >= 1, "tol, max_sweeps: expected tol > 0 and max_sweeps >= 1");
  const svd::JacobiParams params{tol, max_sweeps};
  py::gil_scoped_release release;
  if (av.dtype == DType::Float32)
    return svd::jacobi_svd_cpu<float>(av.ptr<float>(), uv.ptr<float>(), sv.ptr<float>(), vv.ptr<float>(), batch, m, n,
                                      params, wv.ptr<double>(), threads);
  return svd::jacobi_svd_cpu<double>(av.ptr<double>(), uv.ptr<double>(), sv.ptr<double>(), vv.ptr<double>(), batch, m,
                                     n, params, wv.ptr<double>(), threads);
}

#if TENSORPRESS_WITH_CUDA
// Batched one-sided Jacobi SVD on CUDA, same conventions as svd_jacobi; asynchronous on
// `stream`, no workspace (each matrix lives in its block's shared memory).
void svd_jacobi_cuda(const py::object& a, const py::object& u, const py::object& s, const py::object& vh, double tol,
                     int max_sweeps, uintptr_t stream) {
  BorrowedTensor ab(a, "A"), ub(u, "U"), sb(s, "S"), vb(vh, "Vh");
  const TensorView &av = ab.view(), &uv = ub.view(), &sv = sb.view(), &vv = vb.view();
  require(av.dtype == DType::Float32 || av.dtype == DType::Float64,
          "A: expected dtype float32 or float64, got " + torch_dtype_name(a));
  require(av.device == kKernelDeviceKind, "A: expected a CUDA tensor");
  require(av.shape.size() == 3, "A: expected shape (batch, m, n), got " + shape_str(av.shape));
  const int64_t batch = av.shape[0], m = av.shape[1], n = av.shape[2], k = std::min(m, n);
  for (auto [view, name] : {std::pair{&uv, "U"}, {&sv, "S"}, {&vv, "Vh"}}) {
    require(view->device == kKernelDeviceKind && view->device_id == av.device_id,
            std::string(name) + ": expected a tensor on A's device");
    require(view->dtype == av.dtype, std::string(name) + ": expected dtype " + dtype_name(av.dtype));
  }
  expect_shape(uv, {batch, m, k}, "U");
  expect_shape(sv, {batch, k}, "S");
  expect_shape(vv, {batch, k, n}, "Vh");
  require(tol > 0 && max_sweeps >= 1, "tol, max_sweeps: expected tol > 0 and max_sweeps >= 1");
  const int64_t smem = svd::jacobi_cuda_smem_bytes(m, n);
  const tt::CudaLimits& lim = device_limits(av.device_id);
  require(smem <= lim.smem_per_block, "A: a " + std::to_string(m) + " x " + std::to_string(n) + " matrix needs " +
                                          std::to_string(smem) + " bytes of shared memory, the device has " +
                                          std::to_string(lim.smem_per_block) + " per block");
  py::gil_scoped_release release;
  svd::jacobi_svd_cuda(av.dtype == DType::Float64, av.data, uv.data, sv.data, vv.data, batch, m, n, tol, max_sweeps,
                       av.device_id, reinterpret_cast<void*>(stream));
}
#endif

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
  d["cuda_driver"] = cuda_driver_version();
  d["cuda_driver_required"] = cuda_driver_required();
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
  d["cuda_driver"] = "";
  d["cuda_driver_required"] = "";
  d["cuda_device_count"] = 0;
  d["cuda_devices"] = py::list();
#endif
  return d;
}

}  // namespace

#ifndef TENSORPRESS_MODULE_NAME
#define TENSORPRESS_MODULE_NAME _C  // the emulation build names itself _C_cuda_emu
#endif

PYBIND11_MODULE(TENSORPRESS_MODULE_NAME, m) {
  m.doc() = "tensorpress native kernels (tensors cross through DLPack)";
  // CPU or CUDA by x's device; tables / path / stream are used on CUDA only.
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
        py::arg("sm_count"), py::arg("path") = "auto");
  m.def("tt_cuda_tables", &tt_cuda_tables, py::arg("core_dims"), py::arg("order"));
#if TENSORPRESS_WITH_CUDA
  m.def("tt_cuda_device_limits", &tt_cuda_device_limits, py::arg("device"));
  m.def("svd_jacobi_cuda", &svd_jacobi_cuda, py::arg("A"), py::arg("U"), py::arg("S"), py::arg("Vh"), py::arg("tol"),
        py::arg("max_sweeps"), py::arg("stream"));
#endif
  m.def("tt_plan_info", &tt_plan_info, py::arg("core_dims"), py::arg("order"));
  m.def("tt_workspace_size", &tt_workspace_size, py::arg("core_dims"), py::arg("order"), py::arg("batch"),
        py::arg("threads"), py::arg("backward"), py::arg("elem_bytes"));
  m.def("svd_jacobi", &svd_jacobi, py::arg("A"), py::arg("U"), py::arg("S"), py::arg("Vh"), py::arg("workspace"),
        py::arg("tol"), py::arg("max_sweeps"), py::arg("threads"));
  m.def("svd_jacobi_workspace_size", &svd::jacobi_workspace_size, py::arg("m"), py::arg("n"), py::arg("threads"));
  m.def("svd_jacobi_cuda_smem_bytes", &svd::jacobi_cuda_smem_bytes, py::arg("m"), py::arg("n"));
  m.def("blas_gemm", &blas_gemm, py::arg("a"), py::arg("b"), py::arg("out"), py::arg("transpose_a"),
        py::arg("transpose_b"), py::arg("alpha"), py::arg("beta"), py::arg("threads"));
  m.def("blas_trsm", &blas_trsm, py::arg("A"), py::arg("B"), py::arg("left"), py::arg("upper"), py::arg("transpose"),
        py::arg("threads"));
  m.def("build_info", &build_info);
#if TENSORPRESS_CUDA_EMU
  m.def("emu_selftest", &testing::emu_selftest, py::arg("name"), py::arg("threads"), py::arg("blocks") = 1);
  m.def("emu_float_to_half", &testing::emu_float_to_half, py::arg("values"), py::arg("bf16"));
  m.def("emu_half_to_float", &testing::emu_half_to_float, py::arg("bits"), py::arg("bf16"));
#endif
}
