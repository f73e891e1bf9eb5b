// himo_fast::sym_eigh(a, algorithm) -> (eigenvalues ascending, eigenvectors as columns, info):
// the symmetric eigendecomposition without a host read of its status. info (0-d int32, on
// a's device) is 0 on success, as LAPACK/cuSOLVER report it; nothing reads it on the host.
// algorithm picks cuSOLVER's routine on CUDA: "syevd" (divide and conquer, what
// torch.linalg.eigh runs) or "syev_batched" (cusolverDnXsyevBatched, batch of one). Which
// can be captured in a CUDA graph, and how fast each is, is what benchmarks/eigh_probe.py
// measures; the CPU twin is LAPACK whatever the algorithm.
#pragma once

#include <ATen/ATen.h>

namespace himo {

inline void check_sym_eigh_input(const at::Tensor& a, c10::string_view algorithm) {
  TORCH_CHECK_VALUE(algorithm == "syevd" || algorithm == "syev_batched",
                    "himo_fast sym_eigh: algorithm must be 'syevd' or 'syev_batched', got '",
                    algorithm, "'");
  TORCH_CHECK_VALUE(a.dim() == 2 && a.size(0) == a.size(1),
                    "himo_fast sym_eigh: a must be a square matrix, got shape ", a.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
                   "himo_fast sym_eigh: a must be float32 or float64, got ", a.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sym_eigh_cpu(const at::Tensor& a,
                                                            c10::string_view algorithm);
#ifdef HIMO_WITH_CUSOLVER
std::tuple<at::Tensor, at::Tensor, at::Tensor> sym_eigh_cuda(const at::Tensor& a,
                                                             c10::string_view algorithm);
#endif

}  // namespace himo
