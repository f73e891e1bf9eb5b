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

#include "logit_tile.h"

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

// A side's statistics as the tile epilogue reads them (absent: all null).
template <typename acc_t>
tiles::SideView<acc_t> side_view(const Side& side) {
  if (!side.nll.defined()) return {};
  return {side.nll.data_ptr<acc_t>(), side.ref.data_ptr<acc_t>(), side.gp.data_ptr<acc_t>(),
          side.c_off.data_ptr<acc_t>(), side.c_label.data_ptr<acc_t>()};
}

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

// The fused route ("tiles", logit_tile.h): the logits exist only tile by tile, in shared
// memory (CUDA) or a tile buffer (the CPU twin), never as a strip in memory. Row r of R
// has its label at column label_col0 + r, whose logit is taken as ref[r] (rows.ref in the
// backward), the same value everywhere.
struct TileKernels {
  // nll[r] = logsumexp_j(x_rj) - ref[r] of x = s·R·Cᵀ; with col_max defined (the square
  // case), each column's (max, sum of exp) over these rows merged into col_max, col_sum.
  void (*lse)(const at::Tensor& R, const at::Tensor& C, const at::Tensor& scale,
              const at::Tensor& ref, int64_t label_col0, at::Tensor& nll, at::Tensor& col_max,
              at::Tensor& col_sum);
  // StripKernels::ce_grad's weights, written to w ([rows of R, columns of C], R's dtype)
  // from recomputed tiles, with ds_rows[r] = Σ_j W·dot.
  void (*weights)(const at::Tensor& R, const at::Tensor& C, const at::Tensor& scale,
                  const Side& rows, const Side& cols, int64_t label_col0, at::Tensor& w,
                  at::Tensor& ds_rows);
  // Rows per lse call at most (their column partials: 2 x lse_rows / kM x N; the driver
  // takes fewer where that passes 2 x strip_elements).
  int64_t lse_rows;
  bool (*accepts)(at::ScalarType features);
  const char* dtypes;  // what it accepts, for the error message
};

// What differs between devices; everything else in the driver is device-agnostic. Each
// device's op entry points (registered per dispatch key in ops.cpp) pass theirs.
struct Device {
  StripKernels strips;
  TileKernels tiles;
  int64_t strip_elements;  // bound on one strip of logits (rows x columns)
  // col_grad "auto": a square branch's columns' gradient is recomputed (below) when a strip
  // has fewer rows than this (0: never).
  int64_t recompute_below_rows;
  const char* name;
  bool (*accepts)(at::ScalarType features, at::ScalarType acc);  // input dtypes
  const char* dtypes;  // what it accepts, for the error message
};

// The op's arguments: each branch is [a_r, b_r] (square: the columns are the rows) or
// [a_r, b_r, a_c, b_c]: rows against columns, logits s·a_r·b_cᵀ and s·b_r·a_cᵀ. Two
// branches: global (img, txt) and component (cimg, comp), the latter of its own width
// (HiDe's factorised form: cimg = [img·V_m, img·ū], comp = [X̂·V_m, 1]). Row i's label is
// column i + label_offset. The accumulation dtype is the scale's (the caller's rule:
// himo_fast.pca.compute_dtype); inputs may be narrower where the device accepts it.
// comp_branch may also be given by its b side alone, [b_r] (square) or [b_r, b_c], when
// its a side is the global branch's (HiDe's materialized u': the image is both branches'
// a); the backward then adds that side's gradient into the global branch's, in place,
// instead of returning a second gradient of the same tensor for autograd to sum.
// Returns (ce, nll, logits); ce and nll [4, B] (global a→b, b→a, component a→b, b→a):
// the label-smoothed cross entropy of each row and the plain one, lse - label logit
// (saved for the backward). logits: with keep_logits, the unscaled dot products of every
// GEMM of the forward, [2 or 4, B, N], for the backward to skip its recompute; else
// empty. strip_rows > 0 forces the rows per block (tests): the strips, the tiles route's lse
// calls and the label dot products; 0 picks each from its device or memory bound.
// route: "strips" (GEMM strips of logits, then the StripKernels) or "tiles" (TileKernels;
// keeps no logits). col_grad, for the backward (the forward checks it): how a square
// branch's columns' gradient dB = s·Wᵀ·A is formed. "accumulate": from the row strips of
// W, into an [N, width] accumulator in the accumulation dtype (one pass; per strip that
// accumulator is read and written once: N³·width·8 / strip_elements bytes in all, cubic
// in N). "recompute": as the rows' gradient of the transposed matrix s·B·Aᵀ, whose
// weights are Wᵀ (the two sides swapped), in a second pass of strips: no accumulator,
// written once in the inputs' dtype, for one more logits GEMM and weights pass. Columns
// (rectangular branches) always accumulate: a transposed strip's rows may hold no label.
// "auto": the device's rule (Device::recompute_below_rows).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_ce(
    const Device& device, at::TensorList global_branch, at::TensorList comp_branch,
    const at::Tensor& scale, int64_t label_offset, double label_smoothing, bool keep_logits,
    int64_t strip_rows, c10::string_view route, c10::string_view col_grad);

// Gradients of each branch's tensors (same order, same count) and of the scale; a comp
// branch given by its b side gets b's, its a's being summed into the global branch's.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> dual_ce_backward(
    const Device& device, const at::Tensor& grad_ce, const at::Tensor& grad_nll,
    const at::Tensor& nll, const at::Tensor& logits, at::TensorList global_branch,
    at::TensorList comp_branch, const at::Tensor& scale, int64_t label_offset,
    double label_smoothing, int64_t strip_rows, c10::string_view route,
    c10::string_view col_grad);

// The devices (dual_infonce.cpp, dual_infonce_cuda.cu) and their tile kernels
// (dual_infonce_tiles.cpp, the CPU twin; dual_infonce_tiles_cuda.cu).
const Device& cpu_device();
TileKernels cpu_tile_kernels();
#ifdef HIMO_WITH_CUDA
const Device& cuda_device();
TileKernels cuda_tile_kernels();
#endif

}  // namespace himo
