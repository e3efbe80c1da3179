// The decode engine's core: one whole decoder step of a Q-Sparse model per call, in compiled code.
// megatron_qsparse/inference/engine.py builds it from a Hugging Face export and drives generation; this file
// holds no policy, only the arithmetic of megatron_qsparse/hf/modeling_qsparse.py, one token per sequence a call:
//   embedding -> per layer: norm, QKV (top-K site), RoPE, GQA attention over the KV cache, output projection
//   (top-K site), residual, norm, gated FFN (two top-K sites; or MoE routed to the top-k experts), residual
//   -> final norm -> LM head -> sampling.
// Activations, the KV cache and every sum are fp32; weights are fp32, bfloat16 or (BitNet b1.58) packed ternary.
// Projections come in three kinds:
//   kDense    every input channel: y = W x, W row-major [out, in] as exported (dot products, threads split rows)
//   kGather   Q-Sparse: top-k of x (per segment), then only the kept rows of the input-major Wt [in, out]
//   kTernary  BitNet b1.58 + Q-Sparse: top-k, int8 absmax levels of the kept entries, then only their rows of
//             2-bit codes; y = (sum of level * code, exact in int32) * gamma / 127 * alpha
// A zero input (dropped by the mask, a natural zero of ReLU^2, or an int8 level of 0) never reads its row.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>
#include <sys/mman.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "rows.h"
#include "select.h"
#include "ternary.h"

namespace {

using namespace qsparse;

enum Kind : int64_t { kDense = 0, kGather = 1, kTernary = 2 };
constexpr float kQuantEps = 1e-5f;  // megatron_qsparse.sparsity.bitnet.EPS: the least absmax scale
constexpr int64_t kMaxBatch = 8;  // sequences decoded together (dot_rows handles up to 8)

// body(thread, threads) on `threads` OpenMP threads (one parallel region), or inline.
template <typename Body>
void on_threads(int64_t threads, Body&& body) {
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    body(static_cast<int64_t>(omp_get_thread_num()), static_cast<int64_t>(omp_get_num_threads()));
    return;
  }
#endif
  body(0, 1);
}

inline void barrier() {
#ifdef _OPENMP
#pragma omp barrier
#endif
}

// Thread t's part [begin, end) of [0, n), cut at multiples of `align`.
struct Span { int64_t begin, end; };
inline Span share(int64_t n, int64_t t, int64_t threads, int64_t align = 1) {
  const int64_t units = (n + align - 1) / align;
  return {std::min(n, units * t / threads * align), std::min(n, units * (t + 1) / threads * align)};
}

// A copy of t in memory that the kernel may back with 2 MiB pages (madvise; transparent huge pages in "madvise"
// mode): a gathered row then rarely misses the TLB (bf16 rows of 40% of a 1024 x 3072 Wt, one core: ~+10%).
at::Tensor on_huge_pages(const at::Tensor& t) {
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t bytes = t.nbytes(), size = std::max(kHuge, (bytes + kHuge - 1) / kHuge * kHuge);
  void* memory = std::aligned_alloc(kHuge, size);
  TORCH_CHECK(memory != nullptr, "out of memory copying a weight of ", bytes, " bytes");
#ifdef MADV_HUGEPAGE
  madvise(memory, size, MADV_HUGEPAGE);
#endif
  std::memcpy(memory, t.data_ptr(), bytes);
  return at::from_blob(memory, t.sizes(), [](void* p) { std::free(p); }, t.options());
}

inline float relu2(float g) { const float r = g > 0.f ? g : 0.f; return r * r; }
inline float silu(float g) { return g / (1.f + std::exp(-g)); }

// Seconds spent per phase of step(), accumulated until profile_reset(): where a token's time goes.
enum Phase { kSelect = 0, kDenseProducts, kGatherProducts, kTernaryProducts, kAttention, kLmHead, kStep, kPhases };

class PhaseTimer {
 public:
  PhaseTimer(std::vector<double>& seconds, Phase phase)
      : seconds_(seconds), phase_(phase), start_(std::chrono::steady_clock::now()) {}
  ~PhaseTimer() {
    seconds_[phase_] += std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  std::vector<double>& seconds_;
  Phase phase_;
  std::chrono::steady_clock::time_point start_;
};

struct Projection {
  at::Tensor weight, bias;  // bias: fp32 [out] or empty
  int64_t kind, in, out, k, segment;
  float alpha;  // kTernary: the weight's absmean scale
};

struct Layer {
  at::Tensor norm1_w, norm1_b, norm2_w, norm2_b, router;  // router: fp32 [experts, hidden] or empty (dense FFN)
  int64_t qkv, o;
  std::vector<int64_t> ffn;  // (gate_up, down) projection ids, one pair per expert
};

class Engine : public torch::CustomClassHolder {
 public:
  // dims: vocab, hidden, heads, kv_heads, head_dim, layers, max_seq, activation (0 relu2, 1 silu), norm (0 rms,
  // 1 layer), experts_per_token, threads, max_batch (sequences decoded together, each its own KV cache). scalars: norm epsilon. embed / lm_head: [vocab, hidden] fp32 or bf16
  // (may be one tensor); rope_cos / rope_sin: fp32 [max_seq, head_dim / 2].
  Engine(std::vector<int64_t> dims, std::vector<double> scalars, at::Tensor embed, at::Tensor lm_head,
         at::Tensor final_w, at::Tensor final_b, at::Tensor rope_cos, at::Tensor rope_sin)
      : embed_(embed), lm_head_(lm_head), final_w_(final_w), final_b_(final_b), cos_(rope_cos), sin_(rope_sin) {
    TORCH_CHECK(dims.size() == 12 && scalars.size() == 1, "Engine: 12 dims and 1 scalar");
    vocab_ = dims[0]; hidden_ = dims[1]; heads_ = dims[2]; kv_heads_ = dims[3]; head_dim_ = dims[4];
    layers_ = dims[5]; max_seq_ = dims[6]; silu_ = dims[7] == 1; layernorm_ = dims[8] == 1;
    experts_per_token_ = dims[9]; threads_ = std::max<int64_t>(1, dims[10]); max_batch_ = dims[11];
    eps_ = static_cast<float>(scalars[0]);
    TORCH_CHECK(max_batch_ >= 1 && max_batch_ <= kMaxBatch, "Engine: max_batch must lie in [1, ", kMaxBatch, "]");
    TORCH_CHECK(heads_ % kv_heads_ == 0 && head_dim_ % 2 == 0, "Engine: heads must be a multiple of kv_heads");
    for (const at::Tensor* t : {&embed_, &lm_head_}) {
      TORCH_CHECK(t->dim() == 2 && t->size(0) == vocab_ && t->size(1) == hidden_ && t->is_contiguous() &&
                  (t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16),
                  "Engine: embedding / LM head must be contiguous fp32 or bf16 [vocab, hidden]");
    }
    TORCH_CHECK(cos_.scalar_type() == at::kFloat && cos_.is_contiguous() && cos_.numel() == max_seq_ * head_dim_ / 2 &&
                sin_.scalar_type() == at::kFloat && sin_.is_contiguous() && sin_.numel() == cos_.numel(),
                "Engine: RoPE tables must be contiguous fp32 [max_seq, head_dim / 2]");
    check_vector(final_w_, hidden_, "final norm weight");
    if (layernorm_) check_vector(final_b_, hidden_, "final norm bias");
    const int64_t kv = kv_heads_ * head_dim_;
    keys_.assign(max_batch_ * layers_ * max_seq_ * kv, 0.f);  // [sequence, layer, kv head, position, d]
    values_.assign(max_batch_ * layers_ * max_seq_ * kv, 0.f);
    positions_.assign(max_batch_, 0);
    const int64_t B = max_batch_;
    x_.resize(B * hidden_); h_.resize(B * hidden_); tmp_.resize(B * hidden_); moe_out_.resize(B * hidden_);
    expert_out_.resize(hidden_);
    qkv_.resize(B * (heads_ + 2 * kv_heads_) * head_dim_); ctx_.resize(B * heads_ * head_dim_);
    scores_.resize(threads_ * max_seq_);
    logits_ = at::empty({B, vocab_}, at::TensorOptions().dtype(at::kFloat));
    rng_.seed(0);
  }

  int64_t add_projection(at::Tensor weight, at::Tensor bias, int64_t kind, int64_t in, int64_t out, int64_t k,
                         int64_t segment, double alpha) {
    TORCH_CHECK(weight.is_contiguous() && weight.device().is_cpu(), "projection weight: contiguous CPU tensor");
    TORCH_CHECK(segment > 0 && in % segment == 0 && k >= 0 && k <= segment, "projection: bad k / segment");
    if (kind == kDense) {
      TORCH_CHECK(weight.dim() == 2 && weight.size(0) == out && weight.size(1) == in, "dense weight: [out, in]");
    } else if (kind == kGather) {
      TORCH_CHECK(weight.dim() == 2 && weight.size(0) == in && weight.size(1) == out, "gather weight: [in, out]");
    } else {
      TORCH_CHECK(kind == kTernary && weight.scalar_type() == at::kByte && weight.dim() == 2 && weight.size(0) == in &&
                  weight.size(1) == (out + 127) / 128 * 32, "ternary weight: uint8 [in, ceil(out / 128) * 32]");
    }
    TORCH_CHECK(kind == kTernary || weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
                "projection weight: fp32 or bf16");
    if (bias.numel()) check_vector(bias, out, "projection bias");
    projections_.push_back({on_huge_pages(weight), bias, kind, in, out, k, segment, static_cast<float>(alpha)});
    return static_cast<int64_t>(projections_.size()) - 1;
  }

  void add_layer(at::Tensor norm1_w, at::Tensor norm1_b, int64_t qkv, int64_t o, at::Tensor norm2_w,
                 at::Tensor norm2_b, at::Tensor router, std::vector<int64_t> ffn) {
    TORCH_CHECK(static_cast<int64_t>(stack_.size()) < layers_, "add_layer: all layers added already");
    check_vector(norm1_w, hidden_, "norm weight");
    check_vector(norm2_w, hidden_, "norm weight");
    if (layernorm_) { check_vector(norm1_b, hidden_, "norm bias"); check_vector(norm2_b, hidden_, "norm bias"); }
    const int64_t experts = router.numel() ? router.size(0) : 1;
    TORCH_CHECK(static_cast<int64_t>(ffn.size()) == 2 * experts, "add_layer: one (gate_up, down) pair per expert");
    TORCH_CHECK(!router.numel() || (router.scalar_type() == at::kFloat && router.is_contiguous() &&
                                    router.size(1) == hidden_ && experts_per_token_ <= experts),
                "router: contiguous fp32 [experts, hidden]");
    for (int64_t id : ffn) TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(projections_.size()), "bad projection id");
    stack_.push_back({norm1_w, norm1_b, norm2_w, norm2_b, router, qkv, o, ffn});
  }

  void reset() { std::fill(positions_.begin(), positions_.end(), int64_t{0}); }
  int64_t position() const { return positions_[0]; }
  std::vector<int64_t> positions() const { return positions_; }
  void seed(int64_t value) { rng_.seed(static_cast<uint64_t>(value)); }
  // Seconds per phase since the last profile_reset(): select, dense products, gather products, ternary
  // products, attention, LM head, whole steps.
  std::vector<double> profile() const { return seconds_; }
  void profile_reset() { std::fill(seconds_.begin(), seconds_.end(), 0.0); }

  // One token of sequence 0 at its next position; returns its logits (fp32 [vocab], a view of the buffer that
  // the next call reuses: clone it to keep it).
  at::Tensor step(int64_t token) { return step_batch({token}, {0}).select(0, 0); }

  // One token for each listed sequence (slot of the KV cache), each at that sequence's next position: the
  // projections read the union of the tokens' kept rows once. Returns the logits [tokens, vocab] (a view of the
  // buffer that the next call reuses).
  at::Tensor step_batch(std::vector<int64_t> tokens, std::vector<int64_t> slots) {
    PhaseTimer timer(seconds_, kStep);
    const int64_t B = static_cast<int64_t>(tokens.size());
    TORCH_CHECK(static_cast<int64_t>(stack_.size()) == layers_, "Engine: add every layer before step()");
    TORCH_CHECK(B >= 1 && B <= max_batch_ && slots.size() == tokens.size(),
                "step_batch: 1 to max_batch (", max_batch_, ") tokens, one slot each");
    std::vector<bool> seen(max_batch_, false);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t token = tokens[b], slot = slots[b];
      TORCH_CHECK(token >= 0 && token < vocab_, "token id ", token, " outside the vocabulary [0, ", vocab_, ")");
      TORCH_CHECK(slot >= 0 && slot < max_batch_ && !seen[slot], "slot ", slot, " out of range or repeated");
      seen[slot] = true;
      TORCH_CHECK(positions_[slot] < max_seq_, "the KV cache of sequence ", slot, " is full (", max_seq_,
                  " positions)");
      embed_row(token, x_.data() + b * hidden_);
    }
    slots_ = slots;
    for (int64_t l = 0; l < layers_; ++l) {
      const Layer& layer = stack_[l];
      norm_rows(x_.data(), layer.norm1_w, layer.norm1_b, h_.data(), B);
      project(projections_[layer.qkv], h_.data(), qkv_.data(), B);
      attend(l, B);
      project(projections_[layer.o], ctx_.data(), tmp_.data(), B);
      for (int64_t i = 0; i < B * hidden_; ++i) x_[i] += tmp_[i];
      norm_rows(x_.data(), layer.norm2_w, layer.norm2_b, h_.data(), B);
      if (layer.router.numel()) moe(layer, B); else ffn(layer.ffn[0], layer.ffn[1], h_.data(), tmp_.data(), B);
      for (int64_t i = 0; i < B * hidden_; ++i) x_[i] += tmp_[i];
    }
    norm_rows(x_.data(), final_w_, final_b_, h_.data(), B);
    float* logits = logits_.data_ptr<float>();
    {
      PhaseTimer head(seconds_, kLmHead);
      with_rows(lm_head_, [&](auto* w) {
        on_threads(threads_, [&](int64_t t, int64_t n) {
          const Span s = share(vocab_, t, n, 4);
          dot_rows(w, hidden_, h_.data(), B, vocab_, s.begin, s.end, logits);
        });
      });
    }
    for (int64_t slot : slots) ++positions_[slot];
    return logits_.narrow(0, 0, B);
  }

  // A token drawn from `logits` (fp32 [vocab]): argmax (lowest index on ties) when temperature <= 0 or
  // top_k == 1; else softmax(logits / temperature) restricted to the top_k most likely (top_k <= 0: all), then to
  // the smallest most-likely set whose probability reaches top_p (top_p >= 1: all), renormalized.
  int64_t sample(at::Tensor logits, double temperature, int64_t top_k, double top_p) {
    TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.is_contiguous() && logits.dim() == 1,
                "sample: contiguous fp32 [vocab] logits");
    const float* l = logits.data_ptr<float>();
    const int64_t n = logits.numel();
    if (temperature <= 0 || top_k == 1) return std::max_element(l, l + n) - l;
    std::vector<int64_t>& order = order_;
    order.resize(n);
    std::iota(order.begin(), order.end(), int64_t{0});
    auto likelier = [l](int64_t a, int64_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); };
    int64_t m = n;
    if (top_k > 0 && top_k < n) {
      std::nth_element(order.begin(), order.begin() + (top_k - 1), order.end(), likelier);
      m = top_k;
    }
    if (top_p < 1.0 || m < n) std::sort(order.begin(), order.begin() + m, likelier);
    else m = n;
    const float best = *std::max_element(l, l + n);
    std::vector<double>& p = probs_;
    p.resize(m);
    double total = 0.0;
    for (int64_t i = 0; i < m; ++i) total += (p[i] = std::exp((static_cast<double>(l[order[i]]) - best) / temperature));
    if (top_p < 1.0) {
      double kept = 0.0;
      int64_t keep = 0;
      while (keep < m && kept < top_p * total) kept += p[keep++];
      m = std::max<int64_t>(keep, 1);
      total = std::accumulate(p.begin(), p.begin() + m, 0.0);
    }
    double u = std::uniform_real_distribution<double>(0.0, total)(rng_);
    for (int64_t i = 0; i < m; ++i) {
      if ((u -= p[i]) < 0) return order[i];
    }
    return order[m - 1];
  }

 private:
  static void check_vector(const at::Tensor& t, int64_t size, const char* what) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == size, what,
                ": contiguous fp32 of ", size);
  }

  template <typename Body>
  static void with_rows(const at::Tensor& w, Body body) {
    if (w.scalar_type() == at::kFloat) body(w.data_ptr<float>());
    else body(reinterpret_cast<const uint16_t*>(w.data_ptr()));
  }

  void embed_row(int64_t token, float* x) {
    with_rows(embed_, [&](auto* w) {
      for (int64_t i = 0; i < hidden_; ++i) x[i] = widen(w[token * hidden_ + i]);
    });
  }

  void norm_rows(const float* x, const at::Tensor& weight, const at::Tensor& bias, float* out, int64_t B) const {
    for (int64_t b = 0; b < B; ++b) norm(x + b * hidden_, weight, bias, out + b * hidden_);
  }

  // RMSNorm (bias empty) or LayerNorm, as megatron_qsparse.layers.norm_fn.normalize in fp32.
  void norm(const float* x, const at::Tensor& weight, const at::Tensor& bias, float* out) const {
    const float* w = weight.data_ptr<float>();
    const int64_t n = hidden_;
    if (!layernorm_) {
      float sq = 0.f;
      for (int64_t i = 0; i < n; ++i) sq += x[i] * x[i];
      const float r = 1.f / std::sqrt(sq / n + eps_);
      for (int64_t i = 0; i < n; ++i) out[i] = x[i] * r * w[i];
      return;
    }
    const float* b = bias.data_ptr<float>();
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) sum += x[i];
    const float mean = sum / n;
    float var = 0.f;
    for (int64_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
    const float r = 1.f / std::sqrt(var / n + eps_);
    for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - mean) * r * w[i] + b[i];
  }

  // The rows a projection reads for the B tokens of x [B, in]: each token's top-k per segment (all of x when
  // k == segment), united, rows where every kept input is 0 skipped; values_in_ [B, kept_] holds each token's
  // input on them, 0 where it dropped the row.
  void kept_inputs(const Projection& p, const float* x, int64_t B) {
    PhaseTimer timer(seconds_, kSelect);
    keep_.resize(B * p.in);
    bool* keep = reinterpret_cast<bool*>(keep_.data());
    for (int64_t b = 0; b < B; ++b) {
      if (p.k < p.segment) {
        for (int64_t s = 0; s < p.in; s += p.segment) {
          select_topk(x + b * p.in + s, p.segment, p.k, scratch_, keep + b * p.in + s);
        }
      } else {
        std::fill(keep + b * p.in, keep + (b + 1) * p.in, true);
      }
      for (int64_t d = 0; d < p.in; ++d) keep[b * p.in + d] &= x[b * p.in + d] != 0.f;
    }
    gather_kept(x, keep, B, p.in, rows_, values_in_);
    kept_ = static_cast<int64_t>(rows_.size());
  }

  // y [B, out] = the projection of x [B, in] (BitNet: one token at a time, each with its own int8 scale).
  void project(const Projection& p, const float* x, float* y, int64_t B) {
    if (p.kind == kDense) {
      PhaseTimer timer(seconds_, kDenseProducts);
      with_rows(p.weight, [&](auto* w) {
        on_threads(threads_, [&](int64_t t, int64_t n) {
          const Span s = share(p.out, t, n, 4);
          dot_rows(w, p.in, x, B, p.out, s.begin, s.end, y);
        });
      });
    } else if (p.kind == kGather) {
      kept_inputs(p, x, B);
      PhaseTimer timer(seconds_, kGatherProducts);
      gather_product(p, y, B);
    } else {
      for (int64_t b = 0; b < B; ++b) {
        kept_inputs(p, x + b * p.in, 1);
        PhaseTimer timer(seconds_, kTernaryProducts);
        ternary_product(p, y + b * p.out);
      }
    }
    if (p.bias.numel()) {
      const float* bias = p.bias.data_ptr<float>();
      for (int64_t i = 0; i < B * p.out; ++i) y[i] += bias[i % p.out];
    }
  }

  // y = sum over the kept rows of value * Wt[row, :]: threads split the rows (each streams whole rows into its
  // own partial sums), then split the outputs to add the partials.
  void gather_product(const Projection& p, float* y, int64_t B) {
    const int64_t size = B * p.out, n = kept_;
    partial_.resize(threads_ * size);
    with_rows(p.weight, [&](auto* wt) {
      on_threads(threads_, [&](int64_t t, int64_t threads) {
        float* mine = partial_.data() + t * size;
        std::fill(mine, mine + size, 0.f);
        // Chunks of 16 rows dealt out in turn: the threads read neighbouring rows at the same time.
        thread_local std::vector<int64_t> my_rows;
        thread_local std::vector<float> my_values;
        my_rows.clear();
        for (int64_t c = t * 16; c < n; c += threads * 16) {
          for (int64_t i = c; i < std::min(n, c + 16); ++i) my_rows.push_back(i);
        }
        const int64_t mine_n = static_cast<int64_t>(my_rows.size());
        my_values.resize(B * mine_n);
        for (int64_t b = 0; b < B; ++b) {
          for (int64_t j = 0; j < mine_n; ++j) my_values[b * mine_n + j] = values_in_[b * n + my_rows[j]];
        }
        for (int64_t j = 0; j < mine_n; ++j) my_rows[j] = rows_[my_rows[j]];
        accumulate_rows(wt, p.out, my_rows.data(), mine_n, my_values.data(), mine_n, B, mine);
        barrier();
        const Span outs = share(size, t, threads, 16);
        for (int64_t i = outs.begin; i < outs.end; ++i) {
          float sum = 0.f;
          for (int64_t u = 0; u < threads; ++u) sum += partial_[u * size + i];
          y[i] = sum;
        }
      });
    });
  }

  // BitNet b1.58: the kept inputs' int8 absmax levels (RoundClip(x * (127 / gamma), -128, 127), gamma the largest
  // kept |x|, as megatron_qsparse.sparsity.bitnet), then exact integer products with the ternary codes.
  void ternary_product(const Projection& p, float* y) {
    float gamma = 0.f;
    for (int64_t i = 0; i < kept_; ++i) gamma = std::max(gamma, std::fabs(values_in_[i]));
    gamma = std::max(gamma, kQuantEps);
    const float by = (1.f / gamma) * 127.f;  // as torch forms 127 / gamma
    levels_.resize(kept_);
    int64_t n = 0, level_sum = 0;
    for (int64_t i = 0; i < kept_; ++i) {  // drops the entries whose level is 0
      const float v = std::min(std::max(std::nearbyint(values_in_[i] * by), -128.f), 127.f);
      rows_[n] = rows_[i];
      levels_[n] = static_cast<int8_t>(v);
      level_sum += levels_[n];
      n += v != 0.f;
    }
    const int64_t groups = (p.out + 127) / 128, padded = groups * 128;
    int_partial_.resize(threads_ * padded);
    const uint8_t* packed = p.weight.data_ptr<uint8_t>();
    const float scale = gamma / 127.f * p.alpha;
    on_threads(threads_, [&](int64_t t, int64_t threads) {
      int32_t* mine = int_partial_.data() + t * padded;
      std::fill(mine, mine + padded, 0);
      thread_local std::vector<Lanes16> scratch;
      const Span rows = share(n, t, threads, 2);
      ternary_rows(packed, groups, rows_.data() + rows.begin, levels_.data() + rows.begin, rows.end - rows.begin,
                   mine, scratch);
      barrier();
      const Span outs = share(p.out, t, threads, 16);
      for (int64_t i = outs.begin; i < outs.end; ++i) {
        int64_t sum = -level_sum;  // the codes are w + 1
        for (int64_t u = 0; u < threads; ++u) sum += int_partial_[u * padded + i];
        y[i] = static_cast<float>(sum) * scale;
      }
    });
  }

  // For each token: RoPE on its q and k at its position (rotate-half pairs i, i + d/2), k and v into its
  // sequence's cache, then softmax attention of every query head over the cached positions of its key/value head.
  // The (token, head) pairs are split over threads.
  void attend(int64_t layer, int64_t B) {
    PhaseTimer timer(seconds_, kAttention);
    const int64_t d = head_dim_, half = d / 2, kv = kv_heads_ * d, width = (heads_ + 2 * kv_heads_) * d;
    auto cache = [&](std::vector<float>& store, int64_t b) {  // layer `layer` of token b's sequence
      return store.data() + (slots_[b] * layers_ + layer) * max_seq_ * kv;
    };
    for (int64_t b = 0; b < B; ++b) {
      const int64_t pos = positions_[slots_[b]];
      const float* c = cos_.data_ptr<float>() + pos * half;
      const float* s = sin_.data_ptr<float>() + pos * half;
      float* q = qkv_.data() + b * width;
      for (int64_t h = 0; h < heads_ + kv_heads_; ++h) {  // the query heads, then the key heads
        float* v = q + h * d;
        for (int64_t i = 0; i < half; ++i) {
          const float x0 = v[i], x1 = v[i + half];
          v[i] = x0 * c[i] - x1 * s[i];
          v[i + half] = x1 * c[i] + x0 * s[i];
        }
      }
      float* keys = cache(keys_, b);
      float* values = cache(values_, b);
      for (int64_t g = 0; g < kv_heads_; ++g) {  // cache layout [kv head, position, d]
        std::copy(q + (heads_ + g) * d, q + (heads_ + g + 1) * d, keys + (g * max_seq_ + pos) * d);
        std::copy(q + (heads_ + kv_heads_ + g) * d, q + (heads_ + kv_heads_ + g + 1) * d,
                  values + (g * max_seq_ + pos) * d);
      }
    }
    const float root = static_cast<float>(std::sqrt(static_cast<double>(d)));
    const int64_t group = heads_ / kv_heads_;
    on_threads(std::min(threads_, B * heads_), [&](int64_t t, int64_t threads) {  // reads the cache: memory-bound
      float* score = scores_.data() + t * max_seq_;
      const Span mine = share(B * heads_, t, threads);
      for (int64_t bh = mine.begin; bh < mine.end; ++bh) {
        const int64_t b = bh / heads_, h = bh % heads_, pos = positions_[slots_[b]];
        const float* qh = qkv_.data() + b * width + h * d;
        const float* kh = cache(keys_, b) + (h / group) * max_seq_ * d;
        const float* vh = cache(values_, b) + (h / group) * max_seq_ * d;
        float best = -INFINITY;
        for (int64_t p = 0; p <= pos; ++p) {
          score[p] = dot(qh, kh + p * d, d) / root;
          best = std::max(best, score[p]);
        }
        float total = 0.f;
        for (int64_t p = 0; p <= pos; ++p) total += (score[p] = std::exp(score[p] - best));
        float* out = ctx_.data() + (b * heads_ + h) * d;
        std::fill(out, out + d, 0.f);
        for (int64_t p = 0; p <= pos; ++p) {
          const float w = score[p] / total;
          for (int64_t i = 0; i < d; ++i) out[i] += w * vh[p * d + i];
        }
      }
    });
  }

  // Gated FFN: act(gate) * up on the gate_up projection's halves, then the down projection.
  void ffn(int64_t gate_up, int64_t down, const float* x, float* y, int64_t B) {
    const Projection& gu = projections_[gate_up];
    const int64_t inter = gu.out / 2;
    gate_up_.resize(B * gu.out);
    mid_.resize(B * inter);
    project(gu, x, gate_up_.data(), B);
    for (int64_t b = 0; b < B; ++b) {
      const float* g = gate_up_.data() + b * gu.out;
      for (int64_t i = 0; i < inter; ++i) mid_[b * inter + i] = (silu_ ? silu(g[i]) : relu2(g[i])) * g[inter + i];
    }
    project(projections_[down], mid_.data(), y, B);
  }

  // MoE, token by token: the router (dense input) picks the top-k experts (lowest index on ties); softmax over
  // their logits weights their outputs, added in expert order. tmp_ [B, hidden] receives the outputs.
  void moe(const Layer& layer, int64_t B) {
    for (int64_t b = 0; b < B; ++b) moe_token(layer, h_.data() + b * hidden_, moe_out_.data() + b * hidden_);
    std::copy(moe_out_.begin(), moe_out_.begin() + B * hidden_, tmp_.begin());
  }

  void moe_token(const Layer& layer, const float* x, float* out) {
    const int64_t experts = layer.router.size(0);
    router_logits_.resize(experts);
    dot_rows(layer.router.data_ptr<float>(), hidden_, x, 1, experts, 0, experts, router_logits_.data());
    std::vector<int64_t> chosen(experts);
    std::iota(chosen.begin(), chosen.end(), int64_t{0});
    const float* l = router_logits_.data();
    std::partial_sort(chosen.begin(), chosen.begin() + experts_per_token_, chosen.end(),
                      [l](int64_t a, int64_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
    chosen.resize(experts_per_token_);
    const float best = l[chosen[0]];
    std::vector<float> weight(experts_per_token_);
    float total = 0.f;
    for (int64_t i = 0; i < experts_per_token_; ++i) total += (weight[i] = std::exp(l[chosen[i]] - best));
    std::vector<int64_t> by_expert(experts_per_token_);
    std::iota(by_expert.begin(), by_expert.end(), int64_t{0});
    std::sort(by_expert.begin(), by_expert.end(), [&](int64_t a, int64_t b) { return chosen[a] < chosen[b]; });
    std::fill(out, out + hidden_, 0.f);
    for (int64_t i : by_expert) {
      const int64_t e = chosen[i];
      ffn(layer.ffn[2 * e], layer.ffn[2 * e + 1], x, expert_out_.data(), 1);
      const float w = weight[i] / total;
      for (int64_t j = 0; j < hidden_; ++j) out[j] += expert_out_[j] * w;
    }
  }

  int64_t vocab_, hidden_, heads_, kv_heads_, head_dim_, layers_, max_seq_, experts_per_token_, threads_, max_batch_;
  bool silu_, layernorm_;
  float eps_;
  at::Tensor embed_, lm_head_, final_w_, final_b_, cos_, sin_, logits_;
  std::vector<Projection> projections_;
  std::vector<Layer> stack_;
  int64_t kept_ = 0;
  std::vector<int64_t> positions_, slots_;  // next position of every sequence; the slots of this step's tokens
  std::vector<float> keys_, values_, x_, h_, tmp_, moe_out_, expert_out_, qkv_, ctx_, scores_, gate_up_, mid_, partial_,
      values_in_, router_logits_;
  std::vector<int32_t> int_partial_;
  std::vector<int64_t> rows_, order_;
  std::vector<int8_t> levels_;
  std::vector<char> keep_;
  std::vector<double> probs_;
  Scratch scratch_;
  std::mt19937_64 rng_;
  std::vector<double> seconds_ = std::vector<double>(kPhases, 0.0);
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(qsparse, m) {
  m.class_<Engine>("Engine")
      .def(torch::init<std::vector<int64_t>, std::vector<double>, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                       at::Tensor, at::Tensor>())
      .def("add_projection", &Engine::add_projection)
      .def("add_layer", &Engine::add_layer)
      .def("reset", &Engine::reset)
      .def("position", &Engine::position)
      .def("seed", &Engine::seed)
      .def("step", &Engine::step)
      .def("step_batch", &Engine::step_batch)
      .def("positions", &Engine::positions)
      .def("sample", &Engine::sample)
      .def("profile", &Engine::profile)
      .def("profile_reset", &Engine::profile_reset);
}
