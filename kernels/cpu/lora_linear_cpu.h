// Native CPU kernels of feddpa::lora_linear (forward and backward). See lora_linear_cpu.cpp.
#pragma once

#include <ATen/ATen.h>
#include <array>
#include <optional>
#include <tuple>

namespace feddpa {

// lhs (M, K) @ rhs_t (R, K)^T -> (M, R) in the accumulation dtype (fp32, fp64 for fp64 lhs).
at::Tensor skinny_product(const at::Tensor& lhs, const at::Tensor& rhs_t);

// y = x W^T + b + ((xl A^T) * S) B^T with xl = x ⊙ keep / (1 - p) under in-op dropout
// (dropout_p > 0, mask from dropout_seed: dropout.h), else x; returns (y, u) with u = xl A^T in
// the accumulation dtype (saved for backward: it is only M x R).
std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scale,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed);

at::Tensor lora_linear_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scale,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed);

// Returns (dx, d lora_a, d lora_b, d scale); an entry whose mask bit is false is an empty tensor.
// With in-op dropout the mask is regenerated from the seed: dx's and dA's rank-R terms apply it.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scale,
    const at::Tensor& u, std::array<bool, 4> output_mask, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed);

}  // namespace feddpa
