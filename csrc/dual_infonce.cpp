// Device-agnostic strip driver of the dual InfoNCE, its input checks, and the CPU
// elementwise kernels (the `cpu` backend, and what CI runs).
#include "dual_infonce.h"

#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>

#include "tile_math.h"

namespace himo {
namespace {

// Elements of one strip of logits on the CPU: bounds the workspace whatever N is (4 MiB in
// fp32). Whether the forward keeps all its logits for the backward is the caller's choice
// (himo_fast/backends.py: on the CPU when they fit in 8 MiB).
constexpr int64_t kCpuStripElements = int64_t(1) << 20;

// Elements of one block of rows of the label logits' dot products (label_dots).
constexpr int64_t kLabelDotElements = int64_t(1) << 24;

// ---------------------------------------------------------------- CPU kernels
//
// Vectorised (at::vec, AVX2/AVX-512 as the CPU allows) two-pass versions of the tile
// math: max first, then the sum of exponentials, per row or per column block. Same
// values as the online form of tile_math.h, which the GPU kernels use; both are tested
// against the reference.

using at::vec::Vectorized;

// exp for the log-sum-exp and softmax passes: at::vec's polynomial exp_u20 (≤ 20 ulp,
// 2.4e-6 relative in fp32; the accurate exp for fp64), which the N² elementwise work is
// bound by, with NaN passed through (exp_u20 clamps it). Elements whose weight must be
// exact (the label logits) go through tile_math.h's std::exp.
template <typename acc_t>
inline Vectorized<acc_t> vexp(const Vectorized<acc_t>& v) {
  return Vectorized<acc_t>::blendv(v.exp_u20(), v, v.isnan());
}

template <typename acc_t>
void cpu_row_nll_impl(const at::Tensor& dots, const at::Tensor& scale, const at::Tensor& ref,
                      at::Tensor& out) {
  using V = Vectorized<acc_t>;
  const int64_t rows = dots.size(0), len = dots.size(1), vlen = len - len % V::size();
  const acc_t s = scale.item<acc_t>();
  const acc_t* d = dots.data_ptr<acc_t>();
  const acc_t* rf = ref.data_ptr<acc_t>();
  acc_t* o = out.data_ptr<acc_t>();
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    const V vs(s);
    for (int64_t r = r0; r < r1; ++r) {
      const acc_t* row = d + r * len;
      V vmax(-std::numeric_limits<acc_t>::infinity());
      for (int64_t j = 0; j < vlen; j += V::size()) vmax = at::vec::maximum(vmax, vs * V::loadu(row + j));
      acc_t mx = at::vec::vec_reduce_all<acc_t>([](V& a, V& b) { return at::vec::maximum(a, b); }, vmax);
      for (int64_t j = vlen; j < len; ++j) mx = std::max(mx, s * row[j]);
      if (std::isnan(mx) || mx == -std::numeric_limits<acc_t>::infinity()) {
        o[r] = mx - rf[r];  // NaN in, NaN out; a row of -inf logits has lse -inf
        continue;
      }
      const V vmx(mx);
      V vsum(acc_t(0));
      for (int64_t j = 0; j < vlen; j += V::size()) vsum = vsum + vexp(vs * V::loadu(row + j) - vmx);
      acc_t sum = at::vec::vec_reduce_all<acc_t>([](V& a, V& b) { return a + b; }, vsum);
      for (int64_t j = vlen; j < len; ++j) sum += std::exp(s * row[j] - mx);
      o[r] = nll_value(LseState<acc_t>{mx, sum}, rf[r]);
    }
  });
}

template <typename acc_t>
void cpu_col_merge_impl(const at::Tensor& dots, const at::Tensor& scale, at::Tensor& col_max,
                        at::Tensor& col_sum) {
  using V = Vectorized<acc_t>;
  const int64_t rows = dots.size(0), cols = dots.size(1);
  const acc_t s = scale.item<acc_t>();
  const acc_t* d = dots.data_ptr<acc_t>();
  acc_t* cm = col_max.data_ptr<acc_t>();
  acc_t* cs = col_sum.data_ptr<acc_t>();
  // Column blocks of whole vectors; each block: new max = max(running, strip), then
  // sum = running_sum * exp(running_max - new) + sum_r exp(s x - new).
  constexpr int64_t kBlock = 256;
  at::parallel_for(0, (cols + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    acc_t mx[kBlock], sm[kBlock];
    const V vs(s);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t c0 = blk * kBlock, n = std::min(kBlock, cols - c0);
      const int64_t vn = n - n % V::size();
      for (int64_t j = 0; j < n; ++j) mx[j] = cm[c0 + j];
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t* row = d + r * cols + c0;
        for (int64_t j = 0; j < vn; j += V::size())
          at::vec::maximum(V::loadu(mx + j), vs * V::loadu(row + j)).store(mx + j);
        for (int64_t j = vn; j < n; ++j) mx[j] = std::max(mx[j], s * row[j]);
      }
      for (int64_t j = 0; j < n; ++j) sm[j] = cs[c0 + j] * rescale(cm[c0 + j], mx[j]);
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t* row = d + r * cols + c0;
        for (int64_t j = 0; j < vn; j += V::size())
          (V::loadu(sm + j) + vexp(vs * V::loadu(row + j) - V::loadu(mx + j))).store(sm + j);
        for (int64_t j = vn; j < n; ++j) sm[j] += std::exp(s * row[j] - mx[j]);
      }
      for (int64_t j = 0; j < n; ++j) {
        cm[c0 + j] = mx[j];
        cs[c0 + j] = sm[j];
      }
    }
  });
}

template <typename acc_t>
void cpu_ce_grad_impl(at::Tensor& dots, const at::Tensor& scale, const Side& rs, const Side& cs,
                      int64_t label_col0, at::Tensor& ds_rows) {
  using V = Vectorized<acc_t>;
  const int64_t rows = dots.size(0), cols = dots.size(1), vcols = cols - cols % V::size();
  const acc_t s = scale.item<acc_t>();
  acc_t* d = dots.data_ptr<acc_t>();
  struct Ptrs {
    const acc_t *nll, *ref, *gp, *c_off, *c_label;
  };
  auto ptrs = [](const Side& side) {
    return Ptrs{side.nll.data_ptr<acc_t>(), side.ref.data_ptr<acc_t>(), side.gp.data_ptr<acc_t>(),
                side.c_off.data_ptr<acc_t>(), side.c_label.data_ptr<acc_t>()};
  };
  const bool with_col = cs.nll.defined();
  const Ptrs R = ptrs(rs), C = with_col ? ptrs(cs) : Ptrs{};
  acc_t* dsr = ds_rows.data_ptr<acc_t>();
  auto weight = [&](acc_t x, int64_t r, int64_t j, bool label) {
    acc_t w = ce_weight(x, R.ref[r], R.nll[r], R.gp[r], label ? R.c_label[r] : R.c_off[r]);
    if (with_col) w += ce_weight(x, C.ref[j], C.nll[j], C.gp[j], label ? C.c_label[j] : C.c_off[j]);
    return w;
  };
  // Every element as off-label; then the label element again, whole, in scalar, so that
  // its weight is exactly 0 when the softmax is exactly the target.
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    const V vs(s);
    for (int64_t r = r0; r < r1; ++r) {
      acc_t* row = d + r * cols;
      const int64_t label = label_col0 + r;
      const acc_t label_dot = row[label];
      const V vref(R.ref[r]), vnll(R.nll[r]), vgp(R.gp[r]), vc(R.c_off[r]);
      V vds(acc_t(0));
      for (int64_t j = 0; j < vcols; j += V::size()) {
        const V dot = V::loadu(row + j), x = vs * dot;
        V w = vgp * vexp((x - vref) - vnll) - vc;  // ce_weight, vectorised
        if (with_col) {
          w = w + V::loadu(C.gp + j) * vexp((x - V::loadu(C.ref + j)) - V::loadu(C.nll + j)) -
              V::loadu(C.c_off + j);
        }
        vds = vds + w * dot;
        w.store(row + j);
      }
      acc_t ds = at::vec::vec_reduce_all<acc_t>([](V& a, V& b) { return a + b; }, vds);
      for (int64_t j = vcols; j < cols; ++j) {
        const acc_t w = weight(s * row[j], r, j, false);
        ds += w * row[j];
        row[j] = w;
      }
      const acc_t w_label = weight(s * label_dot, r, label, true);
      dsr[r] = ds + (w_label - row[label]) * label_dot;
      row[label] = w_label;
    }
  });
}

#define HIMO_CPU_DISPATCH(dtype, fn, ...)                  \
  if ((dtype) == at::kDouble) {                           \
    fn<double>(__VA_ARGS__);                               \
  } else {                                                 \
    fn<float>(__VA_ARGS__);                                \
  }

void cpu_row_nll(const at::Tensor& dots, const at::Tensor& scale, const at::Tensor& ref,
                 at::Tensor& out) {
  HIMO_CPU_DISPATCH(dots.scalar_type(), cpu_row_nll_impl, dots, scale, ref, out);
}
void cpu_col_merge(const at::Tensor& dots, const at::Tensor& scale, at::Tensor& cm,
                   at::Tensor& cs) {
  HIMO_CPU_DISPATCH(dots.scalar_type(), cpu_col_merge_impl, dots, scale, cm, cs);
}
void cpu_ce_grad(at::Tensor& dots, const at::Tensor& scale, const Side& rows, const Side& cols,
                 int64_t label_col0, at::Tensor& ds_rows) {
  HIMO_CPU_DISPATCH(dots.scalar_type(), cpu_ce_grad_impl, dots, scale, rows, cols, label_col0,
                    ds_rows);
}

// ---------------------------------------------------------------- driver

// a @ bᵀ with the product in the accumulation dtype (fp32 from bf16/fp16 tensor cores).
at::Tensor mm_acc(const at::Tensor& a, const at::Tensor& b_t, at::ScalarType acc) {
  if (a.scalar_type() == acc) return at::mm(a, b_t);
  return at::mm(a, b_t, acc);
}

int64_t strip_rows(const Device& dev, int64_t rows, int64_t cols, int64_t requested) {
  if (requested > 0) return std::min(rows, requested);
  return std::max<int64_t>(1, std::min(rows, dev.strip_elements / std::max<int64_t>(cols, 1)));
}

// Rows per lse call of the fused route: the device's count, fewer where their column
// partials (2 values per column and row block of tiles::kM) would pass 2 per logit of a
// strip. Same bytes and FLOPs in all, only more launches: at N = 262144 on CUDA, 128 row
// blocks (256 MiB of partials) where 528 would hold 1.1 GiB.
int64_t tile_lse_rows(const Device& dev, int64_t cols, int64_t requested) {
  if (requested > 0) return requested;
  const int64_t blocks = std::max<int64_t>(1, dev.strip_elements / std::max<int64_t>(cols, 1));
  return std::min(dev.tiles.lse_rows, blocks * tiles::kM);
}

// Row nll = logsumexp - ref of s·R·Cᵀ and, when asked, the same for every column (the
// square case: the transposed matrix's rows come from the same strips or tiles).
// keep: defined (B x N) to keep the logits' dot products for the backward. tiled: the
// fused route (TileKernels), whose label logits are ref_rows (row r's at column
// label_offset + r).
void job_forward(const Device& dev, const at::Tensor& R, const at::Tensor& C,
                 const at::Tensor& scale, const at::Tensor& ref_rows, at::Tensor nll_rows,
                 const at::Tensor& ref_cols, at::Tensor* nll_cols, int64_t label_offset,
                 int64_t requested_rows, const at::Tensor& keep, bool tiled) {
  const StripKernels& k = dev.strips;
  const int64_t B = R.size(0), N = C.size(0);
  const auto acc = scale.scalar_type();
  at::Tensor col_max, col_sum;
  if (nll_cols != nullptr) {
    col_max = at::full({N}, -std::numeric_limits<double>::infinity(), R.options().dtype(acc));
    col_sum = at::zeros({N}, R.options().dtype(acc));
  }
  const int64_t step = tiled ? tile_lse_rows(dev, N, requested_rows)
                            : strip_rows(dev, B, N, requested_rows);
  const at::Tensor Ct = C.t();
  for (int64_t r0 = 0; r0 < B; r0 += step) {
    const int64_t rn = std::min(step, B - r0);
    at::Tensor out = nll_rows.narrow(0, r0, rn);
    if (tiled) {
      dev.tiles.lse(R.narrow(0, r0, rn), C, scale, ref_rows.narrow(0, r0, rn), label_offset + r0,
                    out, col_max, col_sum);
      continue;
    }
    at::Tensor dots;
    if (keep.defined()) {
      dots = keep.narrow(0, r0, rn);
      at::mm_out(dots, R.narrow(0, r0, rn), Ct);  // inputs in the accumulation dtype
    } else {
      dots = mm_acc(R.narrow(0, r0, rn), Ct, acc);
    }
    k.row_nll(dots, scale, ref_rows.narrow(0, r0, rn), out);
    if (nll_cols != nullptr) k.col_merge(dots, scale, col_max, col_sum);
  }
  if (nll_cols != nullptr) *nll_cols = (col_max - ref_cols) + at::log(col_sum);
}

// Gradients with respect to R, C and the scale of sum_r gp[r] lse[r] - sum_rj c_rj s R_r·C_j
// over the rows (and the columns when cols is defined), from strips of the weights W: each
// strip of logits recomputed (or copied from `kept`, the forward's, when defined) and
// turned into W in place, or, tiled, W written directly by the tile kernel in R's dtype.
// dR (R's dtype) is overwritten strip by strip (added to, with add_rows: R is shared with
// the other branch), each strip scaled and, when added, summed before it is rounded;
// dC (the accumulation dtype) is accumulated into, in place, and dscale added to, each
// where defined. kept: [B, N] dot products, any strides (a transposed view included).
void job_backward(const Device& dev, const at::Tensor& R, const at::Tensor& C,
                  const at::Tensor& scale, const Side& rows, const Side& cols,
                  int64_t label_offset, at::Tensor& dR, at::Tensor dC, at::Tensor dscale,
                  int64_t requested_rows, const at::Tensor& kept, bool tiled,
                  bool add_rows = false) {
  const StripKernels& k = dev.strips;
  const int64_t B = R.size(0), N = C.size(0);
  const int64_t step = strip_rows(dev, B, N, requested_rows);
  const auto acc = scale.scalar_type();
  const bool low_precision = R.scalar_type() != acc;
  const at::Tensor Ct = C.t();
  at::Tensor ds_rows = at::empty({step}, R.options().dtype(acc));
  const at::Tensor w_strip = tiled ? at::empty({step, N}, R.options()) : at::Tensor();
  for (int64_t r0 = 0; r0 < B; r0 += step) {
    const int64_t rn = std::min(step, B - r0);
    const at::Tensor Rb = R.narrow(0, r0, rn);
    at::Tensor ds = ds_rows.narrow(0, 0, rn), w;
    if (tiled) {
      w = w_strip.narrow(0, 0, rn);
      dev.tiles.weights(Rb, C, scale, rows.narrow(r0, rn), cols, label_offset + r0, w, ds);
    } else {
      // A contiguous copy of the kept strip: ce_grad works in place, and the saved logits
      // must survive for a second backward (retain_graph).
      w = kept.defined() ? kept.narrow(0, r0, rn).clone(at::MemoryFormat::Contiguous)
                         : mm_acc(Rb, Ct, acc);
      k.ce_grad(w, scale, rows.narrow(r0, rn), cols, label_offset + r0, ds);
    }
    if (dscale.defined()) dscale.add_(ds.sum());
    // Like flash-attention, the weights go back to the input precision for the
    // tensor-core products (the tile kernel writes them so); accumulation stays in fp32.
    const at::Tensor wm = w.scalar_type() != R.scalar_type() ? w.to(R.scalar_type()) : w;
    at::Tensor dR_strip = dR.narrow(0, r0, rn);
    if (add_rows) {
      // The strip's product (rows x width, acc) summed with dR in acc, rounded once.
      dR_strip.add_(mm_acc(wm, C, acc).mul_(scale));
    } else if (low_precision) {
      dR_strip.copy_(at::mm(wm, C, acc).mul_(scale));
    } else {
      at::mm_out(dR_strip, wm, C);
      dR_strip.mul_(scale);
    }
    if (!dC.defined()) continue;
    if (low_precision) {
      // addmm's out_dtype overload (CUDA): bf16/fp16 operands, fp32 accumulated in place.
      // A product then add_ held an [N, d] fp32 temporary per strip (768 MiB at N =
      // 262144, d = 768) and moved twice the bytes.
      at::addmm_out(dC, dC, wm.t(), Rb, acc);
    } else {
      dC.addmm_(wm.t(), Rb);
    }
  }
  if (dC.defined()) dC.mul_(scale);
}

// The label logits' dot products a_i·b_{i+offset}, and (with label smoothing) the mean
// logits' a_i·mean(b): O(N·d), in the accumulation dtype.
struct LabelDots {
  at::Tensor label, mean;
};

// In blocks of rows (`requested_rows`, the driver's strip, when > 0): the copies in the
// accumulation dtype stay ≈ 3 × 64 MiB whatever N is (whole bf16-to-fp32 copies of a and
// b at N = 262144, d = 768 would be 1.5 GiB).
LabelDots label_dots(const at::Tensor& a, const at::Tensor& b, int64_t offset, double eps,
                     at::ScalarType acc, int64_t requested_rows) {
  const int64_t B = a.size(0);
  const int64_t step = requested_rows > 0 ? requested_rows
                       : std::max<int64_t>(1, kLabelDotElements / std::max<int64_t>(a.size(1), 1));
  const at::Tensor b_mean = eps != 0.0 ? at::mean(b, {0}, /*keepdim=*/true, acc) : at::Tensor();
  std::vector<at::Tensor> label, mean;
  for (int64_t r0 = 0; r0 < B; r0 += step) {
    const int64_t rn = std::min(step, B - r0);
    const at::Tensor a32 = a.narrow(0, r0, rn).to(acc);
    label.push_back((a32 * b.narrow(0, offset + r0, rn).to(acc)).sum(1));
    // The same reduction as the label's: with one column the two are then equal to the bit
    // (mean(b) = b), and the smoothed term of a single pair is exactly zero.
    if (b_mean.defined()) mean.push_back((a32 * b_mean).sum(1));
  }
  auto join = [](const std::vector<at::Tensor>& t) {
    return t.empty() ? at::Tensor() : t.size() == 1 ? t[0] : at::cat(t);
  };
  return {join(label), join(mean)};
}

// ce - nll = x_label - sum_j y_j x_j = s·ε·(label - mean). A cross entropy is never
// negative, but its label logit comes from a dot product rounded apart from the GEMM's
// (≈ 1e-5 at s = 100 in fp32): a solved row, one pair say, could come out slightly below
// zero. Clamped (clamp_min keeps a NaN a NaN); the backward does not depend on it.
at::Tensor smoothed(const at::Tensor& nll, const LabelDots& t, const at::Tensor& s, double eps) {
  if (eps == 0.0) return at::clamp_min(nll, 0.0);
  return at::clamp_min(nll + (t.label - t.mean) * s * eps, 0.0);
}

// ---------------------------------------------------------------- checks

void check_features(const char* name, const at::Tensor& t, const at::Tensor& like,
                    const char* like_name, bool same_width) {
  TORCH_CHECK_VALUE(t.dim() == 2, "himo_fast dual_ce: ", name, " must be 2-D, got shape ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), "himo_fast dual_ce: ", name,
                   " has dtype ", t.scalar_type(), " but img_r has ", like.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), "himo_fast dual_ce: ", name, " is on ",
                    t.device(), " but img_r is on ", like.device());
  if (same_width) {
    TORCH_CHECK_VALUE(t.size(1) == like.size(1), "himo_fast dual_ce: ", name,
                      " has feature dim ", t.size(1), " but ", like_name, " has ", like.size(1));
  }
  TORCH_CHECK_VALUE(t.is_contiguous(), "himo_fast dual_ce: ", name, " must be contiguous");
}

// One branch of the dual InfoNCE: rows (a_r, b_r) against columns (a_c, b_c); logits are
// s·a_r·b_cᵀ and s·b_r·a_cᵀ. Square case: the columns are the rows. shares_a: a_r and
// a_c are the global branch's (the component branch given as [b_r] or [b_r, b_c]).
struct Branch {
  at::Tensor a_r, b_r, a_c, b_c;
  bool square, shares_a;
};

struct Inputs {
  Branch global, comp;
  int64_t B, N;
  at::ScalarType acc;  // the scale's dtype
};

Branch check_branch(const char* name, at::TensorList t, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.size() == 2 || t.size() == 4, "himo_fast dual_ce: ", name,
                    " must be [a_r, b_r] (square) or [a_r, b_r, a_c, b_c], got ", t.size(),
                    " tensors");
  check_features("a_r", t[0], like, "global a_r", false);
  for (size_t i = 1; i < t.size(); ++i) check_features(name, t[i], t[0], "its a_r", true);
  if (t.size() == 2) return {t[0], t[1], t[0], t[1], true, false};
  return {t[0], t[1], t[2], t[3], false, false};
}

// The component branch: in full, or its b side only ([b_r] square, [b_r, b_c]), its a
// side then being the global branch's (HiDe's materialized u': the image is both
// branches' a). Half as many tensors as the global branch marks the short form.
Branch check_comp_branch(at::TensorList t, const Branch& global) {
  const size_t full = global.square ? 2 : 4;
  TORCH_CHECK_VALUE(t.size() == full || t.size() == full / 2, "himo_fast dual_ce: comp_branch "
                    "must be ", global.square ? "[a_r, b_r] or [b_r] (the global branch is "
                    "square)" : "[a_r, b_r, a_c, b_c] or [b_r, b_c] (the global branch has "
                    "columns)", ", got ", t.size(), " tensors");
  if (t.size() == full) return check_branch("comp_branch", t, global.a_r);
  for (const at::Tensor& b : t) check_features("comp_branch", b, global.a_r, "global a_r", true);
  return {global.a_r, t[0], global.a_c, global.square ? t[0] : t[1], global.square, true};
}

Inputs check_inputs(const Device& dev, at::TensorList global_branch, at::TensorList comp_branch,
                    const at::Tensor& scale, int64_t label_offset, double label_smoothing) {
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing < 1.0,
                    "himo_fast dual_ce: label_smoothing must be in [0, 1), got ", label_smoothing);
  TORCH_CHECK_VALUE(!global_branch.empty(), "himo_fast dual_ce: empty global_branch");
  const at::Tensor& a = global_branch[0];
  TORCH_CHECK_VALUE(scale.numel() == 1 && scale.dim() <= 1,
                    "himo_fast dual_ce: scale must be 0-d or 1 element, got shape ",
                    scale.sizes());
  TORCH_CHECK_VALUE(scale.device() == a.device(), "himo_fast dual_ce: scale is on ",
                    scale.device(), " but the features are on ", a.device());
  const at::ScalarType acc = scale.scalar_type();
  TORCH_CHECK_TYPE(acc == at::kFloat || acc == at::kDouble,
                   "himo_fast dual_ce: scale (the accumulation dtype) must be float32 or "
                   "float64, got ", acc);
  TORCH_CHECK_TYPE(dev.accepts(a.scalar_type(), acc), "himo_fast dual_ce: ", dev.name,
                   " inputs must be ", dev.dtypes, ", got ", a.scalar_type(),
                   " with a ", acc, " scale");
  const Branch g = check_branch("global_branch", global_branch, a);
  const Branch c = check_comp_branch(comp_branch, g);
  const int64_t B = g.a_r.size(0), N = g.a_c.size(0);
  TORCH_CHECK_VALUE(B >= 1, "himo_fast dual_ce: empty batch");
  for (const at::Tensor* t : {&g.b_r, &c.a_r, &c.b_r}) {
    TORCH_CHECK_VALUE(t->size(0) == B, "himo_fast dual_ce: row tensors must have ", B,
                      " rows, got ", t->size(0));
  }
  for (const at::Tensor* t : {&g.b_c, &c.a_c, &c.b_c}) {
    TORCH_CHECK_VALUE(t->size(0) == N, "himo_fast dual_ce: column tensors must have ", N,
                      " rows, got ", t->size(0));
  }
  TORCH_CHECK_VALUE(N >= B, "himo_fast dual_ce: ", N, " columns < ", B, " rows");
  TORCH_CHECK_VALUE(label_offset >= 0 && label_offset + B <= N, "himo_fast dual_ce: "
                    "label_offset must be in [0, ", N - B, "] for ", B, " rows and ", N,
                    " columns, got ", label_offset);
  return {g, c, B, N, acc};
}

// Part i (along dim 0) of the logits the forward keeps; undefined when it keeps none
// (the op's logits output is then empty).
at::Tensor kept_part(const at::Tensor& kept, int64_t i) {
  return kept.defined() && kept.numel() != 0 ? kept[i] : at::Tensor();
}

// Forward of one branch: the cross entropies and nlls of its two directions.
// keep: [jobs, B, N] for this branch's logits (one job square, two otherwise), or undefined.
void branch_forward(const Device& dev, const Branch& br, const at::Tensor& s, int64_t offset,
                    double eps, at::Tensor ce_ab, at::Tensor ce_ba, at::Tensor nll_ab,
                    at::Tensor nll_ba, int64_t strip, const at::Tensor& keep, bool tiled) {
  auto job = [&](int64_t j) { return kept_part(keep, j); };
  const auto acc = s.scalar_type();
  const LabelDots t_ab = label_dots(br.a_r, br.b_c, offset, eps, acc, strip);
  const LabelDots t_ba = label_dots(br.b_r, br.a_c, offset, eps, acc, strip);
  const at::Tensor ref_ab = t_ab.label * s, ref_ba = t_ba.label * s;
  if (br.square) {
    // One pass: the rows of s·a·bᵀ, and its columns, which are the rows of s·b·aᵀ.
    at::Tensor cols;
    job_forward(dev, br.a_r, br.b_r, s, ref_ab, nll_ab, ref_ba, &cols, 0, strip, job(0), tiled);
    nll_ba.copy_(cols);
  } else {
    job_forward(dev, br.a_r, br.b_c, s, ref_ab, nll_ab, at::Tensor(), nullptr, offset, strip,
                job(0), tiled);
    job_forward(dev, br.b_r, br.a_c, s, ref_ba, nll_ba, at::Tensor(), nullptr, offset, strip,
                job(1), tiled);
  }
  ce_ab.copy_(smoothed(nll_ab, t_ab, s, eps));
  ce_ba.copy_(smoothed(nll_ba, t_ba, s, eps));
}

// The backward data of one direction: ce = lse - sum_j y_j x_j with y = ε/N off the label
// and ε/N + 1 - ε at it; nll = lse - x_label.
Side side(const at::Tensor& a, const at::Tensor& b, const at::Tensor& s, int64_t offset,
          double eps, const at::Tensor& nll, const at::Tensor& g_ce, const at::Tensor& g_nll,
          int64_t strip) {
  const double y_off = eps / double(b.size(0)), y_on = y_off + (1.0 - eps);
  return {nll, label_dots(a, b, offset, 0.0, s.scalar_type(), strip).label * s, g_ce + g_nll,
          g_ce * y_off, g_ce * y_on + g_nll};
}

// Backward of one branch: the gradients of its tensors (2 square, else 4), in its order.
// nll, g_ce, g_nll: [2, B], directions ab and ba. A branch that shares a (br.shares_a)
// adds a's gradient into the global branch's (global_grads, its order) and returns b's.
std::vector<at::Tensor> branch_backward(const Device& dev, const Branch& br, const at::Tensor& s,
                                        int64_t offset, double eps, const at::Tensor& nll,
                                        const at::Tensor& g_ce, const at::Tensor& g_nll,
                                        at::Tensor& dscale, int64_t strip,
                                        const at::Tensor& kept, bool tiled,
                                        bool recompute_columns,
                                        std::vector<at::Tensor>& global_grads) {
  auto job = [&](int64_t j) { return kept_part(kept, j); };
  // The rows' gradients are written once, in the inputs' dtype; the columns' are
  // accumulated over the strips, in the scale's.
  const auto row_opts = br.a_r.options(), col_opts = row_opts.dtype(s.scalar_type());
  auto cast = [&](const at::Tensor& t) { return t.to(br.a_r.scalar_type()); };
  const int64_t B = br.a_r.size(0), N = br.a_c.size(0);
  const int64_t da = br.a_r.size(1);
  const bool add = br.shares_a;
  // a_r's gradient: the global branch's, added to, or a new one.
  at::Tensor d_a = add ? global_grads[0] : at::empty({B, da}, row_opts);
  const Side ab = side(br.a_r, br.b_c, s, offset, eps, nll[0], g_ce[0], g_nll[0], strip);
  const Side ba = side(br.b_r, br.a_c, s, offset, eps, nll[1], g_ce[1], g_nll[1], strip);
  std::vector<at::Tensor> grads;  // in the branch's order: a_r, b_r (, a_c, b_c)
  if (br.square && recompute_columns) {
    // W of s·a·bᵀ row by row for dA, then Wᵀ (the weights of s·b·aᵀ, the sides swapped,
    // the same two terms summed) row by row for dB; the scale's gradient counted once.
    const at::Tensor kept = job(0);
    at::Tensor d_b = at::empty({B, da}, row_opts);
    job_backward(dev, br.a_r, br.b_r, s, ab, ba, 0, d_a, at::Tensor(), dscale, strip, kept,
                 tiled, add);
    job_backward(dev, br.b_r, br.a_r, s, ba, ab, 0, d_b, at::Tensor(), at::Tensor(), strip,
                 kept.defined() ? kept.t() : kept, tiled);
    grads = {d_a, d_b};
  } else if (br.square) {
    at::Tensor d_b = at::zeros({B, da}, col_opts);
    job_backward(dev, br.a_r, br.b_r, s, ab, ba, 0, d_a, d_b, dscale, strip, job(0), tiled, add);
    grads = {d_a, cast(d_b)};
  } else {
    at::Tensor d_b_c = at::zeros({N, da}, col_opts);
    job_backward(dev, br.a_r, br.b_c, s, ab, Side{}, offset, d_a, d_b_c, dscale, strip, job(0),
                 tiled, add);
    at::Tensor d_b_c_out = cast(d_b_c);
    d_b_c = at::Tensor();  // one fp32 accumulator at a time
    at::Tensor d_b_r = at::empty({B, da}, row_opts), d_a_c = at::zeros({N, da}, col_opts);
    job_backward(dev, br.b_r, br.a_c, s, ba, Side{}, offset, d_b_r, d_a_c, dscale, strip,
                 job(1), tiled);
    // Shared: summed into the global a_c's gradient in the accumulation dtype, rounded once
    grads = {d_a, d_b_r, add ? global_grads[2].add_(d_a_c) : cast(d_a_c), d_b_c_out};
  }
  if (!add) return grads;
  std::vector<at::Tensor> b_side;  // a's gradients are the global branch's
  for (size_t i = 1; i < grads.size(); i += 2) b_side.push_back(grads[i]);
  return b_side;
}

// Jobs (logit matrices computed by GEMM) per branch: one square, two otherwise.
int64_t jobs_per_branch(const Inputs& in) { return in.global.square ? 1 : 2; }

// The op's logits [2·jobs, B, N] seen as [branch, job, B, N]; empty stays empty.
at::Tensor per_branch_logits(const at::Tensor& logits, const Inputs& in) {
  if (logits.numel() == 0) return logits;
  return logits.view({2, jobs_per_branch(in), in.B, in.N});
}

// Whether the op takes the fused route (TileKernels). A route the device or dtype does
// not have is an error, never a silent fallback to the other.
bool tiled_route(const Device& dev, c10::string_view route, at::ScalarType features) {
  TORCH_CHECK_VALUE(route == "strips" || route == "tiles",
                    "himo_fast dual_ce: route must be 'strips' or 'tiles', got '",
                    std::string(route), "'");
  if (route == "strips") return false;
  TORCH_CHECK_TYPE(dev.tiles.accepts(features), "himo_fast dual_ce: the ", dev.name,
                   " tiles route takes ", dev.tiles.dtypes, " features, got ", features);
  return true;
}

// Whether a square branch's columns' gradient is recomputed (dual_infonce.h, col_grad);
// checks the option's value for the forward too.
bool recompute_columns(const Device& dev, c10::string_view col_grad, const Inputs& in,
                       int64_t requested_rows) {
  TORCH_CHECK_VALUE(col_grad == "auto" || col_grad == "accumulate" || col_grad == "recompute",
                    "himo_fast dual_ce: col_grad must be 'auto', 'accumulate' or 'recompute', "
                    "got '", std::string(col_grad), "'");
  TORCH_CHECK_VALUE(col_grad != "recompute" || in.global.square,
                    "himo_fast dual_ce: col_grad 'recompute' needs square branches (with "
                    "columns, a transposed strip's rows may hold no label); got ", in.B,
                    " rows against ", in.N, " columns");
  if (col_grad != "auto") return col_grad == "recompute";
  const int64_t rows = strip_rows(dev, in.B, in.N, requested_rows);
  return in.global.square && rows < in.B && rows < dev.recompute_below_rows;
}

bool cpu_accepts(at::ScalarType features, at::ScalarType acc) { return features == acc; }

}  // namespace

const Device& cpu_device() {
  static const Device d{{cpu_row_nll, cpu_col_merge, cpu_ce_grad}, cpu_tile_kernels(),
                        kCpuStripElements, /*recompute_below_rows=*/0, "CPU", cpu_accepts,
                        "float32 or float64, in the scale's dtype"};
  return d;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_ce(
    const Device& device, at::TensorList global_branch, at::TensorList comp_branch,
    const at::Tensor& scale, int64_t label_offset, double label_smoothing, bool keep_logits,
    int64_t strip, c10::string_view route, c10::string_view col_grad) {
  // The strip GEMMs accumulate in fp32 whatever autocast region the loss is called from.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Inputs in = check_inputs(device, global_branch, comp_branch, scale, label_offset,
                                 label_smoothing);
  recompute_columns(device, col_grad, in, strip);  // checked here, used by the backward
  const at::Tensor s = scale.reshape({}).contiguous();
  const auto opts = in.global.a_r.options().dtype(in.acc);
  at::Tensor ce = at::empty({4, in.B}, opts), nll = at::empty({4, in.B}, opts);
  const int64_t jobs = jobs_per_branch(in);
  const bool tiled = tiled_route(device, route, in.global.a_r.scalar_type());
  TORCH_CHECK_VALUE(!keep_logits || in.global.a_r.scalar_type() == in.acc,
                    "himo_fast dual_ce: keep_logits needs inputs in the accumulation dtype");
  TORCH_CHECK_VALUE(!(keep_logits && tiled),
                    "himo_fast dual_ce: keep_logits needs the strips route (tiles keep none)");
  at::Tensor logits = keep_logits ? at::empty({2 * jobs, in.B, in.N}, opts) : at::empty({0}, opts);
  const at::Tensor per_branch = per_branch_logits(logits, in);
  branch_forward(device, in.global, s, label_offset, label_smoothing, ce[0], ce[1], nll[0],
                 nll[1], strip, kept_part(per_branch, 0), tiled);
  branch_forward(device, in.comp, s, label_offset, label_smoothing, ce[2], ce[3], nll[2],
                 nll[3], strip, kept_part(per_branch, 1), tiled);
  return {ce, nll, logits};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> dual_ce_backward(
    const Device& device, const at::Tensor& grad_ce, const at::Tensor& grad_nll,
    const at::Tensor& nll, const at::Tensor& logits, at::TensorList global_branch,
    at::TensorList comp_branch, const at::Tensor& scale, int64_t label_offset,
    double label_smoothing, int64_t strip, c10::string_view route, c10::string_view col_grad) {
  // The strip GEMMs accumulate in fp32 whatever autocast region the loss is called from.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Inputs in = check_inputs(device, global_branch, comp_branch, scale, label_offset,
                                 label_smoothing);
  const std::vector<int64_t> shape{4, in.B};
  TORCH_CHECK_VALUE(nll.sizes() == at::IntArrayRef(shape) && grad_ce.sizes() == nll.sizes() &&
                        grad_nll.sizes() == nll.sizes(),
                    "himo_fast dual_ce_backward: nll, grad_ce and grad_nll must have shape [4, ",
                    in.B, "], got ", nll.sizes(), ", ", grad_ce.sizes(), " and ", grad_nll.sizes());
  const int64_t jobs = jobs_per_branch(in);
  const bool tiled = tiled_route(device, route, in.global.a_r.scalar_type());
  const bool recompute = recompute_columns(device, col_grad, in, strip);
  TORCH_CHECK_VALUE(logits.numel() == 0 || !tiled,
                    "himo_fast dual_ce_backward: the tiles route takes no kept logits");
  TORCH_CHECK_VALUE(logits.numel() == 0 ||
                        (logits.sizes() == at::IntArrayRef({2 * jobs, in.B, in.N}) &&
                         logits.scalar_type() == in.acc && logits.is_contiguous() &&
                         logits.device() == in.global.a_r.device()),
                    "himo_fast dual_ce_backward: logits must be empty or the forward's [",
                    2 * jobs, ", ", in.B, ", ", in.N, "] output, got ", logits.sizes());
  const at::Tensor per_branch = per_branch_logits(logits, in);
  const at::Tensor s = scale.reshape({}).contiguous();
  auto ready = [&](const at::Tensor& t) { return t.to(in.acc).contiguous(); };
  const at::Tensor g_ce = ready(grad_ce), g_nll = ready(grad_nll), l = ready(nll);
  at::Tensor dscale = at::zeros({}, in.global.a_r.options().dtype(in.acc));
  auto two = [](const at::Tensor& t, int64_t first) { return t.narrow(0, first, 2); };
  std::vector<at::Tensor> none;
  auto g = branch_backward(device, in.global, s, label_offset, label_smoothing, two(l, 0),
                           two(g_ce, 0), two(g_nll, 0), dscale, strip, kept_part(per_branch, 0),
                           tiled, recompute, none);
  // The component branch last: where it shares a, it adds into g's gradients of a.
  auto c = branch_backward(device, in.comp, s, label_offset, label_smoothing, two(l, 2),
                           two(g_ce, 2), two(g_nll, 2), dscale, strip, kept_part(per_branch, 1),
                           tiled, recompute, g);
  return {g, c, dscale};
}

}  // namespace himo
