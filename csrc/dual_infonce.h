// The fused symmetric dual InfoNCE: per-row cross entropies of the four logit matrices
//   0: s·img_r·txt_cᵀ   1: s·txt_r·img_cᵀ   2: s·cimg_r·comp_cᵀ   3: s·comp_r·cimg_cᵀ
// and their backward, without storing an N x N matrix beyond a small constant. Rows are
// processed in strips of a bounded number of rows; each strip is one GEMM, followed by
// fused elementwise kernels (online log-sum-exp forward, cross-entropy gradient backward). In the square
// single-rank case the column log-sum-exps (matrices 1 and 3 are the transposes of 0 and
// 2) come from the same strips, merged online across strips.
//
// The strip loop below is device-agnostic (ATen GEMMs: MKL/OpenBLAS on CPU, cuBLAS on
// CUDA); only the elementwise kernels differ, and both use tile_math.h.
#pragma once

#include <ATen/ATen.h>

namespace himo {

// Per-row (or per-column) data of the backward of one logit matrix: the saved
// nll = lse - ref, the reference (label) logit ref, the weight gp of the softmax and the
// weights of the targets, c_label at the label and c_off elsewhere. An undefined nll marks
// an absent side.
struct Side {
  at::Tensor nll, ref, gp, c_off, c_label;
  Side narrow(int64_t start, int64_t length) const {
    return {nll.narrow(0, start, length), ref.narrow(0, start, length),
            gp.narrow(0, start, length), c_off.narrow(0, start, length),
            c_label.narrow(0, start, length)};
  }
};

struct StripKernels {
  // out[r] = logsumexp_j(scale * dots[r, j]) - ref[r] for each row of `dots` (rows x len).
  void (*row_nll)(const at::Tensor& dots, const at::Tensor& scale, const at::Tensor& ref,
                  at::Tensor& out);
  // Merge the column log-sum-exp of this strip into the running (col_max, col_sum).
  void (*col_merge)(const at::Tensor& dots, const at::Tensor& scale, at::Tensor& col_max,
                    at::Tensor& col_sum);
  // In place: dots[r, j] <- ce_weight (tile_math.h) of the row side, plus that of the
  // column side when cols.nll is defined (square case); the label of strip row r is column
  // label_col0 + r (and, square, the label row of that column). ds_rows[r] = sum_j w * dot.
  void (*ce_grad)(at::Tensor& dots, const at::Tensor& scale, const Side& rows,
                  const Side& cols, int64_t label_col0, at::Tensor& ds_rows);
};

const StripKernels& cpu_kernels();
#ifdef HIMO_WITH_CUDA
const StripKernels& cuda_kernels();
#endif

// Ops (registered in ops.cpp). Two branches, each a pair of feature sets: global
// (img, txt) and component (cimg, comp); the component pair may have its own width (HiDe's
// factorised form: cimg = [img·V_m, img·ū], comp = [X̂·V_m, 1]). Columns omitted: the
// square single-rank case, columns = rows. Row i's label is column i + label_offset.
// Returns (ce, nll, logits); ce and nll [4, B]: the label-smoothed cross entropy of each
// row of the four logit matrices, and the plain one, lse - label logit (saved for the
// backward). logits: the unscaled dot products of every GEMM of the forward, [2 or 4, B, N],
// when they fit a small constant bound on the CPU (saved for the backward, which then
// skips its recompute), else empty. strip_rows > 0 forces the strip height (tests); 0
// picks it from a memory bound.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_ce_impl(
    const at::Tensor& img_r, const at::Tensor& txt_r, const at::Tensor& cimg_r,
    const at::Tensor& comp_r, const c10::optional<at::Tensor>& img_c,
    const c10::optional<at::Tensor>& txt_c, const c10::optional<at::Tensor>& cimg_c,
    const c10::optional<at::Tensor>& comp_c, const at::Tensor& scale, int64_t label_offset,
    double label_smoothing, int64_t strip_rows);

// Gradients in the order of the op's inputs: 8 features (empty for omitted columns), scale.
std::vector<at::Tensor> dual_ce_backward_impl(
    const at::Tensor& grad_ce, const at::Tensor& grad_nll, const at::Tensor& nll,
    const at::Tensor& logits, const at::Tensor& img_r, const at::Tensor& txt_r,
    const at::Tensor& cimg_r, const at::Tensor& comp_r, const c10::optional<at::Tensor>& img_c,
    const c10::optional<at::Tensor>& txt_c, const c10::optional<at::Tensor>& cimg_c,
    const c10::optional<at::Tensor>& comp_c, const at::Tensor& scale, int64_t label_offset,
    double label_smoothing, int64_t strip_rows);

}  // namespace himo
