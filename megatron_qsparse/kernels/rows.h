// Reading weight rows: fp32 / bfloat16 loads, the row-accumulation loop of the sparse products and the dot
// products of the dense ones.
// Shared by the compiled ops (qsparse_cpu.cpp) and the decode engine (engine.cpp).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace qsparse {

constexpr int64_t kRowsPerPass = 8;       // rows folded into the accumulators per pass (best of 2, 4, 8, 16)
#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr bool kWideBf16 = true;  // bfloat16 rows widened 16 at a time (AVX-512)
#else
constexpr bool kWideBf16 = false;
#endif

// Rows per pass for weights of type W: bfloat16 under AVX-512 takes 16. Its widening then costs half the
// instructions and 16 rows in flight read short rows faster (one core, 40% of the rows of a bf16 Wt:
// 1024 wide 11 -> 16 GB/s, 3072 wide 17 -> 22 GB/s); fp32 stays at 8 (16 was slower).
template <typename W>
constexpr int64_t rows_per_pass() { return kWideBf16 && std::is_same_v<W, uint16_t> ? 16 : kRowsPerPass; }
constexpr int64_t kAccumulators = 32768;  // fp32 accumulators per thread, 128 KiB in L2 (8K-32K: within 5%)

inline float widen(float v) { return v; }
inline float widen(uint16_t bits) {  // a bfloat16 is the upper half of an fp32
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &word, sizeof f);
  return f;
}

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
#endif

// acc[0:width] += sum_u v[u] * row[u][0:width]
template <int64_t U, typename W>
inline void fold_rows(const W* const* row, const float* v, int64_t width, float* acc) {
  int64_t j = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if constexpr (std::is_same_v<W, uint16_t>) {
    __m512 wide_scale[U];
    for (int64_t u = 0; u < U; ++u) wide_scale[u] = _mm512_set1_ps(v[u]);
    for (; j + 16 <= width; j += 16) {
      __m512 a = _mm512_loadu_ps(acc + j);
      for (int64_t u = 0; u < U; ++u) {
        const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[u] + j));
        a = _mm512_fmadd_ps(wide_scale[u], _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)), a);
      }
      _mm512_storeu_ps(acc + j, a);
    }
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  __m256 scale[U];
  for (int64_t u = 0; u < U; ++u) scale[u] = _mm256_set1_ps(v[u]);
  for (; j + 8 <= width; j += 8) {
    __m256 a = _mm256_loadu_ps(acc + j);
    for (int64_t u = 0; u < U; ++u) a = _mm256_fmadd_ps(scale[u], load8(row[u] + j), a);
    _mm256_storeu_ps(acc + j, a);
  }
#endif
  for (; j < width; ++j) {
    float s = acc[j];
    for (int64_t u = 0; u < U; ++u) s += v[u] * widen(row[u][j]);
    acc[j] = s;
  }
}

// y[b, :] += sum_i values[b * stride + i] * wt[rows[i], :], in column tiles whose accumulators (batch x tile)
// stay in L2 while the n rows stream by.
template <typename W>
void accumulate_rows(const W* wt, int64_t out_features, const int64_t* rows, int64_t n, const float* values,
                     int64_t stride, int64_t batch, float* y) {
  thread_local std::vector<float> acc(kAccumulators);  // per thread, kept across calls: no page faults
  const int64_t tile = std::max<int64_t>(kAccumulators / batch / 8 * 8, 8);
  constexpr int64_t P = rows_per_pass<W>();
  const W* row[P];
  float v[P];
  for (int64_t t0 = 0; t0 < out_features; t0 += tile) {
    const int64_t width = std::min(tile, out_features - t0);
    std::fill(acc.begin(), acc.begin() + batch * width, 0.f);
    int64_t i = 0;
    for (; i + P <= n; i += P) {
      for (int64_t u = 0; u < P; ++u) row[u] = wt + rows[i + u] * out_features + t0;
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t u = 0; u < P; ++u) v[u] = values[b * stride + i + u];
        fold_rows<P>(row, v, width, acc.data() + b * width);
      }
    }
    for (; i < n; ++i) {
      row[0] = wt + rows[i] * out_features + t0;
      for (int64_t b = 0; b < batch; ++b) {
        v[0] = values[b * stride + i];
        fold_rows<1>(row, v, width, acc.data() + b * width);
      }
    }
    for (int64_t b = 0; b < batch; ++b) {
      float* yb = y + b * out_features + t0;
      for (int64_t j = 0; j < width; ++j) yb[j] += acc[b * width + j];
    }
  }
}

// ---- dot products of row-major weights (the decode engine's dense projections) ---------------------------------
#if defined(__AVX2__) && defined(__FMA__)
inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

// sum a[i] * b[i] over n fp32 entries.
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  s = horizontal_sum(acc);
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// dot(r[0:in], x[0:in]) of a weight row.
template <typename W>
inline float dot_row(const W* r, int64_t in, const float* x) {
  int64_t j = 0;
  float s = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; j + 32 <= in; j += 32) {
    a0 = _mm256_fmadd_ps(load8(r + j), _mm256_loadu_ps(x + j), a0);
    a1 = _mm256_fmadd_ps(load8(r + j + 8), _mm256_loadu_ps(x + j + 8), a1);
    a2 = _mm256_fmadd_ps(load8(r + j + 16), _mm256_loadu_ps(x + j + 16), a2);
    a3 = _mm256_fmadd_ps(load8(r + j + 24), _mm256_loadu_ps(x + j + 24), a3);
  }
  for (; j + 8 <= in; j += 8) a0 = _mm256_fmadd_ps(load8(r + j), _mm256_loadu_ps(x + j), a0);
  s = horizontal_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
  for (; j < in; ++j) s += widen(r[j]) * x[j];
  return s;
}

// dot(r, x[b]) for the B tokens of xs [B, in] at once: each 8 weights widened once, then one FMA per token.
template <int B, typename W>
inline void dot_row_batch(const W* r, int64_t in, const float* xs, float* out) {
  int64_t j = 0;
  float s[B] = {};
#if defined(__AVX2__) && defined(__FMA__)
  __m256 a[B];
  for (int b = 0; b < B; ++b) a[b] = _mm256_setzero_ps();
  for (; j + 8 <= in; j += 8) {
    const __m256 w = load8(r + j);
    for (int b = 0; b < B; ++b) a[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xs + b * in + j), a[b]);
  }
  for (int b = 0; b < B; ++b) s[b] = horizontal_sum(a[b]);
#endif
  for (; j < in; ++j) {
    for (int b = 0; b < B; ++b) s[b] += widen(r[j]) * xs[b * in + j];
  }
  for (int b = 0; b < B; ++b) out[b] = s[b];
}

// y[b, o] = dot(w[o, :], x[b, :]) for o in [o0, o1) and the batch's tokens b (y rows of `out`): row-major
// weights, one row at a time. One row streams at the core's full rate; four rows at once read 2-4 KiB apart and
// ran at half of it (one core, 1024-wide bf16 rows: 9 vs 23 GB/s), likely from loads aliasing modulo 4 KiB.
// One token: four accumulators over consecutive columns; several: each weight widened once for all of them.
template <typename W>
void dot_rows(const W* w, int64_t in, const float* xs, int64_t batch, int64_t out, int64_t o0, int64_t o1,
              float* ys) {
  float sums[8];
  for (int64_t o = o0; o < o1; ++o) {
    const W* r = w + o * in;
    switch (batch) {
      case 1: sums[0] = dot_row(r, in, xs); break;
      case 2: dot_row_batch<2>(r, in, xs, sums); break;
      case 3: dot_row_batch<3>(r, in, xs, sums); break;
      case 4: dot_row_batch<4>(r, in, xs, sums); break;
      case 5: dot_row_batch<5>(r, in, xs, sums); break;
      case 6: dot_row_batch<6>(r, in, xs, sums); break;
      case 7: dot_row_batch<7>(r, in, xs, sums); break;
      default: dot_row_batch<8>(r, in, xs, sums); break;
    }
    for (int64_t b = 0; b < batch; ++b) ys[b * out + o] = sums[b];
  }
}


}  // namespace qsparse
