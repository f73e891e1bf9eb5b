// himo_fast::sym_eigh(a) -> (eigenvalues ascending, eigenvectors as columns, info): the
// symmetric eigendecomposition without a host synchronisation. info (0-d int32, on a's
// device) is 0 on success, as LAPACK/cuSOLVER report it; nothing reads it on the host.
#pragma once

#include <ATen/ATen.h>

namespace himo {

inline void check_sym_eigh_input(const at::Tensor& a) {
  TORCH_CHECK_VALUE(a.dim() == 2 && a.size(0) == a.size(1),
                    "himo_fast sym_eigh: a must be a square matrix, got shape ", a.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
                   "himo_fast sym_eigh: a must be float32 or float64, got ", a.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sym_eigh_cpu(const at::Tensor& a);
#ifdef HIMO_WITH_CUSOLVER
std::tuple<at::Tensor, at::Tensor, at::Tensor> sym_eigh_cuda(const at::Tensor& a);
#endif

}  // namespace himo
