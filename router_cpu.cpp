// router_cpu.cpp: paper Eq. 5 for DAR consumers on the CPU, forward and backward, one token at a time.
//
// Not run directly: router_cpu.py compiles this file with PyTorch's C++ extension loader the first time kernel
// "cpu" (the default on CPU) is needed (a C++ compiler and ninja; the build is cached per machine), which
// defines the ops below. dar::mix and dar::mix_backward are one consumer's functional ops: router_cpu.py registers
// their shapes and dar::mix's autograd (what torch.compile sees), and router.cpu_dar_mix calls dar::mix without
// gradient sums (no grad, torch.compile, a source that needs no gradient).
// dar::mix_group and dar::mix_group_backward_into are what eager training and groups call (router_cpu.MixGroup):
// the backward adds each dL/ds_i into one buffer per source (router.SourceGradient) instead of returning a fresh
// tensor for autograd to add up, and one call can mix for a group of consumers (below). The readable reference is
// router.dar_mix.
//
// Why C++: eager PyTorch computes Eq. 5 as about ten passes over memory per (consumer, source) pair, each
// allocating a temporary; on a CPU that traffic is what DAR costs. Here each token's d features of every
// source are read once from memory; the norm, the logits, the softmax and the weighted sum (forward), and
// the source, query and gain gradients (backward) then work on them while they are still in cache.
//
// Groups. Consecutive consumers often start from the same sources (a chunk's first consumer reads v_0 and the
// summaries, which every later consumer reads first too; at chunk 1 each consumer reads the previous one's
// sources and one more), then read each its own newer ones. With shared queries (static, timestep) a group's
// first consumer mixes the shared sources for every member in one pass, each row read once for all: member c gets
// P_c = sum_i beta_ci s_i over the shared sources and lse_c, the log-sum-exp of their logits. A later member
// then mixes P_c, as one more item whose logit is lse_c, with its newer sources: a softmax over all its sources
// splits into the two parts, so this is Eq. 5 over its whole list. P is not kept for the backward, and h only
// by a consumer after a prefix.
//
// Symbols of docs/method.md section 3, per token: s_i (source i), r_i = rms(s_i)^-1,
// z_i = (q g . s_i) r_i / sqrt(d), alpha = softmax_i(z), h = sum_i alpha_i s_i, lse = log sum_i exp(z_i).
// Backward with upstream dh and dlse (nonzero where a group's member reads lse as its prefix's logit):
//   dz_i = alpha_i (dh . s_i - dh . h + dlse),  c_i = dz_i r_i / sqrt(d),
//   dL/ds_i = alpha_i dh + c_i q g - dz_i z_i r_i^2 / d s_i,  dL/d(q g) = sum_i c_i s_i,
// and for a prefix item P of logit lse_P: dL/dP = alpha_P dh, dL/dlse_P = dz_P.
// Sources are float32, float64, bfloat16 or float16 (all of one dtype); statistics, h, P and the query
// gradient are in the accumulation dtype (float32, or float64 for float64 sources).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kTokensPerTask = 16;    // forward: tokens per parallel task, enough work to amortize its start
constexpr int64_t kTokensPerBlock = 256;  // backward: tokens whose query gradient one block sums in order
// Each token reads one row of every source (and backward writes one row of every source gradient): 10 to 50
// interleaved streams, more than the hardware prefetcher follows, so a row would arrive from memory only when
// it is needed. Asking for each row kPrefetchTokens tokens ahead hides that wait (a DAR training step 1-9%
// faster, most where a consumer reads most sources: docs/kernel-log.md). Only rows of the tokens the same task
// handles are asked for.
constexpr int64_t kPrefetchTokens = 2;

// Asks for the cache lines of one row (a hint: nothing waits for it). kForWriting: the row is about to be written.
template <bool kForWriting, typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t d) {
#if defined(__GNUC__) || defined(__clang__)
  const char* first = reinterpret_cast<const char*>(row);
  const char* last = reinterpret_cast<const char*>(row + d) - 1;
  for (const char* line = first; line < last; line += 64) __builtin_prefetch(line, kForWriting);
  __builtin_prefetch(last, kForWriting);  // the row's last line, which a step of 64 from an unaligned start can miss
#endif
}

// The loops that sum over features or rows are written with ATen's vector class, as PyTorch's own CPU kernels
// are (8 floats per AVX2 register; plain loops where router_cpu.py builds without AVX2 on x86, NEON on ARM), not
// left to the compiler's `omp simd`: GCC ends such a reduction with a serial chain of scalar additions, and a
// weighted sum went back to memory after every source. Written out, a group's call with its rows in cache
// measured 30% faster forward, 25% backward (docs/kernel-log.md).
template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

// Vec::size() consecutive features of a row, in the accumulation dtype, and back.
inline Vec<float> load_features(const float* x) { return Vec<float>::loadu(x); }
inline Vec<double> load_features(const double* x) { return Vec<double>::loadu(x); }
template <typename reduced_t>  // bfloat16, float16
inline Vec<float> load_features(const reduced_t* x) {
  Vec<float> v;
  at::vec::load_to_float(x, v);
  return v;
}
template <typename out_t, typename acc_t>
inline void store_features(out_t* x, const Vec<acc_t>& v) {
  if constexpr (std::is_same_v<out_t, acc_t>) {
    v.store(x);
  } else {
    acc_t values[Vec<acc_t>::size()];
    v.store(values);
    for (int64_t j = 0; j < Vec<acc_t>::size(); ++j) x[j] = out_t(values[j]);
  }
}

// x . y over d features: two chains of multiply-adds (one would wait a multiply-add's latency at every step),
// then one horizontal sum.
template <typename acc_t, typename x_t, typename y_t>
inline acc_t dot(const x_t* x, const y_t* y, int64_t d) {
  constexpr int64_t kWidth = Vec<acc_t>::size();
  Vec<acc_t> sum(0), sum2(0);
  int64_t k = 0;
  for (; k + 2 * kWidth <= d; k += 2 * kWidth) {
    sum = at::vec::fmadd(load_features(x + k), load_features(y + k), sum);
    sum2 = at::vec::fmadd(load_features(x + k + kWidth), load_features(y + k + kWidth), sum2);
  }
  if (k + kWidth <= d) {
    sum = at::vec::fmadd(load_features(x + k), load_features(y + k), sum);
    k += kWidth;
  }
  acc_t total = at::vec::vec_reduce_all<acc_t>(std::plus<Vec<acc_t>>(), sum + sum2);
  for (; k < d; ++k) total += acc_t(x[k]) * acc_t(y[k]);
  return total;
}

// sum_j weights[j] rows[j], over `count` rows of one type.
template <typename row_t, typename acc_t>
struct Terms {
  const row_t* const* rows;
  const acc_t* weights;
  int64_t count;
};

// out = (out if add) + a's weighted rows + b's, feature by feature: kVectors vectors of out at a time, each summed
// in a register (kVectors independent chains of multiply-adds) and stored once. Returns where it stopped.
template <int64_t kVectors, typename out_t, typename acc_t, typename a_t, typename b_t>
inline int64_t weighted_sum_from(int64_t k, out_t* out, bool add, Terms<a_t, acc_t> a, Terms<b_t, acc_t> b,
                                 int64_t d) {
  constexpr int64_t kWidth = Vec<acc_t>::size();
  for (; k + kVectors * kWidth <= d; k += kVectors * kWidth) {
    Vec<acc_t> sum[kVectors];
    for (int64_t v = 0; v < kVectors; ++v) sum[v] = add ? load_features(out + k + v * kWidth) : Vec<acc_t>(0);
    const auto add_terms = [&](const auto& terms) {
      for (int64_t j = 0; j < terms.count; ++j) {
        const Vec<acc_t> weight(terms.weights[j]);
        for (int64_t v = 0; v < kVectors; ++v) {
          sum[v] = at::vec::fmadd(weight, load_features(terms.rows[j] + k + v * kWidth), sum[v]);
        }
      }
    };
    add_terms(a);
    add_terms(b);
    for (int64_t v = 0; v < kVectors; ++v) store_features(out + k + v * kWidth, sum[v]);
  }
  return k;
}

template <typename out_t, typename acc_t, typename a_t, typename b_t>
inline void weighted_sum(out_t* out, bool add, Terms<a_t, acc_t> a, Terms<b_t, acc_t> b, int64_t d) {
  int64_t k = weighted_sum_from<4>(0, out, add, a, b, d);
  k = weighted_sum_from<1>(k, out, add, a, b, d);
  for (; k < d; ++k) {
    acc_t sum = add ? acc_t(out[k]) : acc_t(0);
    for (int64_t j = 0; j < a.count; ++j) sum += a.weights[j] * acc_t(a.rows[j][k]);
    for (int64_t j = 0; j < b.count; ++j) sum += b.weights[j] * acc_t(b.rows[j][k]);
    out[k] = out_t(sum);
  }
}

// The queries of a group in memory: [G, 1 or B, 1 or T, d], consumer c's row for a token.
template <typename acc_t>
struct Query {
  const acc_t* data;
  int64_t consumer_stride, batch_stride, token_stride, tokens;
  const acc_t* at(int64_t consumer, int64_t token) const {
    return data + consumer * consumer_stride + (token / tokens) * batch_stride + (token % tokens) * token_stride;
  }
};

template <typename acc_t>
Query<acc_t> query_of(const at::Tensor& query_gain, int64_t tokens) {
  const int64_t d = query_gain.size(3);
  return {query_gain.data_ptr<acc_t>(), query_gain.size(1) * query_gain.size(2) * d,
          query_gain.size(1) == 1 ? 0 : query_gain.size(2) * d, query_gain.size(2) == 1 ? 0 : d, tokens};
}

// q g of one token: the stored row, or for a per-token query (gain not null) q * g, written into `row`.
template <typename acc_t>
inline const acc_t* query_gain_row(const acc_t* q, const acc_t* gain, acc_t* row, int64_t d) {
  if (gain == nullptr) return q;
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) row[k] = q[k] * gain[k];
  return row;
}

// What the kernels read of the queries and the gains. Queries shared by many tokens (static [d], timestep
// [B, 1, d]) are multiplied by their gains once, as small tensors: query is q g, [G, 1 or B, 1, d], and gain
// undefined. A per-token query (dynamic [B, T, d], only in groups of one) is not: query is q, [1, B, T, d], gain
// g, and the kernels multiply them one row at a time, which spares two passes over a [B, T, d] tensor per call
// (and, backward, two more for dL/dq and dL/dg).
struct QueryGain {
  at::Tensor query;  // contiguous [G, 1 or B, 1 or T, d], accumulation dtype
  at::Tensor gain;   // [d], accumulation dtype, or undefined
  bool per_token() const { return gain.defined(); }
};

template <typename scalar_t>
std::vector<const scalar_t*> source_pointers(const std::vector<at::Tensor>& sources) {
  std::vector<const scalar_t*> pointers;
  for (const auto& s : sources) pointers.push_back(s.data_ptr<scalar_t>());
  return pointers;
}

// The statistics of a group, token-major (each token writes its own contiguous run): alpha and z are
// [B, T, G, items], items = the N sources, after the prefix where there is one (item 0); r is [B, T, N]; lse [G, B, T].
template <typename scalar_t>
void mix_forward(const std::vector<at::Tensor>& sources, const QueryGain& query_gain, const at::Tensor& prefix,
                 const at::Tensor& prefix_logit, double eps, const std::vector<at::Tensor>& outputs, at::Tensor& lse,
                 at::Tensor& alpha, at::Tensor& logits, at::Tensor& inv_rms) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = sources.size(), tokens = sources[0].size(0) * sources[0].size(1), d = sources[0].size(2);
  const int64_t consumers = outputs.size(), first = prefix.defined() ? 1 : 0, items = first + n;
  const auto src = source_pointers<scalar_t>(sources);
  const auto query = query_of<acc_t>(query_gain.query, sources[0].size(1));
  const acc_t* gain = query_gain.per_token() ? query_gain.gain.data_ptr<acc_t>() : nullptr;
  const acc_t* prefix_rows = prefix.defined() ? prefix.data_ptr<acc_t>() : nullptr;
  const acc_t* prefix_z = prefix.defined() ? prefix_logit.data_ptr<acc_t>() : nullptr;
  std::vector<acc_t*> out;
  for (const auto& o : outputs) out.push_back(o.data_ptr<acc_t>());
  acc_t *a = alpha.data_ptr<acc_t>(), *z = logits.data_ptr<acc_t>(), *r = inv_rms.data_ptr<acc_t>();
  acc_t* m = lse.data_ptr<acc_t>();
  const acc_t scale = acc_t(1) / std::sqrt(acc_t(d));
  at::parallel_for(0, tokens, kTokensPerTask, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(gain == nullptr ? 0 : d);
    std::vector<const scalar_t*> rows(n);
    std::vector<const acc_t*> q(consumers);
    for (int64_t token = begin; token < end; ++token) {
      for (int64_t c = 0; c < consumers; ++c) q[c] = query.at(c, token);
      q[0] = query_gain_row(q[0], gain, row.data(), d);
      for (int64_t i = 0; i < n; ++i) {
        const scalar_t* s = rows[i] = src[i] + token * d;
        if (token + kPrefetchTokens < end) prefetch_row<false>(s + kPrefetchTokens * d, d);
        const acc_t ri = acc_t(1) / std::sqrt(dot<acc_t>(s, s, d) / d + acc_t(eps));
        r[token * n + i] = ri;
        for (int64_t c = 0; c < consumers; ++c) {  // z_i = q . k_i / sqrt(d), k_i = g s_i r_i, the row in cache
          z[(token * consumers + c) * items + first + i] = dot<acc_t>(s, q[c], d) * ri * scale;
        }
      }
      // Eq. 5: alpha = softmax over the items, one row per consumer; the token's exps in one vectorized pass
      acc_t *token_z = z + token * consumers * items, *token_alpha = a + token * consumers * items;
      for (int64_t c = 0; c < consumers; ++c) {
        acc_t *zc = token_z + c * items, *ac = token_alpha + c * items;
        if (prefix_z) zc[0] = prefix_z[token];
        acc_t max_logit = -std::numeric_limits<acc_t>::infinity();
        for (int64_t i = 0; i < items; ++i) max_logit = std::max(max_logit, zc[i]);
        for (int64_t i = 0; i < items; ++i) ac[i] = zc[i] - max_logit;
        m[c * tokens + token] = max_logit;
      }
      // Vectorized::exp is Sleef's (the AVX2 build), which libtorch_cpu exports; a torch that did not would fail
      // to load this kernel, and kernel "auto" would fall back to dar_mix, saying why
      at::vec::map([](Vec<acc_t> x) { return x.exp(); }, token_alpha, token_alpha, consumers * items);
      for (int64_t c = 0; c < consumers; ++c) {
        acc_t* ac = token_alpha + c * items;
        acc_t total = 0;
        for (int64_t i = 0; i < items; ++i) total += ac[i];
        const acc_t inverse = acc_t(1) / total;
        for (int64_t i = 0; i < items; ++i) ac[i] *= inverse;
        m[c * tokens + token] += std::log(total);
      }
      const acc_t* prefix_row = prefix_rows ? prefix_rows + token * d : nullptr;
      for (int64_t c = 0; c < consumers; ++c) {  // h = sum_i alpha_i s_i (+ alpha_P P: `first` is 1 with a prefix)
        const acc_t* ac = token_alpha + c * items;
        weighted_sum(out[c] + token * d, false, Terms<acc_t, acc_t>{&prefix_row, ac, first},
                     Terms<scalar_t, acc_t>{rows.data(), ac + first, n}, d);
      }
    }
  });
}

// How the backward cuts the tokens into blocks, one parallel task each: `count` blocks of whole units (`units` of
// them, `unit` tokens each: single tokens, or whole samples), and where each block sums its share of dL/d(q g).
struct TokenBlocks {
  int64_t count, units, unit;
  int64_t copy_stride;  // between the blocks' own copies of dL/d(q g); 0: the blocks share one copy
  int64_t begin(int64_t block) const { return (block * units / count) * unit; }
};

// The backward of mix_forward. Each consumer c receives dL/dh_c and, where its lse is read (a group's first
// consumer hands its prefix and lse on to the others), dL/dlse_c. dh . h, which every dz_i needs, is
// sum_i alpha_i (dh . s_i), so that a consumer's h need not be kept; only with a prefix, whose row P is not
// kept either, is it read from the h kept (prefixed_h): then alpha_P (dh . P) = dh . h - sum_i alpha_i (dh . s_i).
template <typename scalar_t>
void mix_backward(const std::vector<at::Tensor>& sources, const QueryGain& query_gain, const at::Tensor& prefixed_h,
                  const at::Tensor& alpha, const at::Tensor& logits, const at::Tensor& inv_rms,
                  const std::vector<at::Tensor>& grad_outputs, const at::Tensor& grad_lse,
                  const std::vector<at::Tensor>& grad_sources, const std::vector<char>& accumulate,
                  const at::Tensor& grad_prefix, const at::Tensor& grad_prefix_logit,
                  const at::Tensor& grad_query_gain, const at::Tensor& grad_query, const at::Tensor& grad_gain,
                  const TokenBlocks& blocks) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = sources.size(), tokens = sources[0].size(0) * sources[0].size(1), d = sources[0].size(2);
  const int64_t consumers = grad_outputs.size(), first = prefixed_h.defined() ? 1 : 0, items = first + n;
  const auto src = source_pointers<scalar_t>(sources);
  std::vector<scalar_t*> grad_src;
  for (auto& g : grad_sources) grad_src.push_back(g.data_ptr<scalar_t>());
  std::vector<const acc_t*> dhs;
  for (auto& g : grad_outputs) dhs.push_back(g.data_ptr<acc_t>());
  const auto query = query_of<acc_t>(query_gain.query, sources[0].size(1));
  const acc_t* gain = query_gain.per_token() ? query_gain.gain.data_ptr<acc_t>() : nullptr;
  // dL/d(q g) has the queries' shape: a query shared by several tokens sums over them. Usually each block sums
  // into its own copy, laid out as the queries (grad_query_gain is [blocks, G, *query shape]), which the caller
  // adds; blocks, not thread ids, because the ids come from OpenMP and the thread count from torch. A sample's
  // query (timestep) with at least as many samples as threads: the blocks hold whole samples, so each row of
  // dL/d(q g) is summed by one block, in place, in one shared copy ([1, G, B, 1, d]). A per-token (dynamic)
  // query shares nothing: each token sums its row of dL/d(q g) in `row_grad` and turns it into its row of
  // dL/dq = g dL/d(q g) (grad_query [B, T, d]) and its block's share of dL/dg = sum over tokens of q dL/d(q g)
  // (grad_gain [blocks, d]); grad_query_gain is then undefined, as grad_query and grad_gain are for shared queries.
  acc_t* shared_grad = gain ? nullptr : grad_query_gain.data_ptr<acc_t>();
  acc_t* grad_query_rows = gain ? grad_query.data_ptr<acc_t>() : nullptr;
  acc_t* grad_gain_blocks = gain ? grad_gain.data_ptr<acc_t>() : nullptr;
  const acc_t *a = alpha.data_ptr<acc_t>(), *z = logits.data_ptr<acc_t>(), *r = inv_rms.data_ptr<acc_t>();
  const acc_t* hs = prefixed_h.defined() ? prefixed_h.data_ptr<acc_t>() : nullptr;
  const acc_t* dlse = grad_lse.defined() ? grad_lse.data_ptr<acc_t>() : nullptr;
  acc_t* dprefix = hs ? grad_prefix.data_ptr<acc_t>() : nullptr;
  acc_t* dprefix_z = hs ? grad_prefix_logit.data_ptr<acc_t>() : nullptr;
  const acc_t scale = acc_t(1) / std::sqrt(acc_t(d));
  at::parallel_for(0, blocks.count, 1, [&](int64_t first_block, int64_t end_block) {
    std::vector<acc_t> row(gain == nullptr ? 0 : d), row_grad(gain == nullptr ? 0 : d);
    // per token: dz and c = dz r / sqrt(d), [G, N]; dh_c and q_c g, the rows a source's gradient row sums, with
    // their weights per source
    std::vector<acc_t> dz(consumers * n), coefficients(consumers * n), weights(2 * consumers);
    std::vector<const acc_t*> consumer_rows(2 * consumers);
    std::vector<acc_t*> gq(consumers);
    std::vector<const scalar_t*> rows(n);
    for (int64_t block = first_block; block < end_block; ++block) {
      acc_t* block_grad = shared_grad + block * blocks.copy_stride;
      const int64_t block_end = blocks.begin(block + 1);
      for (int64_t token = blocks.begin(block); token < block_end; ++token) {
        for (int64_t c = 0; c < consumers; ++c) {
          const acc_t* qc = query.at(c, token);
          consumer_rows[c] = dhs[c] + token * d;
          consumer_rows[consumers + c] = c == 0 ? query_gain_row(qc, gain, row.data(), d) : qc;
          gq[c] = gain ? row_grad.data() : block_grad + (qc - query.data);  // this token's row
        }
        for (int64_t i = 0; i < n; ++i) {  // dz first holds dh_c . s_i
          rows[i] = src[i] + token * d;
          if (token + kPrefetchTokens < block_end) {
            prefetch_row<false>(rows[i] + kPrefetchTokens * d, d);
            prefetch_row<true>(grad_src[i] + (token + kPrefetchTokens) * d, d);
          }
          for (int64_t c = 0; c < consumers; ++c) dz[c * n + i] = dot<acc_t>(consumer_rows[c], rows[i], d);
        }
        for (int64_t c = 0; c < consumers; ++c) {  // dz_i = alpha_i (dh . s_i - dh . h + dL/dlse)
          const acc_t* ac = a + (token * consumers + c) * items;
          const acc_t* dh = consumer_rows[c];
          acc_t mixed = 0;  // sum_i alpha_i (dh . s_i)
          for (int64_t i = 0; i < n; ++i) mixed += ac[first + i] * dz[c * n + i];
          acc_t delta = mixed;  // dh . h
          const acc_t dl = dlse ? dlse[c * tokens + token] : acc_t(0);
          if (hs) {  // a prefix: dh . h from the kept h; dL/dP = alpha_P dh; dL/dz_P = alpha_P (dh . P - delta + dl)
            delta = dot<acc_t>(dh, hs + token * d, d);
            const acc_t ap = ac[0];
            dprefix_z[token] = (delta - mixed) - ap * (delta - dl);
            weighted_sum(dprefix + token * d, false, Terms<acc_t, acc_t>{&dh, &ap, 1}, Terms<acc_t, acc_t>{}, d);
          }
          for (int64_t i = 0; i < n; ++i) {
            dz[c * n + i] = ac[first + i] * (dz[c * n + i] - delta + dl);
            coefficients[c * n + i] = dz[c * n + i] * r[token * n + i] * scale;
          }
        }
        // dL/ds_i = sum_c (alpha_ci dh_c + c_ci q_c g) - (sum_c rho_ci) s_i, c_ci = dz_ci r_i / sqrt(d),
        // rho_ci = dz_ci z_ci r_i^2 / d: one pass over the row, added to what it holds where accumulate[i]
        for (int64_t i = 0; i < n; ++i) {
          const acc_t ri = r[token * n + i];
          acc_t rho = 0;  // sum_c rho_ci
          for (int64_t c = 0; c < consumers; ++c) {
            const int64_t item = (token * consumers + c) * items + first + i;
            weights[c] = a[item];
            weights[consumers + c] = coefficients[c * n + i];
            rho += dz[c * n + i] * z[item] * ri * ri / d;
          }
          const acc_t minus_rho = -rho;
          weighted_sum(grad_src[i] + token * d, bool(accumulate[i]),
                       Terms<acc_t, acc_t>{consumer_rows.data(), weights.data(), 2 * consumers},
                       Terms<scalar_t, acc_t>{&rows[i], &minus_rho, 1}, d);
        }
        for (int64_t c = 0; c < consumers; ++c) {  // dL/d(q_c g) += sum_i c_ci s_i
          const Terms<scalar_t, acc_t> sources_weighted{rows.data(), coefficients.data() + c * n, n};
          weighted_sum(gq[c], !gain, Terms<acc_t, acc_t>{}, sources_weighted, d);
        }
        if (gain) {  // a per-token query: this token's dL/dq row and its share of dL/dg
          const acc_t* q_raw = query.at(0, token);
          acc_t *dq = grad_query_rows + token * d, *dg = grad_gain_blocks + block * d;
#pragma omp simd
          for (int64_t k = 0; k < d; ++k) {
            dq[k] = row_grad[k] * gain[k];
            dg[k] += row_grad[k] * q_raw[k];
          }
        }
      }
    }
  });
}

void check_sources(const std::vector<at::Tensor>& sources) {
  TORCH_CHECK(!sources.empty(), "dar::mix: no sources");
  for (const auto& s : sources) {
    TORCH_CHECK(s.device().is_cpu() && s.dim() == 3 && s.is_contiguous() && s.sizes() == sources[0].sizes() &&
                    s.scalar_type() == sources[0].scalar_type(),
                "dar::mix: sources must be contiguous CPU tensors [B, T, d] of one shape and dtype");
  }
}

// t as a contiguous tensor of `dtype`: t itself when it is one already. Each ATen call costs a few microseconds
// of dispatch whatever it does, and a group's call would otherwise make dozens that change nothing.
at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype && t.is_contiguous()) return t;
  return t.to(dtype).contiguous();
}

// The kernels' QueryGain, in the accumulation dtype, from G queries [d] or [1 or B, 1 or T, d] (all of one shape)
// and G gains [d] (a transient: the queries and the gains are what the backward keeps). Per-token: one query
// [B, T, d] (dynamic).
QueryGain query_gain_of(const std::vector<at::Tensor>& sources, const std::vector<at::Tensor>& queries,
                        const std::vector<at::Tensor>& gains, at::ScalarType accumulation) {
  const int64_t batch = sources[0].size(0), tokens = sources[0].size(1), d = sources[0].size(2);
  TORCH_CHECK(!queries.empty() && queries.size() == gains.size(), "dar::mix: one gain per query");
  for (size_t c = 0; c < queries.size(); ++c) {
    const auto &query = queries[c], &gain = gains[c];
    TORCH_CHECK(query.device().is_cpu() && gain.device().is_cpu(), "dar::mix: query and gain must be CPU tensors");
    TORCH_CHECK(gain.dim() == 1 && gain.size(0) == d, "dar::mix: gain must be [d], d = ", d);
    TORCH_CHECK((query.dim() == 1 && query.size(0) == d) ||
                    (query.dim() == 3 && (query.size(0) == 1 || query.size(0) == batch) &&
                     (query.size(1) == 1 || query.size(1) == tokens) && query.size(2) == d),
                "dar::mix: query must be [d] or [1 or B, 1 or T, d] for sources [B, T, d] = ", sources[0].sizes());
    TORCH_CHECK(query.sizes() == queries[0].sizes(), "dar::mix: the queries of a group must have one shape");
    if (query.dim() == 3 && query.size(0) == batch && query.size(1) == tokens && tokens > 1) {
      TORCH_CHECK(queries.size() == 1, "dar::mix: a per-token query cannot be grouped");
      return {contiguous_as(query, accumulation).unsqueeze(0), contiguous_as(gain, accumulation)};
    }
  }
  // q g of every consumer, multiplied here into one [G, 1 or B, 1, d] tensor (not an ATen op per consumer)
  const int64_t query_batch = queries[0].dim() == 1 ? 1 : queries[0].size(0);
  const int64_t query_tokens = queries[0].dim() == 1 ? 1 : queries[0].size(1), rows = query_batch * query_tokens;
  auto query_gain = at::empty({int64_t(queries.size()), query_batch, query_tokens, d},
                              sources[0].options().dtype(accumulation));
  AT_DISPATCH_FLOATING_TYPES(accumulation, "dar::mix", [&] {
    scalar_t* out = query_gain.data_ptr<scalar_t>();
    for (size_t c = 0; c < queries.size(); ++c) {
      const auto query = contiguous_as(queries[c], accumulation), gain = contiguous_as(gains[c], accumulation);
      const scalar_t *q = query.data_ptr<scalar_t>(), *g = gain.data_ptr<scalar_t>();
      for (int64_t row = 0; row < rows; ++row, out += d, q += d) {
        for (int64_t k = 0; k < d; ++k) out[k] = q[k] * g[k];
      }
    }
  });
  return {query_gain, at::Tensor()};
}

at::ScalarType accumulation_type(const at::Tensor& source) {
  return source.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Eq. 5 for a group of G consumers that read the same sources, each with its own query and gain, and, for one
// consumer, optionally a prefix: P (the mix of the sources it read before, as a group's first consumer computed
// it) and its lse, one more item whose logit is that lse. Returns each consumer's mix of these sources (its h, or
// for a group's later member its prefix P), their lse [G, B, T], and alpha, z [B, T, G, items] and r [B, T, N].
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mix_group(
    const std::vector<at::Tensor>& sources, const std::vector<at::Tensor>& queries,
    const std::vector<at::Tensor>& gains, const std::optional<at::Tensor>& prefix,
    const std::optional<at::Tensor>& prefix_logit, double eps) {
  check_sources(sources);
  const auto& first = sources[0];
  const auto accumulation = accumulation_type(first);
  const auto query_gain = query_gain_of(sources, queries, gains, accumulation);
  const int64_t consumers = queries.size(), n = sources.size();
  TORCH_CHECK(prefix.has_value() == prefix_logit.has_value() && (!prefix.has_value() || consumers == 1),
              "dar::mix: a prefix needs its logit, and only one consumer reads it");
  at::Tensor prefix_rows, prefix_z;
  if (prefix.has_value()) {
    prefix_rows = contiguous_as(*prefix, accumulation);
    prefix_z = contiguous_as(*prefix_logit, accumulation);
    TORCH_CHECK(prefix->device().is_cpu() && prefix_rows.sizes() == first.sizes() &&
                    prefix_logit->device().is_cpu() && prefix_z.numel() == first.size(0) * first.size(1),
                "dar::mix: the prefix must be a CPU tensor [B, T, d] and its logit [B, T]");
  }
  auto stats_options = first.options().dtype(accumulation);
  std::vector<at::Tensor> outputs;
  for (int64_t c = 0; c < consumers; ++c) outputs.push_back(at::empty(first.sizes(), stats_options));
  auto lse = at::empty({consumers, first.size(0), first.size(1)}, stats_options);
  auto alpha = at::empty({first.size(0), first.size(1), consumers, n + prefix.has_value()}, stats_options);
  auto logits = at::empty_like(alpha), inv_rms = at::empty({first.size(0), first.size(1), n}, stats_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, first.scalar_type(), "dar::mix", [&] {
    mix_forward<scalar_t>(sources, query_gain, prefix_rows, prefix_z, eps, outputs, lse, alpha, logits, inv_rms);
  });
  return {outputs, lse, alpha, logits, inv_rms};
}

// The backward of mix_group: dL/ds_i written into grad_sources[i] (added to it where accumulate[i]); returns each
// consumer's dL/dq and dL/dg, and with a prefix (prefixed_h, the consumer's h, given) [dL/dP, dL/dlse_P]. dq =
// g dL/d(q g), summed over the tokens that share the query (all of them: static; a sample's: timestep; none:
// dynamic), and dg = q dL/d(q g) summed over every token. grad_lse: dL/dlse [G, B, T], or none.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> mix_group_backward_into(
    const std::vector<at::Tensor>& sources, const std::vector<at::Tensor>& queries,
    const std::vector<at::Tensor>& gains, const std::optional<at::Tensor>& prefixed_h, const at::Tensor& alpha,
    const at::Tensor& logits, const at::Tensor& inv_rms, const std::vector<at::Tensor>& grad_outputs,
    const std::optional<at::Tensor>& grad_lse, const std::vector<at::Tensor>& grad_sources,
    const c10::List<bool>& accumulate_flags) {
  const std::vector<char> accumulate(accumulate_flags.begin(), accumulate_flags.end());
  check_sources(sources);
  check_sources(grad_sources);
  TORCH_CHECK(grad_sources.size() == sources.size() && accumulate.size() == sources.size() &&
                  grad_sources[0].sizes() == sources[0].sizes() &&
                  grad_sources[0].scalar_type() == sources[0].scalar_type(),
              "dar::mix_group_backward_into: one gradient buffer like each source, and one accumulate flag each");
  const auto query_gain = query_gain_of(sources, queries, gains, accumulation_type(sources[0]));
  const auto& qg = query_gain.query;
  const int64_t batch = sources[0].size(0), tokens = batch * sources[0].size(1), d = sources[0].size(2);
  const int64_t consumers = queries.size(), n = sources.size(), items = n + prefixed_h.has_value();
  const auto stats = [&](const at::Tensor& t, at::IntArrayRef sizes) {
    return t.is_contiguous() && t.scalar_type() == qg.scalar_type() && t.device().is_cpu() && t.sizes() == sizes;
  };
  TORCH_CHECK(stats(alpha, {batch, sources[0].size(1), consumers, items}) && stats(logits, alpha.sizes()) &&
                  stats(inv_rms, {batch, sources[0].size(1), n}),
              "dar::mix_group_backward_into: alpha and logits must be mix_group's [B, T, G, items], inv_rms [B, T, N]");
  TORCH_CHECK(grad_outputs.size() == queries.size(), "dar::mix_group_backward_into: one output gradient per consumer");
  TORCH_CHECK(!grad_lse.has_value() || grad_lse->numel() == consumers * tokens,
              "dar::mix_group_backward_into: dL/dlse must be [G, B, T]");
  // at least one block per thread, and short float sums: at most kTokensPerBlock terms before the blocks are added
  // (blocks of whole samples: at most T terms into each of a block's rows)
  const int64_t threads = at::get_num_threads();
  const bool per_token = query_gain.per_token(), per_sample = !per_token && qg.size(1) > 1 && batch >= threads;
  const int64_t unit = per_sample ? sources[0].size(1) : 1, units = unit > 0 ? tokens / unit : 0;
  const int64_t count = std::max<int64_t>(
      1, std::min<int64_t>(units, std::max<int64_t>(threads, (tokens + kTokensPerBlock - 1) / kTokensPerBlock)));
  auto per_block = per_token ? at::Tensor()
                             : at::zeros({per_sample ? 1 : count, qg.size(0), qg.size(1), qg.size(2), d}, qg.options());
  const TokenBlocks blocks{count, units, unit, per_token || per_sample ? 0 : per_block.stride(0)};
  auto grad_query_rows = per_token ? at::empty(qg.sizes(), qg.options()) : at::Tensor();
  auto grad_gain_blocks = per_token ? at::zeros({count, d}, qg.options()) : at::Tensor();
  std::vector<at::Tensor> dhs;
  for (const auto& g : grad_outputs) dhs.push_back(contiguous_as(g, qg.scalar_type()));
  const auto dlse = grad_lse.has_value() ? contiguous_as(*grad_lse, qg.scalar_type()) : at::Tensor();
  const auto h = prefixed_h.has_value() ? contiguous_as(*prefixed_h, qg.scalar_type()) : at::Tensor();
  TORCH_CHECK(!h.defined() || (h.device().is_cpu() && h.sizes() == sources[0].sizes()),
              "dar::mix_group_backward_into: prefixed_h must be the consumer's h, [B, T, d]");
  std::vector<at::Tensor> grad_prefix;
  if (h.defined()) grad_prefix = {at::empty(h.sizes(), qg.options()), at::empty({h.size(0), h.size(1)}, qg.options())};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, sources[0].scalar_type(), "dar::mix_backward", [&] {
    mix_backward<scalar_t>(sources, query_gain, h, alpha, logits, inv_rms, dhs, dlse, grad_sources, accumulate,
                           h.defined() ? grad_prefix[0] : at::Tensor(), h.defined() ? grad_prefix[1] : at::Tensor(),
                           per_block, grad_query_rows, grad_gain_blocks, blocks);
  });
  std::vector<at::Tensor> grad_queries, grad_gains;
  if (per_token) {
    grad_queries.push_back(grad_query_rows[0].to(queries[0].scalar_type()));
    grad_gains.push_back(grad_gain_blocks.sum(0).to(gains[0].scalar_type()));
    return {grad_queries, grad_gains, grad_prefix};
  }
  // dL/d(q_c g), the blocks' copies summed, into dq_c = g_c dL/d(q_c g) and dg_c = sum over q_c's rows of
  // q_c dL/d(q_c g): loops here, not a handful of ATen ops per consumer
  const int64_t copies = per_block.size(0), rows = qg.size(1) * qg.size(2);
  AT_DISPATCH_FLOATING_TYPES(qg.scalar_type(), "dar::mix_backward", [&] {
    const scalar_t* blocks_grad = per_block.data_ptr<scalar_t>();
    const int64_t copy_stride = per_block.stride(0);
    for (int64_t c = 0; c < consumers; ++c) {
      const auto query = contiguous_as(queries[c], qg.scalar_type());
      const auto gain = contiguous_as(gains[c], qg.scalar_type());
      auto grad_query = at::empty(query.sizes(), qg.options()), grad_gain = at::zeros({d}, qg.options());
      const scalar_t *q = query.data_ptr<scalar_t>(), *g = gain.data_ptr<scalar_t>();
      const scalar_t* consumer_grad = blocks_grad + c * rows * d;
      scalar_t *dq = grad_query.data_ptr<scalar_t>(), *dg = grad_gain.data_ptr<scalar_t>();
      for (int64_t j = 0; j < rows * d; j += d) {  // one row of q_c at a time
        for (int64_t k = 0; k < d; ++k) {
          scalar_t grad_query_gain = consumer_grad[j + k];
          for (int64_t copy = 1; copy < copies; ++copy) grad_query_gain += consumer_grad[copy * copy_stride + j + k];
          dq[j + k] = grad_query_gain * g[k];
          dg[k] += grad_query_gain * q[j + k];
        }
      }
      grad_queries.push_back(contiguous_as(grad_query, queries[c].scalar_type()));
      grad_gains.push_back(contiguous_as(grad_gain, gains[c].scalar_type()));
    }
  });
  return {grad_queries, grad_gains, grad_prefix};
}

// The functional ops of one consumer, which autograd and torch.compile see: (h, alpha, z, r), alpha and z [B, T, N].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mix(const std::vector<at::Tensor>& sources,
                                                               const at::Tensor& query, const at::Tensor& gain,
                                                               double eps) {
  auto [outputs, lse, alpha, logits, inv_rms] = mix_group(sources, {query}, {gain}, std::nullopt, std::nullopt, eps);
  return {outputs[0], alpha.select(2, 0), logits.select(2, 0), inv_rms};
}

// (dL/ds_i for every source, dL/dq, dL/dg) in fresh tensors.
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> mix_backward_op(
    const std::vector<at::Tensor>& sources, const at::Tensor& query, const at::Tensor& gain, const at::Tensor& alpha,
    const at::Tensor& logits, const at::Tensor& inv_rms, const at::Tensor& grad_h) {
  std::vector<at::Tensor> grad_sources;
  for (const auto& s : sources) grad_sources.push_back(at::empty_like(s));
  c10::List<bool> overwrite;
  for (size_t i = 0; i < sources.size(); ++i) overwrite.push_back(false);
  auto [grad_queries, grad_gains, grad_prefix] = mix_group_backward_into(
      sources, {query}, {gain}, std::nullopt, alpha.unsqueeze(2), logits.unsqueeze(2), inv_rms, {grad_h},
      std::nullopt, grad_sources, overwrite);
  return {grad_sources, grad_queries[0], grad_gains[0]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dar, m) {
  m.def("mix(Tensor[] sources, Tensor query, Tensor gain, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("mix_backward(Tensor[] sources, Tensor query, Tensor gain, Tensor alpha, Tensor logits, Tensor inv_rms, "
        "Tensor grad_h) -> (Tensor[], Tensor, Tensor)");
  m.def("mix_group(Tensor[] sources, Tensor[] queries, Tensor[] gains, Tensor? prefix, Tensor? prefix_logit, "
        "float eps) -> (Tensor[], Tensor, Tensor, Tensor, Tensor)");
  m.def("mix_group_backward_into(Tensor[] sources, Tensor[] queries, Tensor[] gains, Tensor? prefixed_h, Tensor alpha, "
        "Tensor logits, Tensor inv_rms, Tensor[] grad_outputs, Tensor? grad_lse, Tensor(a!)[] grad_sources, "
        "bool[] accumulate) -> (Tensor[], Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(dar, CPU, m) {
  m.impl("mix", &mix);
  m.impl("mix_backward", &mix_backward_op);
  m.impl("mix_group", &mix_group);
  m.impl("mix_group_backward_into", &mix_group_backward_into);
}
