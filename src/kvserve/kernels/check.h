// Input checks at the kernels' entry points.
//
// KV_CHECK(cond, parts...) throws std::invalid_argument with the parts joined (c10::str): Python sees a
// ValueError, through the pybind11 modules (the compute kernels) and through torch.ops (kv_dequant.cpp)
// alike, as the project asks of bad input. Not TORCH_CHECK: on the GPU machine's image (torch
// 2.11.0+cu130, g++ 13.3, an Intel Xeon; 2026-12-04) throwing a c10::Error from any extension built there
// killed the process with SIGSEGV, a one-line extension without flags too, while standard exceptions
// reached Python (benchmarks/README.md, "On a CUDA GPU"). Bad input must be an error, never a crash.
#pragma once

#include <c10/util/StringUtil.h>

#include <stdexcept>

#define KV_CHECK(cond, ...)                                                        \
  do {                                                                             \
    if (!(cond)) throw std::invalid_argument(std::string(c10::str(__VA_ARGS__)));  \
  } while (false)
