"""The two elementwise halves of a deflated conjugate-gradient iteration, fused: the
backward of HiDe's partial basis (himo_fast/subspace_iteration.py: deflated_resolvent)
runs a fixed number of them on k x c blocks (k <= 1024 rows, c = 128 columns, one shifted
system per column). Between them the products stay on cuBLAS; each half here is one
launch instead of ≈ 8 torch ops (a column's dot product and its update in one program).

    cg_update(p, ap, shift, y, res, rs):    mp = ap + shift·p,  α = rs / pᵀmp,
                                            y += α p,  res −= α mp
    cg_direction(res, z_res, corr, p, rs):  res −= z_res,  rs' = resᵀres,
                                            p = res − corr + (rs'/rs) p,  rs = rs'

All float64, row-major k x c, in place; a program per COLS columns loops over the rows
twice (the reduction, then the update). A zero column (masked) stays exactly zero.
"""
import torch
import triton
import triton.language as tl

COLS = 16  # columns per program (16 float64: 128-byte rows)
ROWS = 128  # rows per tile
TINY = tl.constexpr(2.2250738585072014e-308)


@triton.jit(do_not_specialize=["k", "c"])
def _cg_update_kernel(p_ptr, ap_ptr, shift_ptr, y_ptr, res_ptr, rs_ptr, k, c,
                      COLS: tl.constexpr, ROWS: tl.constexpr):
    cols = tl.program_id(0) * COLS + tl.arange(0, COLS)
    col_in = cols < c
    shift = tl.load(shift_ptr + cols, mask=col_in, other=0.0)
    pm = tl.zeros([COLS], dtype=tl.float64)
    for r0 in range(0, k, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        at = rows[:, None] * c + cols[None, :]
        inside = (rows < k)[:, None] & col_in[None, :]
        p = tl.load(p_ptr + at, mask=inside, other=0.0)
        ap = tl.load(ap_ptr + at, mask=inside, other=0.0)
        pm += tl.sum(p * (ap + shift[None, :] * p), 0)
    alpha = tl.load(rs_ptr + cols, mask=col_in, other=0.0) / tl.maximum(pm, TINY)
    for r0 in range(0, k, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        at = rows[:, None] * c + cols[None, :]
        inside = (rows < k)[:, None] & col_in[None, :]
        p = tl.load(p_ptr + at, mask=inside, other=0.0)
        ap = tl.load(ap_ptr + at, mask=inside, other=0.0)
        y = tl.load(y_ptr + at, mask=inside, other=0.0)
        res = tl.load(res_ptr + at, mask=inside, other=0.0)
        tl.store(y_ptr + at, y + alpha[None, :] * p, mask=inside)
        tl.store(res_ptr + at, res - alpha[None, :] * (ap + shift[None, :] * p), mask=inside)


@triton.jit(do_not_specialize=["k", "c"])
def _cg_direction_kernel(res_ptr, zres_ptr, corr_ptr, p_ptr, rs_ptr, k, c,
                         COLS: tl.constexpr, ROWS: tl.constexpr):
    cols = tl.program_id(0) * COLS + tl.arange(0, COLS)
    col_in = cols < c
    rs_new = tl.zeros([COLS], dtype=tl.float64)
    for r0 in range(0, k, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        at = rows[:, None] * c + cols[None, :]
        inside = (rows < k)[:, None] & col_in[None, :]
        res = tl.load(res_ptr + at, mask=inside, other=0.0) \
            - tl.load(zres_ptr + at, mask=inside, other=0.0)
        tl.store(res_ptr + at, res, mask=inside)
        rs_new += tl.sum(res * res, 0)
    rs = tl.load(rs_ptr + cols, mask=col_in, other=0.0)
    beta = rs_new / tl.maximum(rs, TINY)
    tl.debug_barrier()  # this program's res stores before its loads below
    for r0 in range(0, k, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        at = rows[:, None] * c + cols[None, :]
        inside = (rows < k)[:, None] & col_in[None, :]
        res = tl.load(res_ptr + at, mask=inside, other=0.0)
        corr = tl.load(corr_ptr + at, mask=inside, other=0.0)
        p = tl.load(p_ptr + at, mask=inside, other=0.0)
        tl.store(p_ptr + at, res - corr + beta[None, :] * p, mask=inside)
    tl.store(rs_ptr + cols, rs_new, mask=col_in)


def _check(name, t, k, c):
    if t.dtype != torch.float64 or not t.is_contiguous() or tuple(t.shape) != (k, c):
        raise ValueError(f"{name} must be a contiguous float64 {k} x {c} matrix, got "
                         f"{t.dtype} {tuple(t.shape)}")


def cg_update(p, ap, shift, y, res, rs):
    """In place: y += α p, res −= α (ap + shift·p), α = rs / pᵀ(ap + shift·p) per column."""
    k, c = p.shape
    for name, t in (("p", p), ("ap", ap), ("y", y), ("res", res)):
        _check(name, t, k, c)
    _cg_update_kernel[(triton.cdiv(c, COLS),)](p, ap, shift.contiguous(), y, res, rs, k, c,
                                               COLS=COLS, ROWS=ROWS, num_warps=4)


def cg_direction(res, z_res, corr, p, rs):
    """In place: res −= z_res, then p = res − corr + (resᵀres / rs) p, rs = resᵀres."""
    k, c = p.shape
    for name, t in (("res", res), ("z_res", z_res), ("corr", corr), ("p", p)):
        _check(name, t, k, c)
    _cg_direction_kernel[(triton.cdiv(c, COLS),)](res, z_res, corr, p, rs, k, c,
                                                  COLS=COLS, ROWS=ROWS, num_warps=4)
