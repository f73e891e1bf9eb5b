// CUDA kernels of the dual InfoNCE's fused route ("tiles", dual_infonce.h's TileKernels):
// bf16/fp16 logit tiles on tensor cores (WMMA, fp32 accumulation) into shared memory,
// where the epilogue of logit_tile.h turns them into row log-sum-exps (online, in
// registers across the column tiles), the square case's column partials, or the
// backward's weights W. No logit strip in global memory: the forward reads the inputs and
// writes (max, sum) partials per row and column split, and per column and row block; the
// backward writes W once, in the inputs' dtype, for the two cuBLAS products of the driver
// (dual_infonce.cpp's job_backward).
//
// One block: kThreads = 128 threads (4 warps, 2 x 2, each a 32 x 32 quarter of the 64 x 64
// tile), K in steps of kK staged in shared memory. Written without a GPU (2026-12-07) and
// not yet run on one: benchmarks/gpu_check.sh validates it against the reference before
// timing it, and the cuda backend takes it only where named (backends.CUDA_ROUTE).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

#include "dual_infonce.h"

namespace himo {
namespace {

using namespace nvcuda;
using tiles::cdiv;
using tiles::kM;
using tiles::kN;
using tiles::kThreads;

constexpr int kK = 64;          // K per shared-memory step
constexpr int kLdIn = kK + 8;   // its row stride, 144 bytes: WMMA wants 32-byte aligned
                                // fragments (16 rows = 2304 bytes) and ldm % 8 == 0
constexpr int kLdDots = kN + 4;  // 68 floats: 16 rows = 4352 bytes
constexpr int kMergeThreads = 256;
// Programs an lse launch should have at least (column_splits): 2 per SM of an H100.
constexpr int64_t kTargetPrograms = 264;

// The tensor-core element type of an input dtype (zero and rounding without the
// conversion operators that torch's build flags turn off).
template <typename T>
struct Elem;
template <>
struct Elem<at::BFloat16> {
  using type = __nv_bfloat16;
  static __device__ type zero() { return __ushort_as_bfloat16(0); }
  static __device__ type from_float(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Elem<at::Half> {
  using type = __half;
  static __device__ type zero() { return __ushort_as_half(0); }
  static __device__ type from_float(float x) { return __float2half_rn(x); }
};

template <typename E>
struct Smem {
  alignas(128) E a[kM][kLdIn];  // rows of R
  alignas(128) E b[kN][kLdIn];  // rows of C
  alignas(128) float dots[kM][kLdDots];
};

// Rows [row0, row0 + kM) x [k0, k0 + kK) of src (total rows, width K) into dst, zeros
// outside. VEC: 16-byte loads (K % 8 == 0 and 16-byte aligned data).
template <typename Tr, bool VEC>
__device__ __forceinline__ void load_rows(typename Tr::type (*dst)[kLdIn],
                                          const typename Tr::type* __restrict__ src,
                                          int64_t row0, int64_t total, int64_t K, int64_t k0) {
  if constexpr (VEC) {
    constexpr int kVecs = kK / 8;
    for (int i = threadIdx.x; i < kM * kVecs; i += kThreads) {
      const int r = i / kVecs, v = i % kVecs;
      const int64_t gr = row0 + r, gk = k0 + v * 8;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (gr < total && gk < K) val = *reinterpret_cast<const uint4*>(src + gr * K + gk);
      *reinterpret_cast<uint4*>(&dst[r][v * 8]) = val;
    }
  } else {
    for (int i = threadIdx.x; i < kM * kK; i += kThreads) {
      const int r = i / kK, k = i % kK;
      const int64_t gr = row0 + r, gk = k0 + k;
      dst[r][k] = gr < total && gk < K ? src[gr * K + gk] : Tr::zero();
    }
  }
}

// sm.dots = R[row0 .. +kM) · C[col0 .. +kN)ᵀ, fp32. Starts with a barrier (every thread is
// done with the previous tile's epilogue) and ends with one (the tile is complete).
template <typename Tr, bool VEC>
__device__ void compute_tile(Smem<typename Tr::type>& sm, const typename Tr::type* R,
                             const typename Tr::type* C, int64_t row0, int64_t col0, int64_t P,
                             int64_t Q, int64_t K) {
  using E = typename Tr::type;
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  for (int64_t k0 = 0; k0 < K; k0 += kK) {
    __syncthreads();
    load_rows<Tr, VEC>(sm.a, R, row0, P, K, k0);
    load_rows<Tr, VEC>(sm.b, C, col0, Q, K, k0);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &sm.a[wm * 32 + i * 16][kk], kLdIn);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &sm.b[wn * 32 + j * 16][kk], kLdIn);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&sm.dots[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], kLdDots,
                              wmma::mem_row_major);
  __syncthreads();
}

// One block per kM rows (x) and column split of tps tiles (y): its rows' (max, sum) over
// those columns at [y * P + row]; COLS (square), each column's partial (max, sum) over its
// rows at [x * Q + column].
template <typename Tr, bool VEC, bool COLS>
__global__ void __launch_bounds__(kThreads)
    lse_kernel(const typename Tr::type* __restrict__ R, const typename Tr::type* __restrict__ C,
               int64_t P, int64_t Q, int64_t K, int64_t tps, const float* __restrict__ scale,
               const float* __restrict__ ref, int64_t label_col0, float* __restrict__ row_max,
               float* __restrict__ row_sum, float* __restrict__ part_max,
               float* __restrict__ part_sum) {
  __shared__ Smem<typename Tr::type> sm;
  __shared__ float other_max[kN], other_sum[kN];
  const int th = threadIdx.x, r = tiles::row_of(th), half = tiles::half_of(th);
  const int64_t row0 = int64_t(blockIdx.x) * kM, n_tiles = cdiv(Q, kN);
  const int64_t first = int64_t(blockIdx.y) * tps, last = first + tps < n_tiles ? first + tps : n_tiles;
  const float s = *scale, my_ref = row0 + r < P ? ref[row0 + r] : 0.f;
  LseState<float> st = lse_empty<float>();
  for (int64_t col0 = first * kN; col0 < last * kN; col0 += kN) {
    compute_tile<Tr, VEC>(sm, R, C, row0, col0, P, Q, K);
    const auto t = tiles::tile_at(&sm.dots[0][0], kLdDots, row0, col0, label_col0, P, Q);
    if (r < t.rows) st = tiles::push_row(st, t, r, half, s, my_ref);
    if constexpr (COLS) {
      const int c = tiles::column_of(th), ch = tiles::column_half_of(th);
      LseState<float> cp = c < t.cols ? tiles::column_part(t, c, ch, s, ref) : lse_empty<float>();
      if (ch == 1) {
        other_max[c] = cp.max;
        other_sum[c] = cp.sum;
      }
      __syncthreads();  // (the next compute_tile's first barrier orders the reads below
                        // before these are written again)
      if (ch == 0 && c < t.cols) {
        cp = lse_merge(cp, LseState<float>{other_max[c], other_sum[c]});
        part_max[int64_t(blockIdx.x) * Q + col0 + c] = cp.max;
        part_sum[int64_t(blockIdx.x) * Q + col0 + c] = cp.sum;
      }
    }
  }
  // The row's two halves (adjacent lanes), merged as the CPU twin merges them.
  st = lse_merge(st, LseState<float>{__shfl_xor_sync(0xffffffffu, st.max, 1),
                                     __shfl_xor_sync(0xffffffffu, st.sum, 1)});
  if (half == 0 && row0 + r < P) {
    row_max[int64_t(blockIdx.y) * P + row0 + r] = st.max;
    row_sum[int64_t(blockIdx.y) * P + row0 + r] = st.sum;
  }
}

// nll[i] from row i's states of the `splits` column splits.
__global__ void merge_rows_kernel(const float* __restrict__ row_max,
                                  const float* __restrict__ row_sum, int64_t splits, int64_t P,
                                  const float* __restrict__ ref, float* __restrict__ nll) {
  const int64_t i = int64_t(blockIdx.x) * kMergeThreads + threadIdx.x;
  if (i < P) nll[i] = nll_value(tiles::merge_parts(lse_empty<float>(), row_max, row_sum, splits, P, i), ref[i]);
}

// Column j's running (max, sum) merged with its partials of `blocks` row blocks.
__global__ void merge_columns_kernel(const float* __restrict__ part_max,
                                     const float* __restrict__ part_sum, int64_t blocks, int64_t Q,
                                     float* __restrict__ col_max, float* __restrict__ col_sum) {
  const int64_t j = int64_t(blockIdx.x) * kMergeThreads + threadIdx.x;
  if (j >= Q) return;
  const LseState<float> m =
      tiles::merge_parts(LseState<float>{col_max[j], col_sum[j]}, part_max, part_sum, blocks, Q, j);
  col_max[j] = m.max;
  col_sum[j] = m.sum;
}

// One block per tile (row block x, column tile y): W into w ([P, Q], the inputs' dtype),
// Σ_j W·dot of its rows at ds_part[row * gridDim.y + y].
template <typename Tr, bool VEC>
__global__ void __launch_bounds__(kThreads)
    weights_kernel(const typename Tr::type* __restrict__ R, const typename Tr::type* __restrict__ C,
                   int64_t P, int64_t Q, int64_t K, const float* __restrict__ scale,
                   int64_t label_col0, tiles::SideView<float> rows, tiles::SideView<float> cols,
                   typename Tr::type* __restrict__ w, float* __restrict__ ds_part) {
  __shared__ Smem<typename Tr::type> sm;
  const int th = threadIdx.x, r = tiles::row_of(th), half = tiles::half_of(th);
  const int64_t row0 = int64_t(blockIdx.x) * kM, col0 = int64_t(blockIdx.y) * kN;
  const float s = *scale;
  compute_tile<Tr, VEC>(sm, R, C, row0, col0, P, Q, K);
  auto t = tiles::tile_at(&sm.dots[0][0], kLdDots, row0, col0, label_col0, P, Q);
  float ds = r < t.rows ? tiles::weights_row(t, r, half, s, rows, cols) : 0.f;
  ds += __shfl_xor_sync(0xffffffffu, ds, 1);
  if (half == 0 && r < t.rows) ds_part[(row0 + r) * gridDim.y + blockIdx.y] = ds;
  __syncthreads();
  for (int i = th; i < kM * kN; i += kThreads) {  // coalesced: consecutive columns
    const int rr = i / kN, cc = i % kN;
    if (rr < t.rows && cc < t.cols) w[(row0 + rr) * Q + col0 + cc] = Tr::from_float(sm.dots[rr][cc]);
  }
}

template <bool B>
using Bool = std::integral_constant<bool, B>;

// f(Elem<T>{}, Bool<vec>{}) for the inputs' dtype and whether 16-byte loads apply.
template <typename F>
void dispatch(const at::Tensor& R, const at::Tensor& C, F&& f) {
  const int64_t K = R.size(1);
  const bool vec = K % 8 == 0 && reinterpret_cast<uintptr_t>(R.data_ptr()) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(C.data_ptr()) % 16 == 0;
  auto with_vec = [&](auto elem) {
    if (vec) {
      f(elem, Bool<true>{});
    } else {
      f(elem, Bool<false>{});
    }
  };
  if (R.scalar_type() == at::kBFloat16) {
    with_vec(Elem<at::BFloat16>{});
  } else {
    with_vec(Elem<at::Half>{});
  }
}

template <typename Tr>
const typename Tr::type* elems(const at::Tensor& t) {
  return reinterpret_cast<const typename Tr::type*>(t.data_ptr());
}

void check_inputs(const at::Tensor& R, const at::Tensor& C) {
  TORCH_CHECK(R.is_cuda() && R.is_contiguous() && C.is_contiguous() &&
                  C.scalar_type() == R.scalar_type() && C.size(1) == R.size(1),
              "himo_fast tiles: R and C must be contiguous CUDA tensors of one dtype and width");
}

void cuda_tiles_lse(const at::Tensor& R, const at::Tensor& C, const at::Tensor& scale,
                    const at::Tensor& ref, int64_t label_col0, at::Tensor& nll,
                    at::Tensor& col_max, at::Tensor& col_sum) {
  check_inputs(R, C);
  const int64_t P = R.size(0), Q = C.size(0), K = R.size(1), blocks = cdiv(P, kM);
  if (P == 0) return;
  const int64_t n_tiles = cdiv(Q, kN);
  const auto [tps, splits] = tiles::column_splits(blocks, n_tiles, kTargetPrograms);
  TORCH_CHECK(splits <= 65535, "himo_fast tiles: ", splits, " column splits exceed the grid");
  const bool square = col_max.defined();
  at::Tensor rows = at::empty({2, splits, P}, ref.options());
  at::Tensor part = at::empty({2, square ? blocks : 0, Q}, ref.options());
  float *row_max = rows.data_ptr<float>(), *row_sum = row_max + splits * P;
  float *part_max = part.data_ptr<float>(), *part_sum = part_max + (square ? blocks * Q : 0);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(splits));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(R, C, [&](auto elem, auto vec) {
    using Tr = decltype(elem);
    auto launch = [&](auto cols) {
      lse_kernel<Tr, decltype(vec)::value, decltype(cols)::value><<<grid, kThreads, 0, stream>>>(
          elems<Tr>(R), elems<Tr>(C), P, Q, K, tps, scale.data_ptr<float>(), ref.data_ptr<float>(),
          label_col0, row_max, row_sum, part_max, part_sum);
    };
    if (square) {
      launch(Bool<true>{});
    } else {
      launch(Bool<false>{});
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  merge_rows_kernel<<<cdiv(P, kMergeThreads), kMergeThreads, 0, stream>>>(
      row_max, row_sum, splits, P, ref.data_ptr<float>(), nll.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!square) return;
  merge_columns_kernel<<<cdiv(Q, kMergeThreads), kMergeThreads, 0, stream>>>(
      part_max, part_sum, blocks, Q, col_max.data_ptr<float>(), col_sum.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void cuda_tiles_weights(const at::Tensor& R, const at::Tensor& C, const at::Tensor& scale,
                        const Side& rows, const Side& cols, int64_t label_col0, at::Tensor& w,
                        at::Tensor& ds_rows) {
  check_inputs(R, C);
  const int64_t P = R.size(0), Q = C.size(0), K = R.size(1), n_tiles = cdiv(Q, kN);
  if (P == 0) return;
  TORCH_CHECK(n_tiles <= 65535, "himo_fast tiles: ", Q, " columns exceed the grid's ",
              65535 * kN);
  at::Tensor ds_part = at::empty({P, n_tiles}, scale.options());
  const dim3 grid(unsigned(cdiv(P, kM)), unsigned(n_tiles));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(R, C, [&](auto elem, auto vec) {
    using Tr = decltype(elem);
    weights_kernel<Tr, decltype(vec)::value><<<grid, kThreads, 0, stream>>>(
        elems<Tr>(R), elems<Tr>(C), P, Q, K, scale.data_ptr<float>(), label_col0,
        side_view<float>(rows), side_view<float>(cols),
        reinterpret_cast<typename Tr::type*>(w.data_ptr()), ds_part.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  ds_rows.copy_(ds_part.sum(1));
}

bool cuda_tiles_accept(at::ScalarType features) {
  return features == at::kBFloat16 || features == at::kHalf;
}

// Row blocks per lse launch: 4 per SM of an H100 (132 SMs), fewer where their column
// partials (2 x 528 x N floats) would pass 2 x 2^25 (N > 63550; the driver's
// tile_lse_rows): column splits keep the programs at kTargetPrograms. Not tuned on a GPU yet.
constexpr int64_t kCudaLseRows = 528 * kM;

}  // namespace

TileKernels cuda_tile_kernels() {
  return {cuda_tiles_lse, cuda_tiles_weights, kCudaLseRows, cuda_tiles_accept,
          "bfloat16 or float16"};
}

}  // namespace himo
