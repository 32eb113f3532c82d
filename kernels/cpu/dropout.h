// LoRA dropout inside the op (native CPU side): the keep mask is regenerated from a seed, so no
// (M, K) mask or dropped copy of x is ever stored. See lora_linear_cpu.cpp for where it is used.
//
// The mask (identical in the Triton kernels, kernels/triton_dropout.py):
//   (r0, r1, r2, r3) = Philox4x32-10(counter = (k, m / 4, 0, 0), key = seed)
//   keep[m, k]       = (r_{m % 4} >> 1) >= floor(p * 2^31)
// m is the row of x seen as an (M, K) matrix, k its column. Only zeros are applied to x; the
// 1 / (1 - p) factor goes on the rank-R side (u, gs), which is exact in every dtype.
#pragma once

#include <ATen/ATen.h>
#include <cstdint>
#include <optional>

namespace feddpa {

struct LoraDropout {
  double p = 0.0;
  uint64_t seed = 0;
  uint32_t threshold = 0;  // floor(p * 2^31): keep when (random >> 1) >= threshold
  double inv_keep = 1.0;   // 1 / (1 - p)
  bool active() const { return p > 0.0; }
};

// Reads p and the seed tensor (validated by check_lora_linear_inputs); inactive when p == 0.
LoraDropout make_dropout(double p, const std::optional<at::Tensor>& seed);

// u = (x2 ⊙ keep) A^T / (1 - p) in the accumulation dtype, row chunk by row chunk.
at::Tensor dropout_skinny_product(const at::Tensor& x2, const at::Tensor& lora_a,
                                  const LoraDropout& drop);

// The backward's input gradients in one pass over the mask. gsd = g * S / (1 - p), (M, R).
//   dx (when defined, (M, K) contiguous, dtype of x): receives (gsd A) ⊙ keep, chunk by chunk,
//   then dy2 W accumulated in one GEMM (skipped when dy2 is undefined: the banked op runs the
//   frozen GEMM once over all its segments);
//   returns gsd^T (x2 ⊙ keep), (R, K) in the accumulation dtype, when need_da (else empty).
at::Tensor dropout_backward_terms(const at::Tensor& x2, const at::Tensor& gsd,
                                  const at::Tensor& lora_a, const LoraDropout& drop,
                                  const at::Tensor& dy2, const at::Tensor& weight,
                                  at::Tensor& dx, bool need_da);

// The keep mask itself, (rows, cols) bool: for the reference implementation and the tests.
at::Tensor dropout_keep_mask_cpu(int64_t rows, int64_t cols, double p, const at::Tensor& seed);

}  // namespace feddpa
