"""Triton kernels of HiDe, one module per pipeline stage (installed as himo_fast.kernels):

- ``centre``: batch centring (mean + X̂) and the centred Gram / covariance matrix;
- ``eigh``: its eigendecomposition: cuSOLVER's syevd without a host sync, or, while a CUDA
  graph is being captured, a Jacobi solver whose launches can be captured;
- ``reconstruct``: the masked factor products of the reconstruction and of the component
  similarity (u' = Z Bᵀ + ū, [vB, vū]) without materialising u' where it is not needed.

They run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests
them). ``himo_fast.backends`` wires them in as the ``triton`` backend.
"""
from himo_fast.reconstruct import HiDeOps

from .centre import centre, gram_or_cov
from .eigh import eigh, jacobi_eigh
from .reconstruct import masked_matmul, product

# HiDe's primitives on these kernels (himo_fast.reconstruct runs the stage with them).
OPS = HiDeOps(centre, gram_or_cov, product, eigh)

__all__ = ["OPS", "centre", "eigh", "gram_or_cov", "jacobi_eigh", "masked_matmul", "product"]
