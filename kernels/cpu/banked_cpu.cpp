// Native CPU kernels of feddpa::lora_linear_banked: one call over rows that use different
// adapters of a bank (many clients in one batch).
//
//   bank_a (S, r, K), bank_b (S, N, r), index (M, B): row m's branch b uses adapter index[m, b]
//   u[m, b r : (b+1) r] = xl[m] A_{index[m,b]}^T                 accumulated in fp32
//   y[m] = x[m] W^T + bias + sum_b (u_b[m] * S_b[m]) B_{index[m,b]}^T
//
// Rows are grouped into segments: the rows sharing one whole index tuple (one client: its global
// and its local adapter), in their order within the call. The frozen GEMM runs once over all M
// rows; the rank-r products run per segment and branch, on the segment's rows gathered into a
// contiguous block (an M_s x K copy, against the GEMM's M_s x K x N work: 1 / N of it). A call
// with a single segment gathers nothing. As in the plain op (lora_linear_cpu.cpp), the small
// products initialise y (and dx), and the frozen GEMM accumulates into them with beta = 1.
//
// In-op dropout: a segment's mask is the one its rows would get in a call of their own, keyed on
// the segment's seed, dropout_seed[its last branch's adapter] (the client's local adapter), with
// the rows numbered from 0 within the segment; so a batched step equals each client's step
// alone. Two segments sharing a last adapter would share a stream: refused under dropout.
//
// Backward: per segment g_b = dy B_b, gs_b = g_b * S_b; dx = sum_b gs_b A_b (+ dy W once);
// dA_s += gs_b^T xl, dB_s += dy^T (u_b * S_b) for the adapter s of branch b; dS = g * u.
#include "banked_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "checks.h"
#include "dropout.h"
#include "lora_linear_cpu.h"

namespace feddpa {
namespace {

// The rows of one segment: their positions in the call, in order, and the adapter of each branch.
struct Segment {
  at::Tensor rows;               // (M_s,) int64; undefined when the call is one segment
  std::vector<int64_t> adapter;  // one per branch
};

// One int64 key per row: the index tuple read as digits in base S (unique and sortable like
// the tuple), so grouping is a 1-D sort; unique_dim over the (M, B) rows cost 4 ms per call at
// M = 256 (profiled). Falls back to unique_dim when S^B would not fit in 62 bits.
at::Tensor row_keys(const at::Tensor& index, int64_t adapters) {
  const int64_t branches = index.size(1);
  if (branches * std::log2(static_cast<double>(std::max<int64_t>(adapters, 2))) > 62.0)
    return at::Tensor();
  at::Tensor key = index.select(1, 0).clone();
  for (int64_t b = 1; b < branches; ++b) key.mul_(adapters).add_(index.select(1, b));
  return key;
}

std::vector<Segment> segments_of(const at::Tensor& index, int64_t adapters) {
  const at::Tensor key = row_keys(index, adapters);
  at::Tensor tuples, inverse, counts;
  if (key.defined()) {
    std::tie(tuples, inverse, counts) = at::_unique2(key, /*sorted=*/true,
                                                     /*return_inverse=*/true,
                                                     /*return_counts=*/true);
  } else {
    std::tie(tuples, inverse, counts) = at::unique_dim(index, 0, true, true, true);
  }
  const int64_t groups = tuples.size(0);
  const int64_t branches = index.size(1);
  const at::Tensor order = groups > 1 ? at::argsort(inverse, /*stable=*/true) : at::Tensor();
  const at::Tensor counts_cpu = counts.cpu();
  const int64_t* c = counts_cpu.data_ptr<int64_t>();
  // The first row of each group holds its tuple.
  const at::Tensor firsts = groups > 1 ? order.index_select(0, counts.cumsum(0).sub_(counts))
                                       : at::zeros({1}, index.options());
  const at::Tensor tuples_cpu = index.index_select(0, firsts).cpu().contiguous();
  const int64_t* t = tuples_cpu.data_ptr<int64_t>();
  std::vector<Segment> segments(groups);
  int64_t start = 0;
  for (int64_t g = 0; g < groups; ++g) {
    if (groups > 1) segments[g].rows = order.narrow(0, start, c[g]);
    segments[g].adapter.assign(t + g * branches, t + (g + 1) * branches);
    start += c[g];
  }
  return segments;
}

// The segment's rows of an (M, C) matrix (the matrix itself for a one-segment call).
at::Tensor gather(const at::Tensor& m, const Segment& seg) {
  return seg.rows.defined() ? m.index_select(0, seg.rows) : m;
}

// Writes a segment's (M_s, C) block into the rows of an (M, C) matrix; returns the matrix
// (the block itself for a one-segment call).
at::Tensor scatter(at::Tensor& m, const Segment& seg, const at::Tensor& block) {
  if (!seg.rows.defined()) return m = block;
  return m.index_copy_(0, seg.rows, block);
}

// The segment's rows of scale: (1, B r) broadcasts to every row.
at::Tensor segment_scale(const at::Tensor& scale, const Segment& seg) {
  return scale.size(0) == 1 ? scale : gather(scale, seg);
}

LoraDropout segment_dropout(double p, const std::optional<at::Tensor>& seeds,
                            const Segment& seg) {
  if (p <= 0.0) return LoraDropout();
  return make_dropout(p, seeds->narrow(0, seg.adapter.back(), 1));
}

// Under dropout each segment's stream is its last adapter's seed: no two segments may share it.
void check_streams(const std::vector<Segment>& segments, double p) {
  if (p <= 0.0) return;
  std::vector<int64_t> last;
  for (const auto& seg : segments) last.push_back(seg.adapter.back());
  std::sort(last.begin(), last.end());
  const auto dup = std::adjacent_find(last.begin(), last.end());
  TORCH_CHECK_VALUE(dup == last.end(), "lora_linear_banked: under in-op dropout every row whose "
                    "last branch uses adapter ", dup == last.end() ? 0 : *dup, " must use the same "
                    "adapters in every branch (one client, one dropout stream)");
}

// The bank's adapter s: A (r, K) or B (N, r).
at::Tensor adapter(const at::Tensor& bank, int64_t s) { return bank.select(0, s); }

// The stacked A of a segment's branches, (B r, K): the dropout path masks x once for them all.
at::Tensor stacked_a(const at::Tensor& bank_a, const Segment& seg) {
  std::vector<at::Tensor> parts;
  for (int64_t s : seg.adapter) parts.push_back(adapter(bank_a, s));
  return at::cat(parts, 0);
}

// xs A_b^T for every branch b of the segment, side by side: (M_s, B r) in the accumulation dtype.
at::Tensor branch_products(const at::Tensor& xs, const at::Tensor& bank_a, const Segment& seg) {
  std::vector<at::Tensor> parts;
  for (int64_t s : seg.adapter) parts.push_back(skinny_product(xs, adapter(bank_a, s)));
  return at::cat(parts, 1);
}

// The dense form: the adapters the call uses, U of them, side by side as one plain lora_linear
// problem of rank U r (A (U r, K), B (N, U r)), each row's scale in its adapters' columns and
// zero elsewhere. Two BLAS calls of rank U r instead of a gather and 2 B small products per
// segment: fewer, larger calls while U r stays small against K and N (kDenseMaxRank).
struct Dense {
  at::Tensor used;     // (U,) the adapters used, ascending
  at::Tensor columns;  // (M, B r) each row's branch columns in the dense rank
  at::Tensor lora_a;   // (U r, K)
  at::Tensor lora_b;   // (N, U r)
  at::Tensor scale;    // (M, U r)
};

Dense dense_form(const at::Tensor& bank_a, const at::Tensor& bank_b, const at::Tensor& index,
                 const at::Tensor& scale) {
  const int64_t r = bank_a.size(1);
  const int64_t M = index.size(0);
  const auto [used, inverse, counts] = at::_unique2(index, /*sorted=*/true,
                                                    /*return_inverse=*/true,
                                                    /*return_counts=*/false);
  const int64_t U = used.size(0);
  Dense d;
  d.used = used;
  d.columns = (inverse.unsqueeze(-1) * r + at::arange(r, index.options())).reshape({M, -1});
  d.lora_a = bank_a.index_select(0, used).reshape({U * r, bank_a.size(2)});
  d.lora_b = bank_b.index_select(0, used).permute({1, 0, 2}).reshape({bank_b.size(1), U * r});
  d.scale = at::zeros({M, U * r}, scale.options())
                .scatter_add_(1, d.columns, scale.expand({M, scale.size(1)}));
  return d;
}

// Dense rank above which the segment form runs instead: at 8 clients of rank 8 (U r = 72) the
// dense form is the faster one (bench/clients.py); past a few hundred columns its rank work
// (U r (K + N) per row) outgrows a segment's fixed cost.
constexpr int64_t kDenseMaxRank = 128;

bool use_dense(const at::Tensor& index, int64_t adapters, int64_t r, double dropout_p) {
  if (dropout_p > 0.0) return false;  // per-client mask streams need the segments
  const int64_t bound = std::min<int64_t>(adapters, index.numel()) * r;
  if (bound <= kDenseMaxRank) return true;
  return std::get<0>(at::_unique2(index, false, false, false)).size(0) * r <= kDenseMaxRank;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_linear_banked_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& bank_a, const at::Tensor& bank_b, const at::Tensor& index,
    const at::Tensor& scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  check_lora_linear_banked_inputs(x, weight, bias, bank_a, bank_b, index, scale, dropout_p,
                                  dropout_seed);
  check_bank_index_values(index, bank_a.size(0));
  const int64_t K = x.size(-1);
  const int64_t N = weight.size(0);
  const int64_t r = bank_a.size(1);
  const at::Tensor x2 = x.reshape({-1, K});
  const int64_t M = x2.size(0);
  if (use_dense(index, bank_a.size(0), r, dropout_p)) {
    const Dense d = dense_form(bank_a, bank_b, index, scale);
    auto [y, u_dense] = lora_linear_fwd_cpu(x, weight, bias, d.lora_a, d.lora_b, d.scale, 0.0,
                                            std::nullopt);
    return {y, u_dense.gather(1, d.columns)};
  }
  const auto segments = segments_of(index, bank_a.size(0));
  check_streams(segments, dropout_p);

  at::Tensor u = at::empty({M, index.size(1) * r}, x.options().dtype(accum_dtype(x.scalar_type())));
  at::Tensor y = at::empty({M, N}, x.options());
  for (const auto& seg : segments) {
    const at::Tensor xs = gather(x2, seg);
    const LoraDropout drop = segment_dropout(dropout_p, dropout_seed, seg);
    const at::Tensor us_acc = drop.active()
                                  ? dropout_skinny_product(xs, stacked_a(bank_a, seg), drop)
                                  : branch_products(xs, bank_a, seg);
    const at::Tensor us = (us_acc * segment_scale(scale, seg)).to(x.scalar_type());
    at::Tensor ys;
    for (size_t b = 0; b < seg.adapter.size(); ++b) {
      const at::Tensor us_b = us.narrow(1, b * r, r);
      const at::Tensor b_t = adapter(bank_b, seg.adapter[b]).t();
      if (!ys.defined()) {
        ys = bias.has_value() ? at::addmm(*bias, us_b, b_t) : at::mm(us_b, b_t);
      } else {
        ys.addmm_(us_b, b_t);
      }
    }
    scatter(u, seg, us_acc);
    scatter(y, seg, ys);
  }
  y.addmm_(x2, weight.t());  // the frozen GEMM, once over every row, beta = 1

  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  return {y.view(out_shape), u};
}

at::Tensor lora_linear_banked_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& bank_a, const at::Tensor& bank_b, const at::Tensor& index,
    const at::Tensor& scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  return std::get<0>(lora_linear_banked_fwd_cpu(x, weight, bias, bank_a, bank_b, index, scale,
                                                dropout_p, dropout_seed));
}

namespace {

// The backward of the dense form: the plain op's backward at rank U r, its adapter gradients
// put back in the bank's slots and its scale gradient read at each row's columns.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bank_a, const at::Tensor& bank_b, const at::Tensor& index,
    const at::Tensor& scale, const at::Tensor& u, std::array<bool, 4> output_mask) {
  const Dense d = dense_form(bank_a, bank_b, index, scale);
  const int64_t U = d.used.size(0);
  const int64_t r = bank_a.size(1);
  // u at each row's own columns is all the backward reads (elsewhere the scale is zero); two
  // branches on one adapter hold the same value there.
  const at::Tensor u_dense = at::zeros(d.scale.sizes(), u.options()).scatter_(1, d.columns, u);
  auto [dx, da, db, ds] = lora_linear_bwd_cpu(dy, x, weight, d.lora_a, d.lora_b, d.scale,
                                              u_dense, output_mask, 0.0, std::nullopt);
  if (output_mask[1])
    da = at::zeros(bank_a.sizes(), da.options()).index_copy_(0, d.used, da.view({U, r, -1}));
  if (output_mask[2])
    db = at::zeros(bank_b.sizes(), db.options())
             .index_copy_(0, d.used, db.view({db.size(0), U, r}).permute({1, 0, 2}));
  if (output_mask[3]) {
    ds = ds.gather(1, d.columns);
    if (scale.size(0) == 1 && ds.size(0) != 1) ds = ds.sum(0, /*keepdim=*/true);
  }
  return {dx, da, db, ds};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_banked_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bank_a, const at::Tensor& bank_b, const at::Tensor& index,
    const at::Tensor& scale, const at::Tensor& u, std::array<bool, 4> output_mask,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  const auto dtype = x.scalar_type();
  const auto acc = accum_dtype(dtype);
  const int64_t K = x.size(-1);
  const int64_t N = weight.size(0);
  const int64_t r = bank_a.size(1);
  TORCH_CHECK_VALUE(dy.scalar_type() == dtype && dy.size(-1) == N && dy.numel() / N == u.size(0),
                    "lora_linear_banked backward: grad_output must be (..., ", N, ") of dtype ",
                    dtype);
  const at::Tensor dy2 = dy.reshape({-1, N});
  const at::Tensor x2 = x.reshape({-1, K});
  const int64_t M = x2.size(0);
  const auto [need_dx, need_da, need_db, need_ds] = output_mask;
  if (use_dense(index, bank_a.size(0), r, dropout_p))
    return dense_backward(dy, x, weight, bank_a, bank_b, index, scale, u, output_mask);
  const auto segments = segments_of(index, bank_a.size(0));

  at::Tensor g = at::empty({M, u.size(1)}, u.options());
  at::Tensor dx = need_dx ? at::empty({M, K}, x.options()) : at::Tensor();
  at::Tensor da = need_da ? at::zeros(bank_a.sizes(), x.options().dtype(acc)) : at::Tensor();
  // The bank gradients sum over segments (a shared global adapter gets every client's rows):
  // accumulated in fp32, cast once.
  at::Tensor db = need_db ? at::zeros(bank_b.sizes(), x.options().dtype(acc)) : at::Tensor();
  for (const auto& seg : segments) {
    const at::Tensor dys = gather(dy2, seg);
    std::vector<at::Tensor> g_parts;
    for (int64_t s : seg.adapter) g_parts.push_back(skinny_product(dys, adapter(bank_b, s).t()));
    const at::Tensor gs_acc = at::cat(g_parts, 1);  // dy B per branch: (M_s, B r), fp32
    const at::Tensor ss = segment_scale(scale, seg);
    const LoraDropout drop = segment_dropout(dropout_p, dropout_seed, seg);
    at::Tensor dxs;
    if (drop.active() && (need_dx || need_da)) {
      const at::Tensor gsd = gs_acc * ss * drop.inv_keep;
      if (need_dx) dxs = at::empty({dys.size(0), K}, x.options());
      const at::Tensor da_s = dropout_backward_terms(gather(x2, seg), gsd, stacked_a(bank_a, seg),
                                                     drop, at::Tensor(), weight, dxs, need_da);
      for (size_t b = 0; need_da && b < seg.adapter.size(); ++b)
        da.select(0, seg.adapter[b]).add_(da_s.narrow(0, b * r, r));
    }
    if (!drop.active() && (need_dx || need_da)) {
      const at::Tensor gs = (gs_acc * ss).to(dtype);
      const at::Tensor xs = need_da ? gather(x2, seg) : at::Tensor();
      for (size_t b = 0; b < seg.adapter.size(); ++b) {
        const at::Tensor gs_b = gs.narrow(1, b * r, r);
        const at::Tensor a = adapter(bank_a, seg.adapter[b]);
        if (need_dx) dxs = dxs.defined() ? dxs.addmm_(gs_b, a) : at::mm(gs_b, a);
        if (need_da) da.select(0, seg.adapter[b]).add_(at::mm(gs_b.t(), xs));
      }
    }
    if (need_dx) scatter(dx, seg, dxs);
    if (need_db) {
      const at::Tensor us = (gather(u, seg) * ss).to(dtype);
      for (size_t b = 0; b < seg.adapter.size(); ++b)
        db.select(0, seg.adapter[b]).add_(at::mm(dys.t(), us.narrow(1, b * r, r)));
    }
    if (need_ds) scatter(g, seg, gs_acc);
  }
  if (need_dx) {
    dx.addmm_(dy2, weight);  // the frozen GEMM, once over every row
    dx = dx.view(x.sizes());
  }
  at::Tensor ds;
  if (need_ds) {
    ds = g.mul_(u);
    if (scale.size(0) == 1 && ds.size(0) != 1) ds = ds.sum(0, /*keepdim=*/true);
  }
  const auto empty = at::empty({0}, x.options());
  return {need_dx ? dx : empty, need_da ? da.to(dtype) : empty, need_db ? db.to(dtype) : empty,
          need_ds ? ds : at::empty({0}, scale.options())};
}

}  // namespace feddpa
