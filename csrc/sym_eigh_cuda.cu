// himo_fast::sym_eigh on CUDA: cuSOLVER's syevd (or XsyevBatched) with its info flag left on
// the device. torch.linalg.eigh runs syevd but then reads the flag on the host (a sync);
// HiDe does not need it: a failed decomposition can only come from non-finite input, which
// already makes the loss NaN through the reconstruction product. syevd passed torch's
// sync-debug mode on an H100 but cannot be captured in a CUDA graph; XsyevBatched captured
// up to n = 512 and not at 768 (benchmarks/eigh_probe.py; capture uses kernels/eigh.py).
// syevj was measured too and dropped: slower (29 ms at 768), 3e-4 eigenvalue error with its
// default parameters, not capturable.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cusolverDn.h>

#include <type_traits>
#include <unordered_map>
#include <vector>

#include "sym_eigh.h"

namespace himo {
namespace {

template <typename... What>
void check(cusolverStatus_t status, const What&... what) {
  TORCH_CHECK(status == CUSOLVER_STATUS_SUCCESS, "himo_fast sym_eigh: ", what...,
              " failed with cuSOLVER status ", static_cast<int>(status));
}

// One handle per (thread, device), bound to the current stream at each call.
cusolverDnHandle_t handle_for(int device) {
  thread_local std::unordered_map<int, cusolverDnHandle_t> handles;
  auto it = handles.find(device);
  if (it == handles.end()) {
    cusolverDnHandle_t h;
    check(cusolverDnCreate(&h), "cusolverDnCreate");
    it = handles.emplace(device, h).first;
  }
  check(cusolverDnSetStream(it->second, c10::cuda::getCurrentCUDAStream(device)),
        "cusolverDnSetStream");
  return it->second;
}

// cuSOLVER's syevd per precision (S: float, D: double).
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

// syevd: workspace query, workspace, decomposition.
template <typename T>
void syevd(at::Tensor& a, at::Tensor& w, at::Tensor& info) {
  const int n = static_cast<int>(a.size(0));
  cusolverDnHandle_t h = handle_for(a.get_device());
  int lwork = 0;
  // Symmetric input: its row-major buffer is its column-major one.
  check(Syevd<T>::size(h, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n,
                                a.data_ptr<T>(), n, w.data_ptr<T>(), &lwork),
        "syevd_bufferSize");
  at::Tensor work = at::empty({std::max(lwork, 1)}, a.options());
  check(Syevd<T>::run(h, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n,
                           a.data_ptr<T>(), n, w.data_ptr<T>(), work.data_ptr<T>(), lwork,
                           info.data_ptr<int>()),
        "syevd");
}

// cusolverDnXsyevBatched with a batch of one. Its parameters and host workspace are kept per
// thread: the routine may still use them after the call returns.
template <typename T>
void syev_batched(at::Tensor& a, at::Tensor& w, at::Tensor& info) {
  const int64_t n = a.size(0);
  cusolverDnHandle_t h = handle_for(a.get_device());
  thread_local cusolverDnParams_t params = [] {
    cusolverDnParams_t p;
    check(cusolverDnCreateParams(&p), "cusolverDnCreateParams");
    return p;
  }();
  thread_local std::vector<char> host_work;
  const cudaDataType type = std::is_same<T, double>::value ? CUDA_R_64F : CUDA_R_32F;
  size_t device_bytes = 0, host_bytes = 0;
  check(cusolverDnXsyevBatched_bufferSize(h, params, CUSOLVER_EIG_MODE_VECTOR,
                                          CUBLAS_FILL_MODE_LOWER, n, type, a.data_ptr<T>(), n,
                                          type, w.data_ptr<T>(), type, &device_bytes,
                                          &host_bytes, 1),
        "cusolverDnXsyevBatched_bufferSize");
  at::Tensor work = at::empty({static_cast<int64_t>(std::max<size_t>(device_bytes, 1))},
                              a.options().dtype(at::kByte));
  if (host_work.size() < host_bytes) host_work.resize(host_bytes);
  check(cusolverDnXsyevBatched(h, params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n,
                               type, a.data_ptr<T>(), n, type, w.data_ptr<T>(), type,
                               work.data_ptr(), device_bytes,
                               host_bytes ? host_work.data() : nullptr, host_bytes,
                               info.data_ptr<int>(), 1),
        "cusolverDnXsyevBatched");
}

template <typename T>
void decompose(at::Tensor& a, at::Tensor& w, at::Tensor& info, c10::string_view algorithm) {
  if (algorithm == "syev_batched") {
    syev_batched<T>(a, w, info);
  } else {
    syevd<T>(a, w, info);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sym_eigh_cuda(const at::Tensor& a,
                                                             c10::string_view algorithm) {
  check_sym_eigh_input(a, algorithm);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor vecs = a.clone(at::MemoryFormat::Contiguous);
  at::Tensor w = at::empty({a.size(0)}, a.options());
  at::Tensor info = at::zeros({}, a.options().dtype(at::kInt));
  if (a.size(0) == 0) return {w, vecs, info};
  if (a.scalar_type() == at::kDouble) {
    decompose<double>(vecs, w, info, algorithm);
  } else {
    decompose<float>(vecs, w, info, algorithm);
  }
  // cuSOLVER wrote the eigenvectors as columns of a column-major matrix: the row-major
  // tensor holds them as rows.
  return {w, vecs.t(), info};
}

}  // namespace himo
