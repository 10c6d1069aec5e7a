// The two pieces of CUDA syntax our kernels use that macros of the CPU emulation
// (csrc/testing/cuda_emu.h) cannot take over by themselves: the launch and the declaration of
// dynamic shared memory. Every .cu file goes through these, so the same source compiles with
// nvcc and, for the tests, as C++ against the emulator.
//   TP_LAUNCH(grid, block, smem_bytes, stream, kernel)(args...)
//   TP_DYNAMIC_SHARED(type, name);   // `name` points at the launch's dynamic shared memory
#pragma once
#if defined(TENSORPRESS_CUDA_EMU)
#include "testing/cuda_emu.h"
#else
#define TP_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>
#define TP_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif
