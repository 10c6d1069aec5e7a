// Permuting the axes of many small row-major tensors (one per sample), as used between the
// GEMMs of a fused contraction. Adjacent axes that stay adjacent are merged first, so the
// inner loop is a memcpy whenever the innermost axis does not move.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace tensorpress {

struct StridedCopy {
  std::vector<int64_t> size;    // destination axes, outermost first (merged)
  std::vector<int64_t> stride;  // the source stride of each destination axis
  int64_t numel = 1;
};

// dims: source axis sizes; perm: destination axis i is source axis perm[i].
inline StridedCopy make_strided_copy(const std::vector<int64_t>& dims, const std::vector<int>& perm) {
  std::vector<int64_t> src_stride(dims.size(), 1);
  for (int i = static_cast<int>(dims.size()) - 2; i >= 0; --i) src_stride[i] = src_stride[i + 1] * dims[i + 1];
  StridedCopy c;
  for (int p : perm) {
    const int64_t n = dims[p], st = src_stride[p];
    c.numel *= n;
    if (n == 1) continue;
    if (!c.size.empty() && c.stride.back() == st * n) {  // contiguous continuation: merge
      c.size.back() *= n;
      c.stride.back() = st;
    } else {
      c.size.push_back(n);
      c.stride.push_back(st);
    }
  }
  return c;
}

// The inverse permutation, as a permutation of the destination layout back to the source.
inline std::vector<int64_t> permuted_dims(const std::vector<int64_t>& dims, const std::vector<int>& perm) {
  std::vector<int64_t> out;
  for (int p : perm) out.push_back(dims[p]);
  return out;
}
inline std::vector<int> inverse_perm(const std::vector<int>& perm) {
  std::vector<int> inv(perm.size());
  for (size_t i = 0; i < perm.size(); ++i) inv[perm[i]] = static_cast<int>(i);
  return inv;
}

// dst[i * dst_row + j] = src[i + j * src_row] for i < rows, j < cols: the transposition at
// the heart of a gathering permutation. The float version uses AVX2 8x8 register
// transposes where the CPU has them (checked at run time).
void transpose_2d(const float* src, float* dst, int64_t rows, int64_t cols, int64_t src_row, int64_t dst_row);
void transpose_2d(const double* src, double* dst, int64_t rows, int64_t cols, int64_t src_row, int64_t dst_row);

// A contiguous run: short runs of the usual sizes as fixed-size moves (a register or two),
// not a library call each.
template <typename T>
inline void copy_run(const T* from, T* out, int64_t n) {
  switch (n * static_cast<int64_t>(sizeof(T))) {
    case 16:
      std::memcpy(out, from, 16);
      return;
    case 32:
      std::memcpy(out, from, 32);
      return;
    case 64:
      std::memcpy(out, from, 64);
      return;
    case 128:
      std::memcpy(out, from, 128);
      return;
    default:
      if (n >= 64)
        std::memcpy(out, from, sizeof(T) * n);
      else
        for (int64_t i = 0; i < n; ++i) out[i] = from[i];
  }
}

// dst[s] = permute(src[s]) for `samples` consecutive tensors of c.numel elements each.
template <typename T>
void strided_copy(const T* src, T* dst, const StridedCopy& c, int64_t samples) {
  const int axes = static_cast<int>(c.size.size());
  if (axes <= 1) {  // nothing moves
    std::memcpy(dst, src, sizeof(T) * c.numel * samples);
    return;
  }
  const int64_t inner = c.size[axes - 1], inner_stride = c.stride[axes - 1];
  std::vector<int64_t> dst_stride(axes, 1);
  for (int a = axes - 2; a >= 0; --a) dst_stride[a] = dst_stride[a + 1] * c.size[a + 1];

  // A gather (the innermost destination axis is strided in the source): run it as 2-D
  // transposes against the axis that is contiguous in the source.
  int unit = -1;
  for (int a = 0; a < axes - 1; ++a)
    if (c.stride[a] == 1) unit = a;
  if (inner_stride != 1 && unit >= 0) {
    std::vector<int> others;
    for (int a = 0; a < axes - 1; ++a)
      if (a != unit) others.push_back(a);
    std::vector<int64_t> index(others.size());
    for (int64_t s = 0; s < samples; ++s) {
      const T* base = src + s * c.numel;
      T* out = dst + s * c.numel;
      std::fill(index.begin(), index.end(), 0);
      int64_t src_off = 0, dst_off = 0;
      for (;;) {
        transpose_2d(base + src_off, out + dst_off, c.size[unit], inner, inner_stride, dst_stride[unit]);
        int k = static_cast<int>(others.size()) - 1;
        for (; k >= 0; --k) {
          const int a = others[k];
          src_off += c.stride[a];
          dst_off += dst_stride[a];
          if (++index[k] < c.size[a]) break;
          src_off -= c.stride[a] * c.size[a];
          dst_off -= dst_stride[a] * c.size[a];
          index[k] = 0;
        }
        if (k < 0) break;
      }
    }
    return;
  }

  std::vector<int64_t> index(axes - 1);
  for (int64_t s = 0; s < samples; ++s) {
    const T* base = src + s * c.numel;
    T* out = dst + s * c.numel;
    std::fill(index.begin(), index.end(), 0);
    int64_t offset = 0;
    for (;;) {
      const T* from = base + offset;
      if (inner_stride == 1) {
        copy_run(from, out, inner);
      } else {
        for (int64_t i = 0; i < inner; ++i) out[i] = from[i * inner_stride];
      }
      out += inner;
      int a = axes - 2;  // odometer over the outer axes
      for (; a >= 0; --a) {
        offset += c.stride[a];
        if (++index[a] < c.size[a]) break;
        offset -= c.stride[a] * c.size[a];
        index[a] = 0;
      }
      if (a < 0) break;
    }
  }
}

}  // namespace tensorpress
