"""The dual InfoNCE stage on a compiled op: the two branches' losses, from the strip driver
(``ops.dual_ce``, C++/CUDA) or the fused Triton tiles (``ops.fused_dual_ce``).

A branch is a pair (image side, text side): global (v, u) and component (cimg, comp),
the latter of its own width in HiDe's factored form. ``rows`` are this rank's pairs,
``cols`` the gathered ones (None: square, the columns are the rows). Which dtype the
kernels get and whether the forward keeps its logits are the backend's choices
(backends.py), passed in.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .ops import dual_ce, fused_dual_ce
from .pca import compute_dtype


class FusedDualCE(NamedTuple):
    """The fused op (ops.fused_dual_ce) as a graphs.Stage: (*global branch, *component
    branch, scale) -> (ce, nll)."""

    n_global: int  # tensors in the global branch: 2 (square) or 4 (rows and columns)
    label_offset: int
    label_smoothing: float

    def _split(self, inputs):
        n = self.n_global
        return list(inputs[:n]), list(inputs[n:-1]), inputs[-1]

    def forward(self, inputs):
        from .kernels import infonce  # triton is imported only when this runs
        ce, nll = infonce.dual_ce(*self._split(inputs), self.label_offset, self.label_smoothing)
        return (ce, nll), (nll,), None

    def backward(self, inputs, saved, constants, grads):
        from .kernels import infonce
        global_branch, comp_branch, scale = self._split(inputs)
        d_global, d_comp, d_scale = infonce.dual_ce_backward(
            *grads, saved[0], global_branch, comp_branch, scale, self.label_offset,
            self.label_smoothing)
        return (*d_global, *d_comp, d_scale.reshape(scale.shape))

    def eager(self, *inputs):
        return fused_dual_ce(*self._split(inputs), self.label_offset, self.label_smoothing)

    def graphable(self, inputs) -> bool:
        return True  # the same kernels in a graph as eagerly


def dual_infonce(rows, cols, scale, label_offset: int = 0, label_smoothing: float = 0.0, *,
                 kernel_dtype: torch.dtype | None = None, keep_logits: bool = False,
                 strip_rows: int = 0, route: str = "strips", col_grad: str = "auto",
                 fused: bool = False, graphs=None):
    """(global, comp) losses, same contract as ``reference.dual_infonce_reference``.
    ``kernel_dtype``: the features' dtype in the kernels (default: the accumulation dtype);
    ``route`` and ``col_grad``: the compiled op's (ops.dual_ce); ``fused``: the Triton op
    instead (keep_logits, strip_rows, route and col_grad are the compiled op's), replayed
    from ``graphs`` (a graphs.GraphCache) where given."""
    acc = compute_dtype(rows[0][0].dtype)
    kernel_dtype = kernel_dtype or acc
    ready = lambda ts: [t.to(kernel_dtype).contiguous() for t in ts]
    # Each branch as [a_r, b_r] or [a_r, b_r, a_c, b_c].
    glob, comp = (tuple(rows[i]) + (() if cols is None else tuple(cols[i])) for i in (0, 1))
    if all(c is g for c, g in zip(comp[0::2], glob[0::2])):
        # The image is both branches' a (HiDe's materialized u'): the component branch by
        # its b side, so the op adds the image's two gradients in place (one N x d
        # gradient less alive at the backward than two for autograd to sum).
        comp = comp[1::2]
    branches = [ready(glob), ready(comp)]
    s = scale.reshape(()).to(acc)
    if fused:
        stage = FusedDualCE(len(branches[0]), label_offset, float(label_smoothing))
        inputs = (*branches[0], *branches[1], s)
        ce, _ = graphs(stage, *inputs) if graphs is not None else stage.eager(*inputs)
    else:
        ce, _ = dual_ce(*branches, s, label_offset, float(label_smoothing), keep_logits,
                        strip_rows, route, col_grad)
    ce = ce.view(2, 2, -1).mean(-1).sum(-1) * 0.5  # ½ (mean i→t + mean t→i) per branch
    return ce[0], ce[1]
