"""HiDe (centre → PCA → reconstruction) as factors, with its autograd.

The reconstruction u' = X̂Π + ū is kept as factors (Z, B, ū) with u' = Z Bᵀ + 1ūᵀ, where
B has one column per kept component (pca.factor), or, for the fixed-size (masked) basis of
the covariance space, (Z, B) = (X̂, Π): no N x d tensor beyond X̂, which the backward
keeps anyway. Every consumer goes through them:

- ``materialize``: u' itself (N x d), where a consumer needs it (``himo_fast.hide``, the
  gathered columns of the per-rank recipe). For N > d with masked factors, d wide,
  ``hide_reconstruction`` gives u' from one op that keeps no N x d tensor for its
  backward (backends.Impl.reconstruction picks).
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

from .pca import (RecentredRows, Subspace, Split, centring_backward, compute_dtype,
                  differentiable_subspace, factor, factor_backward, gram_or_cov,
                  principal_subspace, reconstruction_backward, row_blocks, split)
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
    # (k, tau) -> whether the PCA of a k x k small matrix is as fast in a CUDA graph as
    # eagerly (the eigensolver may differ while capturing); None: at every size
    graphable: Callable | None = None


TORCH_OPS = HiDeOps(_centre, gram_or_cov, _product)


class Factors(NamedTuple):
    coords: torch.Tensor  # Z (N, a)
    basis: torch.Tensor  # B (d, a)
    mean: torch.Tensor  # ū (1, d)
    ops: HiDeOps = TORCH_OPS  # what the consumers below compute their products with


class Saved(NamedTuple):
    """What HiDe's backward needs from its forward: tensors, and the route's constants
    (the same for every call of one shape, dtype and τ, so a CUDA graph may hold them)."""

    tensors: tuple  # (x, eigvals, kept, rest, lam_kept, lam_rest, across, z, b, *partial)
    gram: bool
    partial: tuple | None  # (block, steps) of a subspace_iteration.PartialBasis
    projector: bool = False  # (Z, B) = (X̂, Π): pca.factor's masked cov-space layout


def hide_forward(u: torch.Tensor, tau: float, sliced: bool, ops: HiDeOps):
    """HiDe's forward without autograd: ((Z, B, ū), Saved)."""
    mean, x = ops.centre(u)
    sub = principal_subspace(x, tau, ops.small_matrix, eigh=ops.eigh, subspace=ops.subspace)
    if sub.partial is not None and sliced:
        raise ValueError("himo_fast: a partial (block) basis needs the masked layout "
                         "(sliced=False)")
    parts = split(sub, sliced)
    projector = not (sub.gram or sliced)
    z, b = factor(x, sub, parts, ops.product, projector)
    across = parts.across if parts.across is not None else x.new_empty(0)
    partial = sub.partial
    tensors = (x, sub.eigvals, parts.kept, parts.rest, parts.lam_kept, parts.lam_rest,
               across, z, b, *((partial.small, partial.ok) if partial is not None else ()))
    return (z, b, mean), Saved(tensors, sub.gram,
                               (partial.block, partial.steps) if partial is not None else None,
                               projector)


def _restored(saved: Saved, eigvals, kept, rest, lam_kept, lam_rest, across, partial):
    """(Subspace, Split) for a backward, from the subspace's saved tensors."""
    sub = Subspace(None, eigvals, None, None, saved.gram,
                   PartialBasis(*partial, *saved.partial) if partial else None)
    return sub, Split(kept, rest, lam_kept, lam_rest, across if across.numel() else None)


def hide_backward(saved: Saved, grad_z, grad_b, grad_mean) -> torch.Tensor:
    """∂L/∂u from the factors' gradients (None: zero), SPEC section 3's exact gradient."""
    x, *subspace, z, b = saved.tensors[:9]
    sub, parts = _restored(saved, *subspace, saved.tensors[9:])
    grad_z = torch.zeros_like(z) if grad_z is None else grad_z
    grad_b = torch.zeros_like(b) if grad_b is None else grad_b
    grad_mean = torch.zeros_like(x[:1]) if grad_mean is None else grad_mean
    grad_x = factor_backward(x, sub, parts, z, b, grad_z, grad_b, saved.projector)
    return centring_backward(grad_x, grad_mean)


def reconstruction_forward(text: torch.Tensor, tau: float, ops: HiDeOps, out_dtype=None):
    """u' = X̂Π + ū (the masked covariance-space layout, N > d) without autograd: (u',
    Saved) with ū and the subspace's tensors, not X̂: the backward recomputes its rows
    from the texts (RecentredRows), which the caller holds anyway. u' in ``out_dtype``
    (default: the compute dtype), a narrower one rounded row block by row block."""
    n, d = text.shape
    if n <= d:
        raise ValueError(f"himo_fast: the fused reconstruction is for N > d (the covariance "
                         f"space); got N={n}, d={d}: use hide_factors")
    (z, b, mean), saved = hide_forward(text.to(compute_dtype(text.dtype)), tau, False, ops)
    if out_dtype in (None, z.dtype):
        out = ops.product(z, b.T, mean)  # materialize
    else:  # no N x d copy in the compute dtype beside the narrow one
        out = z.new_empty(z.shape, dtype=out_dtype)
        for r in row_blocks(n, d):
            out[r] = ops.product(z[r], b.T, mean)
    _x, *subspace, _z, pi = saved.tensors[:9]
    return out, saved._replace(tensors=(mean, *subspace, pi, *saved.tensors[9:]))


def reconstruction_backward_from(text: torch.Tensor, saved: Saved, grad: torch.Tensor):
    """∂L/∂text from ∂L/∂u' (pca.reconstruction_backward), in the texts' dtype."""
    mean, *subspace, pi = saved.tensors[:8]
    sub, parts = _restored(saved, *subspace, saved.tensors[8:])
    return reconstruction_backward(RecentredRows(text, mean), sub, parts, pi, grad)


def refuse_double_backward(what: str = "HiDe's fused backward") -> None:
    """Called in a fused backward: create_graph=True would have autograd differentiate
    it as a constant (it is exact for consumers of Z Bᵀ, but not itself differentiable)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"himo_fast: {what} (backends 'cpu', 'cuda', 'triton') has no double backward "
            "(create_graph=True); use backend='reference', whose gradients are "
            "differentiable to any order")


class _HiDeFactors(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, tau: float, sliced: bool, ops: HiDeOps):
        outputs, saved = hide_forward(u, tau, sliced, ops)
        ctx.save_for_backward(*saved.tensors)
        ctx.saved = saved._replace(tensors=())
        if torch.compiler.is_compiling():
            # Outputs that are not saved tensors: torch 2.11's dynamo (the GPU machine's)
            # dropped the gradient of the output that is the saved kept eigenvectors
            # themselves (B in the covariance case, Z in the Gram case)
            return tuple(t.clone() for t in outputs)
        return outputs

    @staticmethod
    def backward(ctx, grad_z, grad_b, grad_mean):
        refuse_double_backward()
        saved = ctx.saved._replace(tensors=ctx.saved_tensors)
        return hide_backward(saved, grad_z, grad_b, grad_mean), None, None, None


class _HiDeReconstruction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, text: torch.Tensor, tau: float, ops: HiDeOps, out_dtype):
        out, saved = reconstruction_forward(text, tau, ops, out_dtype)
        ctx.save_for_backward(text, *saved.tensors)
        ctx.saved = saved._replace(tensors=())
        return out

    @staticmethod
    def backward(ctx, grad):
        refuse_double_backward()
        text, *tensors = ctx.saved_tensors
        saved = ctx.saved._replace(tensors=tuple(tensors))
        return reconstruction_backward_from(text, saved, grad), None, None, None


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


class HiDeStage(NamedTuple):
    """HiDe (masked layout) as a graphs.Stage: (u,) -> (Z, B, ū)."""

    tau: float
    ops: HiDeOps

    def forward(self, inputs):
        outputs, saved = hide_forward(inputs[0], self.tau, False, self.ops)
        return outputs, saved.tensors, saved._replace(tensors=())

    def backward(self, inputs, saved, constants, grads):
        return (hide_backward(constants._replace(tensors=saved), *grads),)

    def eager(self, u):
        return _HiDeFactors.apply(u, self.tau, False, self.ops)

    def graphable(self, inputs) -> bool:
        return self.ops.graphable is None or self.ops.graphable(min(inputs[0].shape), self.tau)


class HiDeReconstructionStage(NamedTuple):
    """The fused reconstruction as a graphs.Stage: (texts,) -> (u',)."""

    tau: float
    ops: HiDeOps
    out_dtype: torch.dtype | None = None

    def forward(self, inputs):
        out, saved = reconstruction_forward(inputs[0], self.tau, self.ops, self.out_dtype)
        return (out,), saved.tensors, saved._replace(tensors=())

    def backward(self, inputs, saved, constants, grads):
        return (reconstruction_backward_from(inputs[0], constants._replace(tensors=saved),
                                             grads[0]),)

    def eager(self, text):
        return (_HiDeReconstruction.apply(text, self.tau, self.ops, self.out_dtype),)

    def graphable(self, inputs) -> bool:
        return HiDeStage(self.tau, self.ops).graphable(inputs)


def hide_reconstruction(text_features: torch.Tensor, tau: float = 0.9, ops: HiDeOps = TORCH_OPS,
                        graphs=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """materialize(hide_factors(texts, τ)) for N > d as one op, in at least float32 (or
    ``dtype``): the same u' and gradient (to rounding), holding less. Its backward keeps
    the texts and ū, not X̂ (nor Z = X̂ in materialize's graph), and writes ∂L/∂texts once,
    by row blocks, in their dtype: at N = 262144, d = 768 the factors' route holds X̂ (768
    MiB in fp32) from HiDe's forward to its backward, and there two more N x d fp32 tensors
    (∂L/∂Z and ∂L/∂X̂). A narrower ``dtype`` (the bf16 the dual InfoNCE takes u' in) also
    spares the fp32 u' beside its cast through the loss's forward, and the fp32 ∂L/∂u'
    (the cast's gradient) at this backward: ∂L/∂u' comes in that dtype, upcast by blocks.
    Replayed from ``graphs`` (a graphs.GraphCache) where given."""
    if graphs is not None:
        return graphs(HiDeReconstructionStage(tau, ops, dtype), text_features)[0]
    return _HiDeReconstruction.apply(text_features, tau, ops, dtype)


def hide_factors(text_features: torch.Tensor, tau: float = 0.9, sliced: bool = False,
                 ops: HiDeOps = TORCH_OPS, graphs=None) -> Factors:
    """HiDe as factors, in at least float32. ``sliced``: exact-size factors (reads m, a
    host sync on a GPU); otherwise fixed-size factors with the cutoff as a mask, replayed
    from ``graphs`` (a graphs.GraphCache) where given."""
    u = text_features.to(compute_dtype(text_features.dtype))
    if graphs is not None and not sliced:
        return Factors(*graphs(HiDeStage(tau, ops), u), ops)
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
