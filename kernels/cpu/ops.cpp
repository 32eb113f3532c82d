// Registration of the feddpa::lora_linear operator family with the PyTorch dispatcher.
//
//   feddpa::lora_linear        the public op: y only. Autograd kernel below (C++, so that a
//                              training step calls no Python per layer); CPU kernel native.
//   feddpa::lora_linear_fwd    (y, u): what autograd calls, so u is saved instead of recomputed.
//   feddpa::lora_linear_bwd    (dx, dA, dB, dS) given a mask of those wanted.
//   feddpa::lora_linear_check  the input validation alone, for the Python backends.
//
// Every op takes in-op LoRA dropout as (dropout_p, dropout_seed): the A branch reads
// x ⊙ keep / (1 - p), the keep mask regenerated from the seed wherever it is needed
// (kernels/cpu/dropout.h), so only x is saved for backward.
//
// The autograd kernel below is the op's only autograd: the CPU kernels, the Triton CUDA kernels
// and the reference (other devices) sit under it as lora_linear_fwd / lora_linear_bwd.
//
// CUDA kernels (Triton), the fallback for other devices and the fake (meta) kernels that
// torch.compile needs are registered from Python (feddpa_fast/kernels/_register.py).
#include <torch/autograd.h>
#include <torch/library.h>

#include "checks.h"
#include "dropout.h"
#include "lora_linear_cpu.h"

namespace feddpa {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_fwd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scale,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("feddpa::lora_linear_fwd", "")
                       .typed<decltype(lora_linear_fwd_cpu)>();
  return op.call(x, weight, bias, lora_a, lora_b, scale, dropout_p, dropout_seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scale,
    const at::Tensor& u, std::array<bool, 4> mask, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("feddpa::lora_linear_bwd", "")
                       .typed<decltype(lora_linear_bwd_cpu)>();
  return op.call(dy, x, weight, lora_a, lora_b, scale, u, mask, dropout_p, dropout_seed);
}

class LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
      const std::optional<at::Tensor>& bias, const at::Tensor& lora_a, const at::Tensor& lora_b,
      const at::Tensor& scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, u] = call_fwd(x, weight, bias, lora_a, lora_b, scale, dropout_p, dropout_seed);
    const bool dropout = dropout_p > 0.0;
    // x is the one (M, K) activation saved; under in-op dropout the mask is regenerated from
    // the one-element seed, never stored.
    ctx->save_for_backward({x, weight, lora_a, lora_b, scale, u,
                            dropout ? *dropout_seed : at::Tensor()});
    ctx->saved_data["has_bias"] = given(bias);
    ctx->saved_data["dropout_p"] = dropout ? dropout_p : 0.0;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    // needs_input_grad counts tensor inputs only: an absent bias has no slot.
    // Order: x, weight, [bias], lora_a, lora_b, scale.
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const size_t after_bias = has_bias ? 3 : 2;
    const std::array<bool, 4> mask = {
        ctx->needs_input_grad(0), ctx->needs_input_grad(after_bias),
        ctx->needs_input_grad(after_bias + 1), ctx->needs_input_grad(after_bias + 2)};
    const at::Tensor dy = grad_outputs[0];
    const double dropout_p = ctx->saved_data["dropout_p"].toDouble();
    const std::optional<at::Tensor> dropout_seed =
        dropout_p > 0.0 ? std::optional<at::Tensor>(saved[6]) : std::nullopt;
    auto [dx, da, db, ds] = call_bwd(dy, x, weight, saved[2], saved[3], saved[4], saved[5], mask,
                                     dropout_p, dropout_seed);
    at::Tensor dbias;
    if (has_bias && ctx->needs_input_grad(2)) dbias = dy.reshape({-1, weight.size(0)}).sum(0);
    const at::Tensor none;
    // One entry per forward argument (absent optionals and the dropout pair included).
    return {mask[0] ? dx : none, none, dbias, mask[1] ? da : none, mask[2] ? db : none,
            mask[3] ? ds : none, none, none};
  }
};

at::Tensor lora_linear_autograd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scale,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  check_lora_linear_inputs(x, weight, bias, lora_a, lora_b, scale, dropout_p, dropout_seed);
  // The base weight is frozen by contract: silently returning no gradient for it would be a
  // wrong answer, so refuse instead.
  TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && weight.requires_grad()),
                    "lora_linear: weight must be frozen (requires_grad=False); the op never "
                    "computes a gradient for it");
  return LoraLinearFunction::apply(x, weight, bias, lora_a, lora_b, scale, dropout_p,
                                   dropout_seed);
}

void lora_linear_check(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scale,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  check_lora_linear_inputs(x, weight, bias, lora_a, lora_b, scale, dropout_p, dropout_seed);
}

}  // namespace

TORCH_LIBRARY(feddpa, m) {
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
        "Tensor scale, float dropout_p=0., Tensor? dropout_seed=None) -> Tensor");
  m.def("lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
        "Tensor scale, float dropout_p=0., Tensor? dropout_seed=None) -> (Tensor, Tensor)");
  m.def("lora_linear_bwd(Tensor dy, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, "
        "Tensor scale, Tensor u, bool[4] output_mask, float dropout_p=0., "
        "Tensor? dropout_seed=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("lora_linear_check(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, "
        "Tensor lora_b, Tensor scale, float dropout_p=0., Tensor? dropout_seed=None) -> ()");
  m.impl("lora_linear_check", c10::DispatchKey::CompositeImplicitAutograd,
         TORCH_FN(lora_linear_check));
  // The in-op dropout mask itself (bool, rows x cols), CPU: the reference and the tests use it.
  m.def("dropout_keep_mask(int rows, int cols, float p, Tensor seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(feddpa, Autograd, m) {
  m.impl("lora_linear", &lora_linear_autograd);
}

TORCH_LIBRARY_IMPL(feddpa, CPU, m) {
  m.impl("lora_linear", &lora_linear_cpu);
  m.impl("lora_linear_fwd", &lora_linear_fwd_cpu);
  m.impl("lora_linear_bwd", &lora_linear_bwd_cpu);
  m.impl("dropout_keep_mask", &dropout_keep_mask_cpu);
}

}  // namespace feddpa
