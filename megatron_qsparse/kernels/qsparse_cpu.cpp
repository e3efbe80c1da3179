// Q-Sparse CPU ops (built and loaded by megatron_qsparse/kernels/__init__.py).
//   topk_mask:   the top-k mask of every segment of x: the training forward's selection.
//   abs_sum, ternary, int8_levels: BitNet b1.58's fake quantizers, one pass each.
//   topk_linear: the decode step of one projection: mask = top-k of each token's input, y[b, :] = sum over the
//                rows r any token keeps of x[b, r] * mask[b, r] * weight_t[r, :] + bias (fp32 accumulation;
//                fp32 or bfloat16 weight and input), reading only the kept rows of the input-major weight.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "rows.h"
#include "select.h"

namespace {

using namespace qsparse;

constexpr int64_t kMaxBatch = 64;         // bounds the per-thread partial sums (threads x batch x out floats)

// Threads split the rows, each streaming whole rows into its own partial sum, then the partials are added:
// 3-7% faster at 2 threads than splitting the columns (each thread then reads half of every row).
template <typename W>
void gather_all(const W* wt, int64_t out_features, const int64_t* rows, int64_t n, const float* values,
                int64_t batch, float* y) {
  const int64_t size = batch * out_features, threads = at::get_num_threads();
  thread_local std::vector<float> partial_sums;  // the caller's; worker threads see it through `partial`
  partial_sums.assign(threads * size, 0.f);
  float* partial = partial_sums.data();
  const int64_t passes = (n + kRowsPerPass - 1) / kRowsPerPass;
  at::parallel_for(0, passes, 1, [&](int64_t p0, int64_t p1) {
    const int64_t r0 = p0 * kRowsPerPass, r1 = std::min(p1 * kRowsPerPass, n);
    accumulate_rows(wt, out_features, rows + r0, r1 - r0, values + r0, n, batch,
                    partial + at::get_thread_num() * size);
  });
  at::parallel_for(0, size, 4096, [&](int64_t s0, int64_t s1) {
    for (int64_t i = s0; i < s1; ++i) {
      float sum = 0.f;
      for (int64_t t = 0; t < threads; ++t) sum += partial[t * size + i];
      y[i] = sum;
    }
  });
}


// The top-k mask of every segment of x (rows of `segment` entries), segments split across threads.
template <typename X>
void select_segments(const X* x, int64_t segments, int64_t segment, int64_t k, bool* keep) {
  const int64_t grain = std::max<int64_t>(1, 16384 / segment);  // ~16K entries per task
  at::parallel_for(0, segments, grain, [&](int64_t s0, int64_t s1) {
    thread_local Scratch scratch;
    for (int64_t s = s0; s < s1; ++s) select_topk(x + s * segment, segment, k, scratch, keep + s * segment);
  });
}

template <typename X>
const X* typed(const at::Tensor& x) { return reinterpret_cast<const X*>(x.data_ptr()); }

// The ops' elementwise inputs: contiguous float32 or bfloat16 on the CPU.
void check_float_input(const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous() && x.device().is_cpu() &&
              (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "a contiguous float32 or bfloat16 CPU tensor");
}

void check_input(const at::Tensor& x, int64_t segment) {
  check_float_input(x);
  TORCH_CHECK(x.dim() >= 1 && segment > 0 && x.size(-1) % segment == 0, "segment must divide the input size");
}

void select_into(const at::Tensor& x, int64_t k, int64_t segment, bool* keep) {
  const int64_t segments = x.numel() / segment;
  if (x.scalar_type() == at::kFloat) {
    select_segments(x.data_ptr<float>(), segments, segment, k, keep);
  } else {
    select_segments(typed<uint16_t>(x), segments, segment, k, keep);
  }
}

// Q-Sparse's mask: the top-k of every `segment` consecutive entries of x (the whole row, or each block of Block
// Q-Sparse), as a bool tensor shaped like x. The training forward's selection on CPU.
at::Tensor topk_mask(const at::Tensor& x, int64_t k, int64_t segment) {
  check_input(x, segment);
  at::Tensor mask = at::empty(x.sizes(), x.options().dtype(at::kBool));
  select_into(x, k, segment, mask.data_ptr<bool>());
  return mask;
}

// x as fp32, [batch, in]: the input itself, or a per-thread converted copy of a bfloat16 input.
const float* as_float(const at::Tensor& x) {
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>();
  thread_local std::vector<float> converted;
  converted.resize(x.numel());
  const uint16_t* bits = typed<uint16_t>(x);
  for (int64_t i = 0; i < x.numel(); ++i) converted[i] = widen(bits[i]);
  return converted.data();
}

// Q-Sparse decode step of one projection, as one op: mask = top-k of every segment of every token of x;
// out = (x * mask) @ weight_t + bias in x's dtype, reading only the kept rows. One op because, once a
// projection's weights have streamed through the caches, every extra torch op costs tens of microseconds.
// `mask`, when given, receives the selection (for tests).
at::Tensor topk_linear(const at::Tensor& x, const at::Tensor& weight_t, const std::optional<at::Tensor>& bias,
                       int64_t k, int64_t segment, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(weight_t.dim() == 2 && weight_t.is_contiguous() && weight_t.device().is_cpu(),
              "weight_t must be a contiguous 2-D CPU tensor [in, out]");
  TORCH_CHECK(weight_t.scalar_type() == at::kFloat || weight_t.scalar_type() == at::kBFloat16,
              "weight_t must be float32 or bfloat16");
  const int64_t in_features = weight_t.size(0), out_features = weight_t.size(1), batch = x.size(0);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) == in_features &&
              (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x: contiguous float32 or bfloat16 [batch, in]");
  TORCH_CHECK(batch >= 1 && batch <= kMaxBatch, "batch must lie in [1, ", kMaxBatch, "]");
  TORCH_CHECK(segment > 0 && in_features % segment == 0, "segment must divide the input size");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                        bias->numel() == out_features), "bias: contiguous float32 [out]");
  TORCH_CHECK(!mask || (mask->sizes() == x.sizes() && mask->is_contiguous() && mask->scalar_type() == at::kBool),
              "mask: contiguous bool, shaped like x");
  thread_local std::vector<char> own_mask;  // char, not bool: std::vector<bool> has no addressable elements
  own_mask.resize(x.numel());
  bool* keep = mask ? mask->data_ptr<bool>() : reinterpret_cast<bool*>(own_mask.data());
  select_into(x, k, segment, keep);
  const float* xf = as_float(x);
  thread_local std::vector<int64_t> rows;
  thread_local std::vector<float> values, sums;
  gather_kept(xf, keep, batch, in_features, rows, values);
  const int64_t n = static_cast<int64_t>(rows.size());
  sums.resize(batch * out_features);
  if (weight_t.scalar_type() == at::kFloat) {
    gather_all(weight_t.data_ptr<float>(), out_features, rows.data(), n, values.data(), batch, sums.data());
  } else {
    gather_all(reinterpret_cast<const uint16_t*>(weight_t.data_ptr()), out_features, rows.data(), n,
               values.data(), batch, sums.data());
  }
  if (bias) {
    const float* b = bias->data_ptr<float>();
    for (int64_t i = 0; i < batch * out_features; ++i) sums[i] += b[i % out_features];
  }
  at::Tensor out = at::empty({batch, out_features}, x.options());
  if (x.scalar_type() == at::kFloat) {
    std::copy(sums.begin(), sums.end(), out.data_ptr<float>());
  } else {
    std::copy(sums.begin(), sums.end(), out.data_ptr<at::BFloat16>());  // rounds to nearest even
  }
  return out;
}

// ---- BitNet b1.58 fake quantizers (megatron_qsparse.sparsity.bitnet): one pass each instead of torch's ~8 ------
// The arithmetic is the torch route's, operation for operation (IEEE division and product in fp32, round half
// to even, clamp), so both give the same values; tested equal.

inline void store(float* out, int64_t i, float v) { out[i] = v; }
inline void store(c10::BFloat16* out, int64_t i, float v) { out[i] = c10::BFloat16(v); }  // nearest even


// sum |x[0:n]| in fp64 (four lanes, then added).
template <typename X>
double abs_sum_span(const X* x, int64_t n) {
  int64_t i = 0;
  double sum = 0.0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_andnot_ps(sign, load8(x + i));
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(lo, hi));
  sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#endif
  for (; i < n; ++i) sum += std::fabs(widen(x[i]));
  return sum;
}

// sum |w| in fp64 over fixed chunks added in order: the same value whatever the thread count.
at::Tensor abs_sum(const at::Tensor& w) {
  check_float_input(w);
  constexpr int64_t kChunk = 1 << 16;
  const int64_t n = w.numel(), chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks, 0.0);
  auto sum_chunks = [&](auto* data) {
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) partial[c] = abs_sum_span(data + c * kChunk, std::min(kChunk, n - c * kChunk));
    });
  };
  if (w.scalar_type() == at::kFloat) sum_chunks(typed<float>(w)); else sum_chunks(typed<uint16_t>(w));
  double total = 0.0;
  for (double p : partial) total += p;
  return at::scalar_tensor(total, w.options().dtype(at::kDouble));
}

// out[i] = clamp(round_half_even(x[i] / by or x[i] * by), lo, hi) * scale: both quantizers' arithmetic.
template <bool kDivide, typename X, typename O>
void round_clip_scale(const X* in, O* out, int64_t n, float by, float lo, float hi, float scale) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<O, float>) {
    const __m256 vby = _mm256_set1_ps(by), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi),
                 vscale = _mm256_set1_ps(scale);
    for (; i + 8 <= n; i += 8) {
      __m256 v = kDivide ? _mm256_div_ps(load8(in + i), vby) : _mm256_mul_ps(load8(in + i), vby);
      v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm256_min_ps(vhi, _mm256_max_ps(vlo, v));  // a NaN stays NaN: both return their second operand then
      _mm256_storeu_ps(out + i, _mm256_mul_ps(v, vscale));
    }
  }
#endif
  for (; i < n; ++i) {
    const float v = std::nearbyint(kDivide ? widen(in[i]) / by : widen(in[i]) * by);
    store(out, i, std::min(std::max(v, lo), hi) * scale);  // std::max/min keep a NaN first argument, as clamp
  }
}

// Runs `body(in, out)` with x's data and a new tensor like x, typed as float / (uint16 in, BFloat16 out).
template <typename Body>
at::Tensor map_like(const at::Tensor& x, Body body) {
  at::Tensor out = at::empty_like(x);
  if (x.scalar_type() == at::kFloat) body(typed<float>(x), out.data_ptr<float>());
  else body(typed<uint16_t>(x), out.data_ptr<c10::BFloat16>());
  return out;
}

// RoundClip(w / alpha, -1, 1) * alpha, in w's dtype (alpha: fp32, one element).
at::Tensor ternary(const at::Tensor& w, const at::Tensor& alpha) {
  check_float_input(w);
  TORCH_CHECK(alpha.scalar_type() == at::kFloat && alpha.numel() == 1, "alpha: one float32");
  const float a = alpha.item<float>();
  return map_like(w, [&](auto* in, auto* out) {
    at::parallel_for(0, w.numel(), 1 << 14, [&](int64_t i0, int64_t i1) {
      round_clip_scale<true>(in + i0, out + i0, i1 - i0, a, -1.f, 1.f, a);
    });
  });
}

// Per row of x [rows, d]: RoundClip(x * (127 / gamma), -128, 127) * (gamma / 127), in x's dtype (gamma: fp32,
// one per row). 127 / gamma is formed as torch forms it, (1 / gamma) * 127: two roundings, not one.
at::Tensor int8_levels(const at::Tensor& x, const at::Tensor& gamma) {
  check_float_input(x);
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  TORCH_CHECK(gamma.scalar_type() == at::kFloat && gamma.is_contiguous() && gamma.numel() == rows,
              "gamma: contiguous float32, one per row of x");
  const float* g = gamma.data_ptr<float>();
  return map_like(x, [&](auto* in, auto* out) {
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        round_clip_scale<false>(in + r * d, out + r * d, d, (1.f / g[r]) * 127.f, -128.f, 127.f, g[r] / 127.f);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY(qsparse, m) {
  m.def("topk_mask(Tensor x, int k, int segment) -> Tensor", &topk_mask);
  m.def("abs_sum(Tensor w) -> Tensor", &abs_sum);
  m.def("ternary(Tensor w, Tensor alpha) -> Tensor", &ternary);
  m.def("int8_levels(Tensor x, Tensor gamma) -> Tensor", &int8_levels);
  m.def("topk_linear(Tensor x, Tensor weight_t, Tensor? bias, int k, int segment, Tensor(a!)? mask=None) -> Tensor",
        &topk_linear);
}
