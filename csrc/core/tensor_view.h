// A borrowed, typed view of a tensor that arrived through DLPack.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <deque>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/dlpack.h"

namespace tensorpress {

enum class DType { Float32, Float64, Other };
enum class Device { CPU, CUDA, Other };

struct TensorView {
  void* data = nullptr;
  std::vector<int64_t> shape;
  DType dtype = DType::Other;
  Device device = Device::Other;
  int device_id = 0;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  template <typename T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
};

const char* dtype_name(DType t);

// Holds the DLPack capsule alive for as long as the view is used.
class BorrowedTensor {
 public:
  // `name` is used in error messages: it is the argument the caller passed.
  BorrowedTensor(const pybind11::object& tensor, const std::string& name);
  const TensorView& view() const { return view_; }

 private:
  pybind11::object capsule_;
  TensorView view_;
};

// The tensors one binding call borrows, alive (and their views valid) until it returns: a
// deque never moves its elements, so a view returned by add() cannot dangle.
class Borrowed {
 public:
  const TensorView& add(const pybind11::object& tensor, const std::string& name) {
    return held_.emplace_back(tensor, name).view();
  }

 private:
  std::deque<BorrowedTensor> held_;
};

// Argument checks with messages that name the argument and the expectation.
void require(bool ok, const std::string& message);
void require_contiguous_1d_or_more(const pybind11::object& tensor, const std::string& name);

}  // namespace tensorpress
