#include "core/tensor_view.h"

namespace py = pybind11;

namespace tensorpress {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::Float32:
      return "float32";
    case DType::Float64:
      return "float64";
    default:
      return "unsupported";
  }
}

void require(bool ok, const std::string& message) {
  if (!ok) throw py::value_error(message);
}

BorrowedTensor::BorrowedTensor(const py::object& tensor, const std::string& name) {
  if (!py::hasattr(tensor, "__dlpack__"))
    throw py::type_error(name + ": expected a tensor supporting DLPack, got " +
                         std::string(py::str(py::type::of(tensor))));
  capsule_ = tensor.attr("__dlpack__")();
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule_.ptr(), "dltensor"));
  if (managed == nullptr) throw py::error_already_set();
  const DLTensor& t = managed->dl_tensor;

  view_.data = static_cast<char*>(t.data) + t.byte_offset;
  view_.shape.assign(t.shape, t.shape + t.ndim);
  view_.device_id = t.device.device_id;
  view_.device = t.device.device_type == kDLCPU    ? Device::CPU
                 : t.device.device_type == kDLCUDA ? Device::CUDA
                                                   : Device::Other;
  if (t.dtype.code == kDLFloat && t.dtype.lanes == 1 && t.dtype.bits == 32)
    view_.dtype = DType::Float32;
  else if (t.dtype.code == kDLFloat && t.dtype.lanes == 1 && t.dtype.bits == 64)
    view_.dtype = DType::Float64;

  // Kernels index with compact row-major strides: refuse anything else.
  if (t.strides != nullptr && view_.numel() > 0) {  // an empty tensor has nothing to index
    int64_t expected = 1;
    for (int i = t.ndim - 1; i >= 0; --i) {
      if (t.shape[i] != 1 && t.strides[i] != expected)
        throw py::value_error(name + ": expected a contiguous tensor (call .contiguous())");
      expected *= t.shape[i];
    }
  }
}

}  // namespace tensorpress
