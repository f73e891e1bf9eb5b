"""HiDe's PCA stage: the exact principal subspace, the explained-variance cutoff as a
mask, and the exact subspace gradient of SPEC section 3.

Everything here works in whichever space is smaller: the N x N Gram matrix ``X Xᵀ``
(N <= d) or the d x d covariance ``Xᵀ X`` (d < N). Both have the same non-zero
eigenvalues, and the reconstruction is the same projection seen from either side:

    gram space:  u' - ū = P_U X     (P_U projects onto the top-m eigenvectors of X Xᵀ)
    cov space:   u' - ū = X P_V     (P_V projects onto the top-m eigenvectors of Xᵀ X)

The small matrix is decomposed in full, so its null space is explicit and no division
by a singular value is ever needed. The cutoff m is a tensor and the kept set a mask
over the fixed-size basis: no host synchronisation.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

# Variance floor in the explained-variance ratio (the authors' max(Σλ, 1e-8)).
TOTAL_VARIANCE_FLOOR = 1e-8
# Eigenvalues below RELATIVE_ZERO * eps * λ_max are numerically zero: such directions add
# nothing to the forward value and are left out of the kept set, so that their
# (undefined) eigenvectors never enter the gradient. The same bound clamps the gap
# λ_i - λ_j for pairs across the cutoff.
RELATIVE_ZERO = 32.0


class Subspace(NamedTuple):
    """Eigendecomposition of the small side of a centred batch, with the cutoff applied."""

    basis: torch.Tensor  # (k, k) eigenvectors as columns, eigenvalues descending
    eigvals: torch.Tensor  # (k,) descending, clamped to >= 0
    keep: torch.Tensor  # (k,) bool: inside the top-m subspace and numerically non-zero
    m: torch.Tensor  # () int64: the chosen number of components (the authors' m)
    gram: bool  # True: basis lives in sample space (k = N); False: feature space (k = d)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """HiDe runs in at least float32; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cutoff_from_eigvals(eigvals: torch.Tensor, tau: float, total: torch.Tensor | None = None):
    """m = smallest k with cumsum(λ)_k / max(Σλ, 1e-8) >= tau, at least 1, at most len(λ).

    ``eigvals`` descending and non-negative; ``total`` defaults to their sum (pass the
    trace when only the leading eigenvalues are known). Returns (m, index < m mask).
    """
    if total is None:
        total = eigvals.sum()
    ratio = torch.cumsum(eigvals, 0) / torch.clamp(total, min=TOTAL_VARIANCE_FLOOR)
    k = eigvals.shape[0]
    m = torch.clamp((ratio < tau).sum() + 1, max=k)
    inside = torch.arange(k, device=eigvals.device) < m
    return m, inside


def numerical_zero(eigvals: torch.Tensor) -> torch.Tensor:
    """Threshold below which an eigenvalue (of a PSD matrix) counts as zero."""
    eps = torch.finfo(eigvals.dtype).eps
    return RELATIVE_ZERO * eps * eigvals.max().clamp(min=0)


def principal_subspace(x: torch.Tensor, tau: float) -> Subspace:
    """Exact symmetric eigendecomposition of the smaller of Gram / covariance of centred x."""
    n, d = x.shape
    gram = n <= d
    small = x @ x.T if gram else x.T @ x
    # eigh fails on non-finite input; NaN features still reach the loss through the
    # reconstruction product below, so the result is NaN, never a silent number.
    small = torch.nan_to_num(small, nan=0.0, posinf=0.0, neginf=0.0)
    eigvals, basis = torch.linalg.eigh(small)
    eigvals = eigvals.flip(0).clamp(min=0)
    basis = basis.flip(1)
    m, inside = cutoff_from_eigvals(eigvals, tau)
    keep = inside & (eigvals > numerical_zero(eigvals))
    return Subspace(basis, eigvals, keep, m, gram)


def project(x: torch.Tensor, sub: Subspace) -> torch.Tensor:
    """The centred reconstruction X Π (cov space) or P_U X (gram space)."""
    kept = sub.basis * sub.keep.to(sub.basis.dtype)
    if sub.gram:
        return kept @ (kept.T @ x)
    return (x @ kept) @ kept.T


def subspace_backward(x: torch.Tensor, sub: Subspace, grad_recon: torch.Tensor) -> torch.Tensor:
    """∂L/∂X for L(recon(X)), recon = P X (gram) or X P (cov), P the top-m projector.

    SPEC section 3: with S = sym(R̄ Xᵀ) (gram) or sym(Xᵀ R̄) (cov), K_ij = b_iᵀ S b_j /
    (λ_i - λ_j) for kept i and dropped j (mirrored), the gradient is P R̄ + 2 (B K Bᵀ) X
    (gram) or R̄ P + 2 X (B K Bᵀ) (cov). Only pairs across the cutoff appear, so ties
    inside or outside the kept set are harmless; the gap is clamped, never divided by zero.
    """
    basis, lam, keep = sub.basis, sub.eigvals, sub.keep
    keep_f = keep.to(basis.dtype)
    if sub.gram:
        s = grad_recon @ x.T
    else:
        s = x.T @ grad_recon
    s_eig = basis.T @ (0.5 * (s + s.T)) @ basis
    floor = numerical_zero(lam) + torch.finfo(lam.dtype).tiny
    gap = torch.clamp(lam[:, None] - lam[None, :], min=floor)
    across = keep_f[:, None] * (1.0 - keep_f)[None, :]
    k_half = across * s_eig / gap
    k_mat = k_half + k_half.T
    kept = basis * keep_f
    bar = basis @ k_mat @ basis.T
    if sub.gram:
        return kept @ (kept.T @ grad_recon) + 2.0 * bar @ x
    return (grad_recon @ kept) @ kept.T + 2.0 * x @ bar


def centring_backward(grad_x: torch.Tensor, grad_recon: torch.Tensor) -> torch.Tensor:
    """Chain rule through X = u - mean(u) and the mean added back to the reconstruction."""
    return grad_x - grad_x.mean(0, keepdim=True) + grad_recon.mean(0, keepdim=True)
