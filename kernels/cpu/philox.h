// Philox4x32-10 (Salmon et al., SC'11), the counter-based generator of the in-op dropout mask,
// vectorised over consecutive counters. The constants and round function are those of ATen's
// PhiloxRNGEngine.h and of triton.language.random, so the Triton kernels reproduce the stream.
#pragma once

#include <cstdint>

namespace feddpa {

// Counters per philox_columns call.
constexpr int64_t kPhiloxColumns = 32;

// For i in [0, kPhiloxColumns): (w0[i], w1[i], w2[i], w3[i]) = Philox4x32-10 of the counter
// (col + i, group, 0, 0) under the key (seed low word, seed high word).
void philox_columns(uint32_t col, uint32_t group, uint64_t seed, uint32_t* w0, uint32_t* w1,
                    uint32_t* w2, uint32_t* w3);

}  // namespace feddpa
