// tensorpress._C bindings: OpenBLAS GEMM and triangular solve (tensorpress.linalg.blas).
#include "bindings/common.h"
#include "bindings/register.h"
#include "core/blas_threaded.h"

namespace tensorpress::bindings {
namespace {

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

}  // namespace

void register_blas(py::module_& m) {
  m.def("blas_gemm", &blas_gemm, py::arg("a"), py::arg("b"), py::arg("out"), py::arg("transpose_a"),
        py::arg("transpose_b"), py::arg("alpha"), py::arg("beta"), py::arg("threads"));
  m.def("blas_trsm", &blas_trsm, py::arg("A"), py::arg("B"), py::arg("left"), py::arg("upper"), py::arg("transpose"),
        py::arg("threads"));
}

}  // namespace tensorpress::bindings
