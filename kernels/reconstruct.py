"""HiDe stage 3: the reconstruction and the component similarity as factor products.

With the cutoff as a mask over a fixed-size basis (no host sync; himo_fast.pca.split
multiplies the mask into the basis once), every product of the stage is ``A @ B (+ bias)``,
the bias row adding the mean back:

    cov space:   Z = X̂ V_keep                B = V_keep
    gram space:  Z = U_keep                   B = X̂ᵀ U_keep
    u' = Z Bᵀ + ū                             (only where a consumer needs u')
    component image = v [B, ūᵀ]               (s·v·u'ᵀ = s·[vB, vū]·[Z, 1]ᵀ: width m+1)

Reference twin: ``a @ b + bias`` (tests/test_kernels.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import DOT_PRECISION, acc_dtype, check_matrix


@triton.jit
def _matmul_bias_kernel(a_ptr, b_ptr, bias_ptr, out_ptr, M, N, K,
                        stride_am, stride_ak, stride_bk, stride_bn, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        PRECISION: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc += tl.dot(a.to(acc.dtype), b.to(acc.dtype), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(acc.dtype)[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc,
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def matmul_bias(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b + bias[None, :] in the accumulation dtype of a; a and b may be transposed
    views (strides are honoured, nothing is copied)."""
    check_matrix("a", a)
    check_matrix("b", b)
    (m, k), (k2, n) = a.shape, b.shape
    if k != k2:
        raise ValueError(f"a is {m}x{k} but b is {k2}x{n}: inner dimensions differ")
    if bias is not None and bias.numel() != n:
        raise ValueError(f"bias must have {n} elements (columns of b), got {bias.numel()}")
    acc = acc_dtype(a.dtype)
    out = torch.empty(m, n, device=a.device, dtype=acc)
    if m == 0 or n == 0:
        return out
    bias_c = bias.reshape(-1).contiguous() if bias is not None else out
    block_m, block_n, block_k = 32, 32, 32
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _matmul_bias_kernel[grid](
        a, b, bias_c, out, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION=DOT_PRECISION)
    return out


class _Product(torch.autograd.Function):
    """a @ b + bias with its backward on the same kernel (transposed views, no copies)."""

    @staticmethod
    def forward(ctx, a, b, bias):
        ctx.save_for_backward(a, b)
        ctx.bias_shape = None if bias is None else bias.shape
        return matmul_bias(a, b, bias=bias)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = matmul_bias(grad, b.T) if ctx.needs_input_grad[0] else None
        grad_b = matmul_bias(a.T, grad) if ctx.needs_input_grad[1] else None
        grad_bias = None
        if ctx.bias_shape is not None and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0).reshape(ctx.bias_shape)
        return grad_a, grad_b, grad_bias


def product(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable a @ b + bias (bias: one row, broadcast over a's rows)."""
    return _Product.apply(a, b, bias)
