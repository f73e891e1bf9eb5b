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

// Elements of one strip of logits: bounds the workspace whatever N is (4 MiB in fp32 on
// the CPU; 128 MiB on a GPU, where launches over a too-thin strip would starve the chip).
constexpr int64_t kCpuStripElements = int64_t(1) << 20;
constexpr int64_t kCudaStripElements = int64_t(1) << 25;

// ---------------------------------------------------------------- CPU kernels
//
// Vectorised (at::vec, AVX2/AVX-512 as the CPU allows) two-pass versions of the tile
// math: max first, then the sum of exponentials, per row or per column block. Same
// values as the online form of tile_math.h, which the GPU kernels use; both are tested
// against the reference.

using at::vec::Vectorized;

template <typename acc_t>
void cpu_row_lse_impl(const at::Tensor& dots, const at::Tensor& scale, at::Tensor& out) {
  using V = Vectorized<acc_t>;
  const int64_t rows = dots.size(0), len = dots.size(1), vlen = len - len % V::size();
  const acc_t s = scale.item<acc_t>();
  const acc_t* d = dots.data_ptr<acc_t>();
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
        o[r] = mx;  // NaN in, NaN out; a row of -inf logits has lse -inf
        continue;
      }
      const V vmx(mx);
      V vsum(acc_t(0));
      for (int64_t j = 0; j < vlen; j += V::size()) vsum = vsum + (vs * V::loadu(row + j) - vmx).exp();
      acc_t sum = at::vec::vec_reduce_all<acc_t>([](V& a, V& b) { return a + b; }, vsum);
      for (int64_t j = vlen; j < len; ++j) sum += std::exp(s * row[j] - mx);
      o[r] = mx + std::log(sum);
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
          (V::loadu(sm + j) + (vs * V::loadu(row + j) - V::loadu(mx + j)).exp()).store(sm + j);
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
void cpu_softmax_grad_impl(at::Tensor& dots, const at::Tensor& scale, const at::Tensor& lse_row,
                           const at::Tensor& g_row, const at::Tensor& lse_col,
                           const at::Tensor& g_col, at::Tensor& ds_rows) {
  using V = Vectorized<acc_t>;
  const int64_t rows = dots.size(0), cols = dots.size(1), vcols = cols - cols % V::size();
  const acc_t s = scale.item<acc_t>();
  acc_t* d = dots.data_ptr<acc_t>();
  const acc_t* lr = lse_row.data_ptr<acc_t>();
  const acc_t* gr = g_row.data_ptr<acc_t>();
  const bool with_col = lse_col.defined();
  const acc_t* lc = with_col ? lse_col.data_ptr<acc_t>() : nullptr;
  const acc_t* gc = with_col ? g_col.data_ptr<acc_t>() : nullptr;
  acc_t* dsr = ds_rows.data_ptr<acc_t>();
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    const V vs(s);
    for (int64_t r = r0; r < r1; ++r) {
      acc_t* row = d + r * cols;
      const acc_t l = lr[r], g = gr[r];
      const V vl(l), vg(g);
      V vds(acc_t(0));
      for (int64_t j = 0; j < vcols; j += V::size()) {
        const V dot = V::loadu(row + j), x = vs * dot;
        V w = vg * (x - vl).exp();  // softmax_weight, vectorised
        if (with_col) w = w + V::loadu(gc + j) * (x - V::loadu(lc + j)).exp();
        vds = vds + w * dot;
        w.store(row + j);
      }
      acc_t ds = at::vec::vec_reduce_all<acc_t>([](V& a, V& b) { return a + b; }, vds);
      for (int64_t j = vcols; j < cols; ++j) {
        const acc_t x = s * row[j];
        acc_t w = softmax_weight(x, l, g);
        if (with_col) w += softmax_weight(x, lc[j], gc[j]);
        ds += w * row[j];
        row[j] = w;
      }
      dsr[r] = ds;
    }
  });
}

#define HIMO_CPU_DISPATCH(dtype, fn, ...)                  \
  if ((dtype) == at::kDouble) {                           \
    fn<double>(__VA_ARGS__);                               \
  } else {                                                 \
    fn<float>(__VA_ARGS__);                                \
  }

void cpu_row_lse(const at::Tensor& dots, const at::Tensor& scale, at::Tensor& out) {
  HIMO_CPU_DISPATCH(dots.scalar_type(), cpu_row_lse_impl, dots, scale, out);
}
void cpu_col_merge(const at::Tensor& dots, const at::Tensor& scale, at::Tensor& cm,
                   at::Tensor& cs) {
  HIMO_CPU_DISPATCH(dots.scalar_type(), cpu_col_merge_impl, dots, scale, cm, cs);
}
void cpu_softmax_grad(at::Tensor& dots, const at::Tensor& scale, const at::Tensor& lse_row,
                      const at::Tensor& g_row, const at::Tensor& lse_col, const at::Tensor& g_col,
                      at::Tensor& ds_rows) {
  HIMO_CPU_DISPATCH(dots.scalar_type(), cpu_softmax_grad_impl, dots, scale, lse_row, g_row,
                    lse_col, g_col, ds_rows);
}

// ---------------------------------------------------------------- driver

const StripKernels& kernels_for(const at::Tensor& t) {
#ifdef HIMO_WITH_CUDA
  if (t.is_cuda()) return cuda_kernels();
#endif
  TORCH_CHECK_VALUE(t.is_cpu(), "himo_fast dual_lse: no kernels for device ", t.device(),
                    " in this build");
  return cpu_kernels();
}

at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// a @ bᵀ with the product in the accumulation dtype (fp32 from bf16/fp16 tensor cores).
at::Tensor mm_acc(const at::Tensor& a, const at::Tensor& b_t) {
  const at::ScalarType acc = acc_type(a);
  if (a.scalar_type() == acc) return at::mm(a, b_t);
  return at::mm(a, b_t, acc);
}

int64_t strip_rows(const at::Tensor& t, int64_t rows, int64_t cols, int64_t requested) {
  if (requested > 0) return std::min(rows, requested);
  const int64_t budget = t.is_cpu() ? kCpuStripElements : kCudaStripElements;
  return std::max<int64_t>(1, std::min(rows, budget / std::max<int64_t>(cols, 1)));
}

// Row log-sum-exps of s·R·Cᵀ and, when asked, the log-sum-exp of every column (the
// square case: the transposed matrix's rows come from the same strips).
void job_forward(const at::Tensor& R, const at::Tensor& C, const at::Tensor& scale,
                 at::Tensor lse_rows, at::Tensor* lse_cols, int64_t requested_rows) {
  const StripKernels& k = kernels_for(R);
  const int64_t B = R.size(0), N = C.size(0);
  const int64_t step = strip_rows(R, B, N, requested_rows);
  const auto acc = acc_type(R);
  at::Tensor col_max, col_sum;
  if (lse_cols != nullptr) {
    col_max = at::full({N}, -std::numeric_limits<double>::infinity(), R.options().dtype(acc));
    col_sum = at::zeros({N}, R.options().dtype(acc));
  }
  const at::Tensor Ct = C.t();
  for (int64_t r0 = 0; r0 < B; r0 += step) {
    const int64_t rn = std::min(step, B - r0);
    at::Tensor dots = mm_acc(R.narrow(0, r0, rn), Ct);
    at::Tensor out = lse_rows.narrow(0, r0, rn);
    k.row_lse(dots, scale, out);
    if (lse_cols != nullptr) k.col_merge(dots, scale, col_max, col_sum);
  }
  if (lse_cols != nullptr) *lse_cols = col_max + at::log(col_sum);
}

// Gradients of sum(g_rows * lse_rows) (+ sum(g_cols * lse_cols)) with respect to R, C and
// the scale, recomputing each strip of logits. dR is overwritten, dC accumulated into.
void job_backward(const at::Tensor& R, const at::Tensor& C, const at::Tensor& scale,
                  const at::Tensor& lse_rows, const at::Tensor& g_rows, const at::Tensor& lse_cols,
                  const at::Tensor& g_cols, at::Tensor& dR, at::Tensor& dC, at::Tensor& dscale,
                  int64_t requested_rows) {
  const StripKernels& k = kernels_for(R);
  const int64_t B = R.size(0), N = C.size(0);
  const int64_t step = strip_rows(R, B, N, requested_rows);
  const auto acc = acc_type(R);
  const bool low_precision = R.scalar_type() != acc;
  const at::Tensor Ct = C.t();
  at::Tensor ds_rows = at::empty({step}, R.options().dtype(acc));
  for (int64_t r0 = 0; r0 < B; r0 += step) {
    const int64_t rn = std::min(step, B - r0);
    const at::Tensor Rb = R.narrow(0, r0, rn);
    at::Tensor w = mm_acc(Rb, Ct);
    at::Tensor ds = ds_rows.narrow(0, 0, rn);
    k.softmax_grad(w, scale, lse_rows.narrow(0, r0, rn), g_rows.narrow(0, r0, rn), lse_cols,
                   g_cols, ds);
    dscale.add_(ds.sum());
    // Like flash-attention, the weights go back to the input precision for the
    // tensor-core products; accumulation stays in fp32.
    const at::Tensor wm = low_precision ? w.to(R.scalar_type()) : w;
    if (low_precision) {
      dR.narrow(0, r0, rn).copy_(at::mm(wm, C, acc));
      dC.add_(at::mm(wm.t(), Rb, acc));
    } else {
      at::Tensor dR_strip = dR.narrow(0, r0, rn);
      at::mm_out(dR_strip, wm, C);
      dC.addmm_(wm.t(), Rb);
    }
  }
  dR.mul_(scale);
  dC.mul_(scale);
}

// ---------------------------------------------------------------- checks

void check_features(const char* name, const at::Tensor& t, const at::Tensor& like,
                    const char* like_name, bool same_width) {
  TORCH_CHECK_VALUE(t.dim() == 2, "himo_fast dual_lse: ", name, " must be 2-D, got shape ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), "himo_fast dual_lse: ", name,
                   " has dtype ", t.scalar_type(), " but img_r has ", like.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), "himo_fast dual_lse: ", name, " is on ",
                    t.device(), " but img_r is on ", like.device());
  if (same_width) {
    TORCH_CHECK_VALUE(t.size(1) == like.size(1), "himo_fast dual_lse: ", name,
                      " has feature dim ", t.size(1), " but ", like_name, " has ", like.size(1));
  }
  TORCH_CHECK_VALUE(t.is_contiguous(), "himo_fast dual_lse: ", name, " must be contiguous");
}

// One branch of the dual InfoNCE: rows (a_r, b_r) against columns (a_c, b_c); logits are
// s·a_r·b_cᵀ and s·b_r·a_cᵀ. Square case: the columns are the rows.
struct Branch {
  at::Tensor a_r, b_r, a_c, b_c;
  bool square;
};

struct Inputs {
  Branch global, comp;
  int64_t B, N;
};

Inputs check_inputs(const at::Tensor& img_r, const at::Tensor& txt_r, const at::Tensor& cimg_r,
                    const at::Tensor& comp_r, const c10::optional<at::Tensor>& img_c,
                    const c10::optional<at::Tensor>& txt_c,
                    const c10::optional<at::Tensor>& cimg_c,
                    const c10::optional<at::Tensor>& comp_c, const at::Tensor& scale) {
  const auto dt = img_r.scalar_type();
  if (img_r.is_cpu()) {
    TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble,
                     "himo_fast dual_lse: CPU inputs must be float32 or float64, got ", dt);
  } else {
    TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                     "himo_fast dual_lse: CUDA inputs must be float32, bfloat16 or float16, got ",
                     dt);
  }
  // The component branch may live in its own width (HiDe's factorised form).
  check_features("img_r", img_r, img_r, "img_r", true);
  check_features("txt_r", txt_r, img_r, "img_r", true);
  check_features("cimg_r", cimg_r, img_r, "img_r", false);
  check_features("comp_r", comp_r, cimg_r, "cimg_r", true);
  const int64_t B = img_r.size(0);
  TORCH_CHECK_VALUE(B >= 1, "himo_fast dual_lse: empty batch");
  TORCH_CHECK_VALUE(txt_r.size(0) == B && cimg_r.size(0) == B && comp_r.size(0) == B,
                    "himo_fast dual_lse: row tensors must have the same number of rows, got ",
                    B, ", ", txt_r.size(0), ", ", cimg_r.size(0), ", ", comp_r.size(0));
  TORCH_CHECK_VALUE(scale.numel() == 1 && scale.dim() <= 1,
                    "himo_fast dual_lse: scale must be 0-d or 1 element, got shape ",
                    scale.sizes());
  TORCH_CHECK_VALUE(scale.device() == img_r.device(), "himo_fast dual_lse: scale is on ",
                    scale.device(), " but img_r is on ", img_r.device());
  TORCH_CHECK_TYPE(at::isFloatingType(scale.scalar_type()),
                   "himo_fast dual_lse: scale must be floating point, got ",
                   scale.scalar_type());
  const int given = int(img_c.has_value()) + int(txt_c.has_value()) +
                    int(cimg_c.has_value()) + int(comp_c.has_value());
  TORCH_CHECK_VALUE(given == 0 || given == 4,
                    "himo_fast dual_lse: pass all four column tensors or none (square)");
  if (given == 0) return {{img_r, txt_r, img_r, txt_r, true}, {cimg_r, comp_r, cimg_r, comp_r, true}, B, B};
  check_features("img_c", *img_c, img_r, "img_r", true);
  check_features("txt_c", *txt_c, img_r, "img_r", true);
  check_features("cimg_c", *cimg_c, cimg_r, "cimg_r", true);
  check_features("comp_c", *comp_c, cimg_r, "cimg_r", true);
  const int64_t N = img_c->size(0);
  TORCH_CHECK_VALUE(txt_c->size(0) == N && cimg_c->size(0) == N && comp_c->size(0) == N,
                    "himo_fast dual_lse: column tensors must have the same number of rows, got ",
                    N, ", ", txt_c->size(0), ", ", cimg_c->size(0), ", ", comp_c->size(0));
  TORCH_CHECK_VALUE(N >= B, "himo_fast dual_lse: ", N, " columns < ", B, " rows");
  return {{img_r, txt_r, *img_c, *txt_c, false}, {cimg_r, comp_r, *cimg_c, *comp_c, false}, B, N};
}

at::Tensor scale_acc(const at::Tensor& scale, const at::Tensor& like) {
  return scale.reshape({}).to(acc_type(like)).contiguous();
}

// Forward of one branch into two rows of the [4, B] result.
void branch_forward(const Branch& br, const at::Tensor& s, at::Tensor lse_ab, at::Tensor lse_ba,
                    int64_t strip) {
  if (br.square) {
    // One pass: the rows of s·a·bᵀ, and its columns, which are the rows of s·b·aᵀ.
    at::Tensor cols;
    job_forward(br.a_r, br.b_r, s, lse_ab, &cols, strip);
    lse_ba.copy_(cols);
  } else {
    job_forward(br.a_r, br.b_c, s, lse_ab, nullptr, strip);
    job_forward(br.b_r, br.a_c, s, lse_ba, nullptr, strip);
  }
}

// Backward of one branch: gradients of its four inputs (two when square) into out.
void branch_backward(const Branch& br, const at::Tensor& s, const at::Tensor& l_ab,
                     const at::Tensor& g_ab, const at::Tensor& l_ba, const at::Tensor& g_ba,
                     at::Tensor& dscale, std::vector<at::Tensor>& out, int64_t strip) {
  const auto opts = br.a_r.options().dtype(acc_type(br.a_r));
  auto cast = [&](const at::Tensor& t) { return t.to(br.a_r.scalar_type()); };
  const int64_t B = br.a_r.size(0), N = br.a_c.size(0);
  const int64_t da = br.a_r.size(1);
  if (br.square) {
    at::Tensor d_a = at::empty({B, da}, opts), d_b = at::zeros({B, da}, opts);
    job_backward(br.a_r, br.b_r, s, l_ab, g_ab, l_ba, g_ba, d_a, d_b, dscale, strip);
    const at::Tensor none = at::empty({0}, br.a_r.options());
    out.insert(out.end(), {cast(d_a), cast(d_b), none, none});
    return;
  }
  const at::Tensor undefined;
  at::Tensor d_a_r = at::empty({B, da}, opts), d_b_c = at::zeros({N, da}, opts);
  job_backward(br.a_r, br.b_c, s, l_ab, g_ab, undefined, undefined, d_a_r, d_b_c, dscale, strip);
  at::Tensor d_b_r = at::empty({B, da}, opts), d_a_c = at::zeros({N, da}, opts);
  job_backward(br.b_r, br.a_c, s, l_ba, g_ba, undefined, undefined, d_b_r, d_a_c, dscale, strip);
  out.insert(out.end(), {cast(d_a_r), cast(d_b_r), cast(d_a_c), cast(d_b_c)});
}

}  // namespace

const StripKernels& cpu_kernels() {
  static const StripKernels k{cpu_row_lse, cpu_col_merge, cpu_softmax_grad};
  return k;
}

at::Tensor dual_lse_impl(const at::Tensor& img_r, const at::Tensor& txt_r,
                         const at::Tensor& cimg_r, const at::Tensor& comp_r,
                         const c10::optional<at::Tensor>& img_c,
                         const c10::optional<at::Tensor>& txt_c,
                         const c10::optional<at::Tensor>& cimg_c,
                         const c10::optional<at::Tensor>& comp_c, const at::Tensor& scale,
                         int64_t strip) {
  // The strip GEMMs accumulate in fp32 whatever autocast region the loss is called from.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Inputs in = check_inputs(img_r, txt_r, cimg_r, comp_r, img_c, txt_c, cimg_c, comp_c,
                                 scale);
  const at::Tensor s = scale_acc(scale, img_r);
  at::Tensor lse = at::empty({4, in.B}, img_r.options().dtype(acc_type(img_r)));
  branch_forward(in.global, s, lse[0], lse[1], strip);
  branch_forward(in.comp, s, lse[2], lse[3], strip);
  return lse;
}

std::vector<at::Tensor> dual_lse_backward_impl(
    const at::Tensor& grad_lse, const at::Tensor& lse, const at::Tensor& img_r,
    const at::Tensor& txt_r, const at::Tensor& cimg_r, const at::Tensor& comp_r,
    const c10::optional<at::Tensor>& img_c, const c10::optional<at::Tensor>& txt_c,
    const c10::optional<at::Tensor>& cimg_c, const c10::optional<at::Tensor>& comp_c,
    const at::Tensor& scale, int64_t strip) {
  // The strip GEMMs accumulate in fp32 whatever autocast region the loss is called from.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Inputs in = check_inputs(img_r, txt_r, cimg_r, comp_r, img_c, txt_c, cimg_c, comp_c,
                                 scale);
  const auto acc = acc_type(img_r);
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef({4, in.B}) && grad_lse.sizes() == lse.sizes(),
                    "himo_fast dual_lse_backward: lse and grad_lse must have shape [4, ", in.B,
                    "], got ", lse.sizes(), " and ", grad_lse.sizes());
  const at::Tensor s = scale_acc(scale, img_r);
  const at::Tensor g = grad_lse.to(acc).contiguous(), l = lse.to(acc).contiguous();
  at::Tensor dscale = at::zeros({}, img_r.options().dtype(acc));
  // Per branch: d a_r, d b_r, d a_c, d b_c (the last two empty when square).
  std::vector<at::Tensor> grads;
  branch_backward(in.global, s, l[0], g[0], l[1], g[1], dscale, grads, strip);
  branch_backward(in.comp, s, l[2], g[2], l[3], g[3], dscale, grads, strip);
  // Order of the op's inputs: rows (img, txt, cimg, comp), columns (same), scale.
  return {grads[0], grads[1], grads[4], grads[5], grads[2], grads[3], grads[6], grads[7], dscale};
}

}  // namespace himo
