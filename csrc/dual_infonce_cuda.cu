// CUDA elementwise kernels of the dual InfoNCE strip driver (dual_infonce.cpp). The strip
// GEMMs are cuBLAS (tensor cores for bf16/fp16, fp32 accumulation and output); these
// kernels are the fused log-sum-exp / cross-entropy-gradient passes over each strip, using the
// same per-element math (tile_math.h) as the CPU kernels. No host synchronisation: the
// scale is read from device memory and every reduction stays on the device.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include "dual_infonce.h"
#include "tile_math.h"

namespace himo {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ LseState<float> warp_lse(LseState<float> st) {
  for (int off = 16; off > 0; off >>= 1) {
    LseState<float> o{__shfl_xor_sync(0xffffffffu, st.max, off),
                      __shfl_xor_sync(0xffffffffu, st.sum, off)};
    st = lse_merge(st, o);
  }
  return st;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// One block per row: out[r] = logsumexp_j(scale * dots[r, j]) - ref[r].
__global__ void row_nll_kernel(const float* __restrict__ dots, int64_t len,
                               const float* __restrict__ scale, const float* __restrict__ ref,
                               float* __restrict__ out) {
  __shared__ float smax[kWarps], ssum[kWarps];
  const float s = *scale;
  const float* row = dots + blockIdx.x * len;
  LseState<float> st = lse_empty<float>();
  for (int64_t j = threadIdx.x; j < len; j += kThreads) st = lse_push(st, s * row[j]);
  st = warp_lse(st);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    smax[warp] = st.max;
    ssum[warp] = st.sum;
  }
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? LseState<float>{smax[lane], ssum[lane]} : lse_empty<float>();
    st = warp_lse(st);
    if (lane == 0) out[blockIdx.x] = nll_value(st, ref[blockIdx.x]);
  }
}

// One thread per column: merge this strip's column into the running (max, sum).
__global__ void col_merge_kernel(const float* __restrict__ dots, int64_t rows, int64_t cols,
                                 const float* __restrict__ scale, float* __restrict__ cmax,
                                 float* __restrict__ csum) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= cols) return;
  const float s = *scale;
  LseState<float> st{cmax[j], csum[j]};
  for (int64_t r = 0; r < rows; ++r) st = lse_push(st, s * dots[r * cols + j]);
  cmax[j] = st.max;
  csum[j] = st.sum;
}

// One block per row: cross-entropy weights in place, ds_rows[r] = sum_j weight * dot.
__global__ void ce_grad_kernel(float* __restrict__ dots, int64_t cols,
                               const float* __restrict__ scale, tiles::SideView<float> R,
                               tiles::SideView<float> C,
                               int64_t label_col0, float* __restrict__ ds_rows) {
  __shared__ float spart[kWarps];
  const float s = *scale;
  const int64_t r = blockIdx.x, label = label_col0 + r;
  float* row = dots + r * cols;
  const float ref = R.ref[r], nll = R.nll[r], gp = R.gp[r], c_off = R.c_off[r],
              c_label = R.c_label[r];
  float ds = 0.f;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    const float dot = row[j], x = s * dot;
    const bool at_label = j == label;
    float w = ce_weight(x, ref, nll, gp, at_label ? c_label : c_off);
    if (C.nll != nullptr) w += C.weight(j, x, at_label);
    ds += w * dot;
    row[j] = w;
  }
  ds = warp_sum(ds);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) spart[warp] = ds;
  __syncthreads();
  if (warp == 0) {
    ds = warp_sum(lane < kWarps ? spart[lane] : 0.f);
    if (lane == 0) ds_rows[r] = ds;
  }
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "himo_fast CUDA kernel: ", name, " must be a contiguous float32 CUDA tensor");
}

void cuda_row_nll(const at::Tensor& dots, const at::Tensor& scale, const at::Tensor& ref,
                  at::Tensor& out) {
  check_float(dots, "dots");
  if (dots.size(0) == 0) return;
  row_nll_kernel<<<dots.size(0), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      dots.data_ptr<float>(), dots.size(1), scale.data_ptr<float>(), ref.data_ptr<float>(),
      out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void cuda_col_merge(const at::Tensor& dots, const at::Tensor& scale, at::Tensor& cmax,
                    at::Tensor& csum) {
  check_float(dots, "dots");
  const int64_t cols = dots.size(1);
  const int64_t blocks = (cols + kThreads - 1) / kThreads;
  col_merge_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      dots.data_ptr<float>(), dots.size(0), cols, scale.data_ptr<float>(),
      cmax.data_ptr<float>(), csum.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void cuda_ce_grad(at::Tensor& dots, const at::Tensor& scale, const Side& rows, const Side& cols,
                  int64_t label_col0, at::Tensor& ds_rows) {
  check_float(dots, "dots");
  ce_grad_kernel<<<dots.size(0), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      dots.data_ptr<float>(), dots.size(1), scale.data_ptr<float>(), side_view<float>(rows),
      side_view<float>(cols), label_col0, ds_rows.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One strip of logits on a GPU: 128 MiB in fp32 (launches over a too-thin strip would
// starve the chip).
constexpr int64_t kCudaStripElements = int64_t(1) << 25;

// col_grad "auto" (dual_infonce.h): per strip of `rows` rows, accumulating the columns'
// gradient reads and writes [N, d] fp32 (8·N·d bytes); recomputing it costs one more
// logits GEMM (2·rows·N·d FLOPs) and weights pass (≈ 14 bytes per logit on the strips
// route: fp32 dots in and out, bf16 weights). On an H100 (3.35 TB/s, ≈ 600 dense bf16
// TFLOP/s) the two break even near 270 rows, so below 256 (N > 131072 at 2^25 logits per
// strip), recompute: at N = 262144, 128 rows, about half the time, and no 768 MiB
// accumulator at d = 768. A model, not yet a measurement (benchmarks/gpu_check.sh times
// both).
constexpr int64_t kCudaRecomputeBelowRows = 256;

bool cuda_accepts(at::ScalarType features, at::ScalarType acc) {
  return acc == at::kFloat &&
         (features == at::kFloat || features == at::kBFloat16 || features == at::kHalf);
}

}  // namespace

const Device& cuda_device() {
  static const Device d{{cuda_row_nll, cuda_col_merge, cuda_ce_grad}, cuda_tile_kernels(),
                        kCudaStripElements, kCudaRecomputeBelowRows, "CUDA", cuda_accepts,
                        "float32, bfloat16 or float16 with a float32 scale"};
  return d;
}

}  // namespace himo
