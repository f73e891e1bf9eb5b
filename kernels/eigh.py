"""HiDe stage 2 (PCA): a symmetric eigensolver that a CUDA graph can capture.

HiDe decomposes the small Gram / covariance matrix in full (himo_fast.pca). On a GPU that
is cuSOLVER's syevd without its info read (himo_fast::sym_eigh): sync-free, but it cannot
be captured in a CUDA graph (it fails with CUSOLVER_STATUS_INTERNAL_ERROR inside a capture;
syevj cannot either, XsyevBatched only at small sizes: benchmarks/eigh_probe.py on an
H100). Which solver runs when is himo_fast.backends' choice; this module is the Jacobi
solver it uses above XsyevBatched's capturable sizes.

``jacobi_eigh``: two-sided cyclic Jacobi with the round-robin (parallel) ordering. A sweep
is n-1 steps; each step rotates n/2 disjoint index pairs at once: one small kernel computes
the n/2 rotations from the current A, one applies ``A ← JᵀAJ`` (double-buffered) and
``V ← VJ``. Everything runs in float64 whatever the input (the rotations touch each entry
thousands of times; in float32 the eigenvalues drift by ≈ 4e-5 relative, in float64 they
end below float32 LAPACK's own error), with a fixed sweep count: no host
decision, so the launch sequence is static. A pair whose off-diagonal entry is already
negligible gets the identity, so extra sweeps change nothing and degenerate matrices (zero,
repeated eigenvalues) stay finite.
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


def jacobi_eigh(a: torch.Tensor, sweeps: int = SWEEPS):
    """(eigenvalues ascending, eigenvectors as columns) of the symmetric matrix ``a``, like
    torch.linalg.eigh, with a static sequence of kernel launches (capturable). float32 or
    float64 in and out; float64 inside. Reads the lower and upper triangle alike."""
    check_matrix("a", a)
    k = a.shape[0]
    if a.shape[1] != k:
        raise ValueError(f"a must be a square matrix, got shape {tuple(a.shape)}")
    if a.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"a must be float32 or float64, got {a.dtype}")
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
