"""The dual InfoNCE stage on the compiled kernels (``csrc/``): fake kernels and autograd
for the ``himo_fast::dual_ce`` ops, and the loss assembled from them.

The op returns, for each row of the four logit matrices (image→text and text→image, global
and component branch), the label-smoothed cross entropy ``lse - Σ_j y_j·x_j`` and the
plain one ``nll = lse - x_label``, saved for the backward: the softmax is recomputed as
``exp((x - x_label) - nll)``, exact to the last bit where it is near 1. Tiled: O(N·d)
memory, both branches and both directions at once. On the CPU the forward also returns its
logits when they all fit in CPU_LOGITS_KEPT elements (8 MiB), so that the backward skips
their recompute; otherwise that output is empty. The backward forms ``g·(softmax - y)``
per logit, so a row whose softmax is its target (one pair, a solved example) gets exactly
zero gradient.
"""
from __future__ import annotations

import torch

from . import _extension
from .pca import compute_dtype

_LIB = "himo_fast"
# csrc/dual_infonce.cpp kCpuLogitsElements: the CPU forward keeps its logits for the
# backward when all of them fit in this many elements (the fake kernel must agree).
CPU_LOGITS_KEPT = 1 << 21


def kept_logits_shape(img_r, img_c, n_cols):
    """Shape of the op's third output: the forward's logits, or (0,) when not kept."""
    jobs = 2 if img_c is None else 4  # GEMMs: one per branch square, two otherwise
    b = img_r.shape[0]
    if img_r.device.type == "cpu" and jobs * b * n_cols <= CPU_LOGITS_KEPT:
        return (jobs, b, n_cols)
    return (0,)


def _register() -> bool:
    if _extension.extension() is None:
        return False

    @torch.library.register_fake(f"{_LIB}::dual_ce")
    def _(img_r, txt_r, cimg_r, comp_r, img_c, txt_c, cimg_c, comp_c, scale, label_offset=0,
          label_smoothing=0.0, strip_rows=0):
        acc = compute_dtype(img_r.dtype)
        out = lambda: img_r.new_empty((4, img_r.shape[0]), dtype=acc)
        n_cols = img_r.shape[0] if img_c is None else img_c.shape[0]
        return out(), out(), img_r.new_empty(kept_logits_shape(img_r, img_c, n_cols), dtype=acc)

    @torch.library.register_fake(f"{_LIB}::dual_ce_backward")
    def _(grad_ce, grad_nll, nll, logits, img_r, txt_r, cimg_r, comp_r, img_c, txt_c, cimg_c,
          comp_c, scale, label_offset=0, label_smoothing=0.0, strip_rows=0):
        rows = [img_r, txt_r, cimg_r, comp_r]
        cols = [img_c, txt_c, cimg_c, comp_c]
        col_grads = [torch.empty_like(c) if c is not None else img_r.new_empty((0,)) for c in cols]
        return (*[torch.empty_like(r) for r in rows], *col_grads,
                img_r.new_empty((), dtype=compute_dtype(img_r.dtype)))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:9], output[1], output[2])
        ctx.mark_non_differentiable(output[2])
        ctx.square = inputs[4] is None
        ctx.options = inputs[9:]  # label_offset, label_smoothing, strip_rows when given

    def backward(ctx, grad_ce, grad_nll, _grad_logits):
        if torch.is_grad_enabled():
            # dual_ce_backward has no derivative of its own: autograd would treat the
            # gradient as a constant and return a silently wrong second order.
            raise RuntimeError(
                "himo_fast: the compiled dual InfoNCE (backends 'cpu', 'cuda', 'triton') has "
                "no double backward (create_graph=True); use MoLo(backend='reference'), "
                "whose gradients are differentiable to any order")
        *features, scale, nll, logits = ctx.saved_tensors
        ready = lambda g: g.contiguous() if g is not None else torch.zeros_like(nll)
        grads = torch.ops.himo_fast.dual_ce_backward(ready(grad_ce), ready(grad_nll), nll, logits,
                                                     *features, scale, *ctx.options)
        row_grads, col_grads, dscale = grads[:4], grads[4:8], grads[8]
        if ctx.square:
            col_grads = (None,) * 4
        dscale = dscale.to(scale.dtype).reshape(scale.shape)
        return (*row_grads, *col_grads, dscale) + (None,) * len(ctx.options)

    torch.library.register_autograd(f"{_LIB}::dual_ce", backward, setup_context=setup_context)
    return True


REGISTERED = _register()


def dual_ce(img_r, txt_r, cimg_r, comp_r, img_c, txt_c, cimg_c, comp_c, scale,
            label_offset: int = 0, label_smoothing: float = 0.0, strip_rows: int = 0):
    """(ce, nll), each [4, B]: per-row label-smoothed and plain cross entropies of
    s·img_r·txt_cᵀ, s·txt_r·img_cᵀ, s·cimg_r·comp_cᵀ, s·comp_r·cimg_cᵀ; row i's label is
    column i + label_offset. Columns None: square case (columns are the rows)."""
    ce, nll, _ = torch.ops.himo_fast.dual_ce(img_r, txt_r, cimg_r, comp_r, img_c, txt_c, cimg_c,
                                             comp_c, scale, label_offset, label_smoothing,
                                             strip_rows)
    return ce, nll


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
    ce, _ = dual_ce(*rows, *((None,) * 4 if square else cols), s, label_offset,
                    float(label_smoothing), strip_rows)
    ce = ce.view(2, 2, -1).mean(-1).sum(-1) * 0.5  # ½ (mean i→t + mean t→i) per branch
    return ce[0], ce[1]
