"""Shared helpers of the Triton HiDe kernels: dtypes, precision, argument checks."""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for fp32/bf16/fp16 inputs, float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# tl.dot precision: IEEE products, never TF32. The explained-variance cutoff and the
# eigen-gaps of the gradient read the small end of the spectrum, which TF32's 10-bit
# mantissa blurs.
DOT_PRECISION = "ieee"


def check_matrix(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")
