"""The top eigenpairs of HiDe's small PSD matrix by subspace iteration (SPEC section 3).

HiDe needs the eigenvectors that explain a fraction τ of the variance: m of them, where m
is 38 of 128 or 72 of 768 on CLIP-like text spectra. A full ``eigh`` decomposes all k;
a block of r ≈ 2m + 16 vectors needs about eight r-wide products with the matrix instead.
Whether that pays is a property of the machine: on 2 CPU cores MKL's eigh of 768 x 768
(65 ms) is only ≈ 20 ms slower than the block, and the gradient's complement solve costs
more than that (measured: benchmarks/README.md), so the CPU backend keeps the full eigh.
On a GPU the block policy's host reads are syncs, so the ``triton`` backend keeps the full
(sync-free) eigh too; benchmarks/test_hide.py times this path on either device.

Algorithm (Chebyshev-filtered subspace iteration, Rayleigh–Ritz after every filter):
1. Q ← orth(A·Q₀) from a fixed-seed Gaussian start (or the caller's warm start).
2. Rayleigh–Ritz: θ, W = eigh(QᵀAQ), Q ← QW (r x r, cheap).
3. Filter: Q ← orth(T_deg(2A/b − 1)·Q), b = θ_r. T_deg is ≤ 1 on [0, b] (the unwanted
   spectrum) and grows fast above it, so the wanted directions win by T_deg(2θ_m/b − 1)
   per filter instead of θ_m/θ_r per power step (≈ 900 vs 3.5 at θ_r/θ_m = 0.28, degree 3).
   Each column is divided by T_deg at its own Ritz value: columns stay O(1), so the
   filter does not wash the small wanted directions out in float32 (λ₁/λ_m ≈ 250 here).
4. Back to 2 until the directions below the block are damped by DAMPING.

``top_eigenpairs`` gives up (None) when the cutoff is not inside the block, or θ_r/θ_m is
above the caller's bound; pca.principal_subspace then grows the block, up to half the
matrix, and past that decomposes in full: the chosen m is always the exact one.

The gradient needs the eigenvectors the block does not hold. ``deflated_resolvent`` solves
(λ_i I − A)y = P s_i on the complement of the kept vectors by deflated conjugate gradients
instead: the block's other Ritz vectors are deflated exactly, and what is left has
condition at most ≈ 1/(1 − θ_r/θ_m), so a fixed iteration count suffices.
"""
from __future__ import annotations

import functools
import math

import torch

# Filter degree, and the damping of the unwanted directions to reach before stopping:
# the product over filters of 1/T_deg(2θ_m/θ_r − 1), the factor by which directions below
# the block shrink against the cutoff's. 1e-6 reaches the float32 eigh's own projector
# error (≈ 1e-5 on SPEC's spectra; tuning log in benchmarks/README.md).
DEGREE = 3
DAMPING = {torch.float32: 1e-6, torch.float64: 1e-14}
MAX_FILTERS = 12
# Start vectors come from this seed: the result is deterministic and independent of the
# global RNG (a loss function must not consume the training run's random numbers).
SEED = 20261122


def _rayleigh_ritz(q: torch.Tensor, aq: torch.Tensor):
    small = q.T @ aq
    theta, w = torch.linalg.eigh(0.5 * (small + small.T))
    theta, w = theta.flip(0), w.flip(1)
    return theta, q @ w, aq @ w


def _orth(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y)[0]


@functools.lru_cache(maxsize=8)
def _gaussian(k: int, r: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(SEED)
    return torch.randn(k, r, generator=g).to(device, dtype)


def start_block(k: int, r: int, like: torch.Tensor, warm: torch.Tensor | None = None):
    """(k, r) start: the warm block's columns first (if its row count fits), then
    fixed-seed Gaussian ones (made once per shape: a fresh draw costs as much as a product)."""
    block = _gaussian(k, r, like.dtype, like.device)
    if warm is not None and warm.shape[0] == k:
        block = block.clone()
        c = min(r, warm.shape[1])
        block[:, :c] = warm[:, :c].to(block)
    return block


def _chebyshev_filter(a, q, aq, theta, degree):
    """T_deg(2A/b − 1)·Q with b = θ_r, each column divided by T_deg at its own Ritz value."""
    b = theta[-1].clamp(min=torch.finfo(a.dtype).tiny)
    t = (2.0 * theta / b - 1.0).clamp(min=1.0)  # every Ritz value in the filter's variable
    # T_{j+1} = 2·x·T_j − T_{j−1}, x = 2A/b − 1; s_prev = T_{j−1}(t)/T_j(t) keeps columns O(1).
    prev, cur, s_prev = q, (2.0 * aq - b * q) / (b * t), 1.0 / t
    for _ in range(degree - 1):
        grow = 2.0 * t - s_prev  # T_{j+1}(t)/T_j(t) >= 1
        prev, cur = cur, (2.0 * (2.0 * (a @ cur) - b * cur) / b - s_prev * prev) / grow
        s_prev = 1.0 / grow
    return cur


def _chebyshev_gain(ratio: float, degree: int) -> float:
    """T_deg(2/ratio − 1): how much the cutoff direction gains on those below the block."""
    t = 2.0 / ratio - 1.0
    return math.cosh(degree * math.acosh(max(t, 1.0)))


def top_eigenpairs(a: torch.Tensor, r: int, cut, max_ratio: float, degree: int = DEGREE,
                   start: torch.Tensor | None = None):
    """Top-r Ritz pairs of the PSD matrix ``a`` by filtered subspace iteration.

    ``cut(θ) -> m`` gives the cutoff index from the current Ritz values; filtering stops
    once the directions below the block are damped by DAMPING against the cutoff's.
    Returns (θ descending, Ritz basis k x r, θ_r/θ_m), or None when the block is too
    small: the cutoff not inside it, θ_r/θ_m above ``max_ratio``, or no convergence
    within MAX_FILTERS (the caller grows the block). Reads θ on the host (free on a CPU).
    """
    # A Gaussian (or warm) block is well conditioned: no need to orthonormalise it first.
    q = _orth(a @ (start if start is not None else start_block(a.shape[0], r, a)))
    theta, q, aq = _rayleigh_ritz(q, a @ q)
    target = DAMPING.get(a.dtype, DAMPING[torch.float32])
    damped = 1.0
    for _ in range(MAX_FILTERS + 1):
        m = cut(theta)
        theta_m, theta_r = float(theta[m - 1]), float(theta[-1])
        if m >= r or not theta_m > 0.0 or theta_r > max_ratio * theta_m:
            return None
        ratio = max(theta_r / theta_m, 1e-3)
        if damped <= target:
            return theta.clamp(min=0), q, ratio
        q = _orth(_chebyshev_filter(a, q, aq, theta, degree))
        theta, q, aq = _rayleigh_ritz(q, a @ q)
        damped /= _chebyshev_gain(ratio, degree)
    return None


def deflated_resolvent(a: torch.Tensor, kept: torch.Tensor, shifts: torch.Tensor,
                       defl: torch.Tensor, defl_values: torch.Tensor, rhs: torch.Tensor,
                       ratio: float, floor: torch.Tensor) -> torch.Tensor:
    """y_i = (shift_i I − A)⁻¹ P rhs_i on the complement of ``kept`` (P = I − KKᵀ).

    The kept columns are the top eigenvectors and shift_i their eigenvalues, so the
    operator is SPD on the complement, but its condition λ_i/(λ_i − λ_{m+1}) is as bad as
    the gap at the cutoff. Deflated conjugate gradients (Saad et al., SIAM J. Sci. Comput.
    21, 2000) remove that: the Ritz vectors ``defl`` just below the cutoff (Zᵀ A Z =
    diag(defl_values) by Rayleigh–Ritz) are solved exactly, the rest iteratively, with
    condition at most ≈ 1/(1 − ratio) where ratio bounds the eigenvalues below the block
    against λ_m. Exact whatever the accuracy of Z (only the iteration count depends on it).
    All columns at once, fixed iteration count, no host sync. The coarse gaps are clamped
    at ``floor``, as the full-basis formula clamps λ_i − λ_j. Zero right-hand sides (masked
    columns) stay exactly zero.
    """
    def perp(v):
        return v - kept @ (kept.T @ v)

    a_perp = a - kept @ (a @ kept).T  # P·A: one product per iteration instead of three
    # Zᵀ(λ_i − A)Z = diag(λ_i − θ_j) since Z are Ritz vectors; AZ is kept for ZᵀAv.
    zaz = torch.cat([defl, a @ defl], 1)
    p_defl, cols = defl.shape[1], rhs.shape[1]
    gaps = (shifts[None, :] - defl_values[:, None]).clamp(min=floor)

    def deflate(v):
        """(v with its Z part removed, Z(ZᵀMZ)⁻¹ZᵀMv for that v), in two products."""
        c = zaz.T @ v
        zv, azv = c[:p_defl], c[p_defl:]
        # ZᵀA(v − Z·zv) = azv − θ·zv, and Zᵀ(v − Z·zv) = 0
        both = defl @ torch.cat([zv, (defl_values[:, None] * zv - azv) / gaps], 1)
        return v - both[:, :cols], both[:, cols:]

    kappa = 1.0 / max(1.0 - ratio, 1e-3)
    rate = (math.sqrt(kappa) - 1.0) / (math.sqrt(kappa) + 1.0)
    # CG's error bound 2·rate^j reaches the precision's target (measured: float32 reaches
    # its floor, float64 1e-13, at this count; tuning log in benchmarks/README.md).
    target = DAMPING.get(a.dtype, DAMPING[torch.float32])
    iters = math.ceil(math.log(target / 2.0) / math.log(max(rate, 1e-6))) + 1
    tiny = torch.finfo(a.dtype).tiny
    b = perp(rhs)
    y = defl @ ((defl.T @ b) / gaps)
    res, corr = deflate(b - (shifts * y - a_perp @ y))
    p = res - corr
    rs = (res * res).sum(0)
    for _ in range(iters):
        mp = shifts * p - a_perp @ p
        alpha = rs / (p * mp).sum(0).clamp(min=tiny)
        y = y + alpha * p
        # Deflated residuals are orthogonal to Z; rounding breaks that, and past
        # convergence the broken part (where M is nearly singular) would grow: restore it.
        res, corr = deflate(res - alpha * mp)
        rs_new = (res * res).sum(0)
        p = res + (rs_new / rs.clamp(min=tiny)) * p - corr
        rs = rs_new
    return perp(y)
