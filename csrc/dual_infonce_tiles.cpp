// The CPU twin of the fused route's CUDA kernels (dual_infonce_tiles_cuda.cu): the same
// tiles, the same per-thread work (logit_tile.h) run thread by thread, the same merges in
// the same order; only the tile's dot products are a plain loop here instead of tensor
// cores. It is the CI oracle of the GPU's tiling, not a fast CPU path (the cpu backend
// takes the strips).
#include <ATen/Parallel.h>

#include <vector>

#include "dual_infonce.h"

namespace himo {
namespace {

using tiles::cdiv;
using tiles::kM;
using tiles::kN;
using tiles::kThreads;

// The tile at (row0, col0) of R·Cᵀ into buf (kM x kN, ld kN): what the CUDA kernel's
// tensor-core loop leaves in shared memory.
template <typename acc_t>
tiles::Tile<acc_t> compute_tile(acc_t* buf, const acc_t* R, const acc_t* C, int64_t P, int64_t Q,
                                int64_t K, int64_t row0, int64_t col0, int64_t label_col0) {
  const auto t = tiles::tile_at(buf, kN, row0, col0, label_col0, P, Q);
  for (int r = 0; r < t.rows; ++r) {
    for (int c = 0; c < t.cols; ++c) {
      const acc_t* a = R + (row0 + r) * K;
      const acc_t* b = C + (col0 + c) * K;
      acc_t d = 0;
      for (int64_t k = 0; k < K; ++k) d += a[k] * b[k];
      buf[r * kN + c] = d;
    }
  }
  return t;
}

// Programs a launch should have at least (the CUDA kernels aim at 2 per SM of an H100; a
// small target here makes the tests meet both one and several column splits).
constexpr int64_t kTargetPrograms = 4;

template <typename acc_t>
void lse_impl(const at::Tensor& R, const at::Tensor& C, const at::Tensor& scale,
              const at::Tensor& ref, int64_t label_col0, at::Tensor& nll, at::Tensor& col_max,
              at::Tensor& col_sum) {
  const int64_t P = R.size(0), Q = C.size(0), K = R.size(1), blocks = cdiv(P, kM);
  const int64_t n_tiles = cdiv(Q, kN);
  const auto [tps, splits] = tiles::column_splits(blocks, n_tiles, kTargetPrograms);
  const bool square = col_max.defined();
  const acc_t s = scale.item<acc_t>();
  const acc_t *r_ptr = R.data_ptr<acc_t>(), *c_ptr = C.data_ptr<acc_t>(), *ref_ptr = ref.data_ptr<acc_t>();
  // Each program's row states (per column split) and column partials (per row block),
  // merged in order afterwards (the CUDA merges).
  at::Tensor rows = at::empty({2, splits, P}, R.options());
  at::Tensor cols = at::empty({2, square ? blocks : 0, Q}, R.options());
  acc_t *row_max = rows.data_ptr<acc_t>(), *row_sum = row_max + splits * P;
  acc_t *part_max = cols.data_ptr<acc_t>(), *part_sum = part_max + (square ? blocks * Q : 0);
  at::parallel_for(0, blocks * splits, 1, [&](int64_t p0, int64_t p1) {
    std::vector<acc_t> buf(kM * kN);
    std::vector<LseState<acc_t>> st(kThreads), cpart(kThreads);
    for (int64_t program = p0; program < p1; ++program) {
      const int64_t b = program / splits, split = program % splits, row0 = b * kM;
      std::fill(st.begin(), st.end(), lse_empty<acc_t>());
      for (int64_t tile = split * tps; tile < std::min(n_tiles, (split + 1) * tps); ++tile) {
        const auto t = compute_tile(buf.data(), r_ptr, c_ptr, P, Q, K, row0, tile * kN, label_col0);
        for (int th = 0; th < kThreads; ++th) {
          const int r = tiles::row_of(th);
          if (r < t.rows) st[th] = tiles::push_row(st[th], t, r, tiles::half_of(th), s, ref_ptr[row0 + r]);
        }
        if (!square) continue;
        for (int th = 0; th < kThreads; ++th) {
          const int c = tiles::column_of(th);
          if (c < t.cols) cpart[th] = tiles::column_part(t, c, tiles::column_half_of(th), s, ref_ptr);
        }
        for (int c = 0; c < t.cols; ++c) {
          const LseState<acc_t> m = lse_merge(cpart[c], cpart[c + kN]);
          part_max[b * Q + t.col0 + c] = m.max;
          part_sum[b * Q + t.col0 + c] = m.sum;
        }
      }
      for (int r = 0; r < std::min<int64_t>(kM, P - row0); ++r) {
        const LseState<acc_t> m = lse_merge(st[2 * r], st[2 * r + 1]);
        row_max[split * P + row0 + r] = m.max;
        row_sum[split * P + row0 + r] = m.sum;
      }
    }
  });
  acc_t* out = nll.data_ptr<acc_t>();
  for (int64_t i = 0; i < P; ++i)
    out[i] = nll_value(tiles::merge_parts(lse_empty<acc_t>(), row_max, row_sum, splits, P, i), ref_ptr[i]);
  if (!square) return;
  acc_t *cm = col_max.data_ptr<acc_t>(), *cs = col_sum.data_ptr<acc_t>();
  for (int64_t j = 0; j < Q; ++j) {
    const LseState<acc_t> m = tiles::merge_parts<acc_t>({cm[j], cs[j]}, part_max, part_sum, blocks, Q, j);
    cm[j] = m.max;
    cs[j] = m.sum;
  }
}

template <typename acc_t>
void weights_impl(const at::Tensor& R, const at::Tensor& C, const at::Tensor& scale,
                  const Side& rows, const Side& cols, int64_t label_col0, at::Tensor& w,
                  at::Tensor& ds_rows) {
  const int64_t P = R.size(0), Q = C.size(0), K = R.size(1), n_tiles = cdiv(Q, kN);
  const acc_t s = scale.item<acc_t>();
  const acc_t *r_ptr = R.data_ptr<acc_t>(), *c_ptr = C.data_ptr<acc_t>();
  const auto rs = side_view<acc_t>(rows), cs = side_view<acc_t>(cols);
  acc_t* w_ptr = w.data_ptr<acc_t>();
  at::Tensor ds_part = at::empty({P, n_tiles}, R.options());
  acc_t* dsp = ds_part.data_ptr<acc_t>();
  at::parallel_for(0, cdiv(P, kM), 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> buf(kM * kN), ds(kThreads);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t tile = 0; tile < n_tiles; ++tile) {
        auto t = compute_tile(buf.data(), r_ptr, c_ptr, P, Q, K, b * kM, tile * kN, label_col0);
        for (int th = 0; th < kThreads; ++th) {
          const int r = tiles::row_of(th);
          ds[th] = r < t.rows ? tiles::weights_row(t, r, tiles::half_of(th), s, rs, cs) : acc_t(0);
        }
        for (int r = 0; r < t.rows; ++r) {
          dsp[(t.row0 + r) * n_tiles + tile] = ds[2 * r] + ds[2 * r + 1];
          for (int c = 0; c < t.cols; ++c) w_ptr[(t.row0 + r) * Q + t.col0 + c] = t.dot(r, c);
        }
      }
    }
  });
  ds_rows.copy_(ds_part.sum(1));
}

void cpu_lse(const at::Tensor& R, const at::Tensor& C, const at::Tensor& scale,
             const at::Tensor& ref, int64_t label_col0, at::Tensor& nll, at::Tensor& col_max,
             at::Tensor& col_sum) {
  if (R.scalar_type() == at::kDouble) {
    lse_impl<double>(R, C, scale, ref, label_col0, nll, col_max, col_sum);
  } else {
    lse_impl<float>(R, C, scale, ref, label_col0, nll, col_max, col_sum);
  }
}

void cpu_weights(const at::Tensor& R, const at::Tensor& C, const at::Tensor& scale,
                 const Side& rows, const Side& cols, int64_t label_col0, at::Tensor& w,
                 at::Tensor& ds_rows) {
  if (R.scalar_type() == at::kDouble) {
    weights_impl<double>(R, C, scale, rows, cols, label_col0, w, ds_rows);
  } else {
    weights_impl<float>(R, C, scale, rows, cols, label_col0, w, ds_rows);
  }
}

bool cpu_tiles_accept(at::ScalarType features) {
  return features == at::kFloat || features == at::kDouble;
}

}  // namespace

TileKernels cpu_tile_kernels() {
  // All rows in one call up to 4096 (their column partials: 2 x 64 x N).
  return {cpu_lse, cpu_weights, 4096, cpu_tiles_accept, "float32 or float64 (the CPU twin)"};
}

}  // namespace himo
