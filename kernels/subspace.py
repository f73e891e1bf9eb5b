"""The elementwise steps of HiDe's subspace iteration (himo_fast/subspace_iteration.py),
fused: between its products (which stay on cuBLAS), each step is one launch instead of
5-17 torch ops. k x c float64 blocks (k <= 1024 rows, c = 128 columns), row-major, in place.

Chebyshev filter (C_j = T_j(x)Q / T_j(t), x = 2S/b − 1, t the columns' Rayleigh quotients):

    filter_start(q, sq, b, cur, coef, null):  rq = qᵀsq per column, b = max(b, min rq)
                                        over the columns with rq > null·max rq,
                                        t = max(2rq/b − 1, 1), cur = (2sq/b − q)/t,
                                        coef = [T_0/T_1, 2t](t)         (one program)
    filter_step(s_cur, cur, prev, b, coef):  prev ← (4 s_cur/b − 2cur − coef₀·prev)·s',
                                        s' = 1/(coef₁ − coef₀), coef₀ = s'

Deflated conjugate gradients (the backward's complement solve, one shifted system a column):

    cg_update(p, ap, shift, y, res, rs):    mp = ap + shift·p,  α = rs / pᵀmp,
                                            y += α p,  res −= α mp
    cg_direction(res, z_res, corr, p, rs):  res −= z_res,  rs' = resᵀres,
                                            p = res − corr + (rs'/rs) p,  rs = rs'

A program per COLS columns loops over the rows (a column's reduction, then its update); a
zero column (masked) stays exactly zero.
"""
import torch
import triton
import triton.language as tl

COLS = 16  # columns per program (16 float64: 128-byte rows)
ROWS = 128  # rows per tile
TINY = tl.constexpr(2.2250738585072014e-308)


@triton.jit
def _tile(r0, cols, col_in, k, c, ROWS: tl.constexpr):
    """Offsets and mask of the ROWS x COLS tile at row r0 of a row-major k x c block."""
    rows = r0 + tl.arange(0, ROWS)
    return rows[:, None] * c + cols[None, :], (rows < k)[:, None] & col_in[None, :]


@triton.jit(do_not_specialize=["k", "c"])
def _cg_update_kernel(p_ptr, ap_ptr, shift_ptr, y_ptr, res_ptr, rs_ptr, k, c,
                      COLS: tl.constexpr, ROWS: tl.constexpr):
    cols = tl.program_id(0) * COLS + tl.arange(0, COLS)
    col_in = cols < c
    shift = tl.load(shift_ptr + cols, mask=col_in, other=0.0)
    pm = tl.zeros([COLS], dtype=tl.float64)
    for r0 in range(0, k, ROWS):
        at, inside = _tile(r0, cols, col_in, k, c, ROWS)
        p = tl.load(p_ptr + at, mask=inside, other=0.0)
        ap = tl.load(ap_ptr + at, mask=inside, other=0.0)
        pm += tl.sum(p * (ap + shift[None, :] * p), 0)
    alpha = tl.load(rs_ptr + cols, mask=col_in, other=0.0) / tl.maximum(pm, TINY)
    for r0 in range(0, k, ROWS):
        at, inside = _tile(r0, cols, col_in, k, c, ROWS)
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
        at, inside = _tile(r0, cols, col_in, k, c, ROWS)
        res = tl.load(res_ptr + at, mask=inside, other=0.0) \
            - tl.load(zres_ptr + at, mask=inside, other=0.0)
        tl.store(res_ptr + at, res, mask=inside)
        rs_new += tl.sum(res * res, 0)
    rs = tl.load(rs_ptr + cols, mask=col_in, other=0.0)
    beta = rs_new / tl.maximum(rs, TINY)
    tl.debug_barrier()  # this program's res stores before its loads below
    for r0 in range(0, k, ROWS):
        at, inside = _tile(r0, cols, col_in, k, c, ROWS)
        res = tl.load(res_ptr + at, mask=inside, other=0.0)
        corr = tl.load(corr_ptr + at, mask=inside, other=0.0)
        p = tl.load(p_ptr + at, mask=inside, other=0.0)
        tl.store(p_ptr + at, res - corr + beta[None, :] * p, mask=inside)
    tl.store(rs_ptr + cols, rs_new, mask=col_in)


@triton.jit(do_not_specialize=["k", "c"])
def _filter_start_kernel(q_ptr, sq_ptr, b_ptr, cur_ptr, coef_ptr, k, c, NULL: tl.constexpr,
                         COLS: tl.constexpr, ROWS: tl.constexpr):
    """One program: b needs every column's Rayleigh quotient first."""
    high = tl.full((), -float("inf"), tl.float64)
    for c0 in range(0, c, COLS):
        cols = c0 + tl.arange(0, COLS)
        col_in = cols < c
        rq = tl.zeros([COLS], dtype=tl.float64)
        for r0 in range(0, k, ROWS):
            at, inside = _tile(r0, cols, col_in, k, c, ROWS)
            rq += tl.sum(tl.load(q_ptr + at, mask=inside, other=0.0)
                         * tl.load(sq_ptr + at, mask=inside, other=0.0), 0)
        tl.store(coef_ptr + cols, rq, mask=col_in)
        high = tl.maximum(high, tl.max(tl.where(col_in, rq, -float("inf")), 0))
    tl.debug_barrier()
    low = tl.full((), float("inf"), tl.float64)
    for c0 in range(0, c, COLS):  # the smallest quotient of the columns outside the null space
        cols = c0 + tl.arange(0, COLS)
        rq = tl.load(coef_ptr + cols, mask=cols < c, other=float("inf"))
        low = tl.minimum(low, tl.min(tl.where(rq > NULL * high, rq, float("inf")), 0))
    b = tl.maximum(tl.load(b_ptr), tl.where(low < float("inf"), low, 0.0))
    tl.debug_barrier()
    for c0 in range(0, c, COLS):
        cols = c0 + tl.arange(0, COLS)
        col_in = cols < c
        t = tl.maximum(2.0 * tl.load(coef_ptr + cols, mask=col_in, other=0.0) / b - 1.0, 1.0)
        inv_t = 1.0 / t
        for r0 in range(0, k, ROWS):
            at, inside = _tile(r0, cols, col_in, k, c, ROWS)
            q = tl.load(q_ptr + at, mask=inside, other=0.0)
            sq = tl.load(sq_ptr + at, mask=inside, other=0.0)
            tl.store(cur_ptr + at, (sq * (2.0 / b) - q) * inv_t[None, :], mask=inside)
        tl.debug_barrier()
        tl.store(coef_ptr + cols, inv_t, mask=col_in)
        tl.store(coef_ptr + c + cols, 2.0 * t, mask=col_in)
    tl.store(b_ptr, b)


@triton.jit(do_not_specialize=["k", "c"])
def _filter_step_kernel(scur_ptr, cur_ptr, prev_ptr, b_ptr, coef_ptr, k, c,
                        COLS: tl.constexpr, ROWS: tl.constexpr):
    cols = tl.program_id(0) * COLS + tl.arange(0, COLS)
    col_in = cols < c
    four_over_b = 4.0 / tl.load(b_ptr)
    s_prev = tl.load(coef_ptr + cols, mask=col_in, other=0.0)
    s_next = 1.0 / (tl.load(coef_ptr + c + cols, mask=col_in, other=3.0) - s_prev)
    for r0 in range(0, k, ROWS):
        at, inside = _tile(r0, cols, col_in, k, c, ROWS)
        scur = tl.load(scur_ptr + at, mask=inside, other=0.0)
        cur = tl.load(cur_ptr + at, mask=inside, other=0.0)
        prev = tl.load(prev_ptr + at, mask=inside, other=0.0)
        nxt = (four_over_b * scur - 2.0 * cur - s_prev[None, :] * prev) * s_next[None, :]
        tl.store(prev_ptr + at, nxt, mask=inside)
    tl.store(coef_ptr + cols, s_next, mask=col_in)


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


def filter_start(q, sq, b, cur, coef, null):
    """In place: b (one element), cur (k x c), coef (2 x c); see the module docstring."""
    k, c = q.shape
    for name, t in (("q", q), ("sq", sq), ("cur", cur)):
        _check(name, t, k, c)
    _filter_start_kernel[(1,)](q, sq, b, cur, coef, k, c, NULL=null, COLS=COLS, ROWS=ROWS,
                               num_warps=4)


def filter_step(s_cur, cur, prev, b, coef):
    """In place: prev ← the next Chebyshev block, coef's first row ← its scale."""
    k, c = cur.shape
    for name, t in (("s_cur", s_cur), ("cur", cur), ("prev", prev)):
        _check(name, t, k, c)
    _filter_step_kernel[(triton.cdiv(c, COLS),)](s_cur, cur, prev, b, coef, k, c, COLS=COLS,
                                                 ROWS=ROWS, num_warps=4)
