// The schemas of every himo_fast op and their implementations, registered per dispatch
// key: the dispatcher routes by device (fake kernels and autograd: himo_fast/ops.py).
#include <torch/extension.h>

#include "dual_infonce.h"
#include "sym_eigh.h"

namespace {

using T = at::Tensor;
using Tensors = std::vector<at::Tensor>;

// One device's entry points into the device-agnostic dual InfoNCE driver.
template <const himo::Device& (*device)()>
std::tuple<T, T, T> dual_ce(at::TensorList global_branch, at::TensorList comp_branch,
                            const T& scale, int64_t label_offset, double label_smoothing,
                            bool keep_logits, int64_t strip_rows, c10::string_view route,
                            c10::string_view col_grad) {
  return himo::dual_ce(device(), global_branch, comp_branch, scale, label_offset,
                       label_smoothing, keep_logits, strip_rows, route, col_grad);
}

template <const himo::Device& (*device)()>
std::tuple<Tensors, Tensors, T> dual_ce_backward(const T& grad_ce, const T& grad_nll,
                                                 const T& nll, const T& logits,
                                                 at::TensorList global_branch,
                                                 at::TensorList comp_branch, const T& scale,
                                                 int64_t label_offset, double label_smoothing,
                                                 int64_t strip_rows, c10::string_view route,
                                                 c10::string_view col_grad) {
  return himo::dual_ce_backward(device(), grad_ce, grad_nll, nll, logits, global_branch,
                                comp_branch, scale, label_offset, label_smoothing, strip_rows,
                                route, col_grad);
}

bool built_with_cuda() {
#ifdef HIMO_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool built_with_cusolver() {
#ifdef HIMO_WITH_CUSOLVER
  return true;
#else
  return false;
#endif
}

}  // namespace

// A branch is [a_r, b_r] (square) or [a_r, b_r, a_c, b_c] (rows against columns). route:
// "strips" or "tiles"; col_grad: "auto", "accumulate" or "recompute" (dual_infonce.h).
TORCH_LIBRARY(himo_fast, m) {
  m.def(
      "dual_ce(Tensor[] global_branch, Tensor[] comp_branch, Tensor scale, int label_offset=0, "
      "float label_smoothing=0.0, bool keep_logits=False, int strip_rows=0, "
      "str route=\"strips\", str col_grad=\"auto\") -> (Tensor ce, Tensor nll, Tensor logits)");
  m.def(
      "dual_ce_backward(Tensor grad_ce, Tensor grad_nll, Tensor nll, Tensor logits, "
      "Tensor[] global_branch, Tensor[] comp_branch, Tensor scale, int label_offset=0, "
      "float label_smoothing=0.0, int strip_rows=0, str route=\"strips\", "
      "str col_grad=\"auto\") -> "
      "(Tensor[] global_grads, Tensor[] comp_grads, Tensor scale_grad)");
  m.def("sym_eigh(Tensor a, str algorithm=\"syevd\") -> "
        "(Tensor eigenvalues, Tensor eigenvectors, Tensor info)");
}

TORCH_LIBRARY_IMPL(himo_fast, CPU, m) {
  m.impl("dual_ce", &dual_ce<himo::cpu_device>);
  m.impl("dual_ce_backward", &dual_ce_backward<himo::cpu_device>);
  m.impl("sym_eigh", &himo::sym_eigh_cpu);
}

#ifdef HIMO_WITH_CUDA
TORCH_LIBRARY_IMPL(himo_fast, CUDA, m) {
  m.impl("dual_ce", &dual_ce<himo::cuda_device>);
  m.impl("dual_ce_backward", &dual_ce_backward<himo::cuda_device>);
#ifdef HIMO_WITH_CUSOLVER
  m.impl("sym_eigh", &himo::sym_eigh_cuda);
#endif
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in");
  module.def("built_with_cusolver", &built_with_cusolver,
             "True when sym_eigh has its cuSOLVER (sync-free) CUDA kernel");
}
