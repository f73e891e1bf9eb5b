// Registration of the ops with torch.library (schemas, CPU and CUDA implementations): the
// dual InfoNCE (fake kernels and autograd in himo_fast/dual_infonce.py) and the sync-free
// symmetric eigendecomposition HiDe uses (fake kernel in himo_fast/pca.py).
#include <torch/extension.h>

#include "dual_infonce.h"
#include "sym_eigh.h"

namespace {

using T = at::Tensor;
using OptT = c10::optional<at::Tensor>;

std::tuple<T, T, T, T, T, T, T, T, T> dual_ce_backward_op(
    const T& grad_ce, const T& grad_nll, const T& nll, const T& logits, const T& img_r,
    const T& txt_r, const T& cimg_r, const T& comp_r, const OptT& img_c, const OptT& txt_c,
    const OptT& cimg_c, const OptT& comp_c, const T& scale, int64_t label_offset,
    double label_smoothing, int64_t strip_rows) {
  auto g = himo::dual_ce_backward_impl(grad_ce, grad_nll, nll, logits, img_r, txt_r, cimg_r, comp_r,
                                       img_c, txt_c, cimg_c, comp_c, scale, label_offset,
                                       label_smoothing, strip_rows);
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8]};
}

bool built_with_cuda() {
#ifdef HIMO_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(himo_fast, m) {
  m.def(
      "dual_ce(Tensor img_r, Tensor txt_r, Tensor cimg_r, Tensor comp_r, Tensor? img_c, "
      "Tensor? txt_c, Tensor? cimg_c, Tensor? comp_c, Tensor scale, int label_offset=0, "
      "float label_smoothing=0.0, int strip_rows=0) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dual_ce_backward(Tensor grad_ce, Tensor grad_nll, Tensor nll, Tensor logits, Tensor img_r, "
      "Tensor txt_r, Tensor cimg_r, Tensor comp_r, Tensor? img_c, Tensor? txt_c, "
      "Tensor? cimg_c, Tensor? comp_c, Tensor scale, int label_offset=0, "
      "float label_smoothing=0.0, int strip_rows=0) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("sym_eigh(Tensor a, str algorithm=\"syevd\") -> "
        "(Tensor eigenvalues, Tensor eigenvectors, Tensor info)");
}

TORCH_LIBRARY_IMPL(himo_fast, CPU, m) {
  m.impl("dual_ce", &himo::dual_ce_impl);
  m.impl("dual_ce_backward", &dual_ce_backward_op);
  m.impl("sym_eigh", &himo::sym_eigh_cpu);
}

#ifdef HIMO_WITH_CUDA
TORCH_LIBRARY_IMPL(himo_fast, CUDA, m) {
  m.impl("dual_ce", &himo::dual_ce_impl);
  m.impl("dual_ce_backward", &dual_ce_backward_op);
#ifdef HIMO_WITH_CUSOLVER
  m.impl("sym_eigh", &himo::sym_eigh_cuda);
#endif
}
#endif

bool built_with_cusolver() {
#ifdef HIMO_WITH_CUSOLVER
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in");
  module.def("built_with_cusolver", &built_with_cusolver,
             "True when sym_eigh has its cuSOLVER (sync-free) CUDA kernel");
}
