// Native CPU kernels of feddpa::lora_linear_banked (rows of one call use different adapters of
// a bank). See banked_cpu.cpp.
#pragma once

#include <ATen/ATen.h>
#include <array>
#include <optional>
#include <tuple>

namespace feddpa {

// (y, u): y = x W^T + b + sum_b ((xl A_{index[m,b]}^T) * S_b) B_{index[m,b]}^T per row m, u the
// (M, branches * r) products in the accumulation dtype (saved for backward).
std::tuple<at::Tensor, at::Tensor> lora_linear_banked_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& bank_a, const at::Tensor& bank_b, const at::Tensor& index,
    const at::Tensor& scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed);

at::Tensor lora_linear_banked_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& bank_a, const at::Tensor& bank_b, const at::Tensor& index,
    const at::Tensor& scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed);

// (dx, d bank_a, d bank_b, d scale); the bank gradients are zero for adapters no row used; an
// entry whose mask bit is false is an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_banked_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bank_a, const at::Tensor& bank_b, const at::Tensor& index,
    const at::Tensor& scale, const at::Tensor& u, std::array<bool, 4> output_mask,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed);

}  // namespace feddpa
