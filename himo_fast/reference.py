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

from .pca import compute_dtype, principal_subspace
from .factors import Factors, hide_factors_differentiable, materialize


def hide_reference(text_features: torch.Tensor, tau: float = 0.9) -> torch.Tensor:
    """u' = X̂ V_m V_mᵀ + ū in at least float32, with the exact subspace gradient."""
    return materialize(hide_factors_reference(text_features, tau))


def hide_factors_reference(text_features: torch.Tensor, tau: float = 0.9) -> Factors:
    """HiDe's factors over the full, masked basis (no host synchronisation), as plain
    differentiable torch ops: gradients of any order."""
    return hide_factors_differentiable(text_features, tau)


def component_count(text_features: torch.Tensor, tau: float = 0.9) -> torch.Tensor:
    """HiDe's m, the number of components kept (a 0-d int64 tensor; reading it syncs,
    computing it does not)."""
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


def dual_infonce_reference(rows, cols, scale, label_offset: int = 0,
                           label_smoothing: float = 0.0):
    """(global, comp): the InfoNCE of the global pair (img, txt) and of the component pair
    (cimg, comp), rows against columns, labels ``label_offset + arange(rows)``. ``rows``
    and ``cols`` are ((img, txt), (cimg, comp)); ``cols`` None: the square single-rank
    case, columns = rows. ``cimg`` is the image side of the component branch: the images
    themselves, or their factored form (factors.component_image). logit_bias is not an
    argument: softmax cross entropy is invariant to a constant added to every logit.
    """
    cols = rows if cols is None else cols
    dtype = compute_dtype(rows[0][0].dtype)
    (img_r, txt_r), (cimg_r, comp_r), (img_c, txt_c), (cimg_c, comp_c) = (
        [t.to(dtype) for t in pair] for pair in (*rows, *cols))
    scale = scale.to(dtype).reshape(())
    labels = label_offset + torch.arange(img_r.shape[0], device=img_r.device)
    glob = infonce_pair(img_r, txt_r, img_c, txt_c, scale, labels, label_smoothing)
    comp = infonce_pair(cimg_r, comp_r, cimg_c, comp_c, scale, labels, label_smoothing)
    return glob, comp
