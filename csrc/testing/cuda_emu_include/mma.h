// CPU emulation of CUDA's warp matrix API (nvcuda::wmma, <mma.h>) for the test builds only
// (csrc/testing/cuda_emu.h). It models the API's documented semantics, not one GPU's:
// - Fragments at the shapes tensorpress uses: m16n16k16 with __half or __nv_bfloat16
//   operands, m16n16k8 with precision::tf32 operands (stored as float); float accumulators.
//   matrix_a is m x k, matrix_b k x n, the accumulator m x n.
// - Which lane holds which element of a fragment is unspecified in CUDA. Here element e of
//   lane l holds matrix element ((e * 32 + l) * 37 + salt) mod (rows * cols), a bijection
//   that differs per fragment kind: code that assumes a layout for frag.x[i] (anything but
//   the same operation on every element) gets wrong results here.
// - load_matrix_sync, store_matrix_sync and mma_sync are warp collectives: all 32 lanes must
//   call them at the same place (the emulator's barrier check) with the same pointer, ldm and
//   layout (checked); the pointer must be 32-byte aligned and ldm a multiple of 16 bytes
//   (checked). A violation fails the launch with a message naming it.
// - mma_sync: the operands' products are exact in float (at most 22 significant bits); the
//   sum is accumulated in float, k ascending (CUDA promises at least float precision and no
//   order). tf32 operands keep only their top 10 mantissa bits, as the hardware reads them:
//   __float_to_tf32 rounds to nearest with ties away from zero (PTX cvt.rna.tf32.f32).
// The element reads and writes of load/store are the calling lane's own accesses, outside the
// emulator's Quiet scopes, so AddressSanitizer and ThreadSanitizer check them.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "testing/cuda_emu.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

namespace emu {
template <typename T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};

template <typename Use, int M, int N, int K>
struct dims;
template <int M, int N, int K>
struct dims<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K, salt = 11;
};
template <int M, int N, int K>
struct dims<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N, salt = 101;
};
template <int M, int N, int K>
struct dims<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N, salt = 59;
};

inline float value(float v) { return v; }
inline float value(__half v) { return __half2float(v); }
inline float value(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename E>
E from_float(float v);
template <>
inline float from_float<float>(float v) {
  return v;
}
template <>
inline __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// What the tensor cores read of a tf32 operand: the top 10 of its 23 mantissa bits.
inline float tf32_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u &= 0xffffe000u;
  std::memcpy(&v, &u, 4);
  return v;
}
}  // namespace emu

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
  static constexpr bool half_shape = M == 16 && N == 16 && K == 16;
  static constexpr bool tf32_shape = M == 16 && N == 16 && K == 8;
  static_assert(half_shape || tf32_shape, "the emulator models the m16n16k16 and m16n16k8 shapes");
  static_assert(std::is_same<Use, accumulator>::value
                    ? std::is_same<T, float>::value && std::is_void<Layout>::value
                    : (std::is_same<Layout, row_major>::value || std::is_same<Layout, col_major>::value),
                "accumulators are float without a layout; operands are row_major or col_major");
  static_assert(std::is_same<Use, accumulator>::value ||
                    (half_shape && (std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value)) ||
                    (tf32_shape && std::is_same<T, precision::tf32>::value),
                "operands: __half or __nv_bfloat16 at m16n16k16, precision::tf32 at m16n16k8");

 public:
  using element_type = typename emu::storage<T>::type;
  static constexpr int rows = emu::dims<Use, M, N, K>::rows, cols = emu::dims<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols / 32;
  element_type x[num_elements];

  // The matrix element (row-major index) that element e of `lane` holds.
  static int index(int lane, int e) { return ((e * 32 + lane) * 37 + emu::dims<Use, M, N, K>::salt) % (rows * cols); }
};

inline float __float_to_tf32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;  // Inf and NaN pass unchanged
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v) {
  using E = typename fragment<Use, M, N, K, T, Layout>::element_type;
  for (auto& e : f.x) e = emu::from_float<E>(v);
}

namespace emu {
// The warp-uniform arguments of a load or store, checked across the lanes and for alignment.
inline void check_collective(int line, const char* what, const void* ptr, unsigned ldm, int layout, size_t elem) {
  struct Args {
    const void* ptr;
    unsigned ldm;
    int layout;
  } mine{ptr, ldm, layout}, all[32];
  tp_emu::Block& b = tp_emu::block();
  b.all_gather(&mine, sizeof(Args), all, line, what);
  for (const Args& a : all)
    if (a.ptr != ptr || a.ldm != ldm || a.layout != layout)
      b.misuse(std::string(what) + " at line " + std::to_string(line) +
               ": the lanes of a warp passed different pointers, ldm or layouts");
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0)
    b.misuse(std::string(what) + " at line " + std::to_string(line) + ": the pointer is not 32-byte aligned");
  if ((ldm * elem) % 16 != 0)
    b.misuse(std::string(what) + " at line " + std::to_string(line) + ": ldm " + std::to_string(ldm) +
             " is not a multiple of 16 bytes");
}
inline int lane() { return static_cast<int>(threadIdx.x % 32); }
}  // namespace emu

// Operand fragments: the layout is the fragment's.
template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync_at(int line, fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  static_assert(!std::is_same<Use, accumulator>::value, "an accumulator load names its layout_t");
  static_assert(std::is_same<P, typename F::element_type>::value, "the pointer's type is the fragment's storage type");
  const bool row = std::is_same<Layout, row_major>::value;
  emu::check_collective(line, "load_matrix_sync", p, ldm, row, sizeof(P));
  for (int e = 0; e < F::num_elements; ++e) {
    const int i = F::index(emu::lane(), e), r = i / F::cols, c = i % F::cols;
    f.x[e] = p[row ? r * ldm + c : c * ldm + r];
  }
}

template <int M, int N, int K>
void load_matrix_sync_at(int line, fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm,
                         layout_t layout) {
  using F = fragment<accumulator, M, N, K, float>;
  const bool row = layout == mem_row_major;
  emu::check_collective(line, "load_matrix_sync", p, ldm, row, sizeof(float));
  for (int e = 0; e < F::num_elements; ++e) {
    const int i = F::index(emu::lane(), e), r = i / F::cols, c = i % F::cols;
    f.x[e] = p[row ? r * ldm + c : c * ldm + r];
  }
}

template <int M, int N, int K>
void store_matrix_sync_at(int line, float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                          layout_t layout) {
  using F = fragment<accumulator, M, N, K, float>;
  const bool row = layout == mem_row_major;
  emu::check_collective(line, "store_matrix_sync", p, ldm, row, sizeof(float));
  for (int e = 0; e < F::num_elements; ++e) {
    const int i = F::index(emu::lane(), e), r = i / F::cols, c = i % F::cols;
    p[row ? r * ldm + c : c * ldm + r] = f.x[e];
  }
}

// d = a b + c over the whole warp (d may be c).
template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync_at(int line, fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                 const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  using FA = fragment<matrix_a, M, N, K, T, LA>;
  using FB = fragment<matrix_b, M, N, K, T, LB>;
  using FC = fragment<accumulator, M, N, K, float>;
  struct Lane {
    typename FA::element_type a[FA::num_elements];
    typename FB::element_type b[FB::num_elements];
    float c[FC::num_elements];
  } mine, all[32];
  std::memcpy(mine.a, a.x, sizeof(mine.a));
  std::memcpy(mine.b, b.x, sizeof(mine.b));
  std::memcpy(mine.c, c.x, sizeof(mine.c));
  tp_emu::block().all_gather(&mine, sizeof(Lane), all, line, "mma_sync");
  float A[M * K], B[K * N], C[M * N];
  const bool tf32 = std::is_same<T, precision::tf32>::value;
  for (int l = 0; l < 32; ++l) {
    for (int e = 0; e < FA::num_elements; ++e) {
      const float v = emu::value(all[l].a[e]);
      A[FA::index(l, e)] = tf32 ? emu::tf32_bits(v) : v;
    }
    for (int e = 0; e < FB::num_elements; ++e) {
      const float v = emu::value(all[l].b[e]);
      B[FB::index(l, e)] = tf32 ? emu::tf32_bits(v) : v;
    }
    for (int e = 0; e < FC::num_elements; ++e) C[FC::index(l, e)] = all[l].c[e];
  }
  for (int e = 0; e < FC::num_elements; ++e) {
    const int i = FC::index(emu::lane(), e), r = i / N, col = i % N;
    float acc = C[i];
    for (int k = 0; k < K; ++k) acc = std::fma(A[r * K + k], B[k * N + col], acc);
    d.x[e] = acc;
  }
}

}  // namespace wmma
}  // namespace nvcuda

// Collectives carry their call site's line into the emulator's barrier check.
#define load_matrix_sync(...) load_matrix_sync_at(__LINE__, __VA_ARGS__)
#define store_matrix_sync(...) store_matrix_sync_at(__LINE__, __VA_ARGS__)
#define mma_sync(...) mma_sync_at(__LINE__, __VA_ARGS__)
