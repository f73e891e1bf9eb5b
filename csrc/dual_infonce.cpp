// Device-agnostic strip driver of the dual InfoNCE, its input checks, and the CPU
// elementwise kernels (the `cpu` backend, and what CI runs).
#include "dual_infonce.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "tile_math.h"

namespace himo {
namespace {

// Elements of one strip of logits: bounds the workspace whatever N is (4 MiB in fp32 on
// the CPU; 128 MiB on a GPU, where launches over a too-thin strip would starve the chip).
constexpr int64_t kCpuStripElements = int64_t(1) << 20;
constexpr int64_t kCudaStripElements = int64_t(1) << 25;

// ---------------------------------------------------------------- CPU kernels

template <typename acc_t>
void cpu_row_lse_impl(const at::Tensor& dots, const at::Tensor& scale, at::Tensor& out) {
  const int64_t rows = dots.size(0), len = dots.size(1);
  const acc_t s = scale.item<acc_t>();
  const acc_t* d = dots.data_ptr<acc_t>();
  acc_t* o = out.data_ptr<acc_t>();
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      LseState<acc_t> st = lse_empty<acc_t>();
      const acc_t* row = d + r * len;
      for (int64_t j = 0; j < len; ++j) st = lse_push(st, s * row[j]);
      o[r] = lse_value(st);
    }
  });
}

template <typename acc_t>
void cpu_col_merge_impl(const at::Tensor& dots, const at::Tensor& scale, at::Tensor& col_max,
                        at::Tensor& col_sum) {
  const int64_t rows = dots.size(0), cols = dots.size(1);
  const acc_t s = scale.item<acc_t>();
  const acc_t* d = dots.data_ptr<acc_t>();
  acc_t* cm = col_max.data_ptr<acc_t>();
  acc_t* cs = col_sum.data_ptr<acc_t>();
  at::parallel_for(0, cols, 256, [&](int64_t c0, int64_t c1) {
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t* row = d + r * cols;
      for (int64_t j = c0; j < c1; ++j) {
        LseState<acc_t> st = lse_push(LseState<acc_t>{cm[j], cs[j]}, s * row[j]);
        cm[j] = st.max;
        cs[j] = st.sum;
      }
    }
  });
}

template <typename acc_t>
void cpu_softmax_grad_impl(at::Tensor& dots, int64_t seg_len, const at::Tensor& scale,
                           const at::Tensor& lse_row, const at::Tensor& g_row,
                           const at::Tensor& lse_col, const at::Tensor& g_col,
                           at::Tensor& ds_rows) {
  const int64_t rows = dots.size(0), cols = dots.size(1), nseg = cols / seg_len;
  const acc_t s = scale.item<acc_t>();
  acc_t* d = dots.data_ptr<acc_t>();
  const acc_t* lr = lse_row.data_ptr<acc_t>();
  const acc_t* gr = g_row.data_ptr<acc_t>();
  const bool with_col = lse_col.defined();
  const acc_t* lc = with_col ? lse_col.data_ptr<acc_t>() : nullptr;
  const acc_t* gc = with_col ? g_col.data_ptr<acc_t>() : nullptr;
  acc_t* dsr = ds_rows.data_ptr<acc_t>();
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      acc_t ds = 0;
      acc_t* row = d + r * cols;
      for (int64_t seg = 0; seg < nseg; ++seg) {
        const acc_t l = lr[r * nseg + seg], g = gr[r * nseg + seg];
        for (int64_t j = seg * seg_len; j < (seg + 1) * seg_len; ++j) {
          const acc_t x = s * row[j];
          acc_t w = softmax_weight(x, l, g);
          if (with_col) w += softmax_weight(x, lc[j], gc[j]);
          ds += w * row[j];
          row[j] = w;
        }
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
void cpu_softmax_grad(at::Tensor& dots, int64_t seg_len, const at::Tensor& scale,
                      const at::Tensor& lse_row, const at::Tensor& g_row,
                      const at::Tensor& lse_col, const at::Tensor& g_col, at::Tensor& ds_rows) {
  HIMO_CPU_DISPATCH(dots.scalar_type(), cpu_softmax_grad_impl, dots, seg_len, scale, lse_row,
                    g_row, lse_col, g_col, ds_rows);
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

// Row log-sum-exps of s·R·Cᵀ, C made of `nseg` column segments (one lse per row and
// segment, row-major), and optionally the log-sum-exp of every column.
void job_forward(const at::Tensor& R, const at::Tensor& C, int64_t nseg, const at::Tensor& scale,
                 at::Tensor& lse_rows, at::Tensor* lse_cols, int64_t requested_rows) {
  const StripKernels& k = kernels_for(R);
  const int64_t B = R.size(0), N = C.size(0), seg_len = N / nseg;
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
    at::Tensor out = lse_rows.narrow(0, r0 * nseg, rn * nseg);
    k.row_lse(dots.view({rn * nseg, seg_len}), scale, out);
    if (lse_cols != nullptr) k.col_merge(dots, scale, col_max, col_sum);
  }
  if (lse_cols != nullptr) *lse_cols = col_max + at::log(col_sum);
}

// Gradients of sum(g_rows * lse_rows) (+ sum(g_cols * lse_cols)) with respect to R, C and
// the scale, recomputing each strip of logits.
void job_backward(const at::Tensor& R, const at::Tensor& C, int64_t nseg, const at::Tensor& scale,
                  const at::Tensor& lse_rows, const at::Tensor& g_rows, const at::Tensor& lse_cols,
                  const at::Tensor& g_cols, at::Tensor& dR, at::Tensor& dC, at::Tensor& dscale,
                  int64_t requested_rows) {
  const StripKernels& k = kernels_for(R);
  const int64_t B = R.size(0), N = C.size(0), seg_len = N / nseg;
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
    k.softmax_grad(w, seg_len, scale, lse_rows.narrow(0, r0 * nseg, rn * nseg),
                   g_rows.narrow(0, r0 * nseg, rn * nseg), lse_cols, g_cols, ds);
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

void check_features(const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 2, "himo_fast dual_lse: ", name, " must be 2-D, got shape ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), "himo_fast dual_lse: ", name,
                   " has dtype ", t.scalar_type(), " but img_r has ", like.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), "himo_fast dual_lse: ", name, " is on ",
                    t.device(), " but img_r is on ", like.device());
  TORCH_CHECK_VALUE(t.size(1) == like.size(1), "himo_fast dual_lse: ", name,
                    " has feature dim ", t.size(1), " but img_r has ", like.size(1));
  TORCH_CHECK_VALUE(t.is_contiguous(), "himo_fast dual_lse: ", name, " must be contiguous");
}

struct Inputs {
  bool square;
  int64_t B, N;
};

Inputs check_inputs(const at::Tensor& img_r, const at::Tensor& txt_r, const at::Tensor& comp_r,
                    const c10::optional<at::Tensor>& img_c,
                    const c10::optional<at::Tensor>& txt_c,
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
  check_features("img_r", img_r, img_r);
  check_features("txt_r", txt_r, img_r);
  check_features("comp_r", comp_r, img_r);
  const int64_t B = img_r.size(0);
  TORCH_CHECK_VALUE(B >= 1, "himo_fast dual_lse: empty batch");
  TORCH_CHECK_VALUE(txt_r.size(0) == B && comp_r.size(0) == B,
                    "himo_fast dual_lse: row tensors must have the same number of rows, got ",
                    B, ", ", txt_r.size(0), ", ", comp_r.size(0));
  TORCH_CHECK_VALUE(scale.numel() == 1 && scale.dim() <= 1,
                    "himo_fast dual_lse: scale must be 0-d or 1 element, got shape ",
                    scale.sizes());
  TORCH_CHECK_VALUE(scale.device() == img_r.device(), "himo_fast dual_lse: scale is on ",
                    scale.device(), " but img_r is on ", img_r.device());
  TORCH_CHECK_TYPE(at::isFloatingType(scale.scalar_type()),
                   "himo_fast dual_lse: scale must be floating point, got ",
                   scale.scalar_type());
  const int given = int(img_c.has_value()) + int(txt_c.has_value()) + int(comp_c.has_value());
  TORCH_CHECK_VALUE(given == 0 || given == 3,
                    "himo_fast dual_lse: pass all three column tensors or none (square)");
  if (given == 0) return {true, B, B};
  check_features("img_c", *img_c, img_r);
  check_features("txt_c", *txt_c, img_r);
  check_features("comp_c", *comp_c, img_r);
  const int64_t N = img_c->size(0);
  TORCH_CHECK_VALUE(txt_c->size(0) == N && comp_c->size(0) == N,
                    "himo_fast dual_lse: column tensors must have the same number of rows, got ",
                    N, ", ", txt_c->size(0), ", ", comp_c->size(0));
  TORCH_CHECK_VALUE(N >= B, "himo_fast dual_lse: ", N, " columns < ", B, " rows");
  return {false, B, N};
}

at::Tensor scale_acc(const at::Tensor& scale, const at::Tensor& like) {
  return scale.reshape({}).to(acc_type(like)).contiguous();
}

}  // namespace

const StripKernels& cpu_kernels() {
  static const StripKernels k{cpu_row_lse, cpu_col_merge, cpu_softmax_grad};
  return k;
}

at::Tensor dual_lse_impl(const at::Tensor& img_r, const at::Tensor& txt_r,
                         const at::Tensor& comp_r, const c10::optional<at::Tensor>& img_c,
                         const c10::optional<at::Tensor>& txt_c,
                         const c10::optional<at::Tensor>& comp_c, const at::Tensor& scale,
                         int64_t strip) {
  const Inputs in = check_inputs(img_r, txt_r, comp_r, img_c, txt_c, comp_c, scale);
  const at::Tensor s = scale_acc(scale, img_r);
  const auto opts = img_r.options().dtype(acc_type(img_r));
  at::Tensor lse = at::empty({4, in.B}, opts);
  if (in.square) {
    // One pass: rows give matrices 0 and 2, columns give their transposes 1 and 3.
    at::Tensor rows = at::empty({in.B * 2}, opts), cols;
    job_forward(img_r, at::cat({txt_r, comp_r}), 2, s, rows, &cols, strip);
    const at::Tensor r2 = rows.view({in.B, 2});
    lse[0].copy_(r2.select(1, 0));
    lse[2].copy_(r2.select(1, 1));
    lse[1].copy_(cols.narrow(0, 0, in.B));
    lse[3].copy_(cols.narrow(0, in.B, in.B));
  } else {
    at::Tensor rows_img = at::empty({in.B * 2}, opts);
    job_forward(img_r, at::cat({*txt_c, *comp_c}), 2, s, rows_img, nullptr, strip);
    const at::Tensor r2 = rows_img.view({in.B, 2});
    lse[0].copy_(r2.select(1, 0));
    lse[2].copy_(r2.select(1, 1));
    at::Tensor rows_txt = at::empty({in.B * 2}, opts);
    job_forward(at::cat({txt_r, comp_r}), *img_c, 1, s, rows_txt, nullptr, strip);
    lse[1].copy_(rows_txt.narrow(0, 0, in.B));
    lse[3].copy_(rows_txt.narrow(0, in.B, in.B));
  }
  return lse;
}

std::vector<at::Tensor> dual_lse_backward_impl(
    const at::Tensor& grad_lse, const at::Tensor& lse, const at::Tensor& img_r,
    const at::Tensor& txt_r, const at::Tensor& comp_r, const c10::optional<at::Tensor>& img_c,
    const c10::optional<at::Tensor>& txt_c, const c10::optional<at::Tensor>& comp_c,
    const at::Tensor& scale, int64_t strip) {
  const Inputs in = check_inputs(img_r, txt_r, comp_r, img_c, txt_c, comp_c, scale);
  const auto acc = acc_type(img_r);
  const auto opts = img_r.options().dtype(acc);
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef({4, in.B}) && grad_lse.sizes() == lse.sizes(),
                    "himo_fast dual_lse_backward: lse and grad_lse must have shape [4, ", in.B,
                    "], got ", lse.sizes(), " and ", grad_lse.sizes());
  const at::Tensor s = scale_acc(scale, img_r);
  const at::Tensor g = grad_lse.to(acc).contiguous(), l = lse.to(acc).contiguous();
  at::Tensor dscale = at::zeros({}, opts);
  const int64_t d = img_r.size(1);
  auto cast = [&](const at::Tensor& t) { return t.to(img_r.scalar_type()); };
  // Row statistics of the image rows: (row, segment) interleaved as job_forward wrote them.
  const at::Tensor lse_img = at::stack({l[0], l[2]}, 1).reshape({-1});
  const at::Tensor g_img = at::stack({g[0], g[2]}, 1).reshape({-1});
  if (in.square) {
    at::Tensor d_img = at::empty({in.B, d}, opts), d_cols = at::zeros({2 * in.B, d}, opts);
    job_backward(img_r, at::cat({txt_r, comp_r}), 2, s, lse_img, g_img, at::cat({l[1], l[3]}),
                 at::cat({g[1], g[3]}), d_img, d_cols, dscale, strip);
    const at::Tensor none = at::empty({0}, img_r.options());
    return {cast(d_img), cast(d_cols.narrow(0, 0, in.B)), cast(d_cols.narrow(0, in.B, in.B)),
            none, none, none, dscale};
  }
  at::Tensor d_img_r = at::empty({in.B, d}, opts), d_cols = at::zeros({2 * in.N, d}, opts);
  const at::Tensor undefined;
  job_backward(img_r, at::cat({*txt_c, *comp_c}), 2, s, lse_img, g_img, undefined, undefined,
               d_img_r, d_cols, dscale, strip);
  at::Tensor d_rows = at::empty({2 * in.B, d}, opts), d_img_c = at::zeros({in.N, d}, opts);
  job_backward(at::cat({txt_r, comp_r}), *img_c, 1, s, at::cat({l[1], l[3]}),
               at::cat({g[1], g[3]}), undefined, undefined, d_rows, d_img_c, dscale, strip);
  return {cast(d_img_r), cast(d_rows.narrow(0, 0, in.B)), cast(d_rows.narrow(0, in.B, in.B)),
          cast(d_img_c), cast(d_cols.narrow(0, 0, in.N)), cast(d_cols.narrow(0, in.N, in.N)),
          dscale};
}

}  // namespace himo
