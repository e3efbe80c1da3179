// The project's top-K selection (megatron_qsparse.sparsity.topk.topk_mask), one segment at a time, and the
// compaction of the rows a batch keeps.
// Shared by the compiled ops (qsparse_cpu.cpp) and the decode engine (engine.cpp).
#pragma once
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "rows.h"

namespace qsparse {

// |v| as an unsigned integer: ordered like the magnitudes, every NaN above inf (as torch.kthvalue ranks them).
inline uint32_t magnitude_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits & 0x7FFFFFFFu;
}
constexpr uint32_t kInfinityBits = 0x7F800000u;  // magnitudes above this are NaN
constexpr int kBucketShift = 20;                  // bucket = exponent and 3 mantissa bits: 8 buckets per octave
constexpr int64_t kBuckets = int64_t{1} << (31 - kBucketShift);
constexpr int64_t kSmallSegment = 256;            // shorter segments (Block Q-Sparse) use nth_element directly

struct Selection {
  uint32_t kth;     // bits of the k-th largest magnitude
  int64_t greater;  // entries whose bits exceed kth (NaNs included)
};

// Scratch space of one thread, reused across segments and calls (no allocation per row).
struct Scratch {
  std::vector<uint32_t> bits, candidates;
  std::array<uint32_t, kBuckets> counts;
};

// The k-th largest of bits[0:size] (1 <= k < size) without sorting: a histogram over the top bits (8 buckets per
// octave) finds the bucket holding it; only that bucket's entries (a few percent of a real activation row) are
// copied out and nth_element'd. Every pass over the whole row is branch-free: which bucket or side an entry
// falls on is a coin flip for the branch predictor (a quickselect such as torch.kthvalue mispredicts on every
// other element of a fresh row).
inline Selection kth_largest(Scratch& s, int64_t size, int64_t k) {
  const uint32_t* bits = s.bits.data();
  if (size < kSmallSegment) {
    s.candidates.assign(bits, bits + size);
    std::nth_element(s.candidates.begin(), s.candidates.begin() + (k - 1), s.candidates.end(),
                     std::greater<uint32_t>());
    const uint32_t kth = s.candidates[k - 1];
    int64_t greater = 0;
    for (int64_t i = 0; i < k - 1; ++i) greater += s.candidates[i] > kth;
    return {kth, greater};
  }
  s.counts.fill(0);
  uint32_t top = 0;
  for (int64_t i = 0; i < size; ++i) {
    ++s.counts[bits[i] >> kBucketShift];
    top = std::max(top, bits[i]);
  }
  int64_t bucket = top >> kBucketShift, above = 0;  // entries in buckets above `bucket`
  for (; above + s.counts[bucket] < k; --bucket) above += s.counts[bucket];
  const int64_t in_bucket = s.counts[bucket], rank = k - above;  // the answer's rank within its bucket
  s.candidates.resize(size);
  uint32_t* out = s.candidates.data();
  int64_t n = 0;
  for (int64_t i = 0; i < size; ++i) {
    out[n] = bits[i];
    n += (bits[i] >> kBucketShift) == static_cast<uint32_t>(bucket);
  }
  std::nth_element(out, out + (rank - 1), out + in_bucket, std::greater<uint32_t>());
  const uint32_t kth = out[rank - 1];
  int64_t greater = above;
  for (int64_t i = 0; i < rank - 1; ++i) greater += out[i] > kth;
  return {kth, greater};
}

// The project's top-K rule (megatron_qsparse.sparsity.topk.topk_mask) on one segment of x: the k-th largest
// |x| (fp32, NaN ranked above everything) is the threshold; every |x| > threshold is kept, then the ties
// |x| == threshold from the lowest index up, k in all. Comparisons are IEEE: a NaN is never kept, and a NaN
// threshold keeps nothing. Equality with topk_mask / block_topk_mask is tested on ties, NaN and inf.
template <typename X>
void select_topk(const X* x, int64_t size, int64_t k, Scratch& s, bool* keep) {
  if (k >= size || k <= 0) {
    std::fill(keep, keep + size, k > 0);
    return;
  }
  s.bits.resize(size);
  int64_t nans = 0;
  for (int64_t i = 0; i < size; ++i) {
    s.bits[i] = magnitude_bits(widen(x[i]));
    nans += s.bits[i] > kInfinityBits;
  }
  const Selection sel = kth_largest(s, size, k);
  if (sel.kth > kInfinityBits) {
    std::fill(keep, keep + size, false);
    return;
  }
  int64_t ties = k - (sel.greater - nans);  // NaNs rank above the threshold but are never kept
  for (int64_t i = 0; i < size; ++i) {
    const uint32_t m = s.bits[i];
    const bool tie = m == sel.kth;
    keep[i] = ((m > sel.kth) & (m <= kInfinityBits)) | (tie & (ties > 0));
    ties -= tie;
  }
}

// The rows any token keeps (ascending) and the tokens' inputs on them, zero where a token dropped the row.
// Branch-free compaction: whether a row is kept is a coin flip for the branch predictor.
inline void gather_kept(const float* x, const bool* mask, int64_t batch, int64_t in_features, std::vector<int64_t>& rows,
                 std::vector<float>& values) {
  rows.resize(in_features);
  int64_t n = 0;
  for (int64_t d = 0; d < in_features; ++d) {
    bool any = false;
    for (int64_t b = 0; b < batch; ++b) any |= mask[b * in_features + d];
    rows[n] = d;
    n += any;
  }
  rows.resize(n);
  values.resize(batch * n);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t at = b * in_features + rows[i];
      values[b * n + i] = mask[at] ? x[at] : 0.f;
    }
  }
}

}  // namespace qsparse
