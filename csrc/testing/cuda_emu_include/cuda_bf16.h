// CPU emulation shim (test builds only): see csrc/testing/cuda_emu.h.
#pragma once
#include "testing/cuda_emu.h"
