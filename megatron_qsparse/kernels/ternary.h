// BitNet b1.58 products over packed ternary rows, exact in integers (the decode engine, engine.cpp).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace qsparse {

constexpr int64_t kPairsPerFlush = 64;
constexpr int64_t kPrefetchRows = 16;  // pairs this far ahead: best of 4, 8, 16, 32 (300M, s = 0.6: 89 -> 120-130 tok/s)

// ---- packed ternary rows ---------------------------------------------------------------------------------------
// Row r of an input-major ternary weight is `groups` blocks of 32 bytes (128 outputs, the output count padded up);
// byte b of block g holds the codes (w + 1, in {0, 1, 2}) of outputs 128g + 32j + b, j = 0..3, in bits 2j, 2j+1.
// Two rows at a time: their codes, interleaved bytewise, times the pair of int8 levels by one maddubs give int16
// lanes of 2 products each, summed for 64 pairs in int16 (no overflow), then into int32: exact integer sums.
// The sum is over the codes (w + 1); `sum of levels` is subtracted at the end.

#if defined(__AVX2__) && defined(__FMA__)
template <int J>
inline void fold_code_pair(__m256i a, __m256i b, __m256i levels, __m256i* acc) {
  const __m256i three = _mm256_set1_epi8(3);
  const __m256i aj = _mm256_and_si256(_mm256_srli_epi16(a, 2 * J), three);
  const __m256i bj = _mm256_and_si256(_mm256_srli_epi16(b, 2 * J), three);
  acc[2 * J] = _mm256_add_epi16(acc[2 * J], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(aj, bj), levels));
  acc[2 * J + 1] = _mm256_add_epi16(acc[2 * J + 1], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(aj, bj), levels));
}

// acc16 lane order -> outputs: vector 2j (unpacklo) holds outputs 32j + [0, 8) then 32j + [16, 24), vector 2j + 1
// (unpackhi) 32j + [8, 16) then 32j + [24, 32).
inline void flush_block(const __m256i* acc16, int32_t* out) {
  for (int j = 0; j < 4; ++j) {
    for (int h = 0; h < 2; ++h) {
      const __m256i v = acc16[2 * j + h];
      const __m256i lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(v));
      const __m256i hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(v, 1));
      __m256i* p0 = reinterpret_cast<__m256i*>(out + 32 * j + 8 * h);
      __m256i* p1 = reinterpret_cast<__m256i*>(out + 32 * j + 8 * h + 16);
      _mm256_storeu_si256(p0, _mm256_add_epi32(_mm256_loadu_si256(p0), lo));
      _mm256_storeu_si256(p1, _mm256_add_epi32(_mm256_loadu_si256(p1), hi));
    }
  }
}
#endif

struct alignas(32) Lanes16 { int16_t lane[16]; };  // one AVX2 register of int16 sums, aligned for it

// acc[o] += sum_i levels[i] * code(rows[i], o) for the n rows (acc: groups * 128 int32).
void ternary_rows(const uint8_t* packed, int64_t groups, const int64_t* rows, const int8_t* levels, int64_t n,
                  int32_t* acc, std::vector<Lanes16>& scratch) {
  const int64_t stride = groups * 32;
#if defined(__AVX2__) && defined(__FMA__)
  scratch.resize(groups * 8);
  __m256i* acc16 = reinterpret_cast<__m256i*>(scratch.data());
  for (int64_t c = 0; c < n; c += 2 * kPairsPerFlush) {
    std::fill(scratch.begin(), scratch.end(), Lanes16{});
    const int64_t stop = std::min(n, c + 2 * kPairsPerFlush);
    for (int64_t i = c; i < stop; i += 2) {
      const bool pair = i + 1 < stop;
      const uint8_t* r0 = packed + rows[i] * stride;
      const uint8_t* r1 = pair ? packed + rows[i + 1] * stride : r0;
      const uint8_t l0 = static_cast<uint8_t>(levels[i]), l1 = pair ? static_cast<uint8_t>(levels[i + 1]) : 0;
      const __m256i lv = _mm256_set1_epi16(static_cast<int16_t>(l0 | (l1 << 8)));
      if (i + kPrefetchRows + 1 < n) {  // rows of a few hundred bytes: ask for later ones before they are due
        const char* ahead0 = reinterpret_cast<const char*>(packed + rows[i + kPrefetchRows] * stride);
        const char* ahead1 = reinterpret_cast<const char*>(packed + rows[i + kPrefetchRows + 1] * stride);
        for (int64_t line = 0; line < stride; line += 64) {
          _mm_prefetch(ahead0 + line, _MM_HINT_T0);
          _mm_prefetch(ahead1 + line, _MM_HINT_T0);
        }
      }
      for (int64_t g = 0; g < groups; ++g) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + 32 * g));
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + 32 * g));
        __m256i* block = acc16 + 8 * g;
        fold_code_pair<0>(a, b, lv, block);
        fold_code_pair<1>(a, b, lv, block);
        fold_code_pair<2>(a, b, lv, block);
        fold_code_pair<3>(a, b, lv, block);
      }
    }
    for (int64_t g = 0; g < groups; ++g) flush_block(acc16 + 8 * g, acc + 128 * g);
  }
#else
  (void)scratch;
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* r = packed + rows[i] * stride;
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t b = 0; b < 32; ++b) {
        const uint8_t byte = r[32 * g + b];
        for (int j = 0; j < 4; ++j) acc[128 * g + 32 * j + b] += levels[i] * ((byte >> (2 * j)) & 3);
      }
    }
  }
#endif
}

}  // namespace qsparse
