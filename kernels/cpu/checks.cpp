// Input validation for feddpa::lora_linear (see checks.h). Not on the per-element path: a few
// size and dtype comparisons per call.
#include "checks.h"

namespace feddpa {

c10::SymInt leading_rows(const at::Tensor& x) {
  c10::SymInt m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m = m * x.sym_size(d);
  return m;
}

static bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_lora_linear_inputs(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scale,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "lora_linear: x must have shape (..., K), got a 0-d tensor");
  TORCH_CHECK_TYPE(is_supported_dtype(x.scalar_type()),
                   "lora_linear: x has dtype ", x.scalar_type(),
                   "; supported are float32, float16, bfloat16, float64");
  TORCH_CHECK_VALUE(weight.dim() == 2, "lora_linear: weight must have shape (N, K), got ",
                    weight.sym_sizes());
  TORCH_CHECK_VALUE(lora_a.dim() == 2, "lora_linear: lora_a must have shape (R, K), got ",
                    lora_a.sym_sizes());
  TORCH_CHECK_VALUE(lora_b.dim() == 2, "lora_linear: lora_b must have shape (N, R), got ",
                    lora_b.sym_sizes());
  TORCH_CHECK_VALUE(scale.dim() == 2, "lora_linear: scale must have shape (M, R) or (1, R), got ",
                    scale.sym_sizes());

  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(weight.scalar_type() == dtype, "lora_linear: weight has dtype ",
                   weight.scalar_type(), " but x has ", dtype, " (dtypes must match)");
  TORCH_CHECK_TYPE(lora_a.scalar_type() == dtype, "lora_linear: lora_a has dtype ",
                   lora_a.scalar_type(), " but x has ", dtype, " (dtypes must match)");
  TORCH_CHECK_TYPE(lora_b.scalar_type() == dtype, "lora_linear: lora_b has dtype ",
                   lora_b.scalar_type(), " but x has ", dtype, " (dtypes must match)");
  const auto acc = accum_dtype(dtype);
  TORCH_CHECK_TYPE(scale.scalar_type() == acc, "lora_linear: scale must be ", acc,
                   " for x of dtype ", dtype, ", got ", scale.scalar_type());

  const auto& K = x.sym_size(-1);
  const auto& N = weight.sym_size(0);
  const auto& R = lora_a.sym_size(0);
  TORCH_CHECK_VALUE(weight.sym_size(1) == K, "lora_linear: weight has K = ", weight.sym_size(1),
                    " but x has K = ", K, " (weight must be (N, K))");
  TORCH_CHECK_VALUE(lora_a.sym_size(1) == K, "lora_linear: lora_a has K = ", lora_a.sym_size(1),
                    " but x has K = ", K, " (lora_a must be (R, K))");
  TORCH_CHECK_VALUE(lora_b.sym_size(0) == N, "lora_linear: lora_b has N = ", lora_b.sym_size(0),
                    " but weight has N = ", N, " (lora_b must be (N, R))");
  TORCH_CHECK_VALUE(lora_b.sym_size(1) == R, "lora_linear: rank mismatch: lora_a has R = ", R,
                    " rows but lora_b has ", lora_b.sym_size(1), " columns");
  const auto M = leading_rows(x);
  TORCH_CHECK_VALUE(scale.sym_size(1) == R && (scale.sym_size(0) == M || scale.sym_size(0) == 1),
                    "lora_linear: scale must have shape (M, R) = (", M, ", ", R, ") or (1, ", R,
                    "), got ", scale.sym_sizes());

  const auto device = x.device();
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"weight", &weight}, {"lora_a", &lora_a}, {"lora_b", &lora_b}, {"scale", &scale}};
  for (const auto& [name, t] : others) {
    TORCH_CHECK_VALUE(t->device() == device, "lora_linear: ", name, " is on ", t->device(),
                      " but x is on ", device, " (all tensors must share one device)");
  }
  if (bias.has_value()) {
    const auto& b = *bias;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.sym_size(0) == N, "lora_linear: bias must have shape (",
                      N, ",), got ", b.sym_sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == dtype, "lora_linear: bias has dtype ", b.scalar_type(),
                     " but x has ", dtype, " (dtypes must match)");
    TORCH_CHECK_VALUE(b.device() == device, "lora_linear: bias is on ", b.device(),
                      " but x is on ", device, " (all tensors must share one device)");
  }
  check_dropout_args(dropout_p, dropout_seed, device);
}

void check_dropout_args(double dropout_p, const std::optional<at::Tensor>& dropout_seed,
                        c10::Device device) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0,
                    "lora_linear: dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p == 0.0) return;
  TORCH_CHECK_VALUE(given(dropout_seed),
                    "lora_linear: dropout_p = ", dropout_p, " needs dropout_seed (an int64 "
                    "tensor of one element; the mask is regenerated from it in backward)");
  const auto& seed = *dropout_seed;
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, "lora_linear: dropout_seed must be int64, "
                   "got ", seed.scalar_type());
  TORCH_CHECK_VALUE(seed.sym_numel() == 1, "lora_linear: dropout_seed must hold one element, "
                    "got shape ", seed.sym_sizes());
  TORCH_CHECK_VALUE(seed.device() == device, "lora_linear: dropout_seed is on ", seed.device(),
                    " but x is on ", device, " (all tensors must share one device)");
}

}  // namespace feddpa
