"""The dual InfoNCE stage on a compiled op: the two branches' losses, from the strip driver
(``ops.dual_ce``, C++/CUDA) or the fused Triton tiles (``ops.fused_dual_ce``).

A branch is a pair (image side, text side): global (v, u) and component (cimg, comp),
the latter of its own width in HiDe's factored form. ``rows`` are this rank's pairs,
``cols`` the gathered ones (None: square, the columns are the rows). Which dtype the
kernels get and whether the forward keeps its logits are the backend's choices
(backends.py), passed in.
"""
from __future__ import annotations

import torch

from .ops import dual_ce, fused_dual_ce
from .pca import compute_dtype


def dual_infonce(rows, cols, scale, label_offset: int = 0, label_smoothing: float = 0.0, *,
                 kernel_dtype: torch.dtype | None = None, keep_logits: bool = False,
                 strip_rows: int = 0, fused: bool = False):
    """(global, comp) losses, same contract as ``reference.dual_infonce_reference``.
    ``kernel_dtype``: the features' dtype in the kernels (default: the accumulation dtype);
    ``fused``: the Triton op (keep_logits and strip_rows are the strip driver's)."""
    acc = compute_dtype(rows[0][0].dtype)
    kernel_dtype = kernel_dtype or acc
    ready = lambda pair: [t.to(kernel_dtype).contiguous() for t in pair]
    branches = [ready(r) + ([] if cols is None else ready(c))
                for r, c in zip(rows, cols if cols is not None else rows)]
    s = scale.reshape(()).to(acc)
    if fused:
        ce, _ = fused_dual_ce(*branches, s, label_offset, float(label_smoothing))
    else:
        ce, _ = dual_ce(*branches, s, label_offset, float(label_smoothing), keep_logits,
                        strip_rows)
    ce = ce.view(2, 2, -1).mean(-1).sum(-1) * 0.5  # ½ (mean i→t + mean t→i) per branch
    return ce[0], ce[1]
