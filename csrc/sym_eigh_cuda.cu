// himo_fast::sym_eigh on CUDA: cuSOLVER's syevd (or syevj, or XsyevBatched) with its info
// flag left on the device. torch.linalg.eigh runs syevd but then reads the flag on the host
// (a sync); HiDe does not need it: a failed decomposition can only come from non-finite
// input, which already makes the loss NaN through the reconstruction product. syevd passed
// torch's sync-debug mode on an H100 but cannot be captured in a CUDA graph; syevj and
// XsyevBatched are the candidates benchmarks/eigh_probe.py measures for that.
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

// cuSOLVER's routines per precision (S: float, D: double).
template <typename T>
struct Routines;
template <>
struct Routines<float> {
  static constexpr auto syevd_size = cusolverDnSsyevd_bufferSize;
  static constexpr auto syevd = cusolverDnSsyevd;
  static constexpr auto syevj_size = cusolverDnSsyevj_bufferSize;
  static constexpr auto syevj = cusolverDnSsyevj;
};
template <>
struct Routines<double> {
  static constexpr auto syevd_size = cusolverDnDsyevd_bufferSize;
  static constexpr auto syevd = cusolverDnDsyevd;
  static constexpr auto syevj_size = cusolverDnDsyevj_bufferSize;
  static constexpr auto syevj = cusolverDnDsyevj;
};

// One Jacobi parameter set per thread (cuSOLVER's defaults: tolerance at machine precision,
// at most 100 sweeps), kept alive: the routine may still use it after the call returns.
syevjInfo_t syevj_params() {
  thread_local syevjInfo_t params = [] {
    syevjInfo_t p;
    check(cusolverDnCreateSyevjInfo(&p), "cusolverDnCreateSyevjInfo");
    return p;
  }();
  return params;
}

// The calling sequence syevd and syevj share: workspace query, workspace, decomposition
// (syevj takes its parameter set last).
template <typename T, typename Size, typename Run, typename... Params>
void lapack_style(const char* routine, Size size, Run run, at::Tensor& a, at::Tensor& w,
                  at::Tensor& info, Params... params) {
  const int n = static_cast<int>(a.size(0));
  cusolverDnHandle_t h = handle_for(a.get_device());
  int lwork = 0;
  // Symmetric input: its row-major buffer is its column-major one.
  check(size(h, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, a.data_ptr<T>(), n,
             w.data_ptr<T>(), &lwork, params...),
        routine, "_bufferSize");
  at::Tensor work = at::empty({std::max(lwork, 1)}, a.options());
  check(run(h, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, a.data_ptr<T>(), n,
            w.data_ptr<T>(), work.data_ptr<T>(), lwork, info.data_ptr<int>(), params...),
        routine);
}

// cusolverDnXsyevBatched with a batch of one. Its host workspace is kept per thread for the
// same reason as the Jacobi parameters.
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
  if (algorithm == "syevj") {
    lapack_style<T>("syevj", Routines<T>::syevj_size, Routines<T>::syevj, a, w, info,
                    syevj_params());
  } else if (algorithm == "syev_batched") {
    syev_batched<T>(a, w, info);
  } else {
    lapack_style<T>("syevd", Routines<T>::syevd_size, Routines<T>::syevd, a, w, info);
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
