"""The compiled decode kernel: top-K selection and ``(x ⊙ mask) @ Wᵀ`` reading only the kept rows of Wᵀ.

``weight_t`` is an input-major weight Wᵀ [in, out]. For each token of ``x`` [batch, in] the op selects the
top-k channels (of the whole row, or of each block for Block Q-Sparse) by the project's rule, then reads the union
of the tokens' kept rows, each row once for the whole batch, accumulating in fp32. At batch 1 with sparsity s that
is a fraction ``1 - s`` of the weight bytes. ``SparseDecodeLinear`` (sparse_linear.py) is the user-facing API.

The kernel is a small C++ extension (AVX2+FMA when torch itself runs AVX2 code here, plain C++ otherwise),
compiled on first use (~10 s) into ``~/.cache/megatron_qsparse`` (or ``$QSPARSE_KERNEL_DIR``) and reused after.
Without a compiler, or with ``QSPARSE_GATHER_KERNEL=0``, the torch route of sparse_linear.py takes over
(``topk_mask`` + ``index_select`` of the kept rows + ``mm``): exact, slower. ``backend()`` says which one runs.

Why a kernel (fp32 / bf16, 4096→12288 at 50%, batch 1, 1 thread, on the 2-core AMD EPYC dev box):
``index_select`` + ``mm`` 82 / 223 ms (it copies the rows before reading them again), ``torch.sparse.mm`` with a
COO input 7.4 / 11.3 ms (and accumulates bf16 in bf16: 10% error), dense ``F.linear`` 10.5 / 5.6 ms, the gather
4.2 / 2.5 ms (its own dense, all rows: 8.4 / 5.2 ms). Why the selection is in it too: once a projection's weights
have streamed through the caches, each of the ~15 small torch ops of a Python-side selection and gather costs
tens of microseconds; one op instead saves 0.3-0.6 ms per projection (4096→4096 bf16: 1.29 → 0.80 ms). Its
selection is a branch-free radix select: on a fresh input (as every decoded token is) a quickselect, like
``torch.kthvalue``, mispredicts on every other element (14336 channels: 450 µs → 150 µs). It is a second
implementation of the project's top-K rule, tested equal to ``topk_mask`` / ``block_topk_mask`` (ties, NaN, inf).
"""

import functools
import hashlib
import os
import warnings
from pathlib import Path
from typing import Callable, List, Optional

import torch

_SOURCE = r"""
// Q-Sparse decode: mask = top-k of each token's input, y[b, :] = sum over the rows r any token keeps of
// x[b, r] * mask[b, r] * weight_t[r, :] + bias (fp32 accumulation; fp32 or bfloat16 weight and input).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRowsPerPass = 8;       // rows folded into the accumulators per pass (best of 2, 4, 8, 16)
constexpr int64_t kAccumulators = 32768;  // fp32 accumulators per thread, 128 KiB in L2 (8K-32K: within 5%)
constexpr int64_t kMaxBatch = 64;         // bounds the per-thread partial sums (threads x batch x out floats)

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
  const W* row[kRowsPerPass];
  float v[kRowsPerPass];
  for (int64_t t0 = 0; t0 < out_features; t0 += tile) {
    const int64_t width = std::min(tile, out_features - t0);
    std::fill(acc.begin(), acc.begin() + batch * width, 0.f);
    int64_t i = 0;
    for (; i + kRowsPerPass <= n; i += kRowsPerPass) {
      for (int64_t u = 0; u < kRowsPerPass; ++u) row[u] = wt + rows[i + u] * out_features + t0;
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t u = 0; u < kRowsPerPass; ++u) v[u] = values[b * stride + i + u];
        fold_rows<kRowsPerPass>(row, v, width, acc.data() + b * width);
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

// |v| as an unsigned integer: ordered like the magnitudes, every NaN above inf (as torch.kthvalue ranks them).
inline uint32_t magnitude_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits & 0x7FFFFFFFu;
}
constexpr uint32_t kInfinityBits = 0x7F800000u;  // magnitudes above this are NaN

// Bits of the k-th largest of bits[0:size] (1 <= k < size). Long rows: a radix selection, three histogram passes
// over 11, 11 and 10 bits without data-dependent branches (a quickselect mispredicts on every other element of
// a fresh input: 450 vs 110 us at 14336 channels). Short rows (blocks): nth_element.
uint32_t kth_largest_bits(std::vector<uint32_t>& bits, int64_t size, int64_t k) {
  if (size < 256) {
    std::nth_element(bits.begin(), bits.begin() + (k - 1), bits.begin() + size, std::greater<uint32_t>());
    return bits[k - 1];
  }
  constexpr int kShift[3] = {21, 10, 0};
  uint32_t prefix = 0, known = 0;  // the bits of the answer decided so far, and which bits those are
  int64_t rank = k;                // the answer's rank among the entries sharing the prefix
  std::array<int64_t, 2048> counts;
  for (int level = 0; level < 3; ++level) {
    const uint32_t bucket_mask = level == 2 ? 0x3FFu : 0x7FFu;
    counts.fill(0);
    for (int64_t i = 0; i < size; ++i) {
      counts[(bits[i] >> kShift[level]) & bucket_mask] += (bits[i] & known) == prefix;
    }
    uint32_t bucket = bucket_mask;
    for (; counts[bucket] < rank; --bucket) rank -= counts[bucket];
    prefix |= bucket << kShift[level];
    known |= bucket_mask << kShift[level];
  }
  return prefix;
}

// The project's top-K rule (megatron_qsparse.sparsity.topk.topk_mask) on one segment of x: the k-th largest
// |x| (fp32, NaN ranked above everything) is the threshold; every |x| > threshold is kept, then the ties
// |x| == threshold from the lowest index up, k in all. Comparisons are IEEE: a NaN is never kept, and a NaN
// threshold keeps nothing. Equality with topk_mask / block_topk_mask is tested on ties, NaN and inf.
void select_topk(const float* x, int64_t size, int64_t k, std::vector<uint32_t>& bits, bool* keep) {
  if (k >= size || k <= 0) {
    std::fill(keep, keep + size, k > 0);
    return;
  }
  bits.resize(size);
  for (int64_t i = 0; i < size; ++i) bits[i] = magnitude_bits(x[i]);
  const uint32_t kth = kth_largest_bits(bits, size, k);
  if (kth > kInfinityBits) {
    std::fill(keep, keep + size, false);
    return;
  }
  int64_t ties = k;
  for (int64_t i = 0; i < size; ++i) {
    const uint32_t m = magnitude_bits(x[i]);
    ties -= (m > kth) & (m <= kInfinityBits);
  }
  for (int64_t i = 0; i < size; ++i) {
    const uint32_t m = magnitude_bits(x[i]);
    const bool tie = m == kth;
    keep[i] = ((m > kth) & (m <= kInfinityBits)) | (tie & (ties > 0));
    ties -= tie;
  }
}

// The rows any token keeps (ascending) and the tokens' inputs on them, zero where a token dropped the row.
// Branch-free compaction: whether a row is kept is a coin flip for the branch predictor.
void gather_kept(const float* x, const bool* mask, int64_t batch, int64_t in_features, std::vector<int64_t>& rows,
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

// x as fp32, [batch, in]: the input itself, or a per-thread converted copy of a bfloat16 input.
const float* as_float(const at::Tensor& x) {
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>();
  thread_local std::vector<float> converted;
  converted.resize(x.numel());
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(x.data_ptr());
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
  const float* xf = as_float(x);
  thread_local std::vector<char> own_mask;  // char, not bool: std::vector<bool> has no addressable elements
  own_mask.resize(x.numel());
  bool* keep = mask ? mask->data_ptr<bool>() : reinterpret_cast<bool*>(own_mask.data());
  at::parallel_for(0, batch * in_features / segment, 1, [&](int64_t s0, int64_t s1) {
    thread_local std::vector<uint32_t> bits;
    for (int64_t s = s0; s < s1; ++s) select_topk(xf + s * segment, segment, k, bits, keep + s * segment);
  });
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

}  // namespace

TORCH_LIBRARY(qsparse_gather, m) {
  m.def("topk_linear(Tensor x, Tensor weight_t, Tensor? bias, int k, int segment, Tensor(a!)? mask=None) -> Tensor",
        &topk_linear);
}
"""

# kMaxBatch in the source. Beyond a few dozen tokens (prefill) the union is ~all rows and a BLAS matmul wins
# (measured: 2x faster at 256 tokens, fp32).
MAX_KERNEL_BATCH = 64
KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # of the weight and the input; others take the torch route


def _compile_flags() -> List[str]:
    flags = ["-O3"]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith(("AVX2", "AVX512")):  # torch already runs AVX2 code on this CPU
        flags += ["-mavx2", "-mfma"]
    if torch.backends.openmp.is_available():  # at::parallel_for expands to an OpenMP region in our code
        flags.append("-fopenmp")
    return flags


def _write_if_changed(path: Path, text: str) -> None:
    """Rewrite the source only when it differs, so that the build cache (keyed on mtimes) stays valid."""
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@functools.lru_cache(maxsize=None)
def load_kernel() -> Optional[Callable]:
    """The compiled ``topk_linear`` op, built on first call; None where it cannot be built."""
    if os.environ.get("QSPARSE_GATHER_KERNEL", "1") == "0":
        return None
    try:
        from torch.utils import cpp_extension

        flags = _compile_flags()
        digest = hashlib.sha1("\n".join([_SOURCE, *flags, torch.__version__]).encode()).hexdigest()[:12]
        name = f"qsparse_gather_{digest}"
        root = Path(os.environ.get("QSPARSE_KERNEL_DIR", Path.home() / ".cache" / "megatron_qsparse"))
        build_dir = root / name
        build_dir.mkdir(parents=True, exist_ok=True)
        source = build_dir / "topk_linear.cpp"
        _write_if_changed(source, _SOURCE)
        cpp_extension.load(name=name, sources=[str(source)], build_directory=str(build_dir), extra_cflags=flags,
                           extra_ldflags=[f for f in flags if f == "-fopenmp"], is_python_module=False)
        return torch.ops.qsparse_gather.topk_linear
    except Exception as error:  # no compiler, no ninja, read-only home...: stay correct, just slower
        warnings.warn(f"qsparse gather kernel unavailable ({type(error).__name__}: {error}); using the torch "
                      "fallback (index_select + mm)")
        return None


def backend() -> str:
    """``"cpp"`` when the compiled kernel runs, ``"torch"`` for the fallback."""
    return "cpp" if load_kernel() is not None else "torch"


def kernel_applies(x: torch.Tensor, weight_t: torch.Tensor) -> bool:
    """Whether the compiled op takes this call (else the torch route of sparse_linear.py does)."""
    return (load_kernel() is not None and weight_t.device.type == "cpu" and weight_t.dtype in KERNEL_DTYPES
            and x.dtype in KERNEL_DTYPES and 1 <= x.shape[0] <= MAX_KERNEL_BATCH)


def compiled_topk_linear(x: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor], k: int,
                         segment: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(x ⊙ M) @ weight_t + bias`` in x's dtype for ``x`` [batch, in], M the top-``k`` of every ``segment``
    channels of each row, by one call of the compiled op (``kernel_applies`` first). A bool ``mask`` shaped
    like x, if given, receives M."""
    return load_kernel()(x.contiguous(), weight_t, bias, k, segment, mask)
