"""The dual InfoNCE stage on the compiled kernels (``csrc/``): fake kernels and autograd
for the ``himo_fast::dual_lse`` ops, and the loss assembled from them.

Per row, label-smoothed cross entropy is ``lse - (1-ε)·z_label - ε·mean_j z_j``. Only the
log-sum-exp needs all N x N logits: that is the fused op (tiled, O(N·d) memory, both
branches and both directions at once). The label and mean terms are linear in the
features, O(N·d), and computed here with plain tensor ops.
"""
from __future__ import annotations

import torch

from . import _extension
from .pca import compute_dtype

_LIB = "himo_fast"


def _register() -> bool:
    if _extension.extension() is None:
        return False

    @torch.library.register_fake(f"{_LIB}::dual_lse")
    def _(img_r, txt_r, cimg_r, comp_r, img_c, txt_c, cimg_c, comp_c, scale, strip_rows=0):
        return img_r.new_empty((4, img_r.shape[0]), dtype=compute_dtype(img_r.dtype))

    @torch.library.register_fake(f"{_LIB}::dual_lse_backward")
    def _(grad_lse, lse, img_r, txt_r, cimg_r, comp_r, img_c, txt_c, cimg_c, comp_c, scale,
          strip_rows=0):
        rows = [img_r, txt_r, cimg_r, comp_r]
        cols = [img_c, txt_c, cimg_c, comp_c]
        col_grads = [torch.empty_like(c) if c is not None else img_r.new_empty((0,)) for c in cols]
        return (*[torch.empty_like(r) for r in rows], *col_grads,
                img_r.new_empty((), dtype=compute_dtype(img_r.dtype)))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:9], output)
        ctx.square = inputs[4] is None
        ctx.strip_rows = inputs[9] if len(inputs) > 9 else 0

    def backward(ctx, grad_lse):
        *features, scale, lse = ctx.saved_tensors
        grads = torch.ops.himo_fast.dual_lse_backward(
            grad_lse.contiguous(), lse, *features, scale, ctx.strip_rows)
        row_grads, col_grads, dscale = grads[:4], grads[4:8], grads[8]
        if ctx.square:
            col_grads = (None,) * 4
        dscale = dscale.to(scale.dtype).reshape(scale.shape)
        return (*row_grads, *col_grads, dscale, None)

    torch.library.register_autograd(f"{_LIB}::dual_lse", backward, setup_context=setup_context)
    return True


REGISTERED = _register()


def dual_lse(img_r, txt_r, cimg_r, comp_r, img_c, txt_c, cimg_c, comp_c, scale,
             strip_rows: int = 0):
    """Row log-sum-exps [4, B] of s·img_r·txt_cᵀ, s·txt_r·img_cᵀ, s·cimg_r·comp_cᵀ,
    s·comp_r·cimg_cᵀ. Columns None: square case (columns are the rows)."""
    return torch.ops.himo_fast.dual_lse(img_r, txt_r, cimg_r, comp_r, img_c, txt_c, cimg_c,
                                        comp_c, scale, strip_rows)


def _branch(lse_ab, lse_ba, a_rows, b_rows, a_cols, b_cols, scale, offset, eps):
    """½ mean over rows of the two label-smoothed cross entropies of one branch."""
    # Labels are offset + arange(B): the label columns are a contiguous slice (a view).
    n = a_rows.shape[0]
    target_ab = (a_rows * b_cols.narrow(0, offset, n)).sum(-1)
    target_ba = (b_rows * a_cols.narrow(0, offset, n)).sum(-1)
    mean_ab = a_rows @ b_cols.mean(0)
    mean_ba = b_rows @ a_cols.mean(0)
    linear = (1.0 - eps) * (target_ab + target_ba) + eps * (mean_ab + mean_ba)
    return 0.5 * (lse_ab + lse_ba - scale * linear).mean()


def dual_infonce(img_r, txt_r, cimg_r, comp_r, img_c, txt_c, cimg_c, comp_c, scale,
                 label_offset: int = 0, label_smoothing: float = 0.0, strip_rows: int = 0):
    """(global, comp) losses, same contract as ``reference.dual_infonce_reference``."""
    rows_in = (img_r, txt_r, cimg_r, comp_r)
    cols_in = (img_c, txt_c, cimg_c, comp_c)
    square = all(c is r for c, r in zip(cols_in, rows_in))
    acc = compute_dtype(img_r.dtype)
    kernel_dtype = img_r.dtype if img_r.is_cuda and acc == torch.float32 else acc
    rows = [t.to(kernel_dtype).contiguous() for t in rows_in]
    cols = rows if square else [t.to(kernel_dtype).contiguous() for t in cols_in]
    s = scale.reshape(()).to(acc)
    lse = dual_lse(*rows, *((None,) * 4 if square else cols), s, strip_rows)
    v, t, cv, c = (x.to(acc) for x in rows)
    vc, tc, cvc, cc = (v, t, cv, c) if square else (x.to(acc) for x in cols)
    glob = _branch(lse[0], lse[1], v, t, vc, tc, s, label_offset, label_smoothing)
    comp = _branch(lse[2], lse[3], cv, c, cvc, cc, s, label_offset, label_smoothing)
    return glob, comp
