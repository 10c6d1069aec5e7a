// CUDA on the CPU, for tests: the project's .cu files compile unchanged as C++ against this
// header (through the cuda_runtime.h / cuda_fp16.h / cuda_bf16.h shims in cuda_emu_include/)
// and run their kernels on host memory. Test infrastructure, not a product feature: the
// emulation build is a separate extension module (_C_cuda_emu, see CMakeLists.txt), built
// and run by scripts/cuda_emu_tests.sh.
//
// What is modelled, and how:
// - A launch runs its blocks one after another. The threads of a block are fibers (contexts
//   with their own stacks, switched by cuda_emu.cpp) on the launching OS thread, switched at
//   every barrier and warp exchange. (Real OS threads were tried first: with 256 threads per block a barrier
//   cost ~10 ms on 2 cores, the GPU suite would not finish in CI.) ThreadSanitizer sees each
//   fiber as its own thread with no synchronization at the switches, only at the barriers, so a
//   missing barrier is a reported data race; AddressSanitizer is told about every stack switch.
// - __syncthreads is a block barrier that checks every thread reaches it, at the same source
//   line; a thread returning while others wait, or every live thread blocked at barriers that
//   cannot complete, fails the launch (cudaGetLastError reports where).
// - Warp collectives (__shfl*_sync, __syncwarp) exchange among the 32 lanes of a warp, with a
//   warp barrier; they must be called by every lane of the warp with the full mask (the
//   kernels here use no partial-warp masks; the emulator refuses them rather than guess).
// - Static __shared__ variables are function statics, shared by the block's threads (blocks
//   never overlap, and launches are serialized). The schedule is deterministic: a thread runs
//   until it waits, so code that reads another thread's write without a barrier reads the
//   poison or a stale value every time, not once in a while. Dynamic shared memory is a fresh heap buffer
//   of exactly the launch's size, filled with 0xFF bytes (NaN for float and double) before
//   every block, so AddressSanitizer sees overruns and a read-before-write shows as NaN.
// - The launch configuration is validated as the driver does: block and grid sizes, and the
//   dynamic shared memory against the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize
//   (48 KB unless raised) and the device's opt-in limit. The emulated device is an H100.
// - __half and __nv_bfloat16 hold their 16 bits; conversions round to nearest even exactly as
//   CUDA's __float2half_rn / __float2bfloat16_rn (NaN becomes the canonical 0x7fff).
// - Launches are synchronous; streams are accepted and ignored.
// - Tensor-core fragments (nvcuda::wmma, cuda_emu_include/mma.h): see that file.
// Not modelled: atomics, clusters, wgmma/TMA, memory-ordering effects weaker than the barriers
// (the threads see each other's writes at the barriers, as in CUDA).
#pragma once

#include <math.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define TP_EMU_TSAN 1
#else
#define TP_EMU_TSAN 0
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define TP_EMU_ASAN 1
#else
#define TP_EMU_ASAN 0
#endif

// ----------------------------------------------------------------------------- keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

// device math that CUDA provides unqualified for integers (floating point comes from math.h)
using std::max;
using std::min;
inline double __longlong_as_double(long long v) {
  double d;
  std::memcpy(&d, &v, sizeof d);
  return d;
}

// CUDA's 16-byte vector type: its alignment makes a misaligned vector load undefined behaviour
// here too, which UBSan (-fsanitize=alignment) reports.
struct alignas(16) float4 {
  float x, y, z, w;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

// ----------------------------------------------------------------------------- runtime API
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaDeviceProp {
  char name[256];
  int major, minor;
};
#define CUDART_VERSION 13000

namespace tp_emu {

// The emulated device (an H100 SXM's limits, as the cost model assumes).
constexpr int kSmCount = 132;
constexpr int kSmemPerSm = 233472;
constexpr int kSmemPerBlockOptin = 232448;
constexpr int kSmemDefault = 48 * 1024;

struct RuntimeState {
  std::mutex mu;
  cudaError_t last = cudaSuccess;
  std::string detail;                      // what the last launch failure was
  std::map<const void*, int> max_dynamic;  // per kernel, cudaFuncAttributeMaxDynamicSharedMemorySize
  std::mutex launch;                       // one launch at a time (static __shared__ are function statics)
};
inline RuntimeState& runtime() {
  static RuntimeState s;
  return s;
}
inline cudaError_t set_error(cudaError_t e, std::string detail) {
  RuntimeState& r = runtime();
  std::lock_guard<std::mutex> lk(r.mu);
  if (r.last == cudaSuccess) r.last = e, r.detail = std::move(detail);
  return e;
}

}  // namespace tp_emu

inline cudaError_t cudaGetLastError() {
  tp_emu::RuntimeState& r = tp_emu::runtime();
  std::lock_guard<std::mutex> lk(r.mu);
  const cudaError_t e = r.last;
  r.last = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() {
  tp_emu::RuntimeState& r = tp_emu::runtime();
  std::lock_guard<std::mutex> lk(r.mu);
  return r.last;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  static thread_local std::string text;
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      text = "invalid argument";
      break;
    case cudaErrorInvalidConfiguration:
      text = "invalid configuration argument";
      break;
    case cudaErrorNoDevice:
      return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    case cudaErrorLaunchFailure:
      text = "unspecified launch failure";
      break;
  }
  tp_emu::RuntimeState& r = tp_emu::runtime();
  std::lock_guard<std::mutex> lk(r.mu);
  if (!r.detail.empty()) text += " (CUDA emulator: " + r.detail + ")";
  return text.c_str();
}
inline cudaError_t cudaGetDeviceCount(int* n) { return *n = 1, cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { return *d = 0, cudaSuccess; }
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
inline cudaError_t cudaDriverGetVersion(int* v) { return *v = CUDART_VERSION, cudaSuccess; }
inline cudaError_t cudaRuntimeGetVersion(int* v) { return *v = CUDART_VERSION, cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaPeekAtLastError(); }
inline cudaError_t cudaDeviceSynchronize() { return cudaPeekAtLastError(); }
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
  if (d != 0) return cudaErrorInvalidDevice;
  std::snprintf(p->name, sizeof p->name, "%s", "CUDA emulator (H100 limits)");
  p->major = 9, p->minor = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int d) {
  if (d != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *v = tp_emu::kSmCount;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
      *v = tp_emu::kSmemPerSm;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *v = tp_emu::kSmemPerBlockOptin;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > tp_emu::kSmemPerBlockOptin)
    return tp_emu::set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: " + std::to_string(value) +
                                                        " bytes of dynamic shared memory asked, the device allows " +
                                                        std::to_string(tp_emu::kSmemPerBlockOptin));
  tp_emu::RuntimeState& r = tp_emu::runtime();
  std::lock_guard<std::mutex> lk(r.mu);
  r.max_dynamic[kernel] = value;
  return cudaSuccess;
}

// ----------------------------------------------------------------------------- half types
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

namespace tp_emu {
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace tp_emu

inline __half __float2half_rn(float f) {
  const uint32_t x = tp_emu::float_bits(f), sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return {static_cast<uint16_t>(0x7fffu)};          // NaN
  if (a >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (a <= 0x33000000u) return {static_cast<uint16_t>(sign)};            // <= 2^-25: to zero
  const uint32_t exp = a >> 23;
  uint32_t h, rem, halfway;
  if (exp < 113) {  // a half subnormal: units of 2^-24
    const uint32_t mant = (a & 0x7fffffu) | 0x800000u, shift = 126 - exp;
    h = mant >> shift, rem = mant & ((1u << shift) - 1), halfway = 1u << (shift - 1);
  } else {
    h = ((exp - 112) << 10) | ((a >> 13) & 0x3ffu), rem = a & 0x1fffu, halfway = 0x1000u;
  }
  if (rem > halfway || (rem == halfway && (h & 1u))) ++h;  // a carry into the exponent is right
  return {static_cast<uint16_t>(sign | h)};
}
inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1fu,
                 mant = h.bits & 0x3ffu;
  if (exp == 0x1f) return tp_emu::bits_float(sign | 0x7f800000u | (mant << 13));
  if (exp != 0) return tp_emu::bits_float(sign | ((exp + 112) << 23) | (mant << 13));
  const float v = std::ldexp(static_cast<float>(mant), -24);  // zero or subnormal: exact
  return sign ? -v : v;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = tp_emu::float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>(0x7fffu)};
  return {static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 b) { return tp_emu::bits_float(static_cast<uint32_t>(b.bits) << 16); }

// ----------------------------------------------------------------------------- blocks
extern "C" void tp_emu_switch(void** save_sp, void* load_sp);  // cuda_emu.cpp
#if TP_EMU_TSAN
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
#endif

namespace tp_emu {

// ThreadSanitizer must not check the emulator's own bookkeeping (fiber states, barrier counts,
// threadIdx), which the scheduler and the fibers share with no synchronization the tool could
// see (they never run at once): within a Quiet scope a fiber's accesses are not recorded, its
// acquires and releases still are. Only the kernels' own accesses are checked.
struct Quiet {
  Quiet() { begin(); }
  ~Quiet() { end(); }
  Quiet(const Quiet&) = delete;
  Quiet& operator=(const Quiet&) = delete;
  // the nesting of the code now running: a fiber's own (it may end inside a scope, see
  // Block::suspend), or the OS thread's
  static inline thread_local int* depth = nullptr;
  static inline thread_local int thread_depth = 0;
  static int& current() { return depth ? *depth : thread_depth; }
  static void begin() {
#if TP_EMU_TSAN
    __tsan_ignore_thread_begin();
#endif
    ++current();
  }
  static void end() {
    --current();
#if TP_EMU_TSAN
    __tsan_ignore_thread_end();
#endif
  }
};

// Happens-before for ThreadSanitizer, which sees every CUDA thread as its own fiber with no
// synchronization at the switches: only the barriers order the threads' memory accesses.
inline void hb_release(void* token) {
#if TP_EMU_TSAN
  __tsan_release(token);
#else
  (void)token;
#endif
}
inline void hb_acquire(void* token) {
#if TP_EMU_TSAN
  __tsan_acquire(token);
#else
  (void)token;
#endif
}

struct Barrier {
  int n = 0, waiting = 0, exited = 0, line = 0;
  uint64_t generation = 0;
  char token[2] = {};  // ThreadSanitizer sync objects, one per generation parity
};

// One launch's CUDA threads: fibers (cooperatively scheduled contexts) on the launching OS
// thread, run block after block. A fiber runs until it waits at a barrier or a warp exchange
// (or returns); the scheduler then resumes the next runnable one, round-robin.
class Block {
 public:
  Block(int threads, size_t smem) : n_(threads), smem_bytes_(smem), fibers_(threads), warps_((threads + 31) / 32) {
    smem_.reset(new (std::align_val_t(16)) unsigned char[smem ? smem : 1]);
    for (size_t w = 0; w < warps_.size(); ++w) {
      warps_[w].lanes = std::min(32, threads - static_cast<int>(w) * 32);
      for (auto& g : warps_[w].gather) g.assign(32 * kGatherBytes, 0);
    }
    const size_t per = kStackBytes + kGuardBytes;
    stacks_ =
        static_cast<char*>(mmap(nullptr, per * threads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (stacks_ == MAP_FAILED) throw std::bad_alloc();
    for (int t = 0; t < threads; ++t) {
      mprotect(stacks_ + t * per, kGuardBytes, PROT_NONE);  // a stack overflow faults at once
      fibers_[t].stack = stacks_ + t * per + kGuardBytes;
#if TP_EMU_TSAN
      fibers_[t].tsan = __tsan_create_fiber(0);
#endif
    }
#if TP_EMU_TSAN
    main_tsan_ = __tsan_get_current_fiber();
#endif
  }
  ~Block() {
#if TP_EMU_TSAN
    for (Fiber& f : fibers_) __tsan_destroy_fiber(f.tsan);
#endif
    // the fibers never return from entry(): their frames' redzones are still poisoned, and the
    // next mapping at these addresses would inherit the poison
#if TP_EMU_ASAN
    __asan_unpoison_memory_region(stacks_, (kStackBytes + kGuardBytes) * fibers_.size());
#endif
    munmap(stacks_, (kStackBytes + kGuardBytes) * fibers_.size());
    ::operator delete[](smem_.release(), std::align_val_t(16));
  }
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;

  // Runs `body` on every thread of one block; false when the block failed (see error()).
  bool run(dim3 block_dim, const std::function<void()>& body) {
    Quiet quiet;
    std::memset(smem_.get(), 0xff, smem_bytes_);
    reset(block_, n_);
    for (Warp& w : warps_) {
      reset(w.bar, w.lanes);
      std::fill(std::begin(w.parity), std::end(w.parity), 0);
    }
    exited_ = 0;
    body_ = &body;
    block_dim_ = block_dim;
    for (int t = 0; t < n_; ++t) {
      // a fresh stack whose first switch "returns" into entry() with the ABI's alignment
      Fiber& f = fibers_[t];
      void** sp = reinterpret_cast<void**>((reinterpret_cast<uintptr_t>(f.stack) + kStackBytes) & ~uintptr_t(15));
      *--sp = nullptr;                                 // entry()'s return address: it never returns
      *--sp = reinterpret_cast<void*>(&Block::entry);  // where tp_emu_switch's ret goes
      for (int r = 0; r < 6; ++r) *--sp = nullptr;     // rbp, rbx, r12-r15
      f.sp = sp;
      f.state = State::Runnable;
      f.waiting_on = nullptr;
      f.quiet = 0;
    }
    hb_release(&start_token_);
    while (!failed_ && exited_ < n_) {
      bool ran = false;
      for (int t = 0; t < n_ && !failed_; ++t)
        if (fibers_[t].state == State::Runnable) resume(t), ran = true;
      if (!ran && !failed_) fail(describe_deadlock());
    }
    hb_acquire(&end_token_);
    if (failed_)  // the abandoned threads' last writes are ordered before the launch's return too
      for (Barrier* b : barriers()) hb_acquire(&b->token[0]), hb_acquire(&b->token[1]);
    return !failed_;
  }

  unsigned char* dynamic_shared() { return smem_.get(); }
  const std::string& error() const { return error_; }

  void syncthreads(int line) {
    Quiet quiet;
    arrive(block_, line, "__syncthreads");
  }
  void syncwarp(unsigned mask, int line) {
    Quiet quiet;
    check_mask(mask, "__syncwarp");
    arrive(warps_[current_tid / 32].bar, line, "__syncwarp");
  }

  // One exchange among the lanes of the current warp: lane l gets the value lane src(l) put
  // in. Double-buffered slots need one barrier per exchange: a lane can reuse a buffer only
  // after the next exchange's barrier, which every lane reaches after reading this one.
  template <typename T, typename Src>
  T exchange(unsigned mask, T v, Src src, int line, const char* what) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle of a type above 8 bytes");
    Quiet quiet;
    check_mask(mask, what);
    Warp& w = warps_[current_tid / 32];
    const int lane = current_tid % 32, p = w.parity[lane];
    std::memcpy(w.slots[p][lane], &v, sizeof(T));
    arrive(w.bar, line, what);
    const int s = src(lane);
    T out = v;
    if (s >= 0 && s < w.lanes) std::memcpy(&out, w.slots[p][s], sizeof(T));
    w.parity[lane] = static_cast<uint8_t>(1 - p);
    return out;
  }

  // A warp collective that hands every lane the `bytes` bytes each of the 32 lanes put in, in
  // lane order (`all` gets 32 * bytes): the tensor-core fragment operations (mma.h) exchange
  // their operands through it. Same buffering argument as exchange(); whole warps only.
  static constexpr size_t kGatherBytes = 256;
  void all_gather(const void* mine, size_t bytes, void* all, int line, const char* what) {
    Quiet quiet;
    Warp& w = warps_[current_tid / 32];
    if (w.lanes != 32 || bytes > kGatherBytes) {
      fail(std::string(what) +
           (w.lanes != 32 ? " in a warp of " + std::to_string(w.lanes) + " threads (needs all 32)"
                          : ": operand above the emulator's " + std::to_string(kGatherBytes) + " bytes per lane"));
      park();
    }
    const int lane = current_tid % 32, p = w.parity[lane];
    std::memcpy(w.gather[p].data() + lane * kGatherBytes, mine, bytes);
    arrive(w.bar, line, what);
    for (int l = 0; l < 32; ++l)
      std::memcpy(static_cast<unsigned char*>(all) + l * bytes, w.gather[p].data() + l * kGatherBytes, bytes);
    w.parity[lane] = static_cast<uint8_t>(1 - p);
  }
  // Fails the launch (a misuse the hardware would not diagnose), naming `what`.
  [[noreturn]] void misuse(const std::string& what) {
    Quiet quiet;
    fail(what);
    park();
  }

  static inline thread_local Block* current = nullptr;  // the launch running on this OS thread
  static inline thread_local int current_tid = 0;       // its CUDA thread now running

 private:
#if TP_EMU_ASAN || TP_EMU_TSAN
  static constexpr size_t kStackBytes = 512 * 1024;  // instrumented frames are larger
#else
  static constexpr size_t kStackBytes = 128 * 1024;
#endif
  static constexpr size_t kGuardBytes = 4096;
  enum class State { Runnable, Waiting, Exited, Parked };
  struct Fiber {
    void* sp = nullptr;  // saved stack pointer while switched out
    char* stack = nullptr;
    State state = State::Exited;
    Barrier* waiting_on = nullptr;
    uint64_t generation = 0;
    void* tsan = nullptr;
    void* asan_fake = nullptr;
    int quiet = 0;  // Quiet nesting of this fiber
  };
  struct Warp {
    Barrier bar;
    int lanes = 32;
    uint8_t parity[32] = {};
    alignas(8) unsigned char slots[2][32][8] = {};
    std::vector<unsigned char> gather[2];  // all_gather's buffers, 32 x kGatherBytes each
  };

  static void reset(Barrier& b, int n) { b.n = n, b.waiting = 0, b.exited = 0, b.line = 0; }
  std::vector<Barrier*> barriers() {
    std::vector<Barrier*> out{&block_};
    for (Warp& w : warps_) out.push_back(&w.bar);
    return out;
  }

  // scheduler -> fiber t
  void resume(int t) {
    current_tid = t;
    threadIdx = {t % block_dim_.x, (t / block_dim_.x) % block_dim_.y, t / (block_dim_.x * block_dim_.y)};
    Fiber& f = fibers_[t];
    Quiet::depth = &f.quiet;  // (before the switch: the scheduler's own write, ignored)
#if TP_EMU_TSAN
    __tsan_switch_to_fiber(f.tsan, 1 /* __tsan_switch_to_fiber_no_sync */);
#endif
#if TP_EMU_ASAN
    __sanitizer_start_switch_fiber(&main_fake_, f.stack, kStackBytes);
#endif
    tp_emu_switch(&main_sp_, f.sp);
    Quiet::depth = nullptr;
#if TP_EMU_ASAN
    __sanitizer_finish_switch_fiber(main_fake_, nullptr, nullptr);
#endif
  }

  // fiber -> scheduler; `state` says whether it will be resumed (never for Exited / Parked).
  // Called within a Quiet scope; everything the switch needs is read into locals first, so a
  // last switch, made with the accesses no longer ignored, touches no shared memory.
  void suspend(State state) {
    Fiber& f = fibers_[current_tid];
    f.state = state;
    const bool last = state == State::Exited || state == State::Parked;
    void** const save_sp = &f.sp;
    void* const main_sp = main_sp_;
    void* const main_tsan = main_tsan_;
    void** const fake = last ? nullptr : &f.asan_fake;
    const void* const bottom = main_bottom_;
    const size_t size = main_size_;
    if (last) {  // a fiber must not end with its accesses ignored (ThreadSanitizer reports it)
      const int depth = f.quiet;
      f.quiet = 0;
#if TP_EMU_TSAN
      for (int i = 0; i < depth; ++i) __tsan_ignore_thread_end();
#else
      (void)depth;
#endif
    }
#if TP_EMU_TSAN
    __tsan_switch_to_fiber(main_tsan, 1);
#else
    (void)main_tsan;
#endif
#if TP_EMU_ASAN
    __sanitizer_start_switch_fiber(fake, bottom, size);
#else
    (void)fake, (void)bottom, (void)size;
#endif
    tp_emu_switch(save_sp, main_sp);  // (assembly: not instrumented)
#if TP_EMU_ASAN
    __sanitizer_finish_switch_fiber(f.asan_fake, &main_bottom_, &main_size_);
#endif
  }

  static void entry() {
    Block* bp;
    const std::function<void()>* body;
    {
      Quiet quiet;
      bp = current;
      body = bp->body_;
#if TP_EMU_ASAN
      __sanitizer_finish_switch_fiber(nullptr, &bp->main_bottom_, &bp->main_size_);
#endif
      hb_acquire(&bp->start_token_);
    }
    Block& b = *bp;
    try {
      (*body)();
    } catch (const std::exception& e) {
      Quiet quiet;
      b.fail(std::string("exception in the kernel: ") + e.what());
    } catch (...) {
      Quiet quiet;
      b.fail("exception in the kernel");
    }
    Quiet quiet;  // to the end: this fiber is never resumed
    if (!b.failed_) b.leave();
    hb_release(&b.end_token_);
    b.suspend(State::Exited);
  }

  // The current thread returned: barriers still waiting for it can never complete.
  void leave() {
    ++exited_;
    for (Barrier* b : {&block_, &warps_[current_tid / 32].bar}) {
      ++b->exited;
      if (b->waiting > 0 && b->waiting + b->exited == b->n)
        fail(what_of(*b) + " at line " + std::to_string(b->line) + " reached by " + std::to_string(b->waiting) +
             " of " + std::to_string(b->n) + " threads: the others returned from the kernel");
    }
  }

  void arrive(Barrier& b, int line, const char* what) {
    if (b.waiting == 0) {
      b.line = line;
    } else if (b.line != line) {
      fail(std::string(what) + " reached at different places: line " + std::to_string(b.line) + " and line " +
           std::to_string(line) + " (thread " + std::to_string(current_tid) + ")");
      park();
    }
    const uint64_t gen = b.generation;
    hb_release(&b.token[gen & 1]);
    if (++b.waiting + b.exited == b.n) {
      if (b.exited > 0) {
        fail(std::string(what) + " at line " + std::to_string(line) + " reached by " + std::to_string(b.waiting) +
             " of " + std::to_string(b.n) + " threads: the others returned from the kernel");
        park();
      }
      for (Fiber& f : fibers_)
        if (f.state == State::Waiting && f.waiting_on == &b) f.state = State::Runnable, f.waiting_on = nullptr;
      b.waiting = 0;
      ++b.generation;
    } else {
      fibers_[current_tid].waiting_on = &b;
      suspend(State::Waiting);
    }
    hb_acquire(&b.token[gen & 1]);
  }

  [[noreturn]] void park() {
    hb_release(&end_token_);
    suspend(State::Parked);
    std::abort();  // never resumed
  }

  void check_mask(unsigned mask, const char* what) {
    const int lanes = warps_[current_tid / 32].lanes;
    const unsigned full = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
    if (mask != full) {
      fail(std::string(what) + ": mask 0x" + hex(mask) + " is not the warp's full mask 0x" + hex(full) +
           " (the emulator runs whole-warp collectives only)");
      park();
    }
  }
  static std::string hex(unsigned v) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "%08x", v);
    return buf;
  }
  std::string what_of(const Barrier& b) const { return &b == &block_ ? "__syncthreads" : "a warp collective"; }

  std::string describe_deadlock() const {
    std::string out = "deadlock: every live thread waits at a barrier no other thread can reach (";
    bool first = true;
    auto add = [&](const Barrier& b, const std::string& name) {
      if (b.waiting == 0) return;
      out += (first ? "" : "; ") + name + " at line " + std::to_string(b.line) + ": " + std::to_string(b.waiting) +
             " of " + std::to_string(b.n) + " waiting";
      first = false;
    };
    add(block_, "__syncthreads");
    for (size_t w = 0; w < warps_.size(); ++w) add(warps_[w].bar, "warp " + std::to_string(w));
    return out + ")";
  }

  void fail(const std::string& msg) {
    if (!failed_) failed_ = true, error_ = msg;
  }

  const int n_;
  const size_t smem_bytes_;
  std::unique_ptr<unsigned char[]> smem_;
  std::vector<Fiber> fibers_;
  std::vector<Warp> warps_;
  Barrier block_;
  char* stacks_ = nullptr;
  void* main_sp_ = nullptr;  // the scheduler's, while a fiber runs
  const std::function<void()>* body_ = nullptr;
  dim3 block_dim_;
  int exited_ = 0;
  bool failed_ = false;
  std::string error_;
  char start_token_ = 0, end_token_ = 0;
  void* main_tsan_ = nullptr;
  void* main_fake_ = nullptr;
  const void* main_bottom_ = nullptr;
  size_t main_size_ = 0;
};

inline Block& block() {
  if (Block::current == nullptr) std::abort();  // a device intrinsic called outside a kernel
  return *Block::current;
}

inline std::string dim_str(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

// Runs `body` (the kernel with its arguments bound) on every thread of every block.
inline void run_grid(const char* file, int line, dim3 grid, dim3 block_dim, size_t smem, const void* kernel,
                     const std::function<void()>& body) {
  Quiet quiet;
  const std::string at = std::string(file) + ":" + std::to_string(line);
  const uint64_t threads = uint64_t(block_dim.x) * block_dim.y * block_dim.z;
  if (threads == 0 || threads > 1024 || block_dim.x > 1024 || block_dim.y > 1024 || block_dim.z > 64) {
    set_error(cudaErrorInvalidConfiguration, "block " + dim_str(block_dim) + " at " + at);
    return;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    set_error(cudaErrorInvalidConfiguration, "grid " + dim_str(grid) + " at " + at);
    return;
  }
  {
    RuntimeState& r = runtime();
    std::unique_lock<std::mutex> lk(r.mu);
    auto it = r.max_dynamic.find(kernel);
    const int allowed = it == r.max_dynamic.end() ? kSmemDefault : it->second;
    if (smem > static_cast<size_t>(allowed)) {
      lk.unlock();
      set_error(cudaErrorInvalidValue, std::to_string(smem) + " bytes of dynamic shared memory, the kernel allows " +
                                           std::to_string(allowed) +
                                           " (cudaFuncAttributeMaxDynamicSharedMemorySize) at " + at);
      return;
    }
  }
  std::lock_guard<std::mutex> serial(runtime().launch);
  Block blk(static_cast<int>(threads), smem);
  Block* const outer = Block::current;
  Block::current = &blk;
  blockDim = block_dim;
  gridDim = grid;
  bool ok = true;
  for (unsigned z = 0; z < grid.z && ok; ++z)
    for (unsigned y = 0; y < grid.y && ok; ++y)
      for (unsigned x = 0; x < grid.x && ok; ++x) {
        blockIdx = {x, y, z};
        ok = blk.run(block_dim, body);
        if (!ok)
          set_error(cudaErrorLaunchFailure,
                    blk.error() + " in block " + dim_str(dim3(x, y, z)) + " of the kernel launched at " + at);
      }
  Block::current = outer;
  threadIdx = {0, 0, 0};
}

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  const char* file;
  int line;
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... args) const {
    // the arguments are copied once, as CUDA copies them to the parameter space
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    const auto k = kernel;
    run_grid(file, line, grid, block, smem, reinterpret_cast<const void*>(k), [&] { std::apply(k, params); });
  }
};

template <typename... P>
Launch<P...> launch(const char* file, int line, dim3 grid, dim3 block, size_t smem, cudaStream_t,
                    void (*kernel)(P...)) {
  return Launch<P...>{kernel, file, line, grid, block, smem};
}

}  // namespace tp_emu

// ----------------------------------------------------------------------------- intrinsics
#define __syncthreads() ::tp_emu::block().syncthreads(__LINE__)
#define __syncwarp(...) ::tp_emu::sync_warp(__LINE__, ##__VA_ARGS__)
#define __shfl_xor_sync(...) ::tp_emu::shfl_xor(__LINE__, __VA_ARGS__)
#define __shfl_sync(...) ::tp_emu::shfl(__LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::tp_emu::shfl_down(__LINE__, __VA_ARGS__)

namespace tp_emu {
inline void sync_warp(int line, unsigned mask = 0xffffffffu) { block().syncwarp(mask, line); }
// width: lanes are grouped by `width`; a source outside the lane's group gives its own value
template <typename T>
T shfl_xor(int line, unsigned mask, T v, int lane_mask, int width = 32) {
  return block().exchange(
      mask, v,
      [&](int l) {
        const int s = l ^ lane_mask;
        return s / width == l / width ? s : l;
      },
      line, "__shfl_xor_sync");
}
template <typename T>
T shfl(int line, unsigned mask, T v, int src_lane, int width = 32) {
  return block().exchange(mask, v, [&](int l) { return (l / width) * width + src_lane % width; }, line, "__shfl_sync");
}
template <typename T>
T shfl_down(int line, unsigned mask, T v, unsigned delta, int width = 32) {
  return block().exchange(
      mask, v,
      [&](int l) {
        const int s = l + static_cast<int>(delta);
        return s / width == l / width ? s : l;
      },
      line, "__shfl_down_sync");
}
}  // namespace tp_emu

// ----------------------------------------------------------------------------- project macros
// (csrc/core/cuda_launch.h defines them for nvcc)
#define TP_LAUNCH(grid, block, smem, stream, ...) \
  ::tp_emu::launch(__FILE__, __LINE__, (grid), (block), (smem), (stream), __VA_ARGS__)
#define TP_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::tp_emu::block().dynamic_shared())
