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

void check_lora_linear_banked_inputs(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& bank_a, const at::Tensor& bank_b, const at::Tensor& index,
    const at::Tensor& scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  TORCH_CHECK_VALUE(bank_a.dim() == 3, "lora_linear_banked: bank_a must have shape (S, r, K), "
                    "got ", bank_a.sym_sizes());
  TORCH_CHECK_VALUE(bank_b.dim() == 3, "lora_linear_banked: bank_b must have shape (S, N, r), "
                    "got ", bank_b.sym_sizes());
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "lora_linear_banked: index must be int64, "
                   "got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.dim() == 2 && index.sym_size(1) >= 1,
                    "lora_linear_banked: index must have shape (M, branches), got ",
                    index.sym_sizes());
  const auto& S = bank_a.sym_size(0);
  const auto& r = bank_a.sym_size(1);
  TORCH_CHECK_VALUE(bank_b.sym_size(0) == S, "lora_linear_banked: bank_a holds ", S,
                    " adapters but bank_b holds ", bank_b.sym_size(0));
  TORCH_CHECK_VALUE(bank_b.sym_size(2) == r, "lora_linear_banked: rank mismatch: bank_a has r = ",
                    r, " but bank_b has r = ", bank_b.sym_size(2));
  TORCH_CHECK_VALUE(S >= 1, "lora_linear_banked: the bank holds no adapter (S = 0)");
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(bank_a.scalar_type() == dtype && bank_b.scalar_type() == dtype,
                   "lora_linear_banked: bank_a / bank_b have dtypes ", bank_a.scalar_type(), " / ",
                   bank_b.scalar_type(), " but x has ", dtype, " (dtypes must match)");
  TORCH_CHECK_VALUE(bank_a.sym_size(2) == x.sym_size(-1), "lora_linear_banked: bank_a has K = ",
                    bank_a.sym_size(2), " but x has K = ", x.sym_size(-1));
  TORCH_CHECK_VALUE(weight.dim() == 2 && bank_b.sym_size(1) == weight.sym_size(0),
                    "lora_linear_banked: bank_b has N = ", bank_b.sym_size(1),
                    " but weight is ", weight.sym_sizes(), " (N, K)");
  const auto branches = index.sym_size(1);
  TORCH_CHECK_VALUE(scale.dim() == 2 && scale.sym_size(1) == branches * r,
                    "lora_linear_banked: scale must have shape (M, branches * r) = (M, ",
                    branches * r, ") or (1, ", branches * r, "), got ", scale.sym_sizes());
  // The rest (x, weight, bias, scale's dtype and rows, devices) is the plain op's check on one
  // adapter of the bank and one branch of scale.
  check_lora_linear_inputs(x, weight, bias, bank_a.select(0, 0), bank_b.select(0, 0),
                           scale.narrow_symint(1, 0, r));
  TORCH_CHECK_VALUE(bank_a.device() == x.device() && bank_b.device() == x.device(),
                    "lora_linear_banked: bank_a / bank_b are on ", bank_a.device(), " / ",
                    bank_b.device(), " but x is on ", x.device());
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0,
                    "lora_linear_banked: dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK_VALUE(index.sym_size(0) == leading_rows(x), "lora_linear_banked: index has ",
                    index.sym_size(0), " rows but x has M = ", leading_rows(x));
  TORCH_CHECK_VALUE(index.device() == x.device(), "lora_linear_banked: index is on ",
                    index.device(), " but x is on ", x.device());
  if (dropout_p == 0.0) return;
  TORCH_CHECK_VALUE(given(dropout_seed), "lora_linear_banked: dropout_p = ", dropout_p,
                    " needs dropout_seed (int64, one seed per adapter of the bank: (S,))");
  const auto& seed = *dropout_seed;
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, "lora_linear_banked: dropout_seed must be "
                   "int64, got ", seed.scalar_type());
  TORCH_CHECK_VALUE(seed.dim() == 1 && seed.sym_size(0) == S, "lora_linear_banked: "
                    "dropout_seed must have shape (S,) = (", S, ",), got ", seed.sym_sizes());
  TORCH_CHECK_VALUE(seed.device() == x.device(), "lora_linear_banked: dropout_seed is on ",
                    seed.device(), " but x is on ", x.device());
}

void check_bank_index_values(const at::Tensor& index, int64_t adapters) {
  if (index.numel() == 0) return;
  const auto [low, high] = at::aminmax(index);
  const int64_t lo = low.item<int64_t>();
  const int64_t hi = high.item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0, "lora_linear_banked: index holds ", lo, ": every row needs an "
                    "adapter in every branch (switch a branch off with a zero scale)");
  TORCH_CHECK_VALUE(hi < adapters, "lora_linear_banked: index holds ", hi,
                    " but the bank holds ", adapters, " adapters (valid: 0..", adapters - 1, ")");
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
