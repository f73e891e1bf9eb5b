"""The dual InfoNCE in fused Triton tiles: no logit matrix in memory.

A logit matrix is x = s·P·Qᵀ (P: [p, k] rows, Q: [q, k] columns). The kernels are
flash-attention style, each a loop over column tiles whose products stay in registers:

- ``_lse_rows_kernel``: the forward, nll[i] = logsumexp_j x_ij - ref[i] with an online
  (max, sum) per row. In the square case the same tiles also give each column's (max,
  sum) over the program's rows, merged afterwards: one product for both directions.
- ``_ce_grad_kernel``: the backward, dP = s·W·Q with W = dloss/dx formed per tile from the
  saved statistics of the rows (side p) and/or of the columns (side q): W_ij = gp·softmax -
  c per side, as csrc/tile_math.h's ce_weight. Both P's and Q's gradients come from this
  kernel (Q's as the rows of the transposed product), each recomputing the tiles; the
  register file holds dP in chunks of BLOCK_D columns (grid axis 1), each chunk
  recomputing its tiles, since a whole [BLOCK_M, 768] fp32 accumulator does not fit.
- ``_ce_weight_kernel``: the other backward route, for wide features: the same W tiles
  written once, in the inputs' dtype, to a bounded strip of rows, which two cuBLAS
  products turn into dP and dQ. At d = 768 that is one recompute of the tiles instead of
  six (3 chunks x 2 sides), for 6 bytes of memory traffic per logit (use_strips decides).
  The weights, never the logits, and a bounded strip of them (STRIP_ELEMENTS).
- ``_row_dots_kernel``: the label logits (and the label-smoothing means), O(N·d).

Label logits. Element (i, i + shift) is the label of its row. Its logit is the one the
caller passes (``ref``: s·a_i·b_label, an O(N·d) dot product), in the forward and in
every backward tile alike, so a row's softmax at its label is exp(0 - nll) from the same
numbers everywhere: one pair gets nll = 0 and a weight of exactly gp - c_label = 0, not
the difference of two differently rounded products.

The driver (``dual_ce``, ``dual_ce_backward``) has the contract of csrc/dual_infonce.h's op
(ce and nll [4, B]: global a→b, b→a, component a→b, b→a). Reference twin:
himo_fast.reference.dual_infonce_reference (tests/test_infonce_triton.py).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .common import DOT_PRECISION

# Tiles (launch options included). The forward keeps a [BLOCK_M, BLOCK_N] tile and its
# inputs; the backward also its [BLOCK_M, BLOCK_D] accumulator (64 x 256 fp32: 64
# registers a thread at 8 warps), BLOCK_D up to BLOCK_D_MAX. Not yet tuned on a GPU:
# benchmarks/infonce_tiles.py sweeps them (gpu_check.sh stage tiles_infonce).
FWD_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
BWD_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3)
BLOCK_D_MAX = 256
# The strip backward (strips_backward): W tiles written in the inputs' dtype, STRIP_ELEMENTS
# per strip (64 MiB in bf16), then two cuBLAS products; "auto" picks it by width (use_strips).
WEIGHT_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
STRIP_ELEMENTS = 1 << 25
BACKWARD = "auto"
# The square forward's row blocks per launch (lse_rows_and_cols): two waves of programs on
# an H100's 132 SMs, whose column partials are merged after each launch.
COL_PROGRAMS = 256


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # out_dtype named: Triton 3.6 (the GPU machine's) asserts that a float64 accumulator
    # has it, where 3.8 infers it
    if UPCAST:  # see interpreted_bf16
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION,
                      out_dtype=acc.dtype)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _dots(p_ptr, q_ptr, rm, rn, P, Q, K, acc, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
          UPCAST: tl.constexpr):
    """acc + P[rm] · Q[rn]ᵀ over the whole width K (rows out of range read as zeros)."""
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(p_ptr + rm[:, None] * K + rk[None, :],
                    mask=(rm[:, None] < P) & (rk[None, :] < K), other=0.0)
        b = tl.load(q_ptr + rn[:, None] * K + rk[None, :],
                    mask=(rn[:, None] < Q) & (rk[None, :] < K), other=0.0)
        acc = _dot(a, tl.trans(b), acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _lse_rows_kernel(p_ptr, q_ptr, scale_ptr, ref_ptr, nll_ptr, cmax_ptr, csum_ptr, P, Q, K,
                     shift, r0, r_end, COLS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                     UPCAST: tl.constexpr):
    """Rows [r0, r_end): their nll; with COLS, also each column's (max, sum of exp) over
    this program's rows, at row program_id of cmax / csum (merged by lse_rows_and_cols)."""
    acc_t = nll_ptr.dtype.element_ty
    rm = (r0 + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rm < r_end
    s = tl.load(scale_ptr)
    ref = tl.load(ref_ptr + rm, mask=row_ok, other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), acc_t)
    l_i = tl.zeros((BLOCK_M,), acc_t)
    for n0 in range(0, Q, BLOCK_N):
        rn = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        x = s * _dots(p_ptr, q_ptr, rm, rn, P, Q, K, tl.zeros((BLOCK_M, BLOCK_N), acc_t),
                      BLOCK_K, PRECISION, UPCAST)
        x = tl.where(rn[None, :] == rm[:, None] + shift, ref[:, None], x)
        x = tl.where(rn[None, :] < Q, x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        # exp(-inf - -inf) is NaN: an empty state (or a column of -inf) rescales to 0.
        alpha = tl.where(m_i == float("-inf"), 0.0, tl.exp(m_i - m_new))
        e = tl.where(x == float("-inf"), 0.0, tl.exp(x - m_new[:, None]))
        l_i = l_i * alpha + tl.sum(e, 1)
        m_i = m_new
        if COLS:  # the square case's columns, from the same tile
            xc = tl.where(row_ok[:, None], x, float("-inf"))
            c_max = tl.max(xc, 0)
            c_ref = tl.where(c_max == float("-inf"), 0.0, c_max)  # columns past Q
            c_sum = tl.sum(tl.where(xc == float("-inf"), 0.0, tl.exp(xc - c_ref[None, :])), 0)
            at = tl.program_id(0) * Q + rn
            tl.store(cmax_ptr + at, c_max, mask=rn < Q)
            tl.store(csum_ptr + at, c_sum, mask=rn < Q)
    tl.store(nll_ptr + rm, (m_i - ref) + tl.log(l_i), mask=row_ok)


@triton.jit
def _row_dots_kernel(a_ptr, b_ptr, out_ptr, R, K, b_row0, b_row_step, BLOCK_R: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """out[i] = a_i · b_{b_row0 + i·b_row_step} in out's dtype: the label logits (step 1)
    or the dots with one row (step 0). One summation order for both: a row against itself
    gives the same bits either way."""
    acc_t = out_ptr.dtype.element_ty
    rr = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rb = b_row0 + rr * b_row_step
    acc = tl.zeros((BLOCK_R, BLOCK_K), acc_t)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        ok = (rr[:, None] < R) & (rk[None, :] < K)
        a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=ok, other=0.0)
        b = tl.load(b_ptr + rb[:, None] * K + rk[None, :], mask=ok, other=0.0)
        acc += a.to(acc_t) * b.to(acc_t)
    tl.store(out_ptr + rr, tl.sum(acc, 1), mask=rr < R)


@triton.jit
def _side_weight(x, label, side_ptr, idx, ok, n):
    """gp·softmax - c of one side (its statistics at ``idx``, broadcast by the caller's
    shapes): csrc/tile_math.h's ce_weight."""
    nll = tl.load(side_ptr + 0 * n + idx, mask=ok, other=0.0)
    ref = tl.load(side_ptr + 1 * n + idx, mask=ok, other=0.0)
    gp = tl.load(side_ptr + 2 * n + idx, mask=ok, other=0.0)
    c_off = tl.load(side_ptr + 3 * n + idx, mask=ok, other=0.0)
    c_label = tl.load(side_ptr + 4 * n + idx, mask=ok, other=0.0)
    return gp * tl.exp((x - ref) - nll) - tl.where(label, c_label, c_off)


@triton.jit
def _tile_weight(p_ptr, q_ptr, s, side_p_ptr, side_q_ptr, rm, rn, row_ok, col_ok, P, Q, K,
                 shift, HAS_P: tl.constexpr, HAS_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    """(W, dots) of one tile: W = dloss/dx from the sides present, 0 outside the matrix."""
    dots = _dots(p_ptr, q_ptr, rm, rn, P, Q, K, tl.zeros((BLOCK_M, BLOCK_N), s.dtype),
                 BLOCK_K, PRECISION, UPCAST)
    label = rn[None, :] == rm[:, None] + shift
    # The label logit as the forward took it (module docstring); both sides' refs are the
    # same dot product where both are present.
    if HAS_P:
        ref_p = tl.load(side_p_ptr + 1 * P + rm, mask=row_ok, other=0.0)
        x = tl.where(label, ref_p[:, None], s * dots)
    else:
        ref_q = tl.load(side_q_ptr + 1 * Q + rn, mask=col_ok, other=0.0)
        x = tl.where(label, ref_q[None, :], s * dots)
    w = tl.zeros((BLOCK_M, BLOCK_N), s.dtype)
    if HAS_P:
        w += _side_weight(x, label, side_p_ptr, rm[:, None], row_ok[:, None], P)
    if HAS_Q:
        w += _side_weight(x, label, side_q_ptr, rn[None, :], col_ok[None, :], Q)
    return tl.where(row_ok[:, None] & col_ok[None, :], w, 0.0), dots


@triton.jit
def _ce_grad_kernel(p_ptr, q_ptr, scale_ptr, side_p_ptr, side_q_ptr, dp_ptr, ds_ptr,
                    P, Q, K, shift, d0, HAS_P: tl.constexpr, HAS_Q: tl.constexpr,
                    NEED_DS: tl.constexpr, ADD: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rd = d0 + tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rm < P
    s = tl.load(scale_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_D), s.dtype)
    ds = tl.zeros((BLOCK_M,), s.dtype)
    for n0 in range(0, Q, BLOCK_N):
        rn = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_ok = rn < Q
        w, dots = _tile_weight(p_ptr, q_ptr, s, side_p_ptr, side_q_ptr, rm, rn, row_ok, col_ok,
                               P, Q, K, shift, HAS_P, HAS_Q, BLOCK_M, BLOCK_N, BLOCK_K,
                               PRECISION, UPCAST)
        if NEED_DS:
            ds += tl.sum(w * dots, 1)
        qd = tl.load(q_ptr + rn[:, None] * K + rd[None, :],
                     mask=col_ok[:, None] & (rd[None, :] < K), other=0.0)
        # Like the strip driver (and flash-attention): the weights go back to the inputs'
        # precision for the tensor cores; the accumulation stays in fp32.
        acc = _dot(w.to(qd.dtype), qd, acc, PRECISION, UPCAST)
    out_ok = row_ok[:, None] & (rd[None, :] < K)
    dp = acc * s
    if ADD:  # dP's tile summed with what is there (the other branch's), rounded once
        dp += tl.load(dp_ptr + rm[:, None] * K + rd[None, :], mask=out_ok, other=0.0).to(s.dtype)
    tl.store(dp_ptr + rm[:, None] * K + rd[None, :], dp.to(dp_ptr.dtype.element_ty), mask=out_ok)
    if NEED_DS:
        if tl.program_id(1) == 0:
            tl.store(ds_ptr + rm, ds, mask=row_ok)


@triton.jit
def _ce_weight_kernel(p_ptr, q_ptr, scale_ptr, side_p_ptr, side_q_ptr, w_ptr, dsp_ptr,
                      P, Q, K, shift, r0, r_end, HAS_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                      UPCAST: tl.constexpr):
    """W of rows [r0, r_end) in the inputs' dtype, and per tile Σ_j W·dots (for ds)."""
    rm = (r0 + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok, col_ok = rm < r_end, rn < Q
    s = tl.load(scale_ptr)
    w, dots = _tile_weight(p_ptr, q_ptr, s, side_p_ptr, side_q_ptr, rm, rn, row_ok, col_ok,
                           P, Q, K, shift, True, HAS_Q, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION,
                           UPCAST)
    tl.store(w_ptr + (rm - r0)[:, None] * Q + rn[None, :], w.to(w_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
    tl.store(dsp_ptr + (rm - r0) * tl.num_programs(1) + tl.program_id(1), tl.sum(w * dots, 1),
             mask=row_ok)


# ---------------------------------------------------------------- launches

def dot_precision(t: torch.Tensor) -> str:
    """tl.dot's precision for fp32 features: torch's own matmul setting, as for the strip
    driver's cuBLAS products and ClipLoss's logits (open_clip's training turns TF32 on:
    the logits then carry TF32's 1e-3 relative error, which SPEC 4's fp32 bar assumes off);
    IEEE by default. bf16/fp16 products are exact either way."""
    if t.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return DOT_PRECISION


def interpreted_bf16(t: torch.Tensor) -> bool:
    """Whether to widen bf16 operands to fp32 before tl.dot: Triton's interpreter multiplies
    the raw bit patterns of bf16 tiles (errors of 1e10; fp16 is right; triton-lang/triton
    #11584, "we just don't support it yet"). A product of two bf16 values is exact in
    fp32 and tensor cores accumulate in fp32, so the widened dot is the GPU's arithmetic up
    to summation order. Compiled kernels keep bf16."""
    return t.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def lse_rows(p, q, s, ref, shift):
    """nll[i] = logsumexp_j(s·p_i·q_j, label j = i + shift taken as ref[i]) - ref[i]."""
    P, K = p.shape
    nll = torch.empty(P, device=p.device, dtype=s.dtype)
    _lse_rows_kernel[(triton.cdiv(P, FWD_BLOCKS["BLOCK_M"]),)](
        p, q, s, ref, nll, nll, nll, P, q.shape[0], K, shift, 0, P, COLS=False,
        PRECISION=dot_precision(p), UPCAST=interpreted_bf16(p), **FWD_BLOCKS)
    return nll


def lse_rows_and_cols(a, b, s, ref):
    """(nll of the rows, nll of the columns) of the square s·a·bᵀ (labels on the diagonal,
    ref the label logits, the same for both): one pass over the tiles. Column partials of
    COL_PROGRAMS row blocks at a time ([COL_PROGRAMS, N] (max, sum) pairs, 512 MiB at
    N = 262144), merged across strips as the online log-sum-exp merges."""
    P, K = a.shape
    bm = FWD_BLOCKS["BLOCK_M"]
    step = COL_PROGRAMS * bm
    nll = torch.empty(P, device=a.device, dtype=s.dtype)
    part = torch.empty(2, min(COL_PROGRAMS, triton.cdiv(P, bm)), P, device=a.device, dtype=s.dtype)
    col_max = torch.full((P,), float("-inf"), device=a.device, dtype=s.dtype)
    col_sum = torch.zeros(P, device=a.device, dtype=s.dtype)
    for r0 in range(0, P, step):
        programs = triton.cdiv(min(step, P - r0), bm)
        _lse_rows_kernel[(programs,)](
            a, b, s, ref, nll, part[0], part[1], P, P, K, 0, r0, min(r0 + step, P), COLS=True,
            PRECISION=dot_precision(a), UPCAST=interpreted_bf16(a), **FWD_BLOCKS)
        p_max, p_sum = part[0, :programs], part[1, :programs]
        strip_max = p_max.amax(0)
        strip_sum = (p_sum * torch.exp(p_max - strip_max)).sum(0)
        new = torch.maximum(col_max, strip_max)
        col_sum = col_sum * torch.exp(col_max - new) + strip_sum * torch.exp(strip_max - new)
        col_max = new
    return nll, (col_max - ref) + torch.log(col_sum)


def d_chunks(K: int, block_d_max: int):
    """The launches over dP's columns, [(first column, BLOCK_D, chunks)]: whole chunks of
    block_d_max, then one power-of-two chunk for the rest (768 at 512: 512 + 256). Each
    chunk recomputes the logit tiles, so fewer, wider chunks cost fewer FLOPs while the
    accumulator fits the registers."""
    full, rest = divmod(K, block_d_max)
    plan = [(0, block_d_max, full)] if full else []
    if rest:
        plan.append((full * block_d_max, max(16, triton.next_power_of_2(rest)), 1))
    return plan


def ce_grad(p, q, s, side_p, side_q, shift, need_ds, into=None):
    """(dP = s·W·Q in p's dtype, ds[i] = Σ_j W_ij p_i·q_j or None) of the logits s·p·qᵀ,
    W from the statistics side_p (per row of p) and/or side_q (per row of q), [5, len].
    ``into``: a gradient of p to add dP to, in place (then returned as dP)."""
    P, K = p.shape
    dp = into if into is not None else torch.empty_like(p)
    ds = torch.empty(P if need_ds else 1, device=p.device, dtype=s.dtype)
    for i, (d0, block_d, chunks) in enumerate(d_chunks(K, BLOCK_D_MAX)):
        _ce_grad_kernel[(triton.cdiv(P, BWD_BLOCKS["BLOCK_M"]), chunks)](
            p, q, s, side_p if side_p is not None else s, side_q if side_q is not None else s,
            dp, ds, P, q.shape[0], K, shift, d0, HAS_P=side_p is not None,
            HAS_Q=side_q is not None, NEED_DS=need_ds and i == 0, ADD=into is not None,
            BLOCK_D=block_d,
            PRECISION=dot_precision(p), UPCAST=interpreted_bf16(p), **BWD_BLOCKS)
    return dp, (ds if need_ds else None)


def _mm_acc(a, b):
    """a @ b with fp32 accumulation and output (bf16/fp16 tensor cores on CUDA; elsewhere
    the widened product, the same arithmetic: ATen has mm's out_dtype on CUDA only)."""
    if a.dtype in (torch.float16, torch.bfloat16):
        if a.is_cuda:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a.float(), b.float())
    return torch.mm(a, b)


def _addmm_acc_(acc, a, b):
    """acc += a @ b in place, as _mm_acc computes a @ b: no product-sized temporary (at
    N = 262144, d = 768 a new fp32 [N, d] tensor each strip: 768 MiB and its traffic)."""
    if a.dtype in (torch.float16, torch.bfloat16):
        if a.is_cuda:
            return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return acc.addmm_(a.float(), b.float())
    return acc.addmm_(a, b)


def strips_backward(p, q, s, side_p, side_q, shift, p_into=None, q_into=None):
    """(dP, dQ, ds) of the logits s·p·qᵀ, with W written in bounded strips of rows (the
    inputs' dtype, STRIP_ELEMENTS at most) and both products by cuBLAS: one recompute of
    the tiles instead of one per dP chunk and side (ce_grad), for 6 bytes of traffic per
    logit. side_p: the rows' statistics (always), side_q: the columns' (square case) or None.
    ``p_into``/``q_into``: gradients of p/q to add dP/dQ to, in place (then returned)."""
    P, K = p.shape
    Q = q.shape[0]
    b = WEIGHT_BLOCKS
    step = max(b["BLOCK_M"], STRIP_ELEMENTS // max(Q, 1) // b["BLOCK_M"] * b["BLOCK_M"])
    tiles = triton.cdiv(Q, b["BLOCK_N"])
    w = torch.empty(min(step, P), Q, device=p.device, dtype=p.dtype)
    dsp = torch.empty(min(step, P), tiles, device=p.device, dtype=s.dtype)
    dp = p_into if p_into is not None else torch.empty_like(p)
    dq = torch.zeros(Q, K, device=p.device, dtype=s.dtype)
    ds = torch.zeros((), device=p.device, dtype=s.dtype)
    for r0 in range(0, P, step):
        rows = min(step, P - r0)
        _ce_weight_kernel[(triton.cdiv(rows, b["BLOCK_M"]), tiles)](
            p, q, s, side_p, side_q if side_q is not None else s, w, dsp, P, Q, K, shift, r0,
            r0 + rows, HAS_Q=side_q is not None, PRECISION=dot_precision(p),
            UPCAST=interpreted_bf16(p), **b)
        if p_into is not None:  # summed in the accumulation dtype, rounded once
            dp[r0:r0 + rows] += _mm_acc(w[:rows], q) * s
        else:
            dp[r0:r0 + rows] = _mm_acc(w[:rows], q) * s
        _addmm_acc_(dq, w[:rows].T, p[r0:r0 + rows])
        ds += dsp[:rows].sum()
    dq.mul_(s)
    if q_into is not None:
        return dp, q_into.add_(dq), ds
    return dp, dq.to(q.dtype), ds


def use_strips(K: int) -> bool:
    """The backward's route for width K (BACKWARD: "auto", "recompute" or "strips"): auto
    takes the strips where ce_grad would need more than one dP chunk (each recomputing
    every tile), i.e. at the global branch's d = 768, and recomputes at narrow widths."""
    if BACKWARD == "auto":
        return sum(n for _, _, n in d_chunks(K, BLOCK_D_MAX)) > 1
    return BACKWARD == "strips"


# ---------------------------------------------------------------- the op's driver

def _check(global_branch, comp_branch, scale, label_offset, label_smoothing):
    """Refuses bad input before any work; returns _comp_in_full's (component branch in
    full, whether it shares the global a side)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1:
        raise ValueError(f"scale must be a one-element tensor, got {scale!r}")
    if scale.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"scale (the accumulation dtype) must be float32 or float64, got {scale.dtype}")
    if len(global_branch) not in (2, 4):
        raise ValueError(f"global_branch must be [a_r, b_r] (square) or [a_r, b_r, a_c, b_c], "
                         f"got {len(global_branch)} tensors")
    if len(comp_branch) not in (len(global_branch), len(global_branch) // 2):
        forms = ("[a_r, b_r] or [b_r] (the global branch is square)" if len(global_branch) == 2
                 else "[a_r, b_r, a_c, b_c] or [b_r, b_c] (the global branch has columns)")
        raise ValueError(f"comp_branch must be {forms}, got {len(comp_branch)} tensors")
    comp_branch, shares_a = _comp_in_full(global_branch, comp_branch)
    a = global_branch[0]
    allowed = (torch.float64,) if scale.dtype == torch.float64 else (
        torch.float32, torch.bfloat16, torch.float16)
    for name, branch in (("global_branch", global_branch), ("comp_branch", comp_branch)):
        for t in branch:
            if t.dim() != 2 or t.shape[1] != branch[0].shape[1]:
                raise ValueError(f"{name}: tensors must be 2-D of one width, got "
                                 f"{[tuple(x.shape) for x in branch]}")
            if t.dtype != a.dtype or t.dtype not in allowed:
                raise TypeError(f"{name}: features must be one of {allowed} with a "
                                f"{scale.dtype} scale, got {t.dtype}")
            if t.device != scale.device:
                raise ValueError(f"{name}: features on {t.device} but the scale on {scale.device}")
    B = a.shape[0]
    N = B if len(global_branch) == 2 else global_branch[2].shape[0]
    for branch in (global_branch, comp_branch):
        if branch[0].shape[0] != B or branch[1].shape[0] != B or any(
                t.shape[0] != N for t in branch[2:]):
            raise ValueError(f"row tensors must have {B} rows and column tensors {N}")
    if B < 1:
        raise ValueError("empty batch")
    if N < B:
        raise ValueError(f"{N} columns < {B} rows: each row's label is one of the columns")
    if not 0 <= label_offset <= N - B:
        raise ValueError(f"label_offset must be in [0, {N - B}] for {B} rows and {N} "
                         f"columns, got {label_offset}")
    return comp_branch, shares_a


def _comp_in_full(global_branch, comp_branch):
    """(the component branch as [a_r, b_r(, a_c, b_c)], whether its a side is the global
    branch's): given by its b side alone ([b_r] or [b_r, b_c], half the global branch's
    tensors), it shares the global a_r (and a_c), and its gradient goes into theirs."""
    if 2 * len(comp_branch) != len(global_branch):
        return list(comp_branch), False
    a_sides = list(global_branch[0::2])  # a_r (, a_c)
    return [t for pair in zip(a_sides, comp_branch) for t in pair], True


def _columns(branch):
    """[a_r, b_r, a_c, b_c], contiguous; square: the columns are the rows."""
    t = [x.contiguous() for x in branch]
    return t if len(t) == 4 else t + t


def row_dots(a, b, b_row0, b_row_step, acc):
    """a_i · b_{b_row0 + i·b_row_step} for every row i of a (b_row_step 0: b is one row)."""
    R, K = a.shape
    out = torch.empty(R, device=a.device, dtype=acc)
    _row_dots_kernel[(triton.cdiv(R, 64),)](a, b, out, R, K, b_row0, b_row_step, BLOCK_R=64,
                                            BLOCK_K=128)
    return out


def _label_dots(a, b, offset, eps, acc):
    """a_i·b_{i+offset}, and (with label smoothing) a_i·mean(b), in acc, without widened
    copies of a and b (1.5 GiB in fp32 at N = 262144, d = 768). With one column the two
    are equal to the bit (mean(b) = b), so a single pair's smoothing term is exactly 0."""
    label = row_dots(a, b, offset, 1, acc)
    mean = row_dots(a, b.mean(0, dtype=acc), 0, 0, acc) if eps != 0.0 else None
    return label, mean


def _smoothed(nll, label, mean, s, eps):
    """The label-smoothed cross entropy from the plain one (clamped: see dual_infonce.cpp)."""
    return (nll if eps == 0.0 else nll + (label - mean) * s * eps).clamp_min(0.0)


def _branch_forward(t, s, offset, eps):
    a_r, b_r, a_c, b_c = _columns(t)
    dots = [_label_dots(rows, cols, offset, eps, s.dtype) for rows, cols in ((a_r, b_c), (b_r, a_c))]
    if len(t) == 2:
        # One matrix: its columns are direction ba's rows. Its label logits are the same
        # dot products (a_i·b_i = b_i·a_i, summed in the same order).
        nlls = lse_rows_and_cols(a_r, b_r, s, (dots[0][0] * s).contiguous())
    else:
        nlls = [lse_rows(rows, cols, s, (label * s).contiguous(), offset)
                for (rows, cols), (label, _) in zip(((a_r, b_c), (b_r, a_c)), dots)]
    return [(_smoothed(nll, label, mean, s, eps), nll) for nll, (label, mean) in zip(nlls, dots)]


def dual_ce(global_branch, comp_branch, scale, label_offset=0, label_smoothing=0.0):
    """(ce, nll), each [4, B] in the scale's dtype: csrc/dual_infonce.h's dual_ce."""
    comp_branch, _ = _check(global_branch, comp_branch, scale, label_offset, label_smoothing)
    s = scale.reshape(1).contiguous()
    parts = [d for t in (global_branch, comp_branch)
             for d in _branch_forward(list(t), s, label_offset, label_smoothing)]
    return torch.stack([ce for ce, _ in parts]), torch.stack([nll for _, nll in parts])


def _side(rows, cols, s, offset, eps, nll, g_ce, g_nll):
    """[5, B] statistics of one direction (rows against cols): nll, ref (the label logit),
    gp = g_ce + g_nll, c_off = g_ce·ε/N, c_label = g_ce·(ε/N + 1 - ε) + g_nll."""
    y_off = eps / cols.shape[0]
    y_on = y_off + (1.0 - eps)
    ref = _label_dots(rows, cols, offset, 0.0, s.dtype)[0] * s
    return torch.stack([nll, ref, g_ce + g_nll, g_ce * y_off, g_ce * y_on + g_nll]).contiguous()


def _branch_backward(t, s, offset, eps, nll, g_ce, g_nll, into=None):
    """Gradients of the branch's tensors (its order) and its part of the scale's. ``into``:
    the global branch's gradients when this branch shares its a side: a's gradient is
    added to theirs, in place, and only b's are returned."""
    square = len(t) == 2
    a_r, b_r, a_c, b_c = _columns(t)
    into_r = into[0] if into is not None else None  # the gradients of a_r and (columns) a_c
    into_c = into[2] if into is not None and not square else None
    ab = _side(a_r, b_c, s, offset, eps, nll[0], g_ce[0], g_nll[0])
    ba = _side(b_r, a_c, s, offset, eps, nll[1], g_ce[1], g_nll[1])
    if use_strips(a_r.shape[1]):
        if square:
            d_a, d_b, ds = strips_backward(a_r, b_r, s, ab, ba, 0, p_into=into_r)
            grads = [d_a, d_b]
        else:
            d_a_r, d_b_c, ds_ab = strips_backward(a_r, b_c, s, ab, None, offset, p_into=into_r)
            d_b_r, d_a_c, ds_ba = strips_backward(b_r, a_c, s, ba, None, offset, q_into=into_c)
            grads, ds = [d_a_r, d_b_r, d_a_c, d_b_c], ds_ab + ds_ba
    elif square:
        # One matrix s·a·bᵀ: its rows are direction ab, its columns direction ba.
        d_a, ds = ce_grad(a_r, b_r, s, ab, ba, 0, True, into=into_r)
        d_b, _ = ce_grad(b_r, a_r, s, ba, ab, 0, False)
        grads, ds = [d_a, d_b], ds.sum()
    else:
        d_a_r, ds_ab = ce_grad(a_r, b_c, s, ab, None, offset, True, into=into_r)
        d_b_c, _ = ce_grad(b_c, a_r, s, None, ab, -offset, False)
        d_b_r, ds_ba = ce_grad(b_r, a_c, s, ba, None, offset, True)
        d_a_c, _ = ce_grad(a_c, b_r, s, None, ba, -offset, False, into=into_c)
        grads, ds = [d_a_r, d_b_r, d_a_c, d_b_c], ds_ab.sum() + ds_ba.sum()
    return (grads[1::2] if into is not None else grads), ds


def dual_ce_backward(grad_ce, grad_nll, nll, global_branch, comp_branch, scale,
                     label_offset=0, label_smoothing=0.0):
    """Gradients of each branch's tensors (same order) and of the scale (0-d); a comp
    branch given by its b side gets b's, its a's summed into the global branch's."""
    comp_branch, shares_a = _check(global_branch, comp_branch, scale, label_offset,
                                   label_smoothing)
    s = scale.reshape(1).contiguous()
    ready = lambda g: g.to(s.dtype).contiguous()
    g_ce, g_nll, nll = ready(grad_ce), ready(grad_nll), ready(nll)
    d_global, ds_g = _branch_backward(list(global_branch), s, label_offset, label_smoothing,
                                      nll[0:2], g_ce[0:2], g_nll[0:2])
    # The component branch last: where it shares a, it adds into d_global's gradients of a.
    d_comp, ds_c = _branch_backward(comp_branch, s, label_offset, label_smoothing, nll[2:4],
                                    g_ce[2:4], g_nll[2:4], d_global if shares_a else None)
    return d_global, d_comp, ds_g + ds_c
