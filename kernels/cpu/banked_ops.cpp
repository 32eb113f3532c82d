// Registration of feddpa::lora_linear_banked (rows of one call use different adapters of a
// bank; kernels/cpu/banked_cpu.cpp) with the PyTorch dispatcher, beside the plain op of ops.cpp:
//
//   feddpa::lora_linear_banked        the public op: y only. Autograd kernel below (C++).
//   feddpa::lora_linear_banked_fwd    (y, u): what autograd calls, so u is saved.
//   feddpa::lora_linear_banked_bwd    (dx, d bank_a, d bank_b, d scale) given a mask.
//   feddpa::lora_linear_banked_check  the shape / dtype validation alone (fake kernels).
//
// As for the plain op, this autograd kernel is the op's only autograd; the other devices'
// kernels and the fake kernels are registered from Python (feddpa_fast/kernels/_register.py).
#include <torch/autograd.h>
#include <torch/library.h>

#include "banked_cpu.h"
#include "checks.h"

namespace feddpa {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_fwd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& bank_a, const at::Tensor& bank_b, const at::Tensor& index,
    const at::Tensor& scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("feddpa::lora_linear_banked_fwd", "")
                       .typed<decltype(lora_linear_banked_fwd_cpu)>();
  return op.call(x, weight, bias, bank_a, bank_b, index, scale, dropout_p, dropout_seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bank_a, const at::Tensor& bank_b, const at::Tensor& index,
    const at::Tensor& scale, const at::Tensor& u, std::array<bool, 4> mask, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("feddpa::lora_linear_banked_bwd", "")
                       .typed<decltype(lora_linear_banked_bwd_cpu)>();
  return op.call(dy, x, weight, bank_a, bank_b, index, scale, u, mask, dropout_p, dropout_seed);
}

class LoraLinearBankedFunction : public torch::autograd::Function<LoraLinearBankedFunction> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
      const std::optional<at::Tensor>& bias, const at::Tensor& bank_a, const at::Tensor& bank_b,
      const at::Tensor& index, const at::Tensor& scale, double dropout_p,
      const std::optional<at::Tensor>& dropout_seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, u] = call_fwd(x, weight, bias, bank_a, bank_b, index, scale, dropout_p,
                           dropout_seed);
    const bool dropout = dropout_p > 0.0;
    ctx->save_for_backward({x, weight, bank_a, bank_b, index, scale, u,
                            dropout ? *dropout_seed : at::Tensor()});
    ctx->saved_data["has_bias"] = given(bias);
    ctx->saved_data["dropout_p"] = dropout ? dropout_p : 0.0;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    // needs_input_grad counts tensor inputs only: an absent bias has no slot.
    // Order: x, weight, [bias], bank_a, bank_b, index, scale.
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const size_t after_bias = has_bias ? 3 : 2;
    const std::array<bool, 4> mask = {
        ctx->needs_input_grad(0), ctx->needs_input_grad(after_bias),
        ctx->needs_input_grad(after_bias + 1), ctx->needs_input_grad(after_bias + 3)};
    const at::Tensor dy = grad_outputs[0];
    const double dropout_p = ctx->saved_data["dropout_p"].toDouble();
    const std::optional<at::Tensor> dropout_seed =
        dropout_p > 0.0 ? std::optional<at::Tensor>(saved[7]) : std::nullopt;
    auto [dx, da, db, ds] = call_bwd(dy, saved[0], saved[1], saved[2], saved[3], saved[4],
                                     saved[5], saved[6], mask, dropout_p, dropout_seed);
    at::Tensor dbias;
    if (has_bias && ctx->needs_input_grad(2)) dbias = dy.reshape({-1, saved[1].size(0)}).sum(0);
    const at::Tensor none;
    // One entry per forward argument (absent optionals, index and the dropout pair included).
    return {mask[0] ? dx : none, none, dbias, mask[1] ? da : none, mask[2] ? db : none, none,
            mask[3] ? ds : none, none, none};
  }
};

at::Tensor lora_linear_banked_autograd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& bank_a, const at::Tensor& bank_b, const at::Tensor& index,
    const at::Tensor& scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  check_lora_linear_banked_inputs(x, weight, bias, bank_a, bank_b, index, scale, dropout_p,
                                  dropout_seed);
  TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && weight.requires_grad()),
                    "lora_linear_banked: weight must be frozen (requires_grad=False); the op "
                    "never computes a gradient for it");
  return LoraLinearBankedFunction::apply(x, weight, bias, bank_a, bank_b, index, scale,
                                         dropout_p, dropout_seed);
}

void lora_linear_banked_check(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& bank_a, const at::Tensor& bank_b, const at::Tensor& index,
    const at::Tensor& scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  check_lora_linear_banked_inputs(x, weight, bias, bank_a, bank_b, index, scale, dropout_p,
                                  dropout_seed);
}

// The values of index, where they can be read (the kernels of every device call it; the fake
// kernels do not).
void lora_linear_banked_check_index(const at::Tensor& index, int64_t adapters) {
  check_bank_index_values(index, adapters);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(feddpa, m) {
  m.def("lora_linear_banked(Tensor x, Tensor weight, Tensor? bias, Tensor bank_a, "
        "Tensor bank_b, Tensor index, Tensor scale, float dropout_p=0., "
        "Tensor? dropout_seed=None) -> Tensor");
  m.def("lora_linear_banked_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor bank_a, "
        "Tensor bank_b, Tensor index, Tensor scale, float dropout_p=0., "
        "Tensor? dropout_seed=None) -> (Tensor, Tensor)");
  m.def("lora_linear_banked_bwd(Tensor dy, Tensor x, Tensor weight, Tensor bank_a, "
        "Tensor bank_b, Tensor index, Tensor scale, Tensor u, bool[4] output_mask, "
        "float dropout_p=0., Tensor? dropout_seed=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("lora_linear_banked_check(Tensor x, Tensor weight, Tensor? bias, Tensor bank_a, "
        "Tensor bank_b, Tensor index, Tensor scale, float dropout_p=0., "
        "Tensor? dropout_seed=None) -> ()");
  m.impl("lora_linear_banked_check", c10::DispatchKey::CompositeImplicitAutograd,
         TORCH_FN(lora_linear_banked_check));
  m.def("lora_linear_banked_check_index(Tensor index, int adapters) -> ()");
  m.impl("lora_linear_banked_check_index", c10::DispatchKey::CompositeExplicitAutograd,
         TORCH_FN(lora_linear_banked_check_index));
}

TORCH_LIBRARY_IMPL(feddpa, Autograd, m) {
  m.impl("lora_linear_banked", &lora_linear_banked_autograd);
}

TORCH_LIBRARY_IMPL(feddpa, CPU, m) {
  m.impl("lora_linear_banked", &lora_linear_banked_cpu);
  m.impl("lora_linear_banked_fwd", &lora_linear_banked_fwd_cpu);
  m.impl("lora_linear_banked_bwd", &lora_linear_banked_bwd_cpu);
}

}  // namespace feddpa
