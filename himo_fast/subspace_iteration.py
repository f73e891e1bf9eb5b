"""HiDe's PCA of a k x k Gram/covariance matrix above the small solver's size (256 < k <=
1024: the covariance at d = 768) without a full eigendecomposition, every decision taken on
the device (issue 15): a fixed sequence of launches, no host read, capturable.

    S ─► shifted power steps, Rayleigh–Ritz, Chebyshev-filtered subspace iteration on a
         block of r vectors (Cholesky QR after each filter), Rayleigh–Ritz: the r x r
         problems on the small solver (kernels.tridiagonal_eigh, r = BLOCK = 128)
      ─► the certificate below, a boolean tensor
      ─► the full solve, its launches predicated on the certificate's failure
         (tridiagonal_eigh(run=…): they return at once where it holds)
      ─► the Subspace: the Ritz pairs where certified, the full decomposition elsewhere
         (torch.where). m is always the float64 m.

The certificate. θ_1 ≥ … ≥ θ_r the Ritz values, V their vectors (orthonormal to
ORTHONORMAL), m̂ the cutoff of θ against the trace T, V_m̂ the kept vectors and Z the
block's others, R = S V_m̂ − V_m̂ Θ_m̂ (Rayleigh–Ritz: VᵀR = 0), λ* = θ_m̂ − ‖R‖_F / ACCURACY.
  1. m̂ <= r − GUARD: the cutoff lies inside the block, with room.
  2. λ* > θ_j for every j in Z, and (one Cholesky; P projects on the block, ρ = RATIO)
         ρλ*(I − P) − (I − P) S (I − P) − R_Z (λ* − Θ_Z)⁻¹ R_Zᵀ + λ* P  ≻  0.
     On span(V_m̂)⊥ in the basis (Z, block complement), λ*I − S is [[λ* − Θ_Z, −Bᵀ],
     [−B, λ* − D]] with B the complement part of R_Z; the matrix above is its Schur
     complement minus (1 − ρ)λ*. So λ*I − S is positive definite on span(V_m̂)⊥: no
     eigenvalue of S outside the kept Ritz vectors reaches λ* (none is missed, and the gap
     is >= ‖R‖_F / ACCURACY: the kept subspace is within an angle ACCURACY of the exact one,
     Davis–Kahan); and the Schur complement at every kept θ_i is >= (1 − ρ)θ_i, so the
     backward's deflated conjugate gradients have condition <= 1/(1 − ρ): CG_ITERS suffice.
  3. S = diag(Θ_m̂, D) + E with ‖E‖₂ = ‖R‖₂ and λ_max(D) < λ* < θ_m̂: by Weyl
     |λ_i − θ_i| <= ‖R‖₂ for i <= m̂, and the float64 m is m̂ when
         Σ_{i<=m̂} θ_i >= τT' + slack   and   Σ_{i<m̂} θ_i + m̂‖R‖_F + slack < τT'
     (T' = max(T, 1e-8); slack = SLACK·k·ε·θ_1 covers rounding here and in a float64 eigh
     itself: within it the float64 m is a coin flip, and the full solve decides).
A NaN anywhere makes a comparison false: the certificate fails and the full solve runs.
Ties at the cutoff (θ_m̂ = θ_m̂+1) fail 2: the full solve's tie policy (pca.full_subspace).

Prediction on an H100 at N=1024, d=768 (not measured; benchmarks/README.md): the products
are microseconds; HiDe fwd+bwd is ≈ 525 small launches (counted on the CPU: 264 torch ops
and 54 Triton launches forward, 169 and 38 backward; the elementwise steps between the
products are fused, kernels/subspace.py), ≈ 3 ms eagerly against syevd's 11.8 ms.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import torch

from .pca import TOTAL_VARIANCE_FLOOR, Subspace, cutoff_from_eigvals, numerical_zero

BLOCK = 128  # r: the resident-register path of the small solver (kernels/eigh.py)
GUARD = 16
WARMUP = 2  # power steps of S + (T/k)·I (full rank whatever S's rank) before the first RR
# Chebyshev filters of DEGREE after the first Rayleigh–Ritz. Measured on the CPU (N=1024
# and 2000 at d=768, 300 x 700, 700 x 300, τ 0.8-0.9): 3 x 8, 4 x 5 and 4 x 6 reach the
# exact projector to 1e-13 (3 x 6 fails one case); degree 5 and above fail all (the block
# loses rank to its top directions between two Cholesky QRs).
FILTERS = 6
DEGREE = 4
# ρ: the complement's spectrum certified below ρ·λ*. Measured on the CPU (the synthetic
# spectrum, 24 batches from 300 x 512 to 4096 x 768, τ = 0.8 and 0.9, block 128): 0.5
# certifies 16 of them at τ = 0.9, 0.6 and above all 24; the CG iterations grow with it.
RATIO = 0.65
# τ above which backends does not try the block: there m outgrows it (τ = 0.93: m ≈ 110-130
# of 768, λ_129/λ_m ≈ 0.8) and the certificate fails; the full solvers then run directly.
TAU_MAX = 0.9
# Columns whose Rayleigh quotient is below this x the largest lie in S's null space (a batch
# of rank below the block): they do not set the filter's b, which would otherwise sink to
# its floor and amplify their rounding past what one Cholesky QR can orthonormalise.
NULL_QUOTIENT = 1e-8
ACCURACY = 1e-9  # the kept subspace's certified angle to the exact one
SLACK = 64.0
ORTHONORMAL = 1e-12  # max |VᵀV − I| for the Ritz values to be bounds
SEED = 20261202  # the start block: deterministic, and not the training run's random numbers


def _cg_iterations(ratio: float, target: float) -> int:
    """CG's error bound 2·((√κ − 1)/(√κ + 1))^j <= target at κ = 1/(1 − ratio)."""
    kappa = 1.0 / (1.0 - ratio)
    rate = (math.sqrt(kappa) - 1.0) / (math.sqrt(kappa) + 1.0)
    return math.ceil(math.log(target / 2.0) / math.log(rate)) + 1


# The backward's CG error target by the features' dtype: float32 gradients are judged at
# max(2e-4, 2x the authors' float32 error ≈ 1e-5) (tests/test_exactness.py), float64 at 1e-8.
CG_TARGET = {torch.float32: 1e-10, torch.float64: 1e-15}
CG_ITERS = {dtype: _cg_iterations(RATIO, target) for dtype, target in CG_TARGET.items()}


class PartialBasis(NamedTuple):
    """What the backward needs of a subspace from ``top_subspace`` (pca.factor_backward)."""

    small: torch.Tensor  # S (k x k, float64)
    ok: torch.Tensor  # () bool: certified: basis columns [0, block) are the Ritz vectors,
    #                    the others zero; otherwise the basis is the full decomposition
    block: int
    steps: "Steps"  # the elementwise steps (the backward's CG)

    def resolvent(self, kept: torch.Tensor, rest: torch.Tensor, lam: torch.Tensor,
                  s_kept: torch.Tensor, floor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """factor_backward's W = rest Kᵀ for this basis where certified: column i is
        Σ_j v_j v_jᵀ s_i / (λ_i − λ_j) over every eigenvector j outside the kept set, those
        outside the block included, as (λ_i I − S)⁻¹ on span(kept)⊥ applied to s_i. The
        masked layout of pca.split: ``kept``/``rest`` (k x k, the block's Ritz vectors in
        columns [0, block)), ``lam`` (k,), ``s_kept`` = S̄·kept (k x k); ``dtype``: the
        features' (CG_ITERS by it)."""
        k, r = kept.shape[0], self.block
        inside = (kept[:, :r] != 0).any(0).to(kept.dtype)  # the kept columns of the block
        w = deflated_resolvent(self.small, kept[:, :r], lam[:r], rest[:, :r],
                               lam[:r] * (1.0 - inside), s_kept[:, :r] * inside, floor,
                               CG_ITERS.get(dtype, CG_ITERS[torch.float64]), self.steps)
        return torch.cat([w, w.new_zeros(k, k - r)], 1)


@functools.lru_cache(maxsize=8)
def _start(k: int, r: int, device: torch.device) -> torch.Tensor:
    """A fixed-seed orthonormal Gaussian k x r block, made once per shape (outside any
    capture: backends._prepare_for_capture runs this path eagerly first)."""
    g = torch.Generator(device="cpu").manual_seed(SEED)
    return torch.linalg.qr(torch.randn(k, r, generator=g, dtype=torch.float64))[0].to(device)


def _orthonormalize(y: torch.Tensor, shifted: bool = False) -> torch.Tensor:
    """Cholesky QR: a GEMM, an r x r Cholesky and a triangular solve, no host read. Between
    filters one pass (orthonormal to ε·cond(Y)², the filter's column scaling keeps cond(Y)
    small); before the last Rayleigh–Ritz ``shifted``: a shifted pass and a plain one
    (Fukaya et al., SIAM J. Sci. Comput. 42, 2020: the shift keeps the Cholesky from
    failing on a numerically rank-deficient block). A failed Cholesky gives NaN, and the
    certificate, which checks the orthonormality it relies on, then fails."""
    k, r = y.shape
    shift = 11.0 * (k * r + r * (r + 1)) * torch.finfo(y.dtype).eps
    for i in range(2 if shifted else 1):
        g = y.T @ y
        if shifted and i == 0:
            g.diagonal().add_(shift * g.diagonal().sum())
        factor = torch.linalg.cholesky_ex(g, upper=True).L  # (named L, upper here)
        y = torch.linalg.solve_triangular(factor, y, upper=True, left=False)
    return y


def _chebyshev(s: torch.Tensor, q: torch.Tensor, b: torch.Tensor, steps: "Steps"):
    """(T_DEGREE(2S/b − 1)·Q, b), column j divided by T_DEGREE at its Rayleigh quotient t_j
    (in the filter's variable): T is <= 1 on [0, b] (the unwanted spectrum, and never 0 at
    0: the block keeps its rank) and grows fast above it; the division keeps the columns
    O(1), so that the wanted directions with small eigenvalues are not washed out.
    b rises to the block's smallest Rayleigh quotient (outside S's null space: above
    NULL_QUOTIENT x the largest), which tends to λ_r+1 from below:
    measured on the CPU (N=1024, d=768, τ=0.9), the kept residual reaches 2e-14·λ_1 in 5
    filters, against 8 with b fixed at the first Rayleigh–Ritz's θ_r (≈ 0.2·λ_r+1).
    A product and a fused step per degree (``steps``); q's buffer is reused."""
    q = q.contiguous()  # (a triangular solve's result may be column-major)
    cur, coef, b = q.new_empty(q.shape), q.new_empty(2, q.shape[1]), b.clone()
    steps.filter_start(q, s @ q, b, cur, coef, NULL_QUOTIENT)
    prev = q
    for _ in range(DEGREE - 1):
        steps.filter_step(s @ cur, cur, prev, b, coef)  # prev ← the next block
        prev, cur = cur, prev
    return cur, b


def _rayleigh_ritz(s: torch.Tensor, q: torch.Tensor, small_eigh: Callable):
    """(θ descending, V = QW, SV) from the r x r problem QᵀSQ = WΘWᵀ."""
    sq = s @ q
    h = q.T @ sq
    theta, w = small_eigh(0.5 * (h + h.T))
    theta, w = theta.flip(0), w.flip(1)
    return theta, q @ w, sq @ w


def certify(s: torch.Tensor, total: torch.Tensor, theta: torch.Tensor, v: torch.Tensor,
            sv: torch.Tensor, tau: float, guard: int = GUARD) -> torch.Tensor:
    """() bool: the module docstring's certificate for the Ritz pairs (θ, V), SV = S·V."""
    checks = certificate(s, total, theta, v, sv, tau, guard)
    return functools.reduce(torch.logical_and, checks.values())


def certificate(s: torch.Tensor, total: torch.Tensor, theta: torch.Tensor, v: torch.Tensor,
                sv: torch.Tensor, tau: float, guard: int = GUARD) -> dict:
    """Its checks by name, each a () bool tensor (for tests and diagnosis)."""
    k, r = v.shape
    f64 = s.dtype
    eye_k = torch.eye(k, dtype=f64, device=s.device)
    lam = theta.clamp(min=0.0)
    m_hat, inside = cutoff_from_eigvals(lam, tau, total)
    kept = inside.to(f64)
    residual = sv - v * theta
    res_norm = (residual * kept).norm()
    theta_m = lam.gather(0, (m_hat - 1).reshape(1)).squeeze(0)
    lam_star = theta_m - res_norm / ACCURACY
    z_gap = torch.where(inside, 1.0, lam_star - theta)  # λ* − θ_j on Z (1 on the kept)
    r_z = residual * (1.0 - kept) / torch.where(z_gap > 0, z_gap, 1.0).sqrt()
    proj = v @ v.T
    vsv = v.T @ sv
    # (I − P) S (I − P) = S − V(SV)ᵀ − (SV)Vᵀ + V(VᵀSV)Vᵀ
    s_perp = s - v @ sv.T - sv @ v.T + v @ vsv @ v.T
    schur = RATIO * lam_star * (eye_k - proj) - s_perp - r_z @ r_z.T + lam_star * proj
    info = torch.linalg.cholesky_ex(0.5 * (schur + schur.T)).info
    eps = torch.finfo(f64).eps
    slack = SLACK * k * eps * lam[0]
    target = tau * total.clamp(min=TOTAL_VARIANCE_FLOOR)
    csum = torch.cumsum(lam, 0)
    below = torch.where(m_hat > 1, csum.gather(0, (m_hat - 2).clamp(min=0).reshape(1)).squeeze(0),
                        torch.zeros((), dtype=f64, device=s.device))
    upper = below + m_hat.to(f64) * res_norm + slack
    lower = csum.gather(0, (m_hat - 1).reshape(1)).squeeze(0)
    orthonormal = (v.T @ v - torch.eye(r, dtype=f64, device=s.device)).abs().max()
    return {"inside the block": m_hat <= r - guard, "kept above λ*": lam_star > 0,
            "block below λ*": (z_gap > 0).all(), "complement below ρλ*": info == 0,
            "m at least m̂": upper < target, "m at most m̂": lower >= target + slack,
            "orthonormal": orthonormal <= ORTHONORMAL}


def top_subspace(small: torch.Tensor, tau: float, gram: bool, small_eigh: Callable,
                 full_eigh: Callable, block: int = BLOCK, guard: int = GUARD,
                 steps: "Steps | None" = None) -> Subspace:
    """pca.full_subspace's Subspace of the PSD ``small`` (float64, k x k) from a block of
    ``block`` Ritz vectors where the certificate holds, else from ``full_eigh(small, run)``
    (run: a one-element int32 tensor, 0 where the certificate holds: the solve is then
    skipped on the device, its outputs unused). ``small_eigh`` solves the block x block
    Rayleigh–Ritz problems, ``steps`` the elementwise ones (TORCH_STEPS by default). Either
    way: the float64 m, the exact subspace (to ACCURACY), and a ``partial`` for the
    backward."""
    k = small.shape[0]
    if not 0 < block < k:
        raise ValueError(f"block must be in (0, {k}) for a {k} x {k} matrix, got {block}")
    steps = steps or TORCH_STEPS
    s = small
    total = s.diagonal().sum()
    q = _start(k, block, s.device)
    shift = total.clamp(min=0.0) / k
    for _ in range(WARMUP):
        q = _orthonormalize(torch.addcmul(s @ q, shift, q))
    theta, q, _ = _rayleigh_ritz(s, q, small_eigh)
    tiny = torch.finfo(s.dtype).tiny
    b = torch.maximum(theta[-1], 1e-6 * theta[0]).clamp(min=tiny)
    for i in range(FILTERS):
        y, b = _chebyshev(s, q, b, steps)
        q = _orthonormalize(y, shifted=i == FILTERS - 1)
    theta, v, sv = _rayleigh_ritz(s, q, small_eigh)
    ok = certify(s, total, theta, v, sv, tau, guard)
    lam_full, vec_full = full_eigh(s, (~ok).to(torch.int32).reshape(1))
    pad = k - block
    eigvals = torch.where(ok, torch.cat([theta.clamp(min=0.0), theta.new_zeros(pad)]),
                          lam_full.flip(0).clamp(min=0.0))
    basis = torch.where(ok, torch.cat([v, v.new_zeros(k, pad)], 1), vec_full.flip(1))
    m, inside = cutoff_from_eigvals(eigvals, tau, torch.where(ok, total, eigvals.sum()))
    keep = inside & (eigvals > numerical_zero(eigvals))
    return Subspace(basis, eigvals, keep, m, gram, PartialBasis(s, ok, block, steps))


class Steps(NamedTuple):
    """The elementwise steps between the products, in place: kernels/subspace.py fuses each
    into one launch (the triton backend's); TORCH_STEPS are their torch twins."""

    filter_start: Callable  # (q, sq, b, cur, coef, null)
    filter_step: Callable  # (s_cur, cur, prev, b, coef): prev ← the next Chebyshev block
    cg_update: Callable  # (p, ap, shift, y, res, rs)
    cg_direction: Callable  # (res, z_res, corr, p, rs)


def _filter_start(q, sq, b, cur, coef, null):
    rq = torch.linalg.vecdot(q, sq, dim=0)
    low = torch.where(rq > null * rq.max(), rq, float("inf")).min()
    b.copy_(torch.maximum(b, torch.where(low < float("inf"), low, 0.0)))
    t = (rq * (2.0 / b) - 1.0).clamp(min=1.0)
    torch.mul(sq * (2.0 / b) - q, 1.0 / t, out=cur)
    coef[0], coef[1] = 1.0 / t, 2.0 * t


def _filter_step(s_cur, cur, prev, b, coef):
    s_next = 1.0 / (coef[1] - coef[0])
    nxt = (s_cur * (4.0 / b) - 2.0 * cur - coef[0] * prev) * s_next
    prev.copy_(nxt)
    coef[0] = s_next


def _cg_update(p, ap, shift, y, res, rs):
    mp = torch.addcmul(ap, shift, p)
    alpha = rs / torch.linalg.vecdot(p, mp, dim=0).clamp(min=torch.finfo(p.dtype).tiny)
    y.addcmul_(alpha, p)
    res.addcmul_(alpha, mp, value=-1.0)


def _cg_direction(res, z_res, corr, p, rs):
    res.sub_(z_res)
    rs_new = torch.linalg.vecdot(res, res, dim=0)
    p.mul_(rs_new / rs.clamp(min=torch.finfo(p.dtype).tiny)).add_(res).sub_(corr)
    rs.copy_(rs_new)


TORCH_STEPS = Steps(_filter_start, _filter_step, _cg_update, _cg_direction)


def deflated_resolvent(a: torch.Tensor, kept: torch.Tensor, shifts: torch.Tensor,
                       defl: torch.Tensor, defl_values: torch.Tensor, rhs: torch.Tensor,
                       floor: torch.Tensor, iters: int = CG_ITERS[torch.float64],
                       steps: Steps = TORCH_STEPS) -> torch.Tensor:
    """y_i = (shift_i I − A)⁻¹ P rhs_i on the complement of ``kept`` (P = I − KKᵀ).

    The kept columns are the top eigenvectors and shift_i their eigenvalues, so the
    operator is SPD on the complement, but its condition λ_i/(λ_i − λ_{m+1}) is as bad as
    the gap at the cutoff. Deflated conjugate gradients (Saad et al., SIAM J. Sci. Comput.
    21, 2000) remove that: the Ritz vectors ``defl`` (Zᵀ A Z = diag(defl_values)) are
    solved exactly, the rest iteratively, with the condition the certificate bounds.
    Exact whatever the accuracy of Z (only the convergence depends on it). All columns
    at once, ``iters`` fixed, no host read; an iteration is 3 products and the two CG
    ``steps``. Zero columns of ``kept``, ``defl`` or ``rhs`` (the masked layout) change
    nothing; a zero right-hand side stays exactly zero.
    """
    def perp(v):
        return v - kept @ (kept.T @ v)

    neg_a_perp = kept @ (a @ kept).T - a  # −P·A: one product per iteration instead of three
    # Zᵀ(λ_i − A)Z = diag(λ_i − θ_j) since Z are Ritz vectors; AZ is kept for ZᵀAv.
    zaz = torch.cat([defl, a @ defl], 1)
    p_defl, cols = defl.shape[1], rhs.shape[1]
    neg_inv_gaps = -1.0 / (shifts[None, :] - defl_values[:, None]).clamp(min=floor)
    dv = defl_values[:, None]

    def deflation(v):
        """(Z·zv, Z(ZᵀMZ)⁻¹ZᵀM(v − Z·zv)) with zv = Zᵀv: v − Z·zv is v deflated."""
        c = zaz.T @ v  # [zv; ZᵀAv]
        # ZᵀA(v − Z·zv) = ZᵀAv − θ·zv, and Zᵀ(v − Z·zv) = 0
        c[p_defl:].addcmul_(dv, c[:p_defl], value=-1.0).mul_(neg_inv_gaps)
        both = torch.matmul(defl, c.view(2, p_defl, cols))
        return both[0], both[1]

    b = perp(rhs)
    y = defl @ ((defl.T @ b) * -neg_inv_gaps)
    res = b - torch.addcmul(neg_a_perp @ y, shifts, y)
    z_res, corr = deflation(res)
    res = res - z_res
    p = res - corr
    rs = torch.linalg.vecdot(res, res, dim=0)
    for _ in range(iters):
        steps.cg_update(p, neg_a_perp @ p, shifts, y, res, rs)
        # Deflated residuals are orthogonal to Z; rounding breaks that, and past
        # convergence the broken part (where M is nearly singular) would grow: restore it.
        z_res, corr = deflation(res)
        steps.cg_direction(res, z_res, corr, p, rs)
    return perp(y)
