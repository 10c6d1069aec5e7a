// Self-tests of the CUDA emulator (the _C_cuda_emu build only): see emu_selftest.cu.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace tensorpress::testing {

// Runs the named self-test kernel; a launch failure throws std::runtime_error.
std::vector<double> emu_selftest(const std::string& name, int threads, int blocks);
// The emulator's half / bfloat16 conversions, bit for bit.
std::vector<uint16_t> emu_float_to_half(const std::vector<float>& v, bool bf16);
std::vector<float> emu_half_to_float(const std::vector<uint16_t>& v, bool bf16);

}  // namespace tensorpress::testing
