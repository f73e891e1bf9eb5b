"""Triton kernels of himo_fast, one module per pipeline stage (installed as
himo_fast.kernels). A leaf: they import torch and triton, never himo_fast;
himo_fast.backends and himo_fast.ops compose them.

- ``centre``: batch centring (mean + X̂) and the centred Gram / covariance matrix;
- ``eigh``: eigensolvers whose launches a CUDA graph can capture: for matrices up to
  1024² (tridiagonal reduction, bisection, inverse iteration; a device-side flag can skip
  all its launches), and parallel Jacobi;
- ``reconstruct``: the factor products of the reconstruction and of the component
  similarity (u' = Z Bᵀ + ū, [vB, vū]), with their backward;
- ``subspace``: the fused elementwise steps of HiDe's subspace iteration (its Chebyshev
  filter, its backward's deflated CG; himo_fast/subspace_iteration.py);
- ``infonce``: the fused dual InfoNCE (the op himo_fast::fused_dual_ce), forward and
  backward, imported by its op when it first runs.

They run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests
them).
"""
from .centre import centre, gram_or_cov
from .eigh import jacobi_eigh, tridiagonal_eigh
from .reconstruct import matmul_bias, product
from .subspace import cg_direction, cg_update, filter_start, filter_step

__all__ = ["centre", "cg_direction", "cg_update", "filter_start", "filter_step", "gram_or_cov",
           "jacobi_eigh", "matmul_bias", "product", "tridiagonal_eigh"]
