// router_cpu.cpp: paper Eq. 5 for one DAR consumer on the CPU, forward and backward, one token at a time.
//
// Not run directly: router.py compiles this file with PyTorch's C++ extension loader the first time kernel
// "cpu" (the default on CPU) is needed (a C++ compiler and ninja; the build is cached per machine), which
// defines the ops dar::mix, dar::mix_backward and dar::mix_backward_into below; router.py registers the shapes of
// the first two and dar::mix's autograd (what torch.compile sees), and router.cpu_dar_mix calls dar::mix. In eager
// training the backward is dar::mix_backward_into, which adds each dL/ds_i into one buffer per source
// (router.SourceGradient) instead of returning a fresh tensor for autograd to add up. The readable reference is
// router.dar_mix.
//
// Why C++: eager PyTorch computes Eq. 5 as about ten passes over memory per (consumer, source) pair, each
// allocating a temporary; on a CPU that traffic is what DAR costs. Here each token's d features of every
// source are read once from memory; the norm, the logit, the softmax and the weighted sum (forward), and
// the source, query and gain gradients (backward) then work on them while they are still in cache.
//
// Symbols of docs/method.md section 3, per token: s_i (source i), r_i = rms(s_i)^-1,
// z_i = (q g . s_i) r_i / sqrt(d), alpha = softmax_i(z), h = sum_i alpha_i s_i. Backward with upstream dh:
//   dz_i = alpha_i (dh . s_i - dh . h),  c_i = dz_i r_i / sqrt(d),
//   dL/ds_i = alpha_i dh + c_i q g - dz_i z_i r_i^2 / d s_i,  dL/d(q g) = sum_i c_i s_i.
// Sources are float32, float64, bfloat16 or float16 (all of one dtype); statistics, h and the query
// gradient are in the accumulation dtype (float32, or float64 for float64 sources).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kTokensPerTask = 16;    // forward: tokens per parallel task, enough work to amortize its start
constexpr int64_t kTokensPerBlock = 256;  // backward: tokens whose query gradient one block sums in order
// Each token reads one row of every source (and backward writes one row of every source gradient): 10 to 50
// interleaved streams, more than the hardware prefetcher follows, so a row would arrive from memory only when
// it is needed. Asking for each row kPrefetchTokens tokens ahead hides that wait (a DAR training step 1-9%
// faster, most where a consumer reads most sources: docs/kernel.md). Only rows of the tokens the same task
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

// The query of a token in memory: q g [1, 1, d] (static) or [B, 1, d] (timestep), or q [B, T, d] (dynamic).
template <typename acc_t>
struct Query {
  const acc_t* data;
  int64_t batch_stride, token_stride, tokens;
  const acc_t* at(int64_t token) const {
    return data + (token / tokens) * batch_stride + (token % tokens) * token_stride;
  }
};

template <typename acc_t>
Query<acc_t> query_of(const at::Tensor& query_gain, int64_t tokens) {
  const int64_t d = query_gain.size(2);
  return {query_gain.data_ptr<acc_t>(), query_gain.size(0) == 1 ? 0 : query_gain.size(1) * d,
          query_gain.size(1) == 1 ? 0 : d, tokens};
}

// q g of one token: the stored row, or for a per-token query (gain not null) q * g, written into `row`.
template <typename acc_t>
inline const acc_t* query_gain_row(const acc_t* q, const acc_t* gain, acc_t* row, int64_t d) {
  if (gain == nullptr) return q;
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) row[k] = q[k] * gain[k];
  return row;
}

// What the kernels read of the query and the gain. A query shared by many tokens (static [d], timestep
// [B, 1, d]) is multiplied by the gain once, as a small tensor: query is q g and gain undefined. A per-token
// query (dynamic [B, T, d]) is not: query is q, gain g, and the kernels multiply them one row at a time, which
// spares two passes over a [B, T, d] tensor per call (and, backward, two more for dL/dq and dL/dg).
struct QueryGain {
  at::Tensor query;  // contiguous [1 or B, 1 or T, d], accumulation dtype
  at::Tensor gain;   // [d], accumulation dtype, or undefined
  bool per_token() const { return gain.defined(); }
};

template <typename scalar_t>
std::vector<const scalar_t*> source_pointers(const std::vector<at::Tensor>& sources) {
  std::vector<const scalar_t*> pointers;
  for (const auto& s : sources) pointers.push_back(s.data_ptr<scalar_t>());
  return pointers;
}

template <typename scalar_t>
void mix_forward(const std::vector<at::Tensor>& sources, const QueryGain& query_gain, double eps, at::Tensor& h,
                 at::Tensor& alpha, at::Tensor& logits, at::Tensor& inv_rms) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = sources.size(), tokens = sources[0].size(0) * sources[0].size(1), d = sources[0].size(2);
  const auto src = source_pointers<scalar_t>(sources);
  const auto query = query_of<acc_t>(query_gain.query, sources[0].size(1));
  const acc_t* gain = query_gain.per_token() ? query_gain.gain.data_ptr<acc_t>() : nullptr;
  acc_t* out = h.data_ptr<acc_t>();
  acc_t *a = alpha.data_ptr<acc_t>(), *z = logits.data_ptr<acc_t>(), *r = inv_rms.data_ptr<acc_t>();
  const acc_t scale = acc_t(1) / std::sqrt(acc_t(d));
  at::parallel_for(0, tokens, kTokensPerTask, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(gain == nullptr ? 0 : d);
    for (int64_t token = begin; token < end; ++token) {
      const acc_t* q = query_gain_row(query.at(token), gain, row.data(), d);
      acc_t max_logit = -std::numeric_limits<acc_t>::infinity();
      for (int64_t i = 0; i < n; ++i) {
        const scalar_t* s = src[i] + token * d;
        if (token + kPrefetchTokens < end) prefetch_row<false>(s + kPrefetchTokens * d, d);
        acc_t square_sum = 0, dot = 0;
#pragma omp simd reduction(+ : square_sum, dot)
        for (int64_t k = 0; k < d; ++k) {
          const acc_t v = s[k];
          square_sum += v * v;
          dot += v * q[k];
        }
        const acc_t ri = acc_t(1) / std::sqrt(square_sum / d + acc_t(eps));
        r[i * tokens + token] = ri;
        z[i * tokens + token] = dot * ri * scale;  // z_i = q . k_i / sqrt(d), k_i = g s_i r_i
        max_logit = std::max(max_logit, z[i * tokens + token]);
      }
      acc_t total = 0;
      for (int64_t i = 0; i < n; ++i) {
        a[i * tokens + token] = std::exp(z[i * tokens + token] - max_logit);
        total += a[i * tokens + token];
      }
      acc_t* ht = out + token * d;  // Eq. 5: h = sum_i alpha_i s_i, alpha = softmax over sources
      for (int64_t k = 0; k < d; ++k) ht[k] = 0;
      for (int64_t i = 0; i < n; ++i) {
        const acc_t ai = a[i * tokens + token] /= total;
        const scalar_t* s = src[i] + token * d;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) ht[k] += ai * acc_t(s[k]);
      }
    }
  });
}

// One token's row of dL/ds_i = alpha_i dh + c_i q g - rho_i s_i (rho_i = dz_i z_i r_i^2 / d), written into gs
// or, kAdd, added to what gs holds; and c_i s_i added to the token's row of dL/d(q g).
template <bool kAdd, typename scalar_t, typename acc_t>
inline void source_gradient_row(scalar_t* gs, const scalar_t* s, const acc_t* dh, const acc_t* q, acc_t* gq,
                                acc_t ai, acc_t c, acc_t rms_term, int64_t d) {
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) {
    const acc_t v = s[k];
    const acc_t term = ai * dh[k] + c * q[k] - rms_term * v;
    gs[k] = scalar_t(kAdd ? acc_t(gs[k]) + term : term);
    gq[k] += c * v;
  }
}

template <typename scalar_t>
void mix_backward(const std::vector<at::Tensor>& sources, const QueryGain& query_gain, const at::Tensor& h,
                  const at::Tensor& alpha, const at::Tensor& logits, const at::Tensor& inv_rms,
                  const at::Tensor& grad_h, const std::vector<at::Tensor>& grad_sources,
                  const std::vector<char>& accumulate, const at::Tensor& grad_query_gain, const at::Tensor& grad_query,
                  const at::Tensor& grad_gain, int64_t blocks) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = sources.size(), tokens = sources[0].size(0) * sources[0].size(1), d = sources[0].size(2);
  const auto src = source_pointers<scalar_t>(sources);
  std::vector<scalar_t*> grad_src;
  for (auto& g : grad_sources) grad_src.push_back(g.data_ptr<scalar_t>());
  const auto query = query_of<acc_t>(query_gain.query, sources[0].size(1));
  const acc_t* gain = query_gain.per_token() ? query_gain.gain.data_ptr<acc_t>() : nullptr;
  // dL/d(q g) has the query's shape: a query shared by several tokens sums over them. The tokens are cut into
  // `blocks` blocks, one parallel task each, and each block sums into its own copy, laid out as the query
  // (grad_query_gain is [blocks, *query shape]), which the caller adds; blocks, not thread ids, because the ids
  // come from OpenMP and the thread count from torch. A per-token (dynamic) query shares nothing: each token
  // sums its row of dL/d(q g) in `row_grad` and turns it into its row of dL/dq = g dL/d(q g) (grad_query
  // [B, T, d]) and its block's share of dL/dg = sum over tokens of q dL/d(q g) (grad_gain [blocks, d]);
  // grad_query_gain is then undefined, as grad_query and grad_gain are for a shared query.
  acc_t* shared_grad = gain ? nullptr : grad_query_gain.data_ptr<acc_t>();
  const int64_t block_stride = gain ? 0 : grad_query_gain.stride(0);
  acc_t* grad_query_rows = gain ? grad_query.data_ptr<acc_t>() : nullptr;
  acc_t* grad_gain_blocks = gain ? grad_gain.data_ptr<acc_t>() : nullptr;
  const acc_t *a = alpha.data_ptr<acc_t>(), *z = logits.data_ptr<acc_t>(), *r = inv_rms.data_ptr<acc_t>();
  const acc_t *hs = h.data_ptr<acc_t>(), *dhs = grad_h.data_ptr<acc_t>();
  const acc_t scale = acc_t(1) / std::sqrt(acc_t(d));
  at::parallel_for(0, blocks, 1, [&](int64_t first_block, int64_t end_block) {
    std::vector<acc_t> row(gain == nullptr ? 0 : d), row_grad(gain == nullptr ? 0 : d);
    for (int64_t block = first_block; block < end_block; ++block) {
      acc_t* block_grad = shared_grad + block * block_stride;
      const int64_t block_end = (block + 1) * tokens / blocks;
      for (int64_t token = block * tokens / blocks; token < block_end; ++token) {
        const acc_t *q = query_gain_row(query.at(token), gain, row.data(), d), *dh = dhs + token * d;
        const acc_t* ht = hs + token * d;
        acc_t* gq = gain ? row_grad.data() : block_grad + (query.at(token) - query.data);  // this token's row
        if (gain) std::fill(row_grad.begin(), row_grad.end(), acc_t(0));
        acc_t delta = 0;
#pragma omp simd reduction(+ : delta)
        for (int64_t k = 0; k < d; ++k) delta += dh[k] * ht[k];
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* s = src[i] + token * d;
          if (token + kPrefetchTokens < block_end) {
            prefetch_row<false>(s + kPrefetchTokens * d, d);
            prefetch_row<true>(grad_src[i] + (token + kPrefetchTokens) * d, d);
          }
          acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t k = 0; k < d; ++k) dot += dh[k] * acc_t(s[k]);
          const acc_t ai = a[i * tokens + token], ri = r[i * tokens + token];
          const acc_t dz = ai * (dot - delta);
          const acc_t c = dz * ri * scale;
          const acc_t rms_term = dz * z[i * tokens + token] * ri * ri / d;
          scalar_t* gs = grad_src[i] + token * d;
          if (accumulate[i]) {
            source_gradient_row<true>(gs, s, dh, q, gq, ai, c, rms_term, d);
          } else {
            source_gradient_row<false>(gs, s, dh, q, gq, ai, c, rms_term, d);
          }
        }
        if (gain) {  // a per-token query: this token's dL/dq row and its share of dL/dg
          const acc_t* q_raw = query.at(token);
          acc_t *dq = grad_query_rows + token * d, *dg = grad_gain_blocks + block * d;
#pragma omp simd
          for (int64_t k = 0; k < d; ++k) {
            dq[k] = gq[k] * gain[k];
            dg[k] += gq[k] * q_raw[k];
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

// The kernels' QueryGain, in the accumulation dtype, from a query [d], [1 or B, 1 or T, d] and a gain [d] (a
// transient: the query and the gain are what the backward keeps). Per-token: a query [B, T, d] (dynamic).
QueryGain query_gain_of(const std::vector<at::Tensor>& sources, const at::Tensor& query, const at::Tensor& gain,
                        at::ScalarType accumulation) {
  const int64_t batch = sources[0].size(0), tokens = sources[0].size(1), d = sources[0].size(2);
  TORCH_CHECK(query.device().is_cpu() && gain.device().is_cpu(), "dar::mix: query and gain must be CPU tensors");
  TORCH_CHECK(gain.dim() == 1 && gain.size(0) == d, "dar::mix: gain must be [d], d = ", d);
  TORCH_CHECK((query.dim() == 1 && query.size(0) == d) ||
                  (query.dim() == 3 && (query.size(0) == 1 || query.size(0) == batch) &&
                   (query.size(1) == 1 || query.size(1) == tokens) && query.size(2) == d),
              "dar::mix: query must be [d] or [1 or B, 1 or T, d] for sources [B, T, d] = ", sources[0].sizes());
  if (query.dim() == 3 && query.size(0) == batch && query.size(1) == tokens) {
    return {query.to(accumulation).contiguous(), gain.to(accumulation).contiguous()};
  }
  return {(query.to(accumulation) * gain.to(accumulation))
              .reshape({query.dim() == 1 ? 1 : query.size(0), query.dim() == 1 ? 1 : query.size(1), d})
              .contiguous(),
          at::Tensor()};
}

at::ScalarType accumulation_type(const at::Tensor& source) {
  return source.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mix(const std::vector<at::Tensor>& sources,
                                                               const at::Tensor& query, const at::Tensor& gain,
                                                               double eps) {
  check_sources(sources);
  const auto& first = sources[0];
  const auto query_gain = query_gain_of(sources, query, gain, accumulation_type(first));
  auto stats_options = first.options().dtype(accumulation_type(first));
  auto h = at::empty(first.sizes(), stats_options);
  auto alpha = at::empty({static_cast<int64_t>(sources.size()), first.size(0), first.size(1)}, stats_options);
  auto logits = at::empty_like(alpha), inv_rms = at::empty_like(alpha);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, first.scalar_type(), "dar::mix", [&] {
    mix_forward<scalar_t>(sources, query_gain, eps, h, alpha, logits, inv_rms);
  });
  return {h, alpha, logits, inv_rms};
}

// dL/dq and dL/dg, with dL/ds_i written into grad_sources[i] (added to it where accumulate[i]): dq = g dL/d(q g),
// summed over the tokens that share the query (all of them: static; a sample's: timestep; none: dynamic), and
// dg = q dL/d(q g) summed over every token.
std::tuple<at::Tensor, at::Tensor> mix_backward_into(
    const std::vector<at::Tensor>& sources, const at::Tensor& query, const at::Tensor& gain, const at::Tensor& h,
    const at::Tensor& alpha, const at::Tensor& logits, const at::Tensor& inv_rms, const at::Tensor& grad_h,
    const std::vector<at::Tensor>& grad_sources, const c10::List<bool>& accumulate_flags) {
  const std::vector<char> accumulate(accumulate_flags.begin(), accumulate_flags.end());
  check_sources(sources);
  check_sources(grad_sources);
  TORCH_CHECK(grad_sources.size() == sources.size() && accumulate.size() == sources.size() &&
                  grad_sources[0].sizes() == sources[0].sizes() &&
                  grad_sources[0].scalar_type() == sources[0].scalar_type(),
              "dar::mix_backward_into: one gradient buffer like each source, and one accumulate flag each");
  const auto query_gain = query_gain_of(sources, query, gain, accumulation_type(sources[0]));
  const auto& qg = query_gain.query;
  const int64_t tokens = sources[0].size(0) * sources[0].size(1), d = sources[0].size(2);
  // at least one block per thread, and short float sums: at most kTokensPerBlock terms before the blocks are added
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(
      tokens, std::max<int64_t>(at::get_num_threads(), (tokens + kTokensPerBlock - 1) / kTokensPerBlock)));
  const bool per_token = query_gain.per_token();
  auto per_block = per_token ? at::Tensor() : at::zeros({blocks, qg.size(0), qg.size(1), d}, qg.options());
  auto grad_query_rows = per_token ? at::empty(qg.sizes(), qg.options()) : at::Tensor();
  auto grad_gain_blocks = per_token ? at::zeros({blocks, d}, qg.options()) : at::Tensor();
  const auto dh = grad_h.to(qg.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, sources[0].scalar_type(), "dar::mix_backward", [&] {
    mix_backward<scalar_t>(sources, query_gain, h.contiguous(), alpha, logits, inv_rms, dh, grad_sources, accumulate,
                           per_block, grad_query_rows, grad_gain_blocks, blocks);
  });
  if (per_token) {
    return {grad_query_rows.to(query.scalar_type()), grad_gain_blocks.sum(0).to(gain.scalar_type())};
  }
  const auto grad_query_gain = per_block.sum(0).reshape(query.sizes());
  const auto grad_query = (grad_query_gain * gain).to(query.scalar_type());
  const auto grad_gain = (grad_query_gain * query).reshape({-1, gain.size(0)}).sum(0).to(gain.scalar_type());
  return {grad_query, grad_gain};
}

// (dL/ds_i for every source, dL/dq, dL/dg) in fresh tensors: the functional op that autograd and torch.compile see.
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> mix_backward_op(
    const std::vector<at::Tensor>& sources, const at::Tensor& query, const at::Tensor& gain, const at::Tensor& h,
    const at::Tensor& alpha, const at::Tensor& logits, const at::Tensor& inv_rms, const at::Tensor& grad_h) {
  std::vector<at::Tensor> grad_sources;
  for (const auto& s : sources) grad_sources.push_back(at::empty_like(s));
  c10::List<bool> overwrite;
  for (size_t i = 0; i < sources.size(); ++i) overwrite.push_back(false);
  auto [grad_query, grad_gain] = mix_backward_into(sources, query, gain, h, alpha, logits, inv_rms, grad_h,
                                                   grad_sources, overwrite);
  return {grad_sources, grad_query, grad_gain};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dar, m) {
  m.def("mix(Tensor[] sources, Tensor query, Tensor gain, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("mix_backward(Tensor[] sources, Tensor query, Tensor gain, Tensor h, Tensor alpha, Tensor logits, "
        "Tensor inv_rms, Tensor grad_h) -> (Tensor[], Tensor, Tensor)");
  m.def("mix_backward_into(Tensor[] sources, Tensor query, Tensor gain, Tensor h, Tensor alpha, Tensor logits, "
        "Tensor inv_rms, Tensor grad_h, Tensor(a!)[] grad_sources, bool[] accumulate) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dar, CPU, m) {
  m.impl("mix", &mix);
  m.impl("mix_backward", &mix_backward_op);
  m.impl("mix_backward_into", &mix_backward_into);
}
