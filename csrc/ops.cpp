// Registration of the dual InfoNCE ops with torch.library (schemas, CPU and CUDA
// implementations). Fake kernels and autograd live in himo_fast/ops.py.
#include <torch/extension.h>

#include "dual_infonce.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dual_lse_backward_op(const at::Tensor& grad_lse, const at::Tensor& lse, const at::Tensor& img_r,
                     const at::Tensor& txt_r, const at::Tensor& comp_r,
                     const c10::optional<at::Tensor>& img_c,
                     const c10::optional<at::Tensor>& txt_c,
                     const c10::optional<at::Tensor>& comp_c, const at::Tensor& scale,
                     int64_t strip_rows) {
  auto g = himo::dual_lse_backward_impl(grad_lse, lse, img_r, txt_r, comp_r, img_c, txt_c,
                                        comp_c, scale, strip_rows);
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[6]};
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
      "dual_lse(Tensor img_r, Tensor txt_r, Tensor comp_r, Tensor? img_c, Tensor? txt_c, "
      "Tensor? comp_c, Tensor scale, int strip_rows=0) -> Tensor");
  m.def(
      "dual_lse_backward(Tensor grad_lse, Tensor lse, Tensor img_r, Tensor txt_r, "
      "Tensor comp_r, Tensor? img_c, Tensor? txt_c, Tensor? comp_c, Tensor scale, "
      "int strip_rows=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(himo_fast, CPU, m) {
  m.impl("dual_lse", &himo::dual_lse_impl);
  m.impl("dual_lse_backward", &dual_lse_backward_op);
}

#ifdef HIMO_WITH_CUDA
TORCH_LIBRARY_IMPL(himo_fast, CUDA, m) {
  m.impl("dual_lse", &himo::dual_lse_impl);
  m.impl("dual_lse_backward", &dual_lse_backward_op);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in");
}
