// The fused symmetric dual InfoNCE: per-row log-sum-exps of the four logit matrices
//   0: s·img_r·txt_cᵀ   1: s·txt_r·img_cᵀ   2: s·cimg_r·comp_cᵀ   3: s·comp_r·cimg_cᵀ
// and their backward, without ever storing an N x N matrix. Rows are processed in strips
// of a bounded number of rows; each strip is one GEMM, followed by fused elementwise
// kernels (online log-sum-exp forward, softmax gradient backward). In the square
// single-rank case the column log-sum-exps (matrices 1 and 3 are the transposes of 0 and
// 2) come from the same strips, merged online across strips.
//
// The strip loop below is device-agnostic (ATen GEMMs: MKL/OpenBLAS on CPU, cuBLAS on
// CUDA); only the elementwise kernels differ, and both use tile_math.h.
#pragma once

#include <ATen/ATen.h>

namespace himo {

struct StripKernels {
  // out[r] = logsumexp_j(scale * dots[r, j]) for each row of `dots` (rows x len).
  void (*row_lse)(const at::Tensor& dots, const at::Tensor& scale, at::Tensor& out);
  // Merge the column log-sum-exp of this strip into the running (col_max, col_sum).
  void (*col_merge)(const at::Tensor& dots, const at::Tensor& scale, at::Tensor& col_max,
                    at::Tensor& col_sum);
  // In place: dots[r, j] <- g_row[r] softmax_row + g_col[j] softmax_col (the latter only
  // when lse_col is defined); ds_rows[r] = sum_j weight * dot.
  void (*softmax_grad)(at::Tensor& dots, const at::Tensor& scale,
                       const at::Tensor& lse_row, const at::Tensor& g_row,
                       const at::Tensor& lse_col, const at::Tensor& g_col, at::Tensor& ds_rows);
};

const StripKernels& cpu_kernels();
#ifdef HIMO_WITH_CUDA
const StripKernels& cuda_kernels();
#endif

// Ops (registered in ops.cpp). Two branches, each a pair of feature sets: global
// (img, txt) and component (cimg, comp); the component pair may have its own width (HiDe's
// factorised form: cimg = [img·V_m, img·ū], comp = [X̂·V_m, 1]). Columns omitted: the
// square single-rank case, columns = rows. strip_rows > 0 forces the strip height (tests);
// 0 picks it from a memory bound.
at::Tensor dual_lse_impl(const at::Tensor& img_r, const at::Tensor& txt_r,
                         const at::Tensor& cimg_r, const at::Tensor& comp_r,
                         const c10::optional<at::Tensor>& img_c,
                         const c10::optional<at::Tensor>& txt_c,
                         const c10::optional<at::Tensor>& cimg_c,
                         const c10::optional<at::Tensor>& comp_c, const at::Tensor& scale,
                         int64_t strip_rows);

// Gradients in the order of the op's inputs: 8 features (empty for omitted columns), scale.
std::vector<at::Tensor> dual_lse_backward_impl(
    const at::Tensor& grad_lse, const at::Tensor& lse, const at::Tensor& img_r,
    const at::Tensor& txt_r, const at::Tensor& cimg_r, const at::Tensor& comp_r,
    const c10::optional<at::Tensor>& img_c, const c10::optional<at::Tensor>& txt_c,
    const c10::optional<at::Tensor>& cimg_c, const c10::optional<at::Tensor>& comp_c,
    const at::Tensor& scale, int64_t strip_rows);

}  // namespace himo
