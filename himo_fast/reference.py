"""The exact HiMo-CLIP loss in plain PyTorch (SPEC section 1): always available, and the
yardstick every kernel is tested against.

It computes the authors' recipe, with two differences that only show where the authors'
code breaks: the PCA is a symmetric eigendecomposition of the smaller of the Gram and
covariance matrices (no host sync, the cutoff is a mask), and its gradient is the exact
subspace gradient (finite on degenerate batches, where ``torch.linalg.svd`` gives NaN).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .pca import centring_backward, compute_dtype, principal_subspace, project, subspace_backward


class _HiDeExact(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, tau: float):
        mean = u.mean(0, keepdim=True)
        x = u - mean
        sub = principal_subspace(x, tau)
        ctx.save_for_backward(x, sub.basis, sub.eigvals, sub.keep, sub.m)
        ctx.gram = sub.gram
        return project(x, sub) + mean

    @staticmethod
    def backward(ctx, grad_recon: torch.Tensor):
        from .pca import Subspace

        x, basis, eigvals, keep, m = ctx.saved_tensors
        sub = Subspace(basis, eigvals, keep, m, ctx.gram)
        grad_x = subspace_backward(x, sub, grad_recon)
        return centring_backward(grad_x, grad_recon), None


def hide_reference(text_features: torch.Tensor, tau: float = 0.9) -> torch.Tensor:
    """u' = X̂ V_m V_mᵀ + ū in at least float32, with the exact subspace gradient."""
    u = text_features.to(compute_dtype(text_features.dtype))
    return _HiDeExact.apply(u, tau)


def hide_components(text_features: torch.Tensor, tau: float = 0.9) -> torch.Tensor:
    """The chosen m (a 0-d int64 tensor; reading it syncs, computing it does not)."""
    u = text_features.detach().to(compute_dtype(text_features.dtype))
    return principal_subspace(u - u.mean(0, keepdim=True), tau).m


def infonce_pair(rows_a, rows_b, cols_a, cols_b, scale, labels, label_smoothing):
    """½[CE(s·a·B_colsᵀ) + CE(s·b·A_colsᵀ)]: one symmetric InfoNCE branch, N x N logits."""
    logits_ab = scale * rows_a @ cols_b.T
    logits_ba = scale * rows_b @ cols_a.T
    return 0.5 * (
        F.cross_entropy(logits_ab, labels, label_smoothing=label_smoothing)
        + F.cross_entropy(logits_ba, labels, label_smoothing=label_smoothing)
    )


def dual_infonce_reference(img_rows, txt_rows, comp_rows, img_cols, txt_cols, comp_cols,
                           scale, label_offset: int = 0, label_smoothing: float = 0.0):
    """(global, comp) for rows against columns, labels ``label_offset + arange(rows)``.

    Square single-rank case: pass the same tensors as rows and columns. logit_bias is not
    an argument: softmax cross entropy is invariant to a constant added to every logit.
    """
    dtype = compute_dtype(img_rows.dtype)
    cast = [t.to(dtype) for t in (img_rows, txt_rows, comp_rows, img_cols, txt_cols, comp_cols)]
    img_rows, txt_rows, comp_rows, img_cols, txt_cols, comp_cols = cast
    scale = scale.to(dtype).reshape(())
    labels = label_offset + torch.arange(img_rows.shape[0], device=img_rows.device)
    glob = infonce_pair(img_rows, txt_rows, img_cols, txt_cols, scale, labels, label_smoothing)
    comp = infonce_pair(img_rows, comp_rows, img_cols, comp_cols, scale, labels, label_smoothing)
    return glob, comp
