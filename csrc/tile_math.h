// Tile math shared by the CPU and CUDA kernels of the dual InfoNCE: the online
// log-sum-exp and the softmax-gradient weight. Both backends call exactly these
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

template <typename acc_t>
HIMO_HD acc_t lse_value(LseState<acc_t> s) {
  return s.max + std::log(s.sum);
}

// d loss / d logit for one logit x = scale * dot that enters a row log-sum-exp `lse`
// with upstream gradient g: g * softmax = g * exp(x - lse).
template <typename acc_t>
HIMO_HD acc_t softmax_weight(acc_t x, acc_t lse, acc_t g) {
  return g * std::exp(x - lse);
}

}  // namespace himo
