// Tile math shared by the CPU and CUDA kernels of the dual InfoNCE: the online
// log-sum-exp and the cross-entropy gradient weight. Both backends call exactly these
// functions per element, so what CI tests on the CPU is the arithmetic the GPU runs.
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__)
#define HIMO_HD __host__ __device__ __forceinline__
#else
#define HIMO_HD inline
#endif

namespace himo {

// Running (max, sum of exp(x - max)) of a stream of logits; empty state is (-inf, 0).
template <typename acc_t>
struct LseState {
  acc_t max;
  acc_t sum;
};

template <typename acc_t>
HIMO_HD LseState<acc_t> lse_empty() {
  return {-std::numeric_limits<acc_t>::infinity(), acc_t(0)};
}

// exp(a - b) for b >= a, with exp(-inf - -inf) defined as 0 (empty states).
template <typename acc_t>
HIMO_HD acc_t rescale(acc_t a, acc_t b) {
  return a == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : std::exp(a - b);
}

template <typename acc_t>
HIMO_HD LseState<acc_t> lse_push(LseState<acc_t> s, acc_t x) {
  if (x > s.max) return {x, s.sum * rescale(s.max, x) + acc_t(1)};
  return {s.max, s.sum + rescale(x, s.max)};
}

template <typename acc_t>
HIMO_HD LseState<acc_t> lse_merge(LseState<acc_t> a, LseState<acc_t> b) {
  if (b.max > a.max) return {b.max, b.sum + a.sum * rescale(a.max, b.max)};
  return {a.max, a.sum + b.sum * rescale(b.max, a.max)};
}

// The log-sum-exp relative to a reference logit of its row, lse - ref (see ce_weight).
template <typename acc_t>
HIMO_HD acc_t nll_value(LseState<acc_t> s, acc_t ref) {
  return (s.max - ref) + std::log(s.sum);
}

// d loss / d logit for one logit x = scale * dot of a row whose log-sum-exp is saved
// relative to a reference logit `ref` of that row (its label logit): nll = lse - ref. The
// softmax is exp((x - ref) - nll): both differences are small where the softmax is near 1,
// so it is accurate to the last bit there, which a single rounded lse (ulp(max)) is not.
// The weight is gp * softmax - c (c: the upstream gradient times the target). Formed per
// element, a row whose softmax is its target (one pair, a solved example) gets exactly 0,
// not the difference of two rounded products.
template <typename acc_t>
HIMO_HD acc_t ce_weight(acc_t x, acc_t ref, acc_t nll, acc_t gp, acc_t c) {
  return gp * std::exp((x - ref) - nll) - c;
}

}  // namespace himo
