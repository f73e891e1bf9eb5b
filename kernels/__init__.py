"""Triton kernels of HiDe, one module per pipeline stage (installed as himo_fast.kernels):

- ``centre``: batch centring (mean + X̂) and the centred Gram / covariance matrix;
- ``reconstruct``: the masked factor products of the reconstruction and of the component
  similarity (u' = Z Bᵀ + ū, [vB, vū]) without materialising u' where it is not needed.

They run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests
them). ``himo_fast.backends`` wires them in as the ``triton`` backend.
"""
from himo_fast.pca import device_eigh
from himo_fast.reconstruct import HiDeOps

from .centre import centre, gram_or_cov
from .reconstruct import masked_matmul, product

# HiDe's primitives on these kernels (himo_fast.reconstruct runs the stage with them), and
# the eigendecomposition without a host sync (cuSOLVER through himo_fast._C where built).
OPS = HiDeOps(centre, gram_or_cov, product, device_eigh)

__all__ = ["OPS", "centre", "gram_or_cov", "masked_matmul", "product"]
