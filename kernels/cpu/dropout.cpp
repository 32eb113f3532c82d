// LoRA dropout inside the native CPU op: the Philox keep mask of dropout.h, regenerated for
// four rows at a time into a small per-thread buffer and applied to a row chunk of x (or of dx)
// that stays in L2; the chunk then goes through its BLAS call. Nothing of size (M, K) is
// allocated: the largest temporary is one chunk (kChunkBytes) per thread.
//
// Threads own whole chunks (mask, then GEMM, in one task): with a parallel mask pass followed
// by a GEMM per chunk, perf showed a quarter of the time in OpenMP spin-waits, as MKL runs
// these (128 x K) x (K x R) products on one thread.
#include "dropout.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <bit>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "philox.h"

namespace feddpa {
namespace {

// Rows of x masked per BLAS call: chunks of about this many bytes (in the accumulation dtype)
// stay in L2 between the masking pass and the GEMM that reads them.
constexpr int64_t kChunkBytes = 512 * 1024;
// One Philox counter serves this many consecutive rows (one word each).
constexpr int64_t kRowsPerCounter = 4;

int64_t padded_columns(int64_t cols) {
  return (cols + kPhiloxColumns - 1) / kPhiloxColumns * kPhiloxColumns;
}

inline bool kept(uint32_t random, uint32_t threshold) { return (random >> 1) >= threshold; }

// Unsigned integer of T's width: masking goes through the bits, branch-free, so that GCC
// vectorises the loops (a select on the comparison did not: "control flow in loop").
template <typename T>
using bits_of = std::conditional_t<sizeof(T) == 2, uint16_t,
                                   std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;

// value if kept, else +0.0: exact in every dtype (NaN and inf are zeroed too).
template <typename T>
inline T keep_or_zero(T value, uint32_t random, uint32_t threshold) {
  using U = bits_of<T>;
  const U all = static_cast<U>(0) - static_cast<U>(kept(random, threshold));
  return std::bit_cast<T>(static_cast<U>(std::bit_cast<U>(value) & all));
}

// The common fp32 cases, cloned for AVX-512 / AVX2 (perf: the SSE form of the copy cost more
// than the Philox generation itself). In place is its own loop: with dst == src, GCC's
// run-time overlap check sent the copy loop down its scalar path (3.8 ns per element of dx).
__attribute__((target_clones("avx512f", "avx2", "default")))
void keep_f32(const float* __restrict src, const uint32_t* __restrict rnd, uint32_t threshold,
              float* __restrict dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = keep_or_zero(src[k], rnd[k], threshold);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void keep_f32_in_place(float* __restrict row, const uint32_t* __restrict rnd,
                       uint32_t threshold, int64_t n) {
  for (int64_t k = 0; k < n; ++k) row[k] = keep_or_zero(row[k], rnd[k], threshold);
}

// The bf16 base's cases (the trainer's default on a CPU with native bf16), cloned the same way:
// with the generic loops below, a bf16 forward and backward with dropout at SmolLM2's v
// (360 x 576 -> 192, p 0.05) took 3.8x a bf16 F.linear, with these 2.8x (one-off timing,
// AVX-512 BF16 EPYC; bench/README.md, "One FedIT round against PEFT + HF Trainer"). bf16
// widens to fp32 by a 16-bit shift, exactly as c10::BFloat16's conversion does; masking a
// 16-bit value is the same AND on its bits for bf16 and fp16.
__attribute__((target_clones("avx512f", "avx2", "default")))
void keep_bf16_to_f32(const uint16_t* __restrict src, const uint32_t* __restrict rnd,
                      uint32_t threshold, float* __restrict dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const float widened = std::bit_cast<float>(static_cast<uint32_t>(src[k]) << 16);
    dst[k] = keep_or_zero(widened, rnd[k], threshold);
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void keep_16bit_in_place(uint16_t* __restrict row, const uint32_t* __restrict rnd,
                         uint32_t threshold, int64_t n) {
  for (int64_t k = 0; k < n; ++k) row[k] = keep_or_zero(row[k], rnd[k], threshold);
}

// dst = src ⊙ keep, converted to dst_t (src and dst distinct).
template <typename src_t, typename dst_t>
void keep_row(const src_t* src, const uint32_t* rnd, uint32_t threshold, dst_t* dst,
              int64_t n) {
  if constexpr (std::is_same_v<src_t, float> && std::is_same_v<dst_t, float>) {
    keep_f32(src, rnd, threshold, dst, n);
  } else if constexpr (std::is_same_v<src_t, c10::BFloat16> && std::is_same_v<dst_t, float>) {
    keep_bf16_to_f32(reinterpret_cast<const uint16_t*>(src), rnd, threshold, dst, n);
  } else {
    for (int64_t k = 0; k < n; ++k) {
      dst[k] = keep_or_zero(static_cast<dst_t>(src[k]), rnd[k], threshold);
    }
  }
}

// row ⊙= keep.
template <typename scalar_t>
void keep_row_in_place(scalar_t* __restrict row, const uint32_t* __restrict rnd,
                       uint32_t threshold, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    keep_f32_in_place(row, rnd, threshold, n);
  } else if constexpr (sizeof(scalar_t) == 2) {  // bf16, fp16
    keep_16bit_in_place(reinterpret_cast<uint16_t*>(row), rnd, threshold, n);
  } else {
    for (int64_t k = 0; k < n; ++k) row[k] = keep_or_zero(row[k], rnd[k], threshold);
  }
}

// The random words of four rows: word j of counter (k, group) goes to words[j * stride + k].
class GroupRandoms {
 public:
  GroupRandoms(const LoraDropout& drop, int64_t cols)
      : drop_(drop), cols_(cols), stride_(padded_columns(cols)),
        words_(kRowsPerCounter * stride_) {}

  void fill(int64_t group) {
    uint32_t* w = words_.data();
    for (int64_t col = 0; col < cols_; col += kPhiloxColumns) {
      philox_columns(static_cast<uint32_t>(col), static_cast<uint32_t>(group), drop_.seed,
                     w + col, w + stride_ + col, w + 2 * stride_ + col, w + 3 * stride_ + col);
    }
  }
  const uint32_t* row(int64_t j) const { return words_.data() + j * stride_; }

 private:
  const LoraDropout& drop_;
  int64_t cols_, stride_;
  std::vector<uint32_t> words_;
};

// A multiple of kRowsPerCounter, so that no counter straddles two chunks.
int64_t chunk_rows(int64_t cols, int64_t rows) {
  const int64_t by_size = kChunkBytes / (std::max<int64_t>(cols, 1) * 4);
  const int64_t chunk = std::max<int64_t>(16, by_size / kRowsPerCounter * kRowsPerCounter);
  return std::min(chunk, std::max<int64_t>(rows, 1));
}

void check_counter_range(int64_t rows, int64_t cols) {
  TORCH_CHECK_VALUE(rows <= (int64_t{1} << 34) && cols <= (int64_t{1} << 32),
                    "lora_linear: in-op dropout supports up to 2^34 rows and 2^32 columns, got (",
                    rows, ", ", cols, ")");
}

// For rows [start, start + len) of x2 (start a multiple of kRowsPerCounter), on this thread:
// xm (len x K, may be null) = x ⊙ keep in acc_t, and dx (len x K rows, may be null) zeroed
// where dropped. Each row's mask is generated once and serves both.
template <typename scalar_t, typename acc_t>
void mask_rows(const at::Tensor& x2, int64_t start, int64_t len, GroupRandoms& randoms,
               uint32_t threshold, acc_t* xm, scalar_t* dx) {
  const int64_t cols = x2.size(1);
  const scalar_t* x = x2.const_data_ptr<scalar_t>() + start * x2.stride(0);
  for (int64_t first = 0; first < len; first += kRowsPerCounter) {
    randoms.fill((start + first) / kRowsPerCounter);
    for (int64_t j = 0; j < kRowsPerCounter && first + j < len; ++j) {
      const int64_t i = first + j;
      if (xm != nullptr) keep_row(x + i * x2.stride(0), randoms.row(j), threshold, xm + i * cols,
                                  cols);
      if (dx != nullptr) keep_row_in_place(dx + i * cols, randoms.row(j), threshold, cols);
    }
  }
}

at::Tensor unit_stride_rows(const at::Tensor& x2) {
  return x2.stride(1) == 1 ? x2 : x2.contiguous();
}

// Runs body(start, len, xm_buffer, randoms) over the row chunks of an (rows, cols) input, each
// thread taking whole chunks with its own buffers; body must write only its own rows (or state
// indexed by at::get_thread_num()). Chunks are handed out one at a time from a shared counter,
// not split evenly up front: on this shared 2-vCPU VM a static split left one thread spinning
// in OpenMP's barrier whenever the other vCPU was slowed (perf: 3.5 % of samples).
template <typename Body>
void for_each_chunk(int64_t rows, int64_t cols, const LoraDropout& drop, bool with_buffer,
                    at::TensorOptions buffer_options, const Body& body) {
  const int64_t chunk = chunk_rows(cols, rows);
  const int64_t chunks = (rows + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), chunks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    at::Tensor buffer = with_buffer ? at::empty({chunk, cols}, buffer_options) : at::Tensor();
    GroupRandoms randoms(drop, cols);
    for (int64_t c = next++; c < chunks; c = next++) {
      const int64_t start = c * chunk;
      const int64_t len = std::min(chunk, rows - start);
      body(start, len, with_buffer ? buffer.narrow(0, 0, len) : buffer, randoms);
    }
  });
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
  const at::Tensor a_t = lora_a.to(acc).t();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x2.scalar_type(), "lora_dropout",
                                  [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    for_each_chunk(rows, cols, drop, true, x2.options().dtype(acc),
                   [&](int64_t start, int64_t len, at::Tensor xm, GroupRandoms& randoms) {
      mask_rows<scalar_t, acc_t>(x2, start, len, randoms, drop.threshold,
                                 xm.data_ptr<acc_t>(), nullptr);
      at::Tensor dst = out.narrow(0, start, len);
      at::mm_out(dst, xm, a_t);
    });
  });
  return out.mul_(drop.inv_keep);
}

at::Tensor dropout_backward_terms(const at::Tensor& x2_in, const at::Tensor& gsd,
                                  const at::Tensor& lora_a, const LoraDropout& drop,
                                  const at::Tensor& dy2, const at::Tensor& weight,
                                  at::Tensor& dx, bool need_da) {
  const at::Tensor x2 = unit_stride_rows(x2_in);
  const auto acc = accum_dtype(x2.scalar_type());
  const int64_t rows = x2.size(0);
  const int64_t cols = x2.size(1);
  check_counter_range(rows, cols);
  const bool need_dx = dx.defined();
  const at::Tensor gsd_x = need_dx ? gsd.to(x2.scalar_type()) : at::Tensor();
  // dA is a sum over rows: one partial per thread, added at the end.
  std::vector<at::Tensor> da_parts(at::get_num_threads());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x2.scalar_type(), "lora_dropout",
                                  [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    for_each_chunk(rows, cols, drop, need_da, x2.options().dtype(acc),
                   [&](int64_t start, int64_t len, at::Tensor xm, GroupRandoms& randoms) {
      scalar_t* dx_rows = nullptr;
      at::Tensor dx_chunk;
      if (need_dx) {
        dx_chunk = dx.narrow(0, start, len);
        at::mm_out(dx_chunk, gsd_x.narrow(0, start, len), lora_a);  // gsd A, masked below
        dx_rows = dx_chunk.data_ptr<scalar_t>();
      }
      mask_rows<scalar_t, acc_t>(x2, start, len, randoms, drop.threshold,
                                 need_da ? xm.data_ptr<acc_t>() : nullptr, dx_rows);
      if (!need_da) return;
      at::Tensor& part = da_parts[at::get_thread_num()];
      const at::Tensor gsd_t = gsd.narrow(0, start, len).t();
      if (part.defined()) {
        part.addmm_(gsd_t, xm);
      } else {
        part = at::mm(gsd_t, xm);
      }
    });
  });
  // The frozen GEMM accumulates into the masked rank-R term in one multi-threaded call: run
  // per chunk (dx written once) it re-packed W for every chunk, 1.35x base against 1.20x
  // at (2048, 1024, 1024, R 32) (bench/op_cpu.py, fwd+bwd).
  if (need_dx && dy2.defined()) dx.addmm_(dy2, weight);
  if (!need_da) return at::Tensor();
  at::Tensor da;
  for (const auto& part : da_parts) {
    if (part.defined()) da = da.defined() ? da.add_(part) : part;
  }
  return da.defined() ? da : at::zeros({lora_a.size(0), cols}, x2.options().dtype(acc));
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
  const int64_t groups = (rows + kRowsPerCounter - 1) / kRowsPerCounter;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    GroupRandoms randoms(drop, cols);
    for (int64_t group = begin; group < end; ++group) {
      randoms.fill(group);
      for (int64_t j = 0; j < kRowsPerCounter && group * kRowsPerCounter + j < rows; ++j) {
        bool* dst = out + (group * kRowsPerCounter + j) * cols;
        const uint32_t* r = randoms.row(j);
        for (int64_t k = 0; k < cols; ++k) dst[k] = kept(r[k], drop.threshold);
      }
    }
  });
  return keep;
}

}  // namespace feddpa
