// Reading weight rows: fp32 / bfloat16 loads and the row-accumulation loop of the sparse products.
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


}  // namespace qsparse
