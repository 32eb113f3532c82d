// LoRA dropout inside the native CPU op: the Philox keep mask of dropout.h, regenerated row by
// row into a small per-thread buffer and applied to row chunks of x (or of dx) that stay in
// cache; each chunk then goes through one BLAS call. Nothing of size (M, K) is allocated: the
// largest temporary is one chunk (kChunkBytes).
#include "dropout.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "checks.h"

namespace feddpa {
namespace {

// Philox4x32-10 constants (Salmon et al., SC'11; the same in ATen's PhiloxRNGEngine.h and in
// triton.language.random).
constexpr uint32_t kKeyA = 0x9E3779B9;
constexpr uint32_t kKeyB = 0xBB67AE85;
constexpr uint32_t kRoundA = 0xD2511F53;
constexpr uint32_t kRoundB = 0xCD9E8D57;
constexpr int kRounds = 10;
// Counters per Philox block: 16 lanes fill one AVX-512 register of uint32 (the loops below are
// written lane-parallel so that GCC vectorises them); each counter gives 4 columns.
constexpr int kLanes = 16;
constexpr int64_t kColumnsPerBlock = 4 * kLanes;
// Rows of x masked per BLAS call: chunks of about this many bytes (in the accumulation dtype)
// stay in L2 between the masking pass and the GEMM that reads them.
constexpr int64_t kChunkBytes = 512 * 1024;

// Philox4x32-10 of the counters (q0 + l, row, 0, 0) for l < kLanes; word j of counter l is
// written to out[4 l + j], i.e. the randoms of columns 4 (q0 + l) + j.
__attribute__((target_clones("avx512f", "avx2", "default")))
void philox_block(uint32_t q0, uint32_t row, uint32_t key0, uint32_t key1, uint32_t* out) {
  uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    c0[l] = q0 + static_cast<uint32_t>(l);
    c1[l] = row;
    c2[l] = 0;
    c3[l] = 0;
  }
  for (int round = 0; round < kRounds; ++round) {
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t p0 = static_cast<uint64_t>(kRoundA) * c0[l];
      const uint64_t p1 = static_cast<uint64_t>(kRoundB) * c2[l];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ key0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ key1;
      c1[l] = static_cast<uint32_t>(p1);
      c3[l] = static_cast<uint32_t>(p0);
      c0[l] = n0;
      c2[l] = n2;
    }
    key0 += kKeyA;
    key1 += kKeyB;
  }
  for (int l = 0; l < kLanes; ++l) {
    out[4 * l] = c0[l];
    out[4 * l + 1] = c1[l];
    out[4 * l + 2] = c2[l];
    out[4 * l + 3] = c3[l];
  }
}

// The randoms of columns [0, cols) of one row; rnd holds padded_columns(cols) words.
void row_randoms(const LoraDropout& drop, int64_t row, int64_t cols, uint32_t* rnd) {
  const auto key0 = static_cast<uint32_t>(drop.seed);
  const auto key1 = static_cast<uint32_t>(drop.seed >> 32);
  for (int64_t col = 0; col < cols; col += kColumnsPerBlock) {
    philox_block(static_cast<uint32_t>(col / 4), static_cast<uint32_t>(row), key0, key1,
                 rnd + col);
  }
}

int64_t padded_columns(int64_t cols) {
  return (cols + kColumnsPerBlock - 1) / kColumnsPerBlock * kColumnsPerBlock;
}

inline bool kept(uint32_t random, uint32_t threshold) { return (random >> 1) >= threshold; }

int64_t chunk_rows(int64_t cols, int64_t rows) {
  const int64_t by_size = std::max<int64_t>(16, kChunkBytes / (std::max<int64_t>(cols, 1) * 4));
  return std::max<int64_t>(1, std::min(by_size, rows));
}

void check_counter_range(int64_t rows, int64_t cols) {
  TORCH_CHECK_VALUE(rows <= (int64_t{1} << 32) && cols <= (int64_t{1} << 34),
                    "lora_linear: in-op dropout supports up to 2^32 rows and 2^34 columns, got (",
                    rows, ", ", cols, ")");
}

// For rows [start, start + len) of x2: xm (len, K, may be undefined) = x ⊙ keep in its dtype
// acc_t, and dx_rows (len, K, may be undefined) zeroed where dropped. One mask per row, shared.
template <typename scalar_t, typename acc_t>
void mask_chunk(const at::Tensor& x2, int64_t start, int64_t len, const LoraDropout& drop,
                at::Tensor& xm, at::Tensor& dx_rows) {
  const int64_t cols = x2.size(1);
  const scalar_t* x = x2.const_data_ptr<scalar_t>();
  const int64_t x_stride = x2.stride(0);
  acc_t* xm_data = xm.defined() ? xm.data_ptr<acc_t>() : nullptr;
  scalar_t* dx_data = dx_rows.defined() ? dx_rows.data_ptr<scalar_t>() : nullptr;
  const uint32_t threshold = drop.threshold;
  at::parallel_for(0, len, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> rnd(padded_columns(cols));
    for (int64_t i = begin; i < end; ++i) {
      row_randoms(drop, start + i, cols, rnd.data());
      if (xm_data != nullptr) {
        const scalar_t* src = x + (start + i) * x_stride;
        acc_t* dst = xm_data + i * cols;
        for (int64_t j = 0; j < cols; ++j) {
          dst[j] = kept(rnd[j], threshold) ? static_cast<acc_t>(src[j]) : acc_t(0);
        }
      }
      if (dx_data != nullptr) {
        scalar_t* row = dx_data + i * cols;
        for (int64_t j = 0; j < cols; ++j) {
          if (!kept(rnd[j], threshold)) row[j] = scalar_t(0);
        }
      }
    }
  });
}

void mask_chunk_any(const at::Tensor& x2, int64_t start, int64_t len, const LoraDropout& drop,
                    at::Tensor& xm, at::Tensor& dx_rows) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x2.scalar_type(), "lora_dropout",
                                  [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    mask_chunk<scalar_t, acc_t>(x2, start, len, drop, xm, dx_rows);
  });
}

at::Tensor unit_stride_rows(const at::Tensor& x2) {
  return x2.stride(1) == 1 ? x2 : x2.contiguous();
}

}  // namespace

LoraDropout make_dropout(double p, const std::optional<at::Tensor>& seed) {
  LoraDropout drop;
  if (p <= 0.0) return drop;
  drop.p = p;
  drop.seed = static_cast<uint64_t>(seed->item<int64_t>());
  drop.threshold = static_cast<uint32_t>(p * 2147483648.0);  // floor(p * 2^31), p < 1
  drop.inv_keep = 1.0 / (1.0 - p);
  return drop;
}

at::Tensor dropout_skinny_product(const at::Tensor& x2_in, const at::Tensor& lora_a,
                                  const LoraDropout& drop) {
  const at::Tensor x2 = unit_stride_rows(x2_in);
  const auto acc = accum_dtype(x2.scalar_type());
  const int64_t rows = x2.size(0);
  const int64_t cols = x2.size(1);
  check_counter_range(rows, cols);
  at::Tensor out = at::empty({rows, lora_a.size(0)}, x2.options().dtype(acc));
  const at::Tensor a_acc = lora_a.to(acc);
  const int64_t chunk = chunk_rows(cols, rows);
  at::Tensor xm_buffer = at::empty({chunk, cols}, x2.options().dtype(acc));
  at::Tensor no_dx;
  for (int64_t start = 0; start < rows; start += chunk) {
    const int64_t len = std::min(chunk, rows - start);
    at::Tensor xm = xm_buffer.narrow(0, 0, len);
    mask_chunk_any(x2, start, len, drop, xm, no_dx);
    at::Tensor dst = out.narrow(0, start, len);
    at::mm_out(dst, xm, a_acc.t());
  }
  return out.mul_(drop.inv_keep);
}

at::Tensor dropout_backward_terms(const at::Tensor& x2_in, const at::Tensor& gsd,
                                  const at::Tensor& lora_a, const LoraDropout& drop,
                                  at::Tensor& dx_init, bool need_da) {
  const at::Tensor x2 = unit_stride_rows(x2_in);
  const auto acc = accum_dtype(x2.scalar_type());
  const int64_t rows = x2.size(0);
  const int64_t cols = x2.size(1);
  check_counter_range(rows, cols);
  const bool need_dx = dx_init.defined();
  const at::Tensor gsd_x = need_dx ? gsd.to(x2.scalar_type()) : at::Tensor();
  at::Tensor da = need_da ? at::zeros({lora_a.size(0), cols}, x2.options().dtype(acc))
                          : at::Tensor();
  const int64_t chunk = chunk_rows(cols, rows);
  at::Tensor xm_buffer = need_da ? at::empty({chunk, cols}, x2.options().dtype(acc))
                                 : at::Tensor();
  for (int64_t start = 0; start < rows; start += chunk) {
    const int64_t len = std::min(chunk, rows - start);
    at::Tensor dx_rows;
    if (need_dx) {
      dx_rows = dx_init.narrow(0, start, len);
      at::mm_out(dx_rows, gsd_x.narrow(0, start, len), lora_a);  // gsd A, masked below
    }
    at::Tensor xm = need_da ? xm_buffer.narrow(0, 0, len) : at::Tensor();
    mask_chunk_any(x2, start, len, drop, xm, dx_rows);
    if (need_da) da.addmm_(gsd.narrow(0, start, len).t(), xm);
  }
  return da;
}

at::Tensor dropout_keep_mask_cpu(int64_t rows, int64_t cols, double p, const at::Tensor& seed) {
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, "dropout_keep_mask: sizes must be >= 0, got (",
                    rows, ", ", cols, ")");
  check_dropout_args(p, seed, at::kCPU);
  check_counter_range(rows, cols);
  at::Tensor keep = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool));
  if (p <= 0.0) return keep.fill_(true);
  const LoraDropout drop = make_dropout(p, seed);
  bool* out = keep.data_ptr<bool>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> rnd(padded_columns(cols));
    for (int64_t i = begin; i < end; ++i) {
      row_randoms(drop, i, cols, rnd.data());
      for (int64_t j = 0; j < cols; ++j) out[i * cols + j] = kept(rnd[j], drop.threshold);
    }
  });
  return keep;
}

}  // namespace feddpa
