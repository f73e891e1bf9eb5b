// The per-tile work of the dual InfoNCE's fused route ("tiles"): what a thread block does
// with one kM x kN tile of dot products once they are in shared memory. The CUDA kernels
// (dual_infonce_tiles_cuda.cu) and their CPU twin (dual_infonce_tiles.cpp) call exactly
// these functions with the same thread decomposition, so CI tests the GPU's epilogue and
// its tiling (labels at tile edges, partial tiles, the column merges) on the CPU; only the
// tensor-core product and the loads differ.
//
// Thread t of kThreads owns, in the row passes, half (t & 1) of tile row t >> 1: the
// columns c = half, half + 2, ... (interleaved: two lanes of one row read different shared
// memory banks); in the column pass, column t % kN over the rows of half t / kN.
#pragma once

#include <cstdint>

#include "tile_math.h"

namespace himo {
namespace tiles {

constexpr int kM = 64;         // rows of a tile
constexpr int kN = 64;         // columns of a tile
constexpr int kThreads = 128;  // two per row, two per column
static_assert(kThreads == 2 * kM && kThreads == 2 * kN, "two threads per tile row and column");

HIMO_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

HIMO_HD int row_of(int t) { return t >> 1; }
HIMO_HD int half_of(int t) { return t & 1; }
HIMO_HD int column_of(int t) { return t % kN; }
HIMO_HD int column_half_of(int t) { return t / kN; }

// One tile of dot products R[row0 + r]·C[col0 + c] (rows x cols valid, ld apart), of a
// matrix whose row i has its label at column i + label_col0.
template <typename acc_t>
struct Tile {
  acc_t* dots;
  int ld;
  int64_t row0, col0, label_col0;
  int rows, cols;
  HIMO_HD bool is_label(int r, int c) const { return row0 + r + label_col0 == col0 + c; }
  HIMO_HD acc_t dot(int r, int c) const { return dots[r * ld + c]; }
  // The logit: the label's is the row's ref (one value in the forward and the backward,
  // tile_math.h's ce_weight), every other s·dot.
  HIMO_HD acc_t logit(int r, int c, acc_t s, acc_t ref) const {
    return is_label(r, c) ? ref : s * dot(r, c);
  }
};

// The tile at (row0, col0) of a P x Q matrix, cut at its edges.
template <typename acc_t>
HIMO_HD Tile<acc_t> tile_at(acc_t* dots, int ld, int64_t row0, int64_t col0, int64_t label_col0,
                            int64_t P, int64_t Q) {
  return {dots, ld, row0, col0, label_col0, int(P - row0 < kM ? P - row0 : kM),
          int(Q - col0 < kN ? Q - col0 : kN)};
}

// Row pass of the forward: this thread's half of row r pushed into its running state.
template <typename acc_t>
HIMO_HD LseState<acc_t> push_row(LseState<acc_t> st, const Tile<acc_t>& t, int r, int half,
                                 acc_t s, acc_t ref) {
  for (int c = half; c < t.cols; c += 2) st = lse_push(st, t.logit(r, c, s, ref));
  return st;
}

// Column pass of the square forward: column c's (max, sum) over this thread's half of the
// tile's rows (ref: the rows' label logits, indexed by row0 + r).
template <typename acc_t>
HIMO_HD LseState<acc_t> column_part(const Tile<acc_t>& t, int c, int half, acc_t s,
                                    const acc_t* ref) {
  LseState<acc_t> st = lse_empty<acc_t>();
  for (int r = half; r < t.rows; r += 2) st = lse_push(st, t.logit(r, c, s, ref[t.row0 + r]));
  return st;
}

// st merged with the partials (max, sum) at [b * stride + j] of parts b = 0, 1, ..., in
// that order: a column's over the row blocks, or a row's over the column splits.
template <typename acc_t>
HIMO_HD LseState<acc_t> merge_parts(LseState<acc_t> st, const acc_t* part_max,
                                    const acc_t* part_sum, int64_t parts, int64_t stride,
                                    int64_t j) {
  for (int64_t b = 0; b < parts; ++b) st = lse_merge(st, {part_max[b * stride + j], part_sum[b * stride + j]});
  return st;
}

// The forward's column splits: where the row blocks alone are fewer than `target`
// programs (the paper's 128 rows are 2 blocks), the column tiles are split into runs of
// `tiles` whole tiles, each run a program whose rows' states are merged afterwards; none
// is empty. Split i covers tiles [i * tiles, min((i + 1) * tiles, n_tiles)).
struct ColumnSplits {
  int64_t tiles, count;
};

HIMO_HD ColumnSplits column_splits(int64_t row_blocks, int64_t n_tiles, int64_t target) {
  const int64_t want = target > row_blocks ? cdiv(target, row_blocks) : 1;
  const int64_t tiles = cdiv(n_tiles, want < n_tiles ? want : n_tiles);
  return {tiles, cdiv(n_tiles, tiles)};
}

// Per-row (or per-column) backward statistics, as dual_infonce.h's Side; nll null: absent.
template <typename acc_t>
struct SideView {
  const acc_t *nll, *ref, *gp, *c_off, *c_label;
  HIMO_HD acc_t weight(int64_t i, acc_t x, bool label) const {
    return ce_weight(x, ref[i], nll[i], gp[i], label ? c_label[i] : c_off[i]);
  }
};

// Weight pass of the backward: this thread's half of row r overwritten with W = dloss/dx
// (the rows' side, plus the columns' where present: the square case); returns Σ W·dot,
// this half's part of the scale's gradient.
template <typename acc_t>
HIMO_HD acc_t weights_row(Tile<acc_t>& t, int r, int half, acc_t s, const SideView<acc_t>& rows,
                          const SideView<acc_t>& cols) {
  const int64_t i = t.row0 + r;
  acc_t ds = 0;
  for (int c = half; c < t.cols; c += 2) {
    const bool label = t.is_label(r, c);
    const acc_t dot = t.dot(r, c), x = label ? rows.ref[i] : s * dot;
    acc_t w = rows.weight(i, x, label);
    if (cols.nll != nullptr) w += cols.weight(t.col0 + c, x, label);
    ds += w * dot;
    t.dots[r * t.ld + c] = w;
  }
  return ds;
}

}  // namespace tiles
}  // namespace himo
