// Compiled with the avx2 flags (see CMakeLists.txt); called only where the CPU has them.
#include "svd/jacobi_sweeps.h"

namespace tensorpress::svd {

TP_JACOBI_DEFINE(avx2)

}  // namespace tensorpress::svd
