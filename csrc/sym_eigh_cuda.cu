// himo_fast::sym_eigh on CUDA: cuSOLVER's syevd with its info flag left on the device.
// torch.linalg.eigh runs the same routine but then reads the flag on the host (a sync);
// HiDe does not need it: a failed decomposition can only come from non-finite input, which
// already makes the loss NaN through the reconstruction product.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cusolverDn.h>

#include <mutex>
#include <unordered_map>

#include "sym_eigh.h"

namespace himo {
namespace {

#define HIMO_CUSOLVER_CHECK(expr)                                                     \
  do {                                                                               \
    const cusolverStatus_t status = (expr);                                          \
    TORCH_CHECK(status == CUSOLVER_STATUS_SUCCESS, "himo_fast sym_eigh: ", #expr,    \
                " failed with cuSOLVER status ", static_cast<int>(status));          \
  } while (0)

// One handle per (thread, device), bound to the current stream at each call.
cusolverDnHandle_t handle_for(int device) {
  thread_local std::unordered_map<int, cusolverDnHandle_t> handles;
  auto it = handles.find(device);
  if (it == handles.end()) {
    cusolverDnHandle_t h;
    HIMO_CUSOLVER_CHECK(cusolverDnCreate(&h));
    it = handles.emplace(device, h).first;
  }
  HIMO_CUSOLVER_CHECK(cusolverDnSetStream(it->second, c10::cuda::getCurrentCUDAStream(device)));
  return it->second;
}

template <typename T>
struct Syevd;
template <>
struct Syevd<float> {
  static constexpr auto size = cusolverDnSsyevd_bufferSize;
  static constexpr auto run = cusolverDnSsyevd;
};
template <>
struct Syevd<double> {
  static constexpr auto size = cusolverDnDsyevd_bufferSize;
  static constexpr auto run = cusolverDnDsyevd;
};

template <typename T>
void syevd(at::Tensor& a, at::Tensor& w, at::Tensor& info) {
  const int n = static_cast<int>(a.size(0));
  cusolverDnHandle_t h = handle_for(a.get_device());
  int lwork = 0;
  // Symmetric input: its row-major buffer is its column-major one.
  HIMO_CUSOLVER_CHECK(Syevd<T>::size(h, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n,
                                     a.data_ptr<T>(), n, w.data_ptr<T>(), &lwork));
  at::Tensor work = at::empty({std::max(lwork, 1)}, a.options());
  HIMO_CUSOLVER_CHECK(Syevd<T>::run(h, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n,
                                    a.data_ptr<T>(), n, w.data_ptr<T>(), work.data_ptr<T>(),
                                    lwork, info.data_ptr<int>()));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sym_eigh_cuda(const at::Tensor& a) {
  check_sym_eigh_input(a);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor vecs = a.clone(at::MemoryFormat::Contiguous);
  at::Tensor w = at::empty({a.size(0)}, a.options());
  at::Tensor info = at::zeros({}, a.options().dtype(at::kInt));
  if (a.size(0) == 0) return {w, vecs, info};
  if (a.scalar_type() == at::kDouble) {
    syevd<double>(vecs, w, info);
  } else {
    syevd<float>(vecs, w, info);
  }
  // cuSOLVER wrote the eigenvectors as columns of a column-major matrix: the row-major
  // tensor holds them as rows.
  return {w, vecs.t(), info};
}

}  // namespace himo
