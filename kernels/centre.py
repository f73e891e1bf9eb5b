"""HiDe stage 1: batch centring and the small symmetric matrix of the centred batch.

``centre(u)`` -> (ū, X̂ = u - ū) in one kernel: each program owns a block of feature
columns, sums them over the batch in the accumulation dtype, then writes its block of X̂.
``gram_or_cov(x)`` -> X̂X̂ᵀ (N <= d) or X̂ᵀX̂ (d < N), whichever is smaller: one symmetric
rank-k kernel, each program one lower-triangle tile (written twice, so the result is
exactly symmetric), IEEE fp32 products (no TF32: the cutoff reads small eigenvalues).

Reference twins: ``u.mean(0)``, ``x @ x.T`` / ``x.T @ x`` (tests/test_kernels.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import DOT_PRECISION, acc_dtype, check_matrix


@triton.jit
def _centre_kernel(u_ptr, mean_ptr, x_ptr, N, D, stride_un, stride_ud,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    total = tl.zeros((BLOCK_D,), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        ok = (rows[:, None] < N) & col_ok[None, :]
        tile = tl.load(u_ptr + rows[:, None] * stride_un + cols[None, :] * stride_ud, mask=ok,
                       other=0.0)
        total += tl.sum(tile.to(ACC), axis=0)
    mean = total / N
    tl.store(mean_ptr + cols, mean, mask=col_ok)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        ok = (rows[:, None] < N) & col_ok[None, :]
        tile = tl.load(u_ptr + rows[:, None] * stride_un + cols[None, :] * stride_ud, mask=ok,
                       other=0.0)
        tl.store(x_ptr + rows[:, None] * D + cols[None, :], tile.to(ACC) - mean[None, :], mask=ok)


@triton.jit
def _syrk_kernel(m_ptr, out_ptr, R, K, stride_r, stride_k,
                 BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """out = Mᵀ M (K x K) for M (R x K) given by strides; one lower-triangle tile each."""
    pid = tl.program_id(0)
    # Tile (i, j), j <= i, from the linear index pid = i(i+1)/2 + j.
    i = ((tl.sqrt(8.0 * pid + 1.0) - 1.0) / 2.0).to(tl.int32)
    i = tl.where((i + 1) * (i + 2) // 2 <= pid, i + 1, i)  # guard the float rounding
    i = tl.where(i * (i + 1) // 2 > pid, i - 1, i)
    j = pid - i * (i + 1) // 2
    ci = i * BLOCK + tl.arange(0, BLOCK)
    cj = j * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=out_ptr.dtype.element_ty)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        a = tl.load(m_ptr + rows[:, None] * stride_r + ci[None, :] * stride_k,
                    mask=(rows[:, None] < R) & (ci[None, :] < K), other=0.0)
        b = tl.load(m_ptr + rows[:, None] * stride_r + cj[None, :] * stride_k,
                    mask=(rows[:, None] < R) & (cj[None, :] < K), other=0.0)
        acc += tl.dot(tl.trans(a), b, input_precision=PRECISION)
    if i == j:  # a diagonal tile's products are not bitwise symmetric: make them so
        acc = (acc + tl.trans(acc)) * 0.5
    ok = (ci[:, None] < K) & (cj[None, :] < K)
    tl.store(out_ptr + ci[:, None] * K + cj[None, :], acc, mask=ok)
    tl.store(out_ptr + cj[None, :] * K + ci[:, None], acc, mask=ok)


def centre(u: torch.Tensor):
    """(ū as 1 x d, X̂ = u - ū), both in the accumulation dtype."""
    check_matrix("text_features", u)
    n, d = u.shape
    acc = acc_dtype(u.dtype)
    mean = torch.empty(1, d, device=u.device, dtype=acc)
    x = torch.empty(n, d, device=u.device, dtype=acc)
    block_d = 64
    _centre_kernel[(triton.cdiv(d, block_d),)](
        u, mean, x, n, d, u.stride(0), u.stride(1), BLOCK_N=32, BLOCK_D=block_d,
        ACC=tl.float64 if acc == torch.float64 else tl.float32)
    return mean, x


def gram_or_cov(x: torch.Tensor, gram: bool) -> torch.Tensor:
    """X̂X̂ᵀ (gram) or X̂ᵀX̂, exactly symmetric, in x's dtype (fp32 or fp64)."""
    check_matrix("x", x)
    n, d = x.shape
    # Mᵀ M with M = Xᵀ (gram: R = d rows, K = N columns) or M = X (cov).
    r, k, stride_r, stride_k = (d, n, x.stride(1), x.stride(0)) if gram else (n, d, x.stride(0), x.stride(1))
    out = torch.empty(k, k, device=x.device, dtype=x.dtype)
    block = 32
    tiles = triton.cdiv(k, block)
    _syrk_kernel[(tiles * (tiles + 1) // 2,)](
        x, out, r, k, stride_r, stride_k, BLOCK=block, BLOCK_R=32,
        PRECISION=DOT_PRECISION)
    return out
