#include "core/permute.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TP_X86 1
#else
#define TP_X86 0
#endif

namespace tensorpress {
namespace {

template <typename T>
void transpose_scalar(const T* src, T* dst, int64_t rows, int64_t cols, int64_t src_row, int64_t dst_row) {
  constexpr int64_t kTile = 16;  // keep both tiles in L1
  for (int64_t i0 = 0; i0 < rows; i0 += kTile)
    for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
      const int64_t i1 = std::min(rows, i0 + kTile), j1 = std::min(cols, j0 + kTile);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j) dst[i * dst_row + j] = src[i + j * src_row];
    }
}

#if TP_X86
// dst rows i..i+7, columns j..j+7 from src columns j..j+7 (each 8 contiguous floats at i).
__attribute__((target("avx2"))) void transpose_8x8(const float* src, float* dst, int64_t src_row, int64_t dst_row) {
  __m256 r0 = _mm256_loadu_ps(src + 0 * src_row), r1 = _mm256_loadu_ps(src + 1 * src_row);
  __m256 r2 = _mm256_loadu_ps(src + 2 * src_row), r3 = _mm256_loadu_ps(src + 3 * src_row);
  __m256 r4 = _mm256_loadu_ps(src + 4 * src_row), r5 = _mm256_loadu_ps(src + 5 * src_row);
  __m256 r6 = _mm256_loadu_ps(src + 6 * src_row), r7 = _mm256_loadu_ps(src + 7 * src_row);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * dst_row, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + 1 * dst_row, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * dst_row, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * dst_row, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * dst_row, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * dst_row, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * dst_row, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * dst_row, _mm256_permute2f128_ps(u3, u7, 0x31));
}

__attribute__((target("avx2"))) void transpose_avx2(const float* src, float* dst, int64_t rows, int64_t cols,
                                                    int64_t src_row, int64_t dst_row) {
  const int64_t rows8 = rows - rows % 8, cols8 = cols - cols % 8;
  for (int64_t j = 0; j < cols8; j += 8)
    for (int64_t i = 0; i < rows8; i += 8)
      transpose_8x8(src + i + j * src_row, dst + i * dst_row + j, src_row, dst_row);
  // ragged edges
  if (rows8 < rows) transpose_scalar(src + rows8, dst + rows8 * dst_row, rows - rows8, cols, src_row, dst_row);
  if (cols8 < cols) transpose_scalar(src + cols8 * src_row, dst + cols8, rows8, cols - cols8, src_row, dst_row);
}

const bool kHasAvx2 = __builtin_cpu_supports("avx2");
#endif

}  // namespace

void transpose_2d(const float* src, float* dst, int64_t rows, int64_t cols, int64_t src_row, int64_t dst_row) {
#if TP_X86
  if (kHasAvx2 && rows >= 8 && cols >= 8) return transpose_avx2(src, dst, rows, cols, src_row, dst_row);
#endif
  transpose_scalar(src, dst, rows, cols, src_row, dst_row);
}

void transpose_2d(const double* src, double* dst, int64_t rows, int64_t cols, int64_t src_row, int64_t dst_row) {
  transpose_scalar(src, dst, rows, cols, src_row, dst_row);
}

}  // namespace tensorpress
