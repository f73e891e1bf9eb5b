"""HiDe's PCA stage: the exact principal subspace, the explained-variance cutoff as a
mask, and the exact subspace gradient of SPEC section 3.

Everything here works in whichever space is smaller: the N x N Gram matrix ``X Xᵀ``
(N <= d) or the d x d covariance ``Xᵀ X`` (d < N). Both have the same non-zero
eigenvalues, and the reconstruction is the same projection seen from either side:

    gram space:  u' - ū = P_U X     (P_U projects onto the top-m eigenvectors of X Xᵀ)
    cov space:   u' - ū = X P_V     (P_V projects onto the top-m eigenvectors of Xᵀ X)

The small matrix is decomposed in full (the eigensolver is chosen by backends.py). No
division by a singular value is ever needed. The cutoff m is a tensor and the kept set a
mask over the fixed-size basis.
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
    # From subspace_iteration.top_subspace: the basis may be a block of Ritz vectors (zero
    # columns after it), and the backward then needs this (its resolvent).
    partial: "subspace_iteration.PartialBasis | None" = None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """HiDe runs in at least float32; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The small matrix, its eigendecomposition and the subspace gradient are computed in
# float64 whatever the features' dtype. Forming XᵀX squares the condition of the small
# singular values, and the gradient divides by eigenvalue gaps at the cutoff: in float32,
# at τ ≥ 0.95, both lose up to 1e4x against the authors' float32 SVD (N=1024, d=768,
# τ=0.99: 9e-3 relative against their 8e-6; tests/test_exactness.py). In float64 the
# float32 pipeline is within 2x of that SVD's error at every τ. The products with the
# features themselves (X̂V_m, the reconstruction) stay in the features' compute dtype.
PCA_DTYPE = torch.float64
# Elements of one block of rows where a product over the batch runs in PCA_DTYPE (the
# small matrix, the backward's reductions and products over N): the float64 copies stay
# ≈ 32 MiB whatever N is. Whole copies at N = 262144, d = 768 are 1.5 GiB each, and the
# backward held up to 8 of them. One block up to N = 5461 at d = 768.
PCA_BLOCK_ELEMENTS = 1 << 22


def row_blocks(n: int, d: int) -> list[slice]:
    """The row blocks of an n x d batch for the products in PCA_DTYPE."""
    step = max(1, PCA_BLOCK_ELEMENTS // max(d, 1))
    return [slice(r0, min(n, r0 + step)) for r0 in range(0, n, step)]


def _t_product(x: torch.Tensor, y: torch.Tensor, blocks: list[slice], dtype) -> torch.Tensor:
    """xᵀy in ``dtype``, summed over row blocks of both."""
    out = None
    for r in blocks:
        part = x[r].to(dtype).T @ y[r].to(dtype)
        out = part if out is None else out.add_(part)
    return out


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


def gram_or_cov(x: torch.Tensor, gram: bool, blocks: int = 3) -> torch.Tensor:
    """X̂X̂ᵀ (gram space) or X̂ᵀX̂ (cov space), exactly symmetric. The lower block
    triangle only, mirrored (torch has no syrk): with 3 x 3 blocks, 6 of 9 block products
    (N=1024, d=768 on 2 CPU cores: 14.0 ms against 17.4 ms for the full product)."""
    f = x.T if gram else x  # the small matrix is fᵀf
    k = f.shape[1]
    edges = [round(i * k / blocks) for i in range(blocks + 1)]
    parts = [f[:, edges[i]:edges[i + 1]] for i in range(blocks)]
    out = f.new_empty(k, k)
    for i in range(blocks):
        rows = slice(edges[i], edges[i + 1])
        for j in range(i + 1):
            cols = slice(edges[j], edges[j + 1])
            block = parts[i].T @ parts[j]
            out[rows, cols] = block
            if i != j:
                out[cols, rows] = block.T
    return out


def principal_subspace(x: torch.Tensor, tau: float, small_matrix=gram_or_cov,
                       eigh=torch.linalg.eigh, subspace=None) -> Subspace:
    """Eigendecomposition of the smaller of Gram / covariance of centred x
    (``small_matrix(x, gram)`` forms it: torch here, a Triton kernel in kernels/centre).
    ``eigh``: the full decomposition (backends.py picks it per device: a sync-free one on
    GPUs); or ``subspace(small, tau, gram) -> Subspace`` in its place where given (the
    triton backend's, which may be subspace_iteration's partial one)."""
    n, d = x.shape
    gram = n <= d
    if gram:
        small = small_matrix(x.to(PCA_DTYPE), True)
    else:  # Σ over row blocks of X̂_bᵀX̂_b, each exactly symmetric
        blocks = row_blocks(n, d)
        small = small_matrix(x[blocks[0]].to(PCA_DTYPE), False)
        for r in blocks[1:]:
            small += small_matrix(x[r].to(PCA_DTYPE), False)
    small = _finite(small)
    if subspace is not None:
        return subspace(small, tau, gram)
    return full_subspace(small, tau, gram, eigh)


def _finite(small: torch.Tensor) -> torch.Tensor:
    # eigh fails on non-finite input; NaN features still reach the loss through the
    # reconstruction product, so the result is NaN, never a silent number.
    return torch.nan_to_num(small, nan=0.0, posinf=0.0, neginf=0.0)


def full_subspace(small: torch.Tensor, tau: float, gram: bool, eigh=torch.linalg.eigh) -> Subspace:
    """The Subspace of the small matrix from its full eigendecomposition, with the cutoff."""
    eigvals, basis = eigh(small)
    eigvals = eigvals.flip(0).clamp(min=0)
    basis = basis.flip(1)
    m, inside = cutoff_from_eigvals(eigvals, tau)
    keep = inside & (eigvals > numerical_zero(eigvals))
    return Subspace(basis, eigvals, keep, m, gram)


class Split(NamedTuple):
    """The basis cut in two at the cutoff: kept and rest (every other direction)."""

    kept: torch.Tensor  # (k, a) kept eigenvectors as columns (masked: a = k, zeros elsewhere)
    rest: torch.Tensor  # (k, r) the others
    lam_kept: torch.Tensor  # (a,)
    lam_rest: torch.Tensor  # (r,)
    across: torch.Tensor | None  # (a, r) 1 where (kept, rest) is a real pair; None: all are


def split(sub: Subspace, sliced: bool) -> Split:
    """Sliced: exact-size blocks (reads the mask: a host sync on GPUs, free on CPUs).
    Masked: fixed-size blocks with the mask multiplied in (no sync, shapes static)."""
    if sliced:
        kept_idx = sub.keep.nonzero().squeeze(1)
        rest_idx = (~sub.keep).nonzero().squeeze(1)
        return Split(sub.basis[:, kept_idx], sub.basis[:, rest_idx], sub.eigvals[kept_idx],
                     sub.eigvals[rest_idx], None)
    keep_f = sub.keep.to(sub.basis.dtype)
    return Split(sub.basis * keep_f, sub.basis * (1.0 - keep_f), sub.eigvals, sub.eigvals,
                 keep_f[:, None] * (1.0 - keep_f)[None, :])


def factor(x: torch.Tensor, sub: Subspace, parts: Split, matmul=torch.matmul,
           projector: bool = False):
    """(Z, B) with X̂Π = Z Bᵀ (the centred reconstruction, never formed here).

    cov space:  Z = X̂ V_m (N x m), B = V_m (d x m)
    gram space: Z = U_m (N x m),   B = X̂ᵀ U_m (d x m)
    ``projector`` (cov space, masked layout: the basis is d columns wide whatever m, a
    subspace-iteration block included, so Z = X̂V_m would be one more N x d tensor):
    Z = X̂ itself, B = Π = V_m V_mᵀ (d x d).

    In x's dtype (the basis is PCA_DTYPE).
    """
    if projector:
        return x, (parts.kept @ parts.kept.T).to(x.dtype)
    kept = parts.kept.to(x.dtype)
    if sub.gram:
        return kept, matmul(x.T, kept)
    return matmul(x, kept), kept


def factor_backward(x: torch.Tensor, sub: Subspace, parts: Split, z: torch.Tensor,
                    b: torch.Tensor, grad_z: torch.Tensor, grad_b: torch.Tensor,
                    projector: bool = False) -> torch.Tensor:
    """∂L/∂X̂ for L(Z, B) that depends on (Z, B) only through Z Bᵀ = X̂Π (SPEC section 3).

    With R̄ = ∂L/∂(X̂Π) we have ∂L/∂Z = R̄B and ∂L/∂B = R̄ᵀZ, so R̄ enters the exact subspace
    gradient only through them: R̄Π and S·(kept basis), S = sym(X̂ᵀR̄) (cov) or sym(R̄X̂ᵀ)
    (gram). K_ij = (rest_jᵀ S kept_i) / (λ_i - λ_j) for every pair across the cutoff, and
    ∂L/∂X̂ = R̄Π + 2 X̂ C̄ (cov) or P R̄ + 2 C̄ X̂ (gram) with C̄ = kept K restᵀ + rest Kᵀ keptᵀ.
    Every product is O(N·d·m) or O(k²·m): R̄ and the d x d / N x N matrices are never formed.
    The gap is clamped (ties across the cutoff give a finite gradient, never NaN).

    Column i of W = rest Kᵀ is Σ_j rest_j (rest_jᵀ S v_i)/(λ_i − λ_j), the resolvent
    (λ_i − A)⁻¹ on the rest applied to S v_i.

    ``projector`` (factor's (Z, B) = (X̂, Π)): ∂L/∂Z = R̄Π and ∂L/∂B = R̄ᵀX̂ = (X̂ᵀR̄)ᵀ, so
    S V_m and R̄Π come without a product over N, and ∂L/∂X̂ = ∂L/∂Z + 2 X̂ C̄ is one.

    Computed in the basis' dtype (PCA_DTYPE: the products with the basis and the division
    by the gaps are where float32 loses the gradient at high τ), returned in x's; in the
    cov space (N > d, where N may be large) over row blocks (row_blocks).
    """
    out_dtype, dtype = x.dtype, parts.kept.dtype
    if projector:
        c = projector_cbar(sub, parts, grad_b, out_dtype)
        grad_x = torch.empty_like(x)
        for r in row_blocks(*x.shape):
            grad_x[r] = grad_z[r].to(dtype) + 2.0 * (x[r].to(dtype) @ c)
        return grad_x
    b, grad_b = b.to(dtype), grad_b.to(dtype)
    if sub.gram:
        x, z, grad_z = x.to(dtype), z.to(dtype), grad_z.to(dtype)
        s_kept = 0.5 * (grad_z + x @ grad_b)  # S U_m
    else:
        s_kept = 0.5 * (_t_product(x, grad_z, row_blocks(*x.shape), dtype) + grad_b)  # S V_m
    w = _across_cutoff(sub, parts, s_kept, out_dtype)
    # Grouped so that the last product has width 2a (one GEMM, not three of width a).
    if sub.gram:
        # P R̄ = U_m (U_mᵀ R̄) = Z gradBᵀ;  C̄ X̂ = U_m K U_restᵀ X̂ + U_rest Kᵀ (U_mᵀ X̂).
        grad_x = torch.cat([z, 2.0 * w], 1) @ torch.cat([grad_b.T + 2.0 * (w.T @ x), b.T], 0)
        return grad_x.to(out_dtype)
    blocks, grad_x = row_blocks(*x.shape), torch.empty_like(x)
    # R̄Π = (R̄V_m)V_mᵀ = gradZ Bᵀ;  X̂ C̄ = (X̂V_m) K V_restᵀ + (X̂ V_rest Kᵀ) V_mᵀ.
    right = torch.cat([b.T, w.T], 0)
    for r in blocks:
        left = torch.cat([grad_z[r].to(dtype) + 2.0 * (x[r].to(dtype) @ w), 2.0 * z[r].to(dtype)], 1)
        grad_x[r] = left @ right
    return grad_x


def _across_cutoff(sub: Subspace, parts: Split, s_kept: torch.Tensor, out_dtype) -> torch.Tensor:
    """W = rest Kᵀ from S·(kept basis) (factor_backward's docstring), gaps clamped."""
    lam = sub.eigvals
    floor = numerical_zero(lam) + torch.finfo(lam.dtype).tiny
    gap = torch.clamp(parts.lam_kept[:, None] - parts.lam_rest[None, :], min=floor)
    k12 = (parts.rest.T @ s_kept).T / gap
    if parts.across is not None:
        k12 = k12 * parts.across
    w = parts.rest @ k12.T
    if sub.partial is not None:  # a block of Ritz vectors: the rest is not all in the basis
        w = torch.where(sub.partial.ok,
                        sub.partial.resolvent(parts.kept, parts.rest, lam, s_kept, floor,
                                              out_dtype), w)
    return w


def projector_cbar(sub: Subspace, parts: Split, grad_b: torch.Tensor, out_dtype) -> torch.Tensor:
    """C̄ = V_m Wᵀ + W V_mᵀ of the projector layout (d x d, the basis' dtype), from
    ∂L/∂B = R̄ᵀX̂ alone: then ∂L/∂X̂ = R̄Π + 2 X̂ C̄ (factor_backward)."""
    grad_b = grad_b.to(parts.kept.dtype)
    s_kept = 0.5 * (grad_b.T + grad_b) @ parts.kept  # S V_m
    w = _across_cutoff(sub, parts, s_kept, out_dtype)
    c = w @ parts.kept.T
    return c + c.T


class RecentredRows(NamedTuple):
    """X̂'s row blocks recomputed, X̂[r] = u[r] - ū in ū's dtype: bit for bit the forward's
    centring (one exactly rounded subtraction of the same operands), without keeping X̂."""

    u: torch.Tensor  # the texts, in their own dtype
    mean: torch.Tensor  # ū (1, d), in the compute dtype

    def __getitem__(self, r: slice) -> torch.Tensor:
        return self.u[r].to(self.mean.dtype) - self.mean

    @property
    def shape(self):
        return self.u.shape


def reconstruction_backward(x: RecentredRows, sub: Subspace, parts: Split, pi: torch.Tensor,
                            grad: torch.Tensor) -> torch.Tensor:
    """∂L/∂u for L(u') with u' = X̂Π + ū (the projector layout), from R̄ = ∂L/∂u' alone, in
    the texts' dtype: what materialize's, factor_backward's (projector) and centring's
    backwards give, by row blocks, with X̂'s rows recomputed. ∂L/∂B = R̄ᵀX̂ and ∂L/∂Z = R̄Π
    as materialize's product would form them (in R̄'s dtype, Π as the forward used it);
    centring's mean term, mean(∂L/∂X̂) = mean(R̄)Π + 2·mean(X̂)C̄, from column means, so that
    each row block is written once. Holds no N x d tensor but the result. R̄ narrower than
    the compute dtype (u' given out narrow) is upcast block by block: the same values."""
    n, d = x.shape
    dtype, blocks, rdt = parts.kept.dtype, row_blocks(n, d), x.mean.dtype
    if len(blocks) == 1:  # upcast once, not per pass (small N: launches count)
        grad = grad.to(rdt)
    grad_b = x_sum = None
    for r in blocks:  # R̄ᵀX̂ and Σ X̂ from one recentring of each block
        xr = x[r]
        part, xs = grad[r].to(rdt).T @ xr, xr.to(dtype).sum(0, keepdim=True)
        grad_b, x_sum = (part, xs) if grad_b is None else (grad_b.add_(part), x_sum.add_(xs))
    c = projector_cbar(sub, parts, grad_b, rdt)
    grad_mean = grad.sum(0, keepdim=True, dtype=rdt)  # ∂L/∂ū: ū is added to every row of u'
    x_mean = x_sum / n
    shift = grad_mean.to(dtype) / n - ((grad_mean / n) @ pi).to(dtype) - 2.0 * (x_mean @ c)
    out = torch.empty(x.shape, dtype=x.u.dtype, device=grad.device)
    for r in blocks:
        out[r] = (grad[r].to(rdt) @ pi).to(dtype) + 2.0 * (x[r].to(dtype) @ c) + shift
    return out


def centring_backward(grad_x: torch.Tensor, grad_mean: torch.Tensor) -> torch.Tensor:
    """Chain rule through X̂ = u - mean(u) and the mean output (used as ū in u' = ... + ū).
    In place: grad_x is factor_backward's own (an N x d copy less at large N)."""
    n = grad_x.shape[0]
    return grad_x.sub_(grad_x.mean(0, keepdim=True)).add_(grad_mean.reshape(1, -1) / n)


class _EighAtCutoff(torch.autograd.Function):
    """(λ, V) of a symmetric matrix, passed in already computed, with a backward that is
    itself differentiable (it uses only differentiable ops on the saved outputs), so that
    autograd can go to any order: the double-backward route of HiDe (factors.py).

    torch.linalg.eigh's backward divides by every eigenvalue gap and so gives NaN on the
    degenerate spectra HiDe meets (duplicated captions, the null space). Here a pair with
    a vanishing gap (≤ the numerical-zero floor) contributes nothing when both of its
    members lie on the same side of the cutoff, where a function of the kept subspace
    cannot depend on how the pair is rotated, and the clamped gap of factor_backward
    when the pair straddles the cutoff."""

    @staticmethod
    def forward(ctx, a, eigvals, basis, keep):
        eigvals, basis = eigvals.clone(), basis.clone()
        # The outputs are saved, not the inputs: in a double backward the saved (λ, V)
        # carry this node, so that their own derivatives are taken through it again.
        ctx.save_for_backward(eigvals, basis, keep)
        return eigvals, basis

    @staticmethod
    def backward(ctx, grad_eigvals, grad_basis):
        lam, v, keep = ctx.saved_tensors
        floor = numerical_zero(lam.detach()) + torch.finfo(lam.dtype).tiny
        gap = lam[None, :] - lam[:, None]  # gap[i, j] = λ_j − λ_i
        across = keep[:, None] != keep[None, :]
        small = gap.detach().abs() <= floor
        sign = torch.where(gap.detach() >= 0, 1.0, -1.0).to(lam.dtype)
        safe = torch.where(small, sign * floor, gap)
        inv = torch.where(small & ~across, torch.zeros_like(gap), 1.0 / safe)
        inv = inv * (1.0 - torch.eye(lam.shape[0], dtype=lam.dtype, device=lam.device))
        inner = (v.T @ grad_basis) * inv if grad_basis is not None else torch.zeros_like(inv)
        if grad_eigvals is not None:
            inner = inner + torch.diag(grad_eigvals)
        grad_a = v @ inner @ v.T
        return 0.5 * (grad_a + grad_a.T), None, None, None


def differentiable_subspace(x: torch.Tensor, tau: float) -> Subspace:
    """principal_subspace(x, tau) (full eigh) as a differentiable function of x, to any
    order (the reference backend): slower than the fused first-order path."""
    n, d = x.shape
    gram = n <= d
    x64 = x.to(PCA_DTYPE)
    small = x64 @ x64.T if gram else x64.T @ x64
    with torch.no_grad():
        sub = full_subspace(_finite(small), tau, gram)
    eigvals, basis = _EighAtCutoff.apply(small, sub.eigvals, sub.basis, sub.keep)
    return Subspace(basis, eigvals, sub.keep, sub.m, gram)
