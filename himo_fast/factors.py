"""HiDe (centre → PCA → reconstruction) as factors, with its autograd.

The reconstruction u' = X̂Π + ū is kept as factors (Z, B, ū) with u' = Z Bᵀ + 1ūᵀ, where
B has one column per kept component (pca.factor). Every consumer goes through them:

- ``materialize``: u' itself (N x d), where a consumer needs it (``himo_fast.hide``, the
  gathered columns of the per-rank recipe).
- ``component_text`` / ``component_image``: the component branch's logits
  s·v·u'ᵀ = s·[vB, vū]·[Z, 1]ᵀ, a product of width m+1 instead of d. At N=1024, d=768,
  m≈72 that is a tenth of the FLOPs.

The autograd function returns the factors and back-propagates the exact subspace gradient
(SPEC section 3) from their gradients alone (pca.factor_backward). Z and B on their own
depend on the choice of basis inside the subspace: the gradient is exact for consumers
that use them through Z Bᵀ, as the ones below do.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .pca import (Subspace, Split, centring_backward, compute_dtype,
                  differentiable_subspace, factor,
                  factor_backward, gram_or_cov, principal_subspace, split)
from .subspace_iteration import PartialBasis


def _centre(u: torch.Tensor):
    mean = u.mean(0, keepdim=True)
    return mean, u - mean


def _product(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return a @ b if bias is None else torch.addmm(bias.reshape(1, -1), a, b)


class HiDeOps(NamedTuple):
    """The primitives HiDe is built from; one set per backend (torch, or the Triton
    kernels of ``himo_fast.kernels``). ``product`` must be differentiable: consumers of
    the factors (u', the component image) use it under autograd."""

    centre: Callable  # u -> (ū as 1 x d, X̂)
    small_matrix: Callable  # (X̂, gram) -> X̂X̂ᵀ or X̂ᵀX̂
    product: Callable  # (a, b, bias=None) -> a @ b + bias
    eigh: Callable = torch.linalg.eigh  # symmetric a -> (eigenvalues ascending, vectors)
    # (small, tau, gram) -> pca.Subspace in place of the full eigh, where set
    subspace: Callable | None = None


TORCH_OPS = HiDeOps(_centre, gram_or_cov, _product)


class Factors(NamedTuple):
    coords: torch.Tensor  # Z (N, a)
    basis: torch.Tensor  # B (d, a)
    mean: torch.Tensor  # ū (1, d)
    ops: HiDeOps = TORCH_OPS  # what the consumers below compute their products with


class _HiDeFactors(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, tau: float, sliced: bool, ops: HiDeOps):
        mean, x = ops.centre(u)
        sub = principal_subspace(x, tau, ops.small_matrix, eigh=ops.eigh, subspace=ops.subspace)
        if sub.partial is not None and sliced:
            raise ValueError("himo_fast: a partial (block) basis needs the masked layout "
                             "(sliced=False)")
        parts = split(sub, sliced)
        z, b = factor(x, sub, parts, ops.product)
        empty = x.new_empty(0)
        across = parts.across if parts.across is not None else empty
        partial = sub.partial
        ctx.save_for_backward(x, sub.eigvals, parts.kept, parts.rest, parts.lam_kept,
                              parts.lam_rest, across, z, b,
                              *((partial.small, partial.ok) if partial is not None else ()))
        ctx.gram = sub.gram
        ctx.partial = (partial.block, partial.steps) if partial is not None else None
        return z, b, mean

    @staticmethod
    def backward(ctx, grad_z, grad_b, grad_mean):
        x, eigvals, kept, rest, lam_kept, lam_rest, across, z, b, *partial = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: this fused backward is exact for consumers of Z Bᵀ, but
            # not itself differentiable; autograd would differentiate it as a constant.
            raise RuntimeError(
                "himo_fast: HiDe's fused backward (backends 'cpu', 'cuda', 'triton') has no "
                "double backward (create_graph=True); use backend='reference', whose "
                "gradients are differentiable to any order")
        sub = Subspace(None, eigvals, None, None, ctx.gram,
                       PartialBasis(*partial, *ctx.partial) if partial else None)
        parts = Split(kept, rest, lam_kept, lam_rest, across if across.numel() else None)
        grad_z = torch.zeros_like(z) if grad_z is None else grad_z
        grad_b = torch.zeros_like(b) if grad_b is None else grad_b
        grad_mean = torch.zeros_like(x[:1]) if grad_mean is None else grad_mean
        grad_x = factor_backward(x, sub, parts, z, b, grad_z, grad_b)
        return centring_backward(grad_x, grad_mean), None, None, None


def hide_factors_differentiable(text_features: torch.Tensor, tau: float = 0.9) -> Factors:
    """HiDe's masked factors as a composition of differentiable torch ops (the reference
    backend): autograd takes its gradient to any order (double backward, gradgradcheck),
    through pca.differentiable_subspace. First order, it equals the fused path's exact
    subspace gradient; it costs O(k³) more in the backward (k = min(N, d))."""
    u = text_features.to(compute_dtype(text_features.dtype))
    mean, x = _centre(u)
    sub = differentiable_subspace(x, tau)
    z, b = factor(x, sub, split(sub, sliced=False))
    return Factors(z, b, mean)


def hide_factors(text_features: torch.Tensor, tau: float = 0.9, sliced: bool = False,
                 ops: HiDeOps = TORCH_OPS) -> Factors:
    """HiDe as factors, in at least float32. ``sliced``: exact-size factors (reads m, a
    host sync on a GPU); otherwise fixed-size factors with the cutoff as a mask."""
    u = text_features.to(compute_dtype(text_features.dtype))
    return Factors(*_HiDeFactors.apply(u, tau, sliced, ops), ops)


def materialize(f: Factors) -> torch.Tensor:
    """u' = Z Bᵀ + ū."""
    return f.ops.product(f.coords, f.basis.T, f.mean)


def factored_is_cheaper(f: Factors) -> bool:
    """The factored component branch has width a+1; the materialised one width d."""
    return f.basis.shape[1] + 1 < f.basis.shape[0]


def component_text(f: Factors) -> torch.Tensor:
    """[Z, 1]: the reconstructed texts in the factored similarity."""
    return torch.cat([f.coords, f.coords.new_ones(f.coords.shape[0], 1)], 1)


def component_image(f: Factors, image: torch.Tensor) -> torch.Tensor:
    """[vB, vū]: images in the factored similarity, so that [vB, vū]·[Z, 1]ᵀ = v·u'ᵀ."""
    v = image.to(f.basis.dtype)
    return f.ops.product(v, torch.cat([f.basis, f.mean.T], 1))
