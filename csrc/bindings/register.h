// The areas of tensorpress._C (csrc/bindings/*.cpp), each adding its functions to the module.
#pragma once
#include <pybind11/pybind11.h>

namespace tensorpress::bindings {

void register_tt(pybind11::module_& m);
void register_svd(pybind11::module_& m);
void register_blas(pybind11::module_& m);

}  // namespace tensorpress::bindings
