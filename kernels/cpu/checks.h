// Input validation for feddpa::lora_linear, shared by every entry point of the native library
// (the autograd kernel, the CPU kernels, and the `lora_linear_check` op that Python backends call).
#pragma once

#include <ATen/ATen.h>
#include <optional>

namespace feddpa {

// fp64 inputs accumulate in fp64 (gradcheck); every other dtype accumulates u = x @ A^T in fp32.
inline at::ScalarType accum_dtype(at::ScalarType x_dtype) {
  return x_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Raises c10::ValueError / c10::TypeError (Python ValueError / TypeError) naming the argument.
// Works on symbolic shapes so that fake tensors under torch.compile go through it too.
// In-op dropout (dropout_p > 0) needs dropout_seed.
void check_lora_linear_inputs(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scale,
    double dropout_p = 0.0,
    const std::optional<at::Tensor>& dropout_seed = std::nullopt);

// The same for feddpa::lora_linear_banked: bank_a (S, r, K), bank_b (S, N, r), index (M, B)
// int64, scale (M, B r) or (1, B r); under in-op dropout dropout_seed is (S,) int64 (one seed per
// adapter of the bank). Shapes and dtypes only (symbolic shapes pass): the index values are
// checked by check_bank_index_values where the data can be read.
void check_lora_linear_banked_inputs(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& bank_a, const at::Tensor& bank_b, const at::Tensor& index,
    const at::Tensor& scale, double dropout_p = 0.0,
    const std::optional<at::Tensor>& dropout_seed = std::nullopt);

// Every entry of index in [0, S): a row without an adapter in some branch (-1, say) is an
// error (a branch is switched off by a zero scale, not a missing adapter).
void check_bank_index_values(const at::Tensor& index, int64_t adapters);

// dropout_p in [0, 1); when it is > 0, dropout_seed is an int64 tensor of one element on
// `device`. A seed given with dropout_p == 0 is ignored.
void check_dropout_args(double dropout_p, const std::optional<at::Tensor>& dropout_seed,
                        c10::Device device);

// True when an optional tensor argument was given (None arrives as nullopt or undefined).
inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The rows of x seen as a matrix: M = prod(x.shape[:-1]).
c10::SymInt leading_rows(const at::Tensor& x);

}  // namespace feddpa
