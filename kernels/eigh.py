"""HiDe stage 2 (PCA): symmetric eigensolvers that a CUDA graph can capture.

HiDe decomposes the small Gram / covariance matrix in full (himo_fast.pca). On a GPU,
cuSOLVER's syevd (himo_fast::sym_eigh, without its info read) is sync-free but costs
milliseconds whatever the size (1.4 ms at 128², benchmarks/README.md) and cannot be captured
in a CUDA graph (CUSOLVER_STATUS_INTERNAL_ERROR inside a capture; syevj cannot either,
XsyevBatched only up to 512: benchmarks/eigh_probe.py on an H100). Which solver runs when is
himo_fast.backends' choice; this module has two, both float64 inside, both a static
sequence of launches with no host read:

``tridiagonal_eigh`` (n <= SMALL_MAX = 256, the per-rank Gram matrix of the paper's recipe,
eagerly and in captures; up to TRIDIAGONAL_MAX = 1024 in captures): Householder reduction
to tridiagonal form (in one program up to 256), eigenvalues by multisection of Sturm counts,
eigenvectors by inverse iteration with the clusters re-orthogonalised (the LAPACK sytrd /
stebz / stein / ormtr route, each stage parallel over eigenvalues where LAPACK loops).

``jacobi_eigh`` (any n; used while capturing above 1024): two-sided cyclic Jacobi with the
round-robin (parallel) ordering. A sweep is n-1 steps; each step rotates n/2 disjoint index
pairs at once: one small kernel computes the n/2 rotations from the current A, one applies
``A ← JᵀAJ`` (double-buffered) and ``V ← VJ``. Float64 whatever the input (the rotations
touch each entry thousands of times; in float32 the eigenvalues drift by ≈ 4e-5 relative, in
float64 they end below float32 LAPACK's own error), with a fixed sweep count. A pair whose
off-diagonal entry is already negligible gets the identity, so extra sweeps change nothing
and degenerate matrices (zero, repeated eigenvalues) stay finite.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import check_matrix

# Sweeps of the cyclic Jacobi method: the off-diagonal norm falls quadratically once the
# angles are small. Measured ‖off(A)‖/‖A‖ (float64 torch twin of these steps, n = 768,
# Gram matrices of Gaussian rows): decaying spectrum 7.7e-9 after 11 sweeps, 2.4e-12 after
# 12; isotropic 1.2e-7 after 11, 2.7e-9 after 12 (so ≈ 1e-15 after 13).
SWEEPS = 13
# Tiles of the update kernel. Per-sweep graph time on an H100 (benchmarks/jacobi_profile.py,
# results/20261123T003853Z): n = 768: 17.6 ms at 16/32 (pairs/rows), 15.8 at 8/32, 25.9 at
# 32/64, 93.6 at 64/64; n = 128: 0.70, 0.66, 1.34, 9.2 ms. 16/32 is the one the GPU tests
# ran with; 8/32 is 10 % faster and untested there. Either way a step costs ≈ 20 us
# against ≈ 6 us of memory traffic (likely cause: a tile's rows are short scattered pieces;
# not profiled further).
BLOCK_PAIRS = 16  # index pairs per program along each side of an A tile
BLOCK_ROWS = 32  # rows of V per program
ROTATIONS_BLOCK = 128  # pairs per program of the rotation kernel


@triton.jit
def _position(j, step, n):
    """Round-robin (circle) schedule: index 0 stays, the others rotate by one per step."""
    return tl.where(j == 0, 0, 1 + (j - 1 + step) % (n - 1))


@triton.jit
def _rotation(a_ptr, n, p, q, ok):
    """(c, s) with [[c, s], [-s, c]] diagonalising the 2 x 2 block (p, q) of A (Golub & Van
    Loan, sym.schur2); the identity where |a_pq| is negligible against √(a_pp·a_qq), and
    for lanes past the last pair (``ok`` false: their indices are out of range)."""
    app = tl.load(a_ptr + p * n + p, mask=ok, other=1.0)
    aqq = tl.load(a_ptr + q * n + q, mask=ok, other=1.0)
    apq = tl.load(a_ptr + p * n + q, mask=ok, other=0.0)
    skip = tl.abs(apq) <= 2.220446049250313e-16 * tl.sqrt(tl.abs(app * aqq))
    tau = (aqq - app) / (2.0 * tl.where(skip, 1.0, apq))
    at = tl.abs(tau)
    # √(1 + τ²) without overflowing τ² for huge τ
    inv = 1.0 / tl.maximum(at, 1.0)
    small = tl.minimum(at, 1.0)
    root = tl.where(at > 1.0, at * tl.sqrt(1.0 + inv * inv), tl.sqrt(1.0 + small * small))
    t = tl.where(tau >= 0.0, 1.0, -1.0) / (at + root)
    c = 1.0 / tl.sqrt(1.0 + t * t)
    return tl.where(skip, 1.0, c), tl.where(skip, 0.0, t * c)


@triton.jit(do_not_specialize=["n", "step"])
def _jacobi_rotations_kernel(a_ptr, cs_ptr, n, step, BLOCK: tl.constexpr):
    """Each pair's rotation, once per step: (c, s) into cs[0], cs[1] (the update kernel
    would otherwise recompute them, square roots and divisions in float64, for every
    element of its tiles: 16 us a launch instead of 3 at n = 128, measured)."""
    h = n // 2
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = j < h
    c, s = _rotation(a_ptr, n, _position(j, step, n), _position(n - 1 - j, step, n), ok)
    tl.store(cs_ptr + j, c, mask=ok)
    tl.store(cs_ptr + h + j, s, mask=ok)


@triton.jit(do_not_specialize=["n", "step", "a_programs"])
def _jacobi_step_kernel(a_in, a_out, v_ptr, cs_ptr, n, step, a_programs,
                        BLOCK: tl.constexpr, BLOCK_V: tl.constexpr):
    """One parallel Jacobi step with the rotations in cs. Axis 0: a block of column pairs.
    Axis 1: a block of row pairs of A (the first ``a_programs``), else a block of rows of
    V. (The two branches name their variables apart: Triton merges same-named values
    across an if.)"""
    h = n // 2
    jb = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok_b = jb < h
    pb = _position(jb, step, n)
    qb = _position(n - 1 - jb, step, n)
    cb = tl.load(cs_ptr + jb, mask=ok_b, other=1.0)
    sb = tl.load(cs_ptr + h + jb, mask=ok_b, other=0.0)
    row_block = tl.program_id(1)
    if row_block < a_programs:
        ja = row_block * BLOCK + tl.arange(0, BLOCK)
        ok_pairs = ja < h
        ok_a = ok_pairs[:, None] & ok_b[None, :]
        pa = _position(ja, step, n)
        qa = _position(n - 1 - ja, step, n)
        ca = tl.load(cs_ptr + ja, mask=ok_pairs, other=1.0)[:, None]
        sa = tl.load(cs_ptr + h + ja, mask=ok_pairs, other=0.0)[:, None]
        cb2, sb2 = cb[None, :], sb[None, :]
        app = tl.load(a_in + pa[:, None] * n + pb[None, :], mask=ok_a, other=0.0)
        apq = tl.load(a_in + pa[:, None] * n + qb[None, :], mask=ok_a, other=0.0)
        aqp = tl.load(a_in + qa[:, None] * n + pb[None, :], mask=ok_a, other=0.0)
        aqq = tl.load(a_in + qa[:, None] * n + qb[None, :], mask=ok_a, other=0.0)
        # Rows (Jᵀ·), then columns (·J).
        rpp = ca * app - sa * aqp
        rpq = ca * apq - sa * aqq
        rqp = sa * app + ca * aqp
        rqq = sa * apq + ca * aqq
        diagonal_block = ja[:, None] == jb[None, :]  # the pair's own 2 x 2: off-diagonal → 0
        tl.store(a_out + pa[:, None] * n + pb[None, :], cb2 * rpp - sb2 * rpq, mask=ok_a)
        tl.store(a_out + pa[:, None] * n + qb[None, :],
                 tl.where(diagonal_block, 0.0, sb2 * rpp + cb2 * rpq), mask=ok_a)
        tl.store(a_out + qa[:, None] * n + pb[None, :],
                 tl.where(diagonal_block, 0.0, cb2 * rqp - sb2 * rqq), mask=ok_a)
        tl.store(a_out + qa[:, None] * n + qb[None, :], sb2 * rqp + cb2 * rqq, mask=ok_a)
    else:
        rows = (row_block - a_programs) * BLOCK_V + tl.arange(0, BLOCK_V)
        ok_v = (rows < n)[:, None] & ok_b[None, :]
        vp = tl.load(v_ptr + rows[:, None] * n + pb[None, :], mask=ok_v, other=0.0)
        vq = tl.load(v_ptr + rows[:, None] * n + qb[None, :], mask=ok_v, other=0.0)
        tl.store(v_ptr + rows[:, None] * n + pb[None, :], cb[None, :] * vp - sb[None, :] * vq,
                 mask=ok_v)
        tl.store(v_ptr + rows[:, None] * n + qb[None, :], sb[None, :] * vp + cb[None, :] * vq,
                 mask=ok_v)


def _check_symmetric_input(a: torch.Tensor) -> None:
    """Both solvers' contract: a square float32 / float64 matrix."""
    check_matrix("a", a)
    if a.shape[1] != a.shape[0]:
        raise ValueError(f"a must be a square matrix, got shape {tuple(a.shape)}")
    if a.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"a must be float32 or float64, got {a.dtype}")


def jacobi_eigh(a: torch.Tensor, sweeps: int = SWEEPS):
    """(eigenvalues ascending, eigenvectors as columns) of the symmetric matrix ``a``, like
    torch.linalg.eigh, with a static sequence of kernel launches (capturable). float32 or
    float64 in and out; float64 inside. Reads the lower and upper triangle alike."""
    _check_symmetric_input(a)
    k = a.shape[0]
    if not isinstance(sweeps, int) or sweeps < 0:
        raise ValueError(f"sweeps must be a non-negative int, got {sweeps!r}")
    # Even size: an odd matrix gets a zero row and column, which no rotation ever touches
    # (its off-diagonal entries are exactly zero), so index k stays the unit vector e_k.
    n = k + (k % 2)
    buf = torch.zeros(2, n, n, dtype=torch.float64, device=a.device)
    buf[0, :k, :k] = a
    v = torch.eye(n, dtype=torch.float64, device=a.device)
    half = n // 2
    a_programs = triton.cdiv(half, BLOCK_PAIRS)
    grid = (a_programs, a_programs + triton.cdiv(n, BLOCK_ROWS))
    cs = torch.empty(2, half, dtype=torch.float64, device=a.device)
    rotations_grid = (triton.cdiv(half, ROTATIONS_BLOCK),)
    current = 0
    for _ in range(sweeps):
        for step in range(n - 1):
            _jacobi_rotations_kernel[rotations_grid](buf[current], cs, n, step,
                                                     BLOCK=ROTATIONS_BLOCK)
            _jacobi_step_kernel[grid](buf[current], buf[1 - current], v, cs, n, step,
                                      a_programs, BLOCK=BLOCK_PAIRS, BLOCK_V=BLOCK_ROWS)
            current = 1 - current
    w, order = buf[current].diagonal()[:k].sort()
    return w.to(a.dtype), v[:k, :k][:, order].to(a.dtype)


# ---------------------------------------------------------------- the small-matrix solver
#
# ``tridiagonal_eigh``: the full decomposition of a symmetric n x n matrix, n <= SMALL_MAX
# (and up to TRIDIAGONAL_MAX for captures), in launches of which none depends on the data
# through the host:
#
#   1. Householder reduction to tridiagonal T = QᵀAQ (LAPACK sytrd's unblocked algorithm),
#      Q kept as its n−2 reflectors: one program (A in registers up to RESIDENT_MAX, tiles
#      from L1/L2 up to SMALL_MAX), or above that 2 launches a step over the whole GPU;
#   2. eigenvalues of T by multisection of Sturm counts (stebz): every eigenvalue
#      independently, PROBES points per iteration, a fixed iteration count;
#   3. eigenvectors of T by inverse iteration (stein): each lane solves (T − x_j I) y = b by
#      Gaussian elimination with partial pivoting, ROUNDS times; between rounds, the
#      vectors of each cluster (a chain of eigenvalues closer than CLUSTER·‖T‖) are
#      orthonormalised against each other (a program per cluster, two Gram-Schmidt passes);
#   4. V = Q Y: the reflectors applied to Y's column blocks, one launch (ormtr).
#
# Why not Jacobi or QL here: a Jacobi sweep is n−1 dependent steps and 10+ sweeps are
# needed (≈ 1300 barriers at n = 128); QL's bulge chase is O(n²) dependent scalar
# rotations. Here the dependent chains are the n−2 reflector steps (each a matrix-vector
# product and a rank-2 update of the trailing block) and O(n) scalar recurrences that run
# for all eigenvalues at once. Float64 throughout.
#
# Floor and prediction at n = 128 on an H100 (not yet measured): the reduction is 126
# dependent steps of ≈ 6 block reductions over the register tile (≈ 1 µs a step): ≈ 0.13
# ms; bisection 13 x 128 dependent divisions ≈ 0.09 ms; inverse iteration 3 rounds of 4
# passes of 128 dependent steps ≈ 0.05 ms; back-transformation 126 steps on 16-column
# blocks ≈ 0.04 ms; ≈ 10 small torch ops of glue. ≈ 0.3 ms against syevd's 1.44 ms.

SMALL_MAX = 256  # above this, one program's passes over the n x n matrix cost milliseconds
# Above SMALL_MAX the reduction runs on the whole GPU, 2 launches a step (_grid_reduction):
# for a capture at d = 768, where XsyevBatched cannot be captured and Jacobi costs 230 ms.
TRIDIAGONAL_MAX = 1024
GRID_COLS = 16  # columns per program of the grid reduction (16 float64: 128-byte rows)
GRID_ROWS = 64  # rows per tile there
# Up to this (padded) size the reduction keeps A in registers: 128² float64 over 16 warps
# is 64 registers a thread. Above it, column blocks of PROGRAM_COLS from L1/L2.
RESIDENT_MAX = 128
# Bisection: BISECT_BLOCK eigenvalues a program, PROBES Sturm-count points each an iteration
# (a power of 2): log2(PROBES + 1) bits an iteration, (PROBES+1)^BISECT_ITERS >= 2^63, so
# the interval shrinks from the Gershgorin width to below float64's resolution of it. A
# count is n dependent steps with a float64 division each (≈ 100 cycles, estimated):
# latency-bound, so more probes per eigenvalue (fewer iterations) and fewer eigenvalues per
# program (more programs) cost little extra per step. Prediction, not yet measured:
# 13 x 128 steps ≈ 0.09 ms at n = 128 (8 probes x 20 iterations: ≈ 0.14 ms).
BISECT_BLOCK = 8
PROBES = 32
BISECT_ITERS = 13
ROUNDS = 3  # inverse-iteration rounds; one more than an isolated eigenvalue needs
CLUSTER = 1e-3  # LAPACK stein's reorthogonalisation threshold, relative to ‖T‖
PROGRAM_COLS = 32  # columns per block in the one-program reduction
EIGEN_BLOCK = 32  # eigenvectors (lanes) per program of the inverse iteration
FLOAT64_EPS = tl.constexpr(2.220446049250313e-16)
SAFE_MIN = tl.constexpr(2.2250738585072014e-308)
BIG = tl.constexpr(1e100)  # the back substitution rescales a lane whose entries pass this


@triton.jit
def _householder(x, x0, cols, k):
    """Householder reflector of step k from x, row k of A past the diagonal (x0 = its
    first entry, a_{k,k+1}): (v, β, α), v zero up to index k, (I − βvvᵀ)x = α e_{k+1}.
    x0 − α = x0 + sign(x0)‖x‖ has no cancellation."""
    norm = tl.sqrt(tl.sum(x * x, 0))
    alpha = tl.where(x0 >= 0, -norm, norm)
    v = tl.where(cols == k + 1, x - alpha, x)
    vv = 2.0 * norm * (norm + tl.abs(x0))
    beta = tl.where(vv > 0, 2.0 / tl.where(vv > 0, vv, 1.0), 0.0)
    return v, beta, alpha


@triton.jit
def _reflector(a_ptr, n, k, NP: tl.constexpr):
    """_householder of step k from row k of A (= column k) in memory, and a_kk."""
    cols = tl.arange(0, NP)
    x = tl.load(a_ptr + k * n + cols, mask=(cols > k) & (cols < n), other=0.0)
    v, beta, alpha = _householder(x, tl.load(a_ptr + k * n + k + 1), cols, k)
    return v, beta, alpha, tl.load(a_ptr + k * n + k)


@triton.jit
def _column_dots(src_ptr, v_ptr, shift, n, k, cols, col_in, ROWS: tl.constexpr):
    """Σ_{r>k} src[r, cols] v_r for the reflector v of step k read at v_ptr (row k of h, or
    row k of A with shift = α: v = x − α e_{k+1}); ROWS rows at a time."""
    acc = tl.zeros(cols.shape, dtype=tl.float64)
    for r0 in range((k + 1) // ROWS * ROWS, n, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_in = (rows > k) & (rows < n)
        tile = tl.load(src_ptr + rows[:, None] * n + cols[None, :],
                       mask=row_in[:, None] & col_in[None, :], other=0.0)
        v_r = tl.load(v_ptr + rows, mask=row_in, other=0.0)
        acc += tl.sum(tile * tl.where(rows == k + 1, v_r - shift, v_r)[:, None], 0)
    return acc


@triton.jit
def _reflect_products(a_ptr, p_ptr, n, k, alpha, beta, cols, ROWS: tl.constexpr):
    """Step k, part 1 on the columns ``cols``: p = β S v (S, the trailing block, is
    symmetric: column sums of v-weighted rows), v read from row k of A."""
    col_in = (cols > k) & (cols < n)
    p = _column_dots(a_ptr, a_ptr + k * n, alpha, n, k, cols, col_in, ROWS)
    tl.store(p_ptr + cols, beta * p, mask=cols < n)


@triton.jit
def _reflect_update(a_ptr, h_ptr, beta_ptr, p_ptr, n, k, cols, NP: tl.constexpr,
                    ROWS: tl.constexpr):
    """Step k, part 2 on the columns ``cols``: w = p − (β/2)(pᵀv)v, and S ← S − v wᵀ − w vᵀ
    (v in row k of h, p complete)."""
    idx = tl.arange(0, NP)
    beta = tl.load(beta_ptr + k)
    half_pv = 0.5 * beta * tl.sum(tl.load(p_ptr + idx, mask=(idx > k) & (idx < n), other=0.0)
                                  * tl.load(h_ptr + k * n + idx, mask=idx < n, other=0.0), 0)
    col_in = (cols > k) & (cols < n)
    v_c = tl.load(h_ptr + k * n + cols, mask=col_in, other=0.0)
    w_c = tl.load(p_ptr + cols, mask=col_in, other=0.0) - half_pv * v_c
    for r0 in range((k + 1) // ROWS * ROWS, n, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_in = (rows > k) & (rows < n)
        inside = row_in[:, None] & col_in[None, :]
        v_r = tl.load(h_ptr + k * n + rows, mask=row_in, other=0.0)
        w_r = tl.load(p_ptr + rows, mask=row_in, other=0.0) - half_pv * v_r
        tile = tl.load(a_ptr + rows[:, None] * n + cols[None, :], mask=inside, other=0.0)
        tile = tile - v_r[:, None] * w_c[None, :] - w_r[:, None] * v_c[None, :]
        tl.store(a_ptr + rows[:, None] * n + cols[None, :], tile, mask=inside)


@triton.jit
def _record_step(h_ptr, beta_ptr, d_ptr, e_ptr, n, k, v, beta, alpha, akk, NP: tl.constexpr):
    cols = tl.arange(0, NP)
    tl.store(h_ptr + k * n + cols, v, mask=cols < n)
    tl.store(beta_ptr + k, beta)
    tl.store(d_ptr + k, akk)
    tl.store(e_ptr + k, alpha)


@triton.jit(do_not_specialize=["n"])
def _tridiagonalize_kernel(run_ptr, a_ptr, d_ptr, e_ptr, h_ptr, beta_ptr, p_ptr, n,
                           NP: tl.constexpr, COLS: tl.constexpr, ROWS: tl.constexpr):
    """One program. a (n x n, overwritten) → d, e (T's diagonal and off-diagonal) and the
    reflectors, T = QᵀAQ with Q = H_0 ⋯ H_{n-3}: H_k = I − β_k v_k v_kᵀ with v_k zero up to
    index k (row k of h, β_k in beta). p is a scratch vector (n). Each step runs the grid
    reduction's two parts over all column blocks in turn."""
    n = n * tl.load(run_ptr)  # run = 0: a skipped launch (tridiagonal_eigh's run)
    for k in range(0, n - 2):
        v, beta, alpha, akk = _reflector(a_ptr, n, k, NP)
        _record_step(h_ptr, beta_ptr, d_ptr, e_ptr, n, k, v, beta, alpha, akk, NP)
        for c0 in range((k + 1) // COLS * COLS, n, COLS):
            _reflect_products(a_ptr, p_ptr, n, k, alpha, beta, c0 + tl.arange(0, COLS), ROWS)
        tl.debug_barrier()
        for c0 in range((k + 1) // COLS * COLS, n, COLS):
            _reflect_update(a_ptr, h_ptr, beta_ptr, p_ptr, n, k, c0 + tl.arange(0, COLS), NP,
                            ROWS)
        tl.debug_barrier()
    if n >= 2:
        tl.store(d_ptr + n - 2, tl.load(a_ptr + (n - 2) * n + n - 2))
        tl.store(e_ptr + n - 2, tl.load(a_ptr + (n - 1) * n + n - 2))
    if n >= 1:
        tl.store(d_ptr + n - 1, tl.load(a_ptr + (n - 1) * n + n - 1))


@triton.jit(do_not_specialize=["n"])
def _tridiagonalize_resident_kernel(run_ptr, a_ptr, d_ptr, e_ptr, h_ptr, beta_ptr, n,
                                    NP: tl.constexpr):
    """_tridiagonalize_kernel for NP <= RESIDENT_MAX: A stays in registers (one NP x NP
    tile; a step's row extraction and product are reductions over it), so that a step
    costs no memory traffic."""
    n = n * tl.load(run_ptr)  # run = 0: a skipped launch (tridiagonal_eigh's run)
    idx = tl.arange(0, NP)
    inside = (idx < n)[:, None] & (idx < n)[None, :]
    a = tl.load(a_ptr + idx[:, None] * n + idx[None, :], mask=inside, other=0.0)
    for k in range(0, n - 2):
        row = tl.sum(tl.where(idx[:, None] == k, a, 0.0), 0)  # row k = column k
        tl.store(d_ptr + k, tl.sum(tl.where(idx == k, row, 0.0), 0))
        v, beta, alpha = _householder(tl.where(idx > k, row, 0.0),
                                      tl.sum(tl.where(idx == k + 1, row, 0.0), 0), idx, k)
        tl.store(e_ptr + k, alpha)
        tl.store(h_ptr + k * n + idx, v, mask=idx < n)
        tl.store(beta_ptr + k, beta)
        p = tl.where(idx > k, beta * tl.sum(a * v[None, :], 1), 0.0)
        w = p - (0.5 * beta * tl.sum(p * v, 0)) * v
        a = a - v[:, None] * w[None, :] - w[:, None] * v[None, :]
    # the last 2 x 2 block
    last = tl.sum(tl.where(idx[:, None] == n - 1, a, 0.0), 0)  # row n-1
    if n >= 2:
        before = tl.sum(tl.where(idx[:, None] == n - 2, a, 0.0), 0)
        tl.store(d_ptr + n - 2, tl.sum(tl.where(idx == n - 2, before, 0.0), 0))
        tl.store(e_ptr + n - 2, tl.sum(tl.where(idx == n - 2, last, 0.0), 0))
    if n >= 1:
        tl.store(d_ptr + n - 1, tl.sum(tl.where(idx == n - 1, last, 0.0), 0))


@triton.jit
def _gershgorin(d_ptr, e_ptr, n, CHUNK: tl.constexpr):
    """(lower, upper) Gershgorin bounds of T, and pivmin, LAPACK stebz's floor for a
    Sturm pivot (safe-minimum · max(1, max e²): e²/pivmin never overflows). In chunks, so
    that a one-warp program holds no n-long vector."""
    lower = tl.full((), float("inf"), tl.float64)
    upper = tl.full((), -float("inf"), tl.float64)
    e2max = tl.full((), 1.0, tl.float64)
    for i0 in range(0, n, CHUNK):
        i = i0 + tl.arange(0, CHUNK)
        d = tl.load(d_ptr + i, mask=i < n, other=0.0)
        e = tl.abs(tl.load(e_ptr + i, mask=i < n - 1, other=0.0))
        e_before = tl.abs(tl.load(e_ptr + i - 1, mask=(i >= 1) & (i < n), other=0.0))
        lower = tl.minimum(lower, tl.min(tl.where(i < n, d - e - e_before, float("inf")), 0))
        upper = tl.maximum(upper, tl.max(tl.where(i < n, d + e + e_before, -float("inf")), 0))
        e2max = tl.maximum(e2max, tl.max(e * e, 0))
    return lower, upper, e2max * SAFE_MIN


@triton.jit(do_not_specialize=["n"])
def _bisect_kernel(run_ptr, d_ptr, e_ptr, w_ptr, n, BLOCK: tl.constexpr,
                   PROBES: tl.constexpr, ITERS: tl.constexpr):
    """Eigenvalue j of T (ascending) for the BLOCK lanes j of this program. count(x), the
    number of eigenvalues below x, is the number of negative pivots of LDLᵀ(T − xI);
    λ_j lies in [x, ·) when count(x) <= j, below x otherwise."""
    n = n * tl.load(run_ptr)  # run = 0: a skipped launch (tridiagonal_eigh's run)
    lower, upper, pivmin = _gershgorin(d_ptr, e_ptr, n, 128)
    norm = tl.maximum(tl.abs(lower), tl.abs(upper))
    margin = 2.1 * FLOAT64_EPS * norm * n + 4.2 * pivmin  # stebz's widening of the bounds
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    lo = tl.zeros([BLOCK], dtype=tl.float64) + (lower - margin)
    hi = tl.zeros([BLOCK], dtype=tl.float64) + (upper + margin)
    frac = (tl.arange(0, PROBES) + 1).to(tl.float64) / (PROBES + 1)
    d0 = tl.load(d_ptr)
    for _ in range(ITERS):
        x = lo[:, None] + (hi - lo)[:, None] * frac[None, :]
        q = d0 - x
        q = tl.where(tl.abs(q) <= pivmin, -pivmin, q)
        count = (q < 0).to(tl.int32)
        for i in range(1, n):
            e = tl.load(e_ptr + i - 1)
            q = (tl.load(d_ptr + i) - x) - (e * e) / q
            q = tl.where(tl.abs(q) <= pivmin, -pivmin, q)
            count += (q < 0).to(tl.int32)
        below = count <= j[:, None]
        lo = tl.max(tl.where(below, x, lo[:, None]), 1)
        hi = tl.min(tl.where(below, hi[:, None], x), 1)
    tl.store(w_ptr + j, 0.5 * (lo + hi), mask=j < n)


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _minimum(a, b):
    return tl.minimum(a, b)


@triton.jit(do_not_specialize=["n"])
def _shifts_and_clusters_kernel(run_ptr, d_ptr, e_ptr, w_ptr, shift_ptr, start_ptr, size_ptr, n,
                                NP: tl.constexpr, CLUSTER: tl.constexpr):
    """One program, from the eigenvalues w (ascending): the inverse-iteration shifts, a
    chain of (nearly) equal eigenvalues spread at least δ = 10ε‖T‖ apart (stein's
    perturbation): x_j = max(λ_j, x_{j-1} + δ) = jδ + max_{i<=j}(λ_i − iδ); and the
    clusters, chains whose consecutive gaps are within CLUSTER·‖T‖: start_j is the first
    index of j's chain, size_j (for a first index) its length."""
    n = n * tl.load(run_ptr)  # run = 0: a skipped launch (tridiagonal_eigh's run)
    lower, upper, pivmin = _gershgorin(d_ptr, e_ptr, n, 128)
    norm = tl.maximum(tl.abs(lower), tl.abs(upper))
    j = tl.arange(0, NP)
    ok = j < n
    w = tl.load(w_ptr + j, mask=ok, other=0.0)
    w_before = tl.load(w_ptr + j - 1, mask=(j >= 1) & ok, other=0.0)  # j = 0 opens anyway
    w_after = tl.load(w_ptr + j + 1, mask=j + 1 < n, other=0.0)  # and j = n-1 closes
    delta = 10.0 * FLOAT64_EPS * norm
    jf = j.to(tl.float64)
    shift = jf * delta + tl.associative_scan(tl.where(ok, w - jf * delta, -float("inf")), 0,
                                             _maximum)
    opens = (j == 0) | (w - w_before > CLUSTER * norm)
    start = tl.associative_scan(tl.where(opens & ok, j, 0), 0, _maximum)
    # the next chain's first index after j: the smallest i > j that opens one (or n)
    opens_next = (j + 1 >= n) | (w_after - w > CLUSTER * norm)
    next_start = tl.associative_scan(tl.where(opens_next, j + 1, n), 0, _minimum, reverse=True)
    tl.store(shift_ptr + j, shift, mask=ok)
    tl.store(start_ptr + j, start, mask=ok)
    tl.store(size_ptr + j, next_start - j, mask=ok)


@triton.jit(do_not_specialize=["n"])
def _inverse_iteration_kernel(run_ptr, d_ptr, e_ptr, shift_ptr, y_ptr, u_ptr, n,
                              FIRST: tl.constexpr, BLOCK: tl.constexpr):
    """One round of inverse iteration for the BLOCK lanes j of this program: y_j ←
    (T − x_j I)⁻¹ y_j, normalised. y is n x n with lane j in column j (FIRST: y_j starts
    pseudo-random); u (4 x n x n) holds each lane's U and transformed right-hand side.
    Elimination with partial pivoting (LAPACK lagtf): U has three diagonals. Pivots
    below ε·max(‖T‖, 1) are raised to it, as lagts does, so that an exact eigenvalue as
    shift gives a large finite solution (T is scaled: ‖T‖ >= 1 or T = 0)."""
    n = n * tl.load(run_ptr)  # run = 0: a skipped launch (tridiagonal_eigh's run)
    lower, upper, pivmin = _gershgorin(d_ptr, e_ptr, n, 128)
    tol = FLOAT64_EPS * tl.maximum(tl.maximum(tl.abs(lower), tl.abs(upper)), 1.0)
    lanes = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = lanes < n
    x = tl.load(shift_ptr + lanes, mask=ok, other=0.0)
    plane = n * n
    # the right-hand side, scaled to unit norm
    norm2 = tl.zeros([BLOCK], dtype=tl.float64)
    for i in range(0, n):
        if FIRST:
            b = tl.rand(20261202, i * n + lanes).to(tl.float64) - 0.5
            tl.store(y_ptr + i * n + lanes, b, mask=ok)
        else:
            b = tl.load(y_ptr + i * n + lanes, mask=ok, other=0.0)
        norm2 += b * b
    inv = 1.0 / tl.sqrt(tl.maximum(norm2, SAFE_MIN))
    # forward elimination; (p, q, f): the pending row's entries at columns i, i+1 and its rhs
    p = tl.load(d_ptr) - x
    q = tl.zeros([BLOCK], dtype=tl.float64) + tl.load(e_ptr, mask=n > 1, other=0.0)
    f = tl.load(y_ptr + lanes, mask=ok, other=0.0) * inv
    for i in range(0, n - 1):
        c = tl.load(e_ptr + i)  # T[i+1, i]
        a1 = tl.load(d_ptr + i + 1) - x
        b1 = tl.load(e_ptr + i + 1, mask=i + 1 < n - 1, other=0.0)  # T[i+1, i+2]
        g = tl.load(y_ptr + (i + 1) * n + lanes, mask=ok, other=0.0) * inv
        swap = tl.abs(c) > tl.abs(p)
        tl.store(u_ptr + i * n + lanes, tl.where(swap, c, p), mask=ok)
        tl.store(u_ptr + plane + i * n + lanes, tl.where(swap, a1, q), mask=ok)
        tl.store(u_ptr + 2 * plane + i * n + lanes, tl.where(swap, b1, 0.0), mask=ok)
        tl.store(u_ptr + 3 * plane + i * n + lanes, tl.where(swap, g, f), mask=ok)
        mult = tl.where(swap, p / tl.where(swap, c, 1.0),
                        c / tl.where(p == 0.0, 1.0, p))  # not swapped and p = 0: c = 0 too
        p, q, f = (tl.where(swap, q - mult * a1, a1 - mult * q), tl.where(swap, -mult * b1, b1),
                   tl.where(swap, f - mult * g, g - mult * f))
    last = n - 1
    tl.store(u_ptr + last * n + lanes, p, mask=ok)
    tl.store(u_ptr + plane + last * n + lanes, tl.zeros([BLOCK], dtype=tl.float64), mask=ok)
    tl.store(u_ptr + 2 * plane + last * n + lanes, tl.zeros([BLOCK], dtype=tl.float64), mask=ok)
    tl.store(u_ptr + 3 * plane + last * n + lanes, f, mask=ok)
    # back substitution; a lane whose entries pass BIG is rescaled by 1/BIG from there on,
    # and the count of rescalings at each row (kept in u's first plane, no longer needed)
    # brings the earlier rows to the same scale afterwards.
    x1 = tl.zeros([BLOCK], dtype=tl.float64)
    x2 = tl.zeros([BLOCK], dtype=tl.float64)
    scaled = tl.zeros([BLOCK], dtype=tl.float64)
    for ii in range(0, n):
        i = n - 1 - ii
        u0 = tl.load(u_ptr + i * n + lanes, mask=ok, other=1.0)
        u1 = tl.load(u_ptr + plane + i * n + lanes, mask=ok, other=0.0)
        u2 = tl.load(u_ptr + 2 * plane + i * n + lanes, mask=ok, other=0.0)
        fi = tl.load(u_ptr + 3 * plane + i * n + lanes, mask=ok, other=0.0)
        u0 = tl.where(tl.abs(u0) < tol, tl.where(u0 < 0, -tol, tol), u0)
        xi = (fi - u1 * x1 - u2 * x2) / u0
        big = tl.abs(xi) > BIG
        xi = tl.where(big, xi / BIG, xi)
        x1 = tl.where(big, x1 / BIG, x1)
        scaled += big.to(tl.float64)
        tl.store(y_ptr + i * n + lanes, xi, mask=ok)
        tl.store(u_ptr + i * n + lanes, scaled, mask=ok)
        x2 = x1
        x1 = xi
    norm2 = tl.zeros([BLOCK], dtype=tl.float64)
    for i in range(0, n):
        behind = scaled - tl.load(u_ptr + i * n + lanes, mask=ok, other=0.0)
        yi = tl.load(y_ptr + i * n + lanes, mask=ok, other=0.0)
        yi = tl.where(behind > 0, yi * tl.exp2(-behind * 332.19280948873626), yi)  # BIG^-behind
        tl.store(y_ptr + i * n + lanes, yi, mask=ok)
        norm2 += yi * yi
    inv = 1.0 / tl.sqrt(tl.maximum(norm2, SAFE_MIN))
    for i in range(0, n):
        yi = tl.load(y_ptr + i * n + lanes, mask=ok, other=0.0)
        tl.store(y_ptr + i * n + lanes, yi * inv, mask=ok)


@triton.jit(do_not_specialize=["n"])
def _cluster_orthonormalize_kernel(run_ptr, y_ptr, start_ptr, size_ptr, n, ROWS: tl.constexpr,
                                   COLS: tl.constexpr):
    """Program j, if j opens a cluster of size > 1: columns j+1 … j+size−1 of y (n x n,
    unit columns) in order, each losing its components along the cluster's earlier
    columns, twice (classical Gram-Schmidt run twice is orthogonal to working
    precision), then normalised. Other programs return at once: clusters are independent.
    Column j is updated in place, ROWS rows at a time (one block when n <= ROWS)."""
    n = n * tl.load(run_ptr)  # run = 0: a skipped launch (tridiagonal_eigh's run)
    head = tl.program_id(0)
    if (n > 0) & (tl.load(start_ptr + head) == head):  # n = 0: start was not written
        for j in range(head + 1, head + tl.load(size_ptr + head)):
            for _ in range(2):
                for c0 in range(head, j, COLS):
                    cols = c0 + tl.arange(0, COLS)
                    col_in = cols < j
                    dots = tl.zeros([COLS], dtype=tl.float64)
                    for r0 in range(0, n, ROWS):
                        rows = r0 + tl.arange(0, ROWS)
                        tile = tl.load(y_ptr + rows[:, None] * n + cols[None, :],
                                       mask=(rows < n)[:, None] & col_in[None, :], other=0.0)
                        yj = tl.load(y_ptr + rows * n + j, mask=rows < n, other=0.0)
                        dots += tl.sum(tile * yj[:, None], 0)
                    tl.debug_barrier()
                    for r0 in range(0, n, ROWS):
                        rows = r0 + tl.arange(0, ROWS)
                        tile = tl.load(y_ptr + rows[:, None] * n + cols[None, :],
                                       mask=(rows < n)[:, None] & col_in[None, :], other=0.0)
                        yj = tl.load(y_ptr + rows * n + j, mask=rows < n, other=0.0)
                        tl.store(y_ptr + rows * n + j, yj - tl.sum(tile * dots[None, :], 1),
                                 mask=rows < n)
                    tl.debug_barrier()
            norm2 = tl.full((), 0.0, tl.float64)
            for r0 in range(0, n, ROWS):
                rows = r0 + tl.arange(0, ROWS)
                yj = tl.load(y_ptr + rows * n + j, mask=rows < n, other=0.0)
                norm2 += tl.sum(yj * yj, 0)
            inv = 1.0 / tl.sqrt(tl.maximum(norm2, SAFE_MIN))
            tl.debug_barrier()
            for r0 in range(0, n, ROWS):
                rows = r0 + tl.arange(0, ROWS)
                yj = tl.load(y_ptr + rows * n + j, mask=rows < n, other=0.0)
                tl.store(y_ptr + rows * n + j, yj * inv, mask=rows < n)
            tl.debug_barrier()


@triton.jit(do_not_specialize=["n", "k"])
def _reflect_products_kernel(run_ptr, a_ptr, h_ptr, beta_ptr, d_ptr, e_ptr, p_ptr, n, k,
                             NP: tl.constexpr, COLS: tl.constexpr, ROWS: tl.constexpr):
    """Step k of the grid reduction (n above SMALL_MAX), part 1 on this program's COLS
    columns; each program forms the reflector from row k itself (O(n)), program 0 records
    it."""
    n = n * tl.load(run_ptr)  # run = 0: a skipped launch (tridiagonal_eigh's run)
    v, beta, alpha, akk = _reflector(a_ptr, n, k, NP)
    if tl.program_id(0) == 0:
        _record_step(h_ptr, beta_ptr, d_ptr, e_ptr, n, k, v, beta, alpha, akk, NP)
    _reflect_products(a_ptr, p_ptr, n, k, alpha, beta,
                      tl.program_id(0) * COLS + tl.arange(0, COLS), ROWS)


@triton.jit(do_not_specialize=["n", "k"])
def _reflect_update_kernel(run_ptr, a_ptr, h_ptr, beta_ptr, p_ptr, n, k, NP: tl.constexpr,
                           COLS: tl.constexpr, ROWS: tl.constexpr):
    """Part 2 on this program's COLS columns."""
    n = n * tl.load(run_ptr)  # run = 0: a skipped launch (tridiagonal_eigh's run)
    _reflect_update(a_ptr, h_ptr, beta_ptr, p_ptr, n, k,
                    tl.program_id(0) * COLS + tl.arange(0, COLS), NP, ROWS)


@triton.jit(do_not_specialize=["n"])
def _apply_reflectors_kernel(run_ptr, y_ptr, h_ptr, beta_ptr, n, COLS: tl.constexpr,
                             ROWS: tl.constexpr):
    """Y ← Q Y = H_0 (H_1 (⋯ H_{n-3} Y)) on this program's COLS columns: the eigenvectors
    of T become those of A. Columns are independent, so the whole back-transformation is
    one launch over column blocks (H_k touches rows > k only)."""
    n = n * tl.load(run_ptr)  # run = 0: a skipped launch (tridiagonal_eigh's run)
    cols = tl.program_id(0) * COLS + tl.arange(0, COLS)
    col_in = cols < n
    for kk in range(0, n - 2):
        k = n - 3 - kk
        r = tl.load(beta_ptr + k) * _column_dots(y_ptr, h_ptr + k * n, 0.0, n, k, cols, col_in,
                                                 ROWS)
        tl.debug_barrier()
        for r0 in range((k + 1) // ROWS * ROWS, n, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            row_in = (rows > k) & (rows < n)
            inside = row_in[:, None] & col_in[None, :]
            tile = tl.load(y_ptr + rows[:, None] * n + cols[None, :], mask=inside, other=0.0)
            v_r = tl.load(h_ptr + k * n + rows, mask=row_in, other=0.0)
            tl.store(y_ptr + rows[:, None] * n + cols[None, :], tile - v_r[:, None] * r[None, :],
                     mask=inside)
        tl.debug_barrier()


def _grid_reduction(run, work, d, e, h, beta, np2):
    """Householder reduction of the n x n ``work`` (n above SMALL_MAX) with 2 launches a
    step, each over column blocks on all the GPU's programs."""
    n = work.shape[0]
    p = torch.empty(n, dtype=work.dtype, device=work.device)
    grid = (triton.cdiv(n, GRID_COLS),)
    for k in range(n - 2):
        _reflect_products_kernel[grid](run, work, h, beta, d, e, p, n, k, NP=np2,
                                       COLS=GRID_COLS, ROWS=GRID_ROWS, num_warps=4)
        _reflect_update_kernel[grid](run, work, h, beta, p, n, k, NP=np2, COLS=GRID_COLS,
                                     ROWS=GRID_ROWS, num_warps=4)
    d[n - 2], d[n - 1], e[n - 2] = work[n - 2, n - 2], work[n - 1, n - 1], work[n - 1, n - 2]


REDUCTIONS = ("registers", "program", "grid")


def tridiagonal_eigh(a: torch.Tensor, rounds: int = ROUNDS, reduction: str | None = None,
                     run: torch.Tensor | None = None):
    """(eigenvalues ascending, eigenvectors as columns) of the symmetric matrix ``a``
    (n <= TRIDIAGONAL_MAX), like torch.linalg.eigh, with a fixed sequence of launches: no
    host read, capturable. float32 or float64 in and out, float64 inside. Reads the lower
    and upper triangle alike (it symmetrises). ``reduction`` (default by size): "registers"
    up to RESIDENT_MAX, one "program"'s tiles up to SMALL_MAX, the "grid" above (2 launches
    a step); any of them at any size for tests.

    ``run``: a one-element int32 tensor on a's device, read by the kernels themselves. 0
    makes every kernel see size 0: no work that grows with n, nothing read or written
    past the flag (the outputs are then unspecified, NaN included):
    a branch decided on the device, a solve that costs its launches only where it is not
    needed (subspace_iteration's fallback). Default: run."""
    _check_symmetric_input(a)
    n = a.shape[0]
    if n > TRIDIAGONAL_MAX:
        raise ValueError(f"a must be at most {TRIDIAGONAL_MAX} x {TRIDIAGONAL_MAX}, "
                         f"got shape {tuple(a.shape)}")
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    if reduction is not None and reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS} or None, got {reduction!r}")
    if run is not None and (run.dtype != torch.int32 or run.numel() != 1
                            or run.device != a.device):
        raise ValueError(f"run must be a one-element int32 tensor on {a.device}, got "
                         f"{run.dtype} of shape {tuple(run.shape)} on {run.device}")
    if n == 0:
        return a.new_empty(0), a.new_empty(0, 0)
    dev, f64 = a.device, torch.float64
    run = torch.ones(1, dtype=torch.int32, device=dev) if run is None else run
    np2 = max(triton.next_power_of_2(n), 16)
    # Scaled to max |a_ij| = 1 (1 for a zero matrix), as LAPACK's syev scales: ‖T‖ >= 1 or
    # T = 0, so that the tolerances below are relative to 1 and no pivot underflows.
    work = a.to(f64)
    scale = work.abs().max()
    scale = torch.where(scale > 0, scale, 1.0)
    work = (0.5 * (work + work.T) / scale).contiguous()
    d = torch.empty(n, dtype=f64, device=dev)
    e = torch.zeros(n, dtype=f64, device=dev)
    if reduction is None:
        small = "registers" if np2 <= RESIDENT_MAX else "program"
        reduction = small if n <= SMALL_MAX else "grid"
    h = torch.zeros(n, n, dtype=f64, device=dev)
    beta = torch.zeros(n, dtype=f64, device=dev)
    if reduction == "registers":
        _tridiagonalize_resident_kernel[(1,)](run, work, d, e, h, beta, n, NP=np2,
                                              num_warps=16)
    elif reduction == "grid":
        _grid_reduction(run, work, d, e, h, beta, np2)
    else:
        scratch = torch.empty(n, dtype=f64, device=dev)
        _tridiagonalize_kernel[(1,)](run, work, d, e, h, beta, scratch, n, NP=np2,
                                     COLS=PROGRAM_COLS, ROWS=GRID_ROWS, num_warps=8)
    w = torch.empty(n, dtype=f64, device=dev)
    _bisect_kernel[(triton.cdiv(n, BISECT_BLOCK),)](run, d, e, w, n, BLOCK=BISECT_BLOCK,
                                                    PROBES=PROBES, ITERS=BISECT_ITERS,
                                                    num_warps=4)
    shift = torch.empty(n, dtype=f64, device=dev)
    start = torch.empty(n, dtype=torch.int32, device=dev)
    size = torch.empty(n, dtype=torch.int32, device=dev)
    _shifts_and_clusters_kernel[(1,)](run, d, e, w, shift, start, size, n, NP=np2,
                                      CLUSTER=CLUSTER, num_warps=4)
    y = torch.empty(n, n, dtype=f64, device=dev)
    u = torch.empty(4, n, n, dtype=f64, device=dev)
    lanes = (triton.cdiv(n, EIGEN_BLOCK),)
    for r in range(rounds):
        _inverse_iteration_kernel[lanes](run, d, e, shift, y, u, n, FIRST=r == 0,
                                         BLOCK=EIGEN_BLOCK, num_warps=1)
        _cluster_orthonormalize_kernel[(n,)](run, y, start, size, n, ROWS=min(np2, 256),
                                             COLS=PROGRAM_COLS // 2, num_warps=4)
    _apply_reflectors_kernel[(triton.cdiv(n, GRID_COLS),)](run, y, h, beta, n, COLS=GRID_COLS,
                                                           ROWS=GRID_ROWS, num_warps=4)
    return (w * scale).to(a.dtype), y.to(a.dtype)
