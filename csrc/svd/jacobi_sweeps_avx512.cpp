// Compiled with the avx512 flags (see CMakeLists.txt); called only where the CPU has them.
#include "svd/jacobi_sweeps.h"

namespace tensorpress::svd {

TP_JACOBI_DEFINE(avx512)

}  // namespace tensorpress::svd
