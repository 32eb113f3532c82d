// Native CPU kernels of feddpa::lora_linear.
//
//   u  = x A^T                  (M, R)  accumulated in fp32 (fp64 for fp64 inputs)
//   y  = x W^T + b + (u * S) B^T (M, N)
//
// Every product is one BLAS call through ATen (MKL / oneDNN under torch); the only per-call
// temporaries are M x R matrices (and, for fp16/bf16, a bounded row chunk of x upcast to fp32).
// Order matters for memory traffic: the small expand GEMM (u*S) B^T (+ bias) *initialises* y,
// then the frozen GEMM accumulates into it with beta = 1. Compared with the base layer alone
// (which also initialises y, with the bias broadcast, then runs its GEMM with beta = 1), this
// adds only the two skinny products, and never a second read-modify-write pass over y.
//
// Backward (weight frozen):
//   g = dy B ; gs = g * S ; dx = dy W + gs A ; dA = gs^T x ; dB = dy^T (u * S) ; dS = g * u
// with the same "small product initialises, big GEMM accumulates" order for dx.
//
// With in-op dropout (dropout.h), xl = x ⊙ keep / (1 - p) is never stored: u is computed chunk
// by chunk from masked rows, and the backward regenerates the mask for its two rank-R terms:
//   gsd = g * S / (1 - p) ; dx = (gsd A) ⊙ keep + dy W ; dA = gsd^T (x ⊙ keep)
// (the masked term initialises dx chunk by chunk, then the frozen GEMM accumulates).
#include "lora_linear_cpu.h"

#include "checks.h"
#include "dropout.h"

namespace feddpa {
namespace {

// Rows of a low-precision operand upcast per chunk: bounds the temporary to
// kUpcastRows x K x 4 bytes (4 MiB at K = 4096) while keeping each BLAS call large.
constexpr int64_t kUpcastRows = 256;

}  // namespace

// For fp32/fp64 one GEMM. For fp16/bf16 the contract wants fp32 accumulation *and* an fp32
// result, which ATen's CPU mm cannot give (its output dtype is the input dtype), so lhs is
// upcast chunk by chunk.
at::Tensor skinny_product(const at::Tensor& lhs, const at::Tensor& rhs_t) {
  const auto acc = accum_dtype(lhs.scalar_type());
  if (lhs.scalar_type() == acc) return at::mm(lhs, rhs_t.t());
  const int64_t rows = lhs.size(0);
  at::Tensor out = at::empty({rows, rhs_t.size(0)}, lhs.options().dtype(acc));
  const at::Tensor rhs_acc = rhs_t.to(acc);  // R x K: small
  for (int64_t start = 0; start < rows; start += kUpcastRows) {
    const int64_t len = std::min(kUpcastRows, rows - start);
    at::Tensor dst = out.narrow(0, start, len);
    at::mm_out(dst, lhs.narrow(0, start, len).to(acc), rhs_acc.t());
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scale,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  check_lora_linear_inputs(x, weight, bias, lora_a, lora_b, scale, dropout_p, dropout_seed);
  const int64_t K = x.size(-1);
  const int64_t N = weight.size(0);
  const at::Tensor x2 = x.reshape({-1, K});
  const LoraDropout drop = make_dropout(dropout_p, dropout_seed);

  at::Tensor u = drop.active() ? dropout_skinny_product(x2, lora_a, drop)  // (M, R), fp32
                               : skinny_product(x2, lora_a);
  const at::Tensor us = (u * scale).to(x.scalar_type());   // scaled in fp32, cast once
  at::Tensor y = bias.has_value() ? at::addmm(*bias, us, lora_b.t()) : at::mm(us, lora_b.t());
  y.addmm_(x2, weight.t());                                // frozen GEMM, beta = 1

  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  return {y.view(out_shape), u};
}

at::Tensor lora_linear_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scale,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  return std::get<0>(
      lora_linear_fwd_cpu(x, weight, bias, lora_a, lora_b, scale, dropout_p, dropout_seed));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& scale,
    const at::Tensor& u, std::array<bool, 4> output_mask, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed) {
  check_dropout_args(dropout_p, dropout_seed, x.device());
  const LoraDropout drop = make_dropout(dropout_p, dropout_seed);
  const auto dtype = x.scalar_type();
  const int64_t K = x.size(-1);
  const int64_t N = weight.size(0);
  TORCH_CHECK_VALUE(dy.scalar_type() == dtype && dy.size(-1) == N && dy.numel() / N == u.size(0),
                    "lora_linear backward: grad_output must be (..., ", N, ") of dtype ", dtype);
  const at::Tensor dy2 = dy.reshape({-1, N});
  const at::Tensor x2 = x.reshape({-1, K});
  const auto [need_dx, need_da, need_db, need_ds] = output_mask;

  at::Tensor g = skinny_product(dy2, lora_b.t());  // dy B: (M, R), fp32
  at::Tensor dx, da, db, ds;
  if (drop.active() && (need_dx || need_da)) {
    const at::Tensor gsd = g * scale * drop.inv_keep;  // (M, R), fp32
    if (need_dx) dx = at::empty({dy2.size(0), K}, x.options());
    const at::Tensor da_acc =
        dropout_backward_terms(x2, gsd, lora_a, drop, dy2, weight, dx, need_da);
    if (need_dx) dx = dx.view(x.sizes());
    if (need_da) da = da_acc.to(dtype);
  }
  if (!drop.active() && (need_dx || need_da)) {
    const at::Tensor gs = (g * scale).to(dtype);
    if (need_dx) {
      dx = at::mm(gs, lora_a);    // small product initialises dx ...
      dx.addmm_(dy2, weight);     // ... the frozen GEMM accumulates
      dx = dx.view(x.sizes());
    }
    if (need_da) da = at::mm(gs.t(), x2);
  }
  if (need_db) db = at::mm(dy2.t(), (u * scale).to(dtype));
  if (need_ds) {
    ds = g.mul_(u);  // g is not needed any more: reuse its storage
    if (scale.size(0) == 1 && ds.size(0) != 1) ds = ds.sum(0, /*keepdim=*/true);
  }
  const auto empty = at::empty({0}, x.options());
  return {need_dx ? dx : empty, need_da ? da : empty, need_db ? db : empty,
          need_ds ? ds : at::empty({0}, scale.options())};
}

}  // namespace feddpa
