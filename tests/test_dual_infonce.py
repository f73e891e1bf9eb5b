"""The compiled dual InfoNCE (csrc/) against the reference: CPU here, CUDA on a GPU."""
import pytest
import torch

import himo_fast
from himo_fast.dual_infonce import dual_infonce
from himo_fast.ops import dual_ce
from himo_fast.reference import dual_infonce_reference
from conftest import assert_ran, loss_rel, pairs, rel, run_fresh

pytestmark = pytest.mark.skipif("cpu" not in himo_fast.available_backends("cpu"),
                                reason="compiled extension not built")
TOL = {torch.float64: 1e-8, torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def _inputs(B, N, d, dtype, device="cpu", square=True, d_comp=None):
    """Rows (img, txt, cimg, comp) and columns; the component pair has width d_comp
    (HiDe's factored form) or d."""
    widths = [d, d, d_comp or d, d_comp or d]
    mk = lambda n, w: torch.nn.functional.normalize(torch.randn(n, w, dtype=torch.float64), dim=-1)
    rows = [mk(B, w) for w in widths]
    cols = rows if square else [torch.cat([mk(N - B, w)[: (N - B) // 2], r, mk(N - B, w)[(N - B) // 2:]])
                                for r, w in zip(rows, widths)]
    cast = lambda ts: [t.to(device=device, dtype=dtype).requires_grad_() for t in ts]
    rows_c = cast(rows)
    cols_c = rows_c if square else cast(cols)
    return rows_c, cols_c


def _pairs(ts):
    """(img, txt, cimg, comp) as the stages take them: ((img, txt), (cimg, comp))."""
    return (ts[0], ts[1]), (ts[2], ts[3])


def _branches(rows, cols=None):
    """The op's arguments: [a_r, b_r] (square) or [a_r, b_r, a_c, b_c] per branch."""
    extra = lambda i: [] if cols is None else [cols[i], cols[i + 1]]
    return [rows[0], rows[1], *extra(0)], [rows[2], rows[3], *extra(2)]


def _run(fn, rows, cols, scale, offset, eps, square):
    leaves = rows + ([] if square else cols) + [scale]
    for t in leaves:
        t.grad = None
    g, c = fn(_pairs(rows), None if square else _pairs(cols), scale, offset, eps)
    (g + 0.6 * c).backward()
    return [g.detach(), c.detach()] + [t.grad.clone() for t in leaves]


def _compare(B, N, d, dtype, device, square, eps, strip_rows=0, d_comp=None, fn=None,
             shared=False):
    """``fn`` (default: the strip driver) against the float64 reference, SPEC 4's tolerances.
    ``shared``: the image is both branches' a, the very same tensor (as where HiDe's u' is
    materialized), so its gradient holds both branches' terms; the reference gets the same
    structure."""
    rows, cols = _inputs(B, N, d, dtype, device, square, d_comp)
    if shared:
        rows[2] = rows[0]
        cols[2] = cols[0]  # the same list as rows when square
    offset = 0 if square else (N - B) // 2
    scale = torch.tensor(13.0, dtype=torch.float32 if dtype != torch.float64 else dtype,
                         device=device, requires_grad=True)
    fn = fn or (lambda *a: dual_infonce(*a, strip_rows=strip_rows))
    ours = _run(fn, rows, cols, scale, offset, eps, square)
    float64 = {}  # one float64 leaf per tensor: a shared image stays one tensor
    up = lambda ts: [float64.setdefault(id(t), t.detach().double().cpu().requires_grad_())
                     for t in ts]
    rows64 = up(rows)
    cols64 = rows64 if square else up(cols)
    s64 = scale.detach().double().cpu().requires_grad_()
    ref = _run(dual_infonce_reference, rows64, cols64, s64, offset, eps, square)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert torch.isfinite(a).all()
        # SPEC 4: losses relative to max(|loss|, 1), gradients to max(‖g‖, 1e-2).
        err = loss_rel(a.cpu(), b) if i < 2 else rel(a.cpu(), b)
        assert err <= TOL[dtype], (i, a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("square", [True, False])
@pytest.mark.parametrize("B,N,d,strip,d_comp", [(1, 3, 5, 0, None), (7, 21, 13, 3, 1), (33, 65, 31, 8, None),
                                                (50, 150, 64, 0, 9)])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cpu_matches_reference(dtype, square, B, N, d, strip, d_comp, eps):
    _compare(B, B if square else N, d, dtype, "cpu", square, eps, strip, d_comp)


# The fused route's CPU twin (csrc/dual_infonce_tiles.cpp): the CUDA tile kernels'
# decomposition and epilogue (csrc/logit_tile.h) run thread by thread. Sizes cross the
# 64 x 64 tiles: partial tiles, labels at tile edges (odd offsets), several row blocks and
# several lse calls (strip: rows per call, merged column partials), the columns split
# among programs (fewer than 4 row blocks: the twin's target) or not (260 rows).
TILE_CASES = [(1, 1, 5, 0, None), (7, 21, 13, 3, 1), (65, 130, 31, 0, 9), (130, 333, 40, 64, None),
              (129, 129, 17, 0, 3), (260, 300, 9, 0, 4)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("square", [True, False])
@pytest.mark.parametrize("B,N,d,strip,d_comp", TILE_CASES)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cpu_tiles_match_reference(dtype, square, B, N, d, strip, d_comp, eps):
    _compare(B, B if square else N, d, dtype, "cpu", square, eps, d_comp=d_comp,
             fn=lambda *a: dual_infonce(*a, strip_rows=strip, route="tiles"))


@pytest.mark.parametrize("square", [True, False])
def test_tiles_equal_strips_in_float64(square):
    # The same function by two routes: in float64 they agree to rounding, values and
    # gradients, so the tiling (labels, partial tiles, merges) loses nothing.
    B, N = 97, 97 if square else 250
    outs = []
    for route, strip in (("strips", 0), ("tiles", 40)):
        torch.manual_seed(3)
        rows, cols = _inputs(B, N, 23, torch.float64, square=square, d_comp=5)
        scale = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
        outs.append(_run(lambda *a: dual_infonce(*a, strip_rows=strip, route=route), rows, cols,
                         scale, 0 if square else 77, 0.1, square))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-13), (a - b).abs().max()


# The component branch by its b side ([b_r] or [b_r, b_c]): its a side is the global
# branch's, as when HiDe's u' is materialized and the image is both branches' a.

def _op_forms(B, N, d, dtype, device, square):
    """(global branch, component branch in full, the same by its b side, label offset):
    image, text and a component side, detached."""
    rows, cols = _inputs(B, N, d, dtype, device, square)
    f = [t.detach() for t in rows] + ([] if square else [t.detach() for t in cols])
    glob = f[0:2] if square else [f[0], f[1], f[4], f[5]]
    full = [f[0], f[3]] if square else [f[0], f[3], f[4], f[7]]
    return glob, full, full[1::2], 0 if square else (N - B) // 2


def compare_op_forms(forward, backward, B, N, d, dtype, device, square, tol):
    """The op on the short form against the full one: the same values, b's gradients, and
    the image's gradient returned once in the global branch's, the sum of the full form's
    two (which autograd sums) to ``tol`` (rounding: the short form rounds the sum once)."""
    torch.manual_seed(5)
    glob, full, short, offset = _op_forms(B, N, d, dtype, device, square)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(7.0, dtype=acc, device=device)
    ce, nll, extra = forward(glob, full, scale, offset)
    ce_s, nll_s, extra_s = forward(glob, short, scale, offset)
    assert torch.equal(ce, ce_s) and torch.equal(nll, nll_s)
    g_ce, g_nll = torch.rand_like(ce), torch.rand_like(nll)
    d_glob, d_full, ds = backward(g_ce, g_nll, nll, extra, glob, full, scale, offset)
    d_glob_s, d_short, ds_s = backward(g_ce, g_nll, nll, extra_s, glob, short, scale, offset)
    assert len(d_glob_s) == len(glob) and len(d_short) == len(short)
    want = [g.double() for g in d_glob]
    for i in range(0, len(glob), 2):  # a_r (and a_c): both branches' terms
        want[i] = want[i] + d_full[i].double()
    got = [*d_glob_s, *d_short, ds_s]
    for i, (a, b) in enumerate(zip(got, [*want, *d_full[1::2], ds])):
        assert a.dtype == glob[0].dtype or i == len(got) - 1
        assert rel(a.double().cpu(), b.double().cpu()) <= tol, (i, a, b)


def _compiled_op(keep=False, strip=5, route="strips", col_grad="auto"):
    """(forward, backward) of himo_fast::dual_ce as compare_op_forms calls them."""
    eps = 0.1

    def forward(glob, comp, scale, offset):
        return torch.ops.himo_fast.dual_ce(glob, comp, scale, offset, eps, keep, strip, route,
                                           col_grad)

    def backward(g_ce, g_nll, nll, logits, glob, comp, scale, offset):
        return torch.ops.himo_fast.dual_ce_backward(g_ce, g_nll, nll, logits, glob, comp, scale,
                                                    offset, eps, strip, route, col_grad)
    return forward, backward


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("square,route,col_grad,keep", [
    (square, route, col_grad, keep) for square in (True, False) for route in ("strips", "tiles")
    for col_grad in ("accumulate", "recompute") for keep in (False, True)
    if (square or col_grad == "accumulate") and not (keep and route == "tiles")])
def test_comp_branch_by_its_b_side_sums_the_image_gradient_in_place(dtype, square, route,
                                                                    col_grad, keep):
    # Every path of the backward that writes the image's gradient: rows (overwritten, then
    # added to), recomputed columns, rectangular columns (an fp32 accumulator added once).
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    compare_op_forms(*_compiled_op(keep, 5, route, col_grad), 23, 23 if square else 61, 17,
                     dtype, "cpu", square, tol)


@pytest.mark.parametrize("route", ["strips", "tiles"])
def test_cuda_comp_branch_by_its_b_side_sums_the_image_gradient_in_place(cuda, route):
    for square in (True, False):
        compare_op_forms(*_compiled_op(strip=64, route=route), 257, 257 if square else 771, 96,
                         torch.bfloat16, cuda, square, 1e-2)
        compare_op_forms(*_compiled_op(strip=64), 257, 257 if square else 771, 96,
                         torch.float32, cuda, square, 1e-6)


def test_comp_branch_by_its_b_side_opcheck_and_gradcheck():
    for square in (True, False):
        rows, cols = _inputs(7, 19, 6, torch.float64, square=square)
        scale = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
        img, txt, _, comp = rows
        glob = [img, txt] if square else [img, txt, cols[0], cols[1]]
        short = [comp] if square else [comp, cols[3]]
        offset = 0 if square else 5
        for keep in (False, True):
            torch.library.opcheck(torch.ops.himo_fast.dual_ce.default,
                                  (glob, short, scale, offset, 0.1, keep, 3))
        n = len(glob)
        op = lambda *a: dual_ce(list(a[:n]), list(a[n:-1]), a[-1], offset, 0.1, False, 3)
        assert torch.autograd.gradcheck(op, (*glob, *short, scale))


def compiled_equals_eager(loss, leaves):
    """torch.compile(fullgraph) of ``loss(*leaves)`` against eager, float64: the value and
    every leaf's gradient (AOTAutograd compiles the backward)."""
    compiled = torch.compile(loss, fullgraph=True)

    def step(f):
        for t in leaves:
            t.grad = None
        out = f(*leaves)
        out.backward()
        return [out.detach()] + [t.grad.clone() for t in leaves]

    for a, b in zip(step(compiled), step(loss)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def compiled_shared_image_equals_eager(fn, device):
    """compiled_equals_eager for ``fn`` (a dual_infonce) with the image as both branches'
    a, rows against columns: Dynamo keeps the stage's identity test, and the op's short
    form traces through its fake kernel and autograd."""
    rows, cols = _inputs(10, 30, 8, torch.float64, device, square=False)
    scale = torch.tensor(7.0, dtype=torch.float64, device=device, requires_grad=True)
    compiled_equals_eager(
        lambda v, u, c, vc, uc, cc, s: sum(fn(((v, u), (v, c)), ((vc, uc), (vc, cc)), s, 10, 0.1)),
        [rows[0], rows[1], rows[3], cols[0], cols[1], cols[3], scale])


def test_shared_image_under_torch_compile_fullgraph(monkeypatch):
    # The compiled graph takes the short form too (the spy is traced with the stage)
    import himo_fast.dual_infonce as stage
    sizes = []
    real = stage.dual_ce
    monkeypatch.setattr(stage, "dual_ce", lambda g, c, *a: sizes.append(len(c)) or real(g, c, *a))
    compiled_shared_image_equals_eager(dual_infonce, "cpu")
    assert sizes == [2, 2], sizes  # rows and columns: [u'_r, u'_c], compiled and eager


@pytest.mark.parametrize("square", [True, False], ids=["square", "rectangular"])
def test_stage_gives_a_shared_image_once(square, monkeypatch):
    # dual_infonce passes the component branch by its b side when its a is the global
    # branch's very tensor, and in full otherwise; the gradients match the reference.
    import himo_fast.dual_infonce as stage
    sizes = []
    real = stage.dual_ce
    monkeypatch.setattr(stage, "dual_ce", lambda g, c, *a: sizes.append(len(c)) or real(g, c, *a))
    _compare(29, 29 if square else 70, 19, torch.float64, "cpu", square, 0.1, shared=True)
    _compare(29, 29 if square else 70, 19, torch.float32, "cpu", square, 0.1, shared=True)
    _compare(7, 7 if square else 21, 5, torch.float64, "cpu", square, 0.1)  # cimg is not img
    assert sizes == [1, 1, 2] if square else sizes == [2, 2, 4]


@pytest.mark.parametrize("route,strip,keep", [("strips", 7, False), ("strips", 7, True),
                                               ("strips", 0, False), ("tiles", 40, False)])
def test_recomputed_columns_equal_accumulated_in_float64(route, strip, keep):
    # col_grad "recompute": a square branch's columns' gradient as the rows' gradient of
    # the transposed matrix (Wᵀ from the swapped sides), in a second pass: the same values
    # and gradients to rounding, several strips, kept logits (read transposed) or not.
    outs = []
    for col_grad in ("accumulate", "recompute"):
        torch.manual_seed(3)
        rows, cols = _inputs(97, 97, 23, torch.float64, d_comp=5)
        scale = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
        outs.append(_run(lambda *a: dual_infonce(*a, strip_rows=strip, route=route,
                                                 keep_logits=keep, col_grad=col_grad),
                         rows, cols, scale, 0, 0.1, True))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), (a - b).abs().max()


@pytest.mark.parametrize("route", ["strips", "tiles"])
@pytest.mark.parametrize("B,strip,d_comp", [(1, 0, None), (33, 8, None), (129, 0, 3)])
def test_recomputed_columns_match_reference_in_float32(route, B, strip, d_comp):
    _compare(B, B, 17, torch.float32, "cpu", True, 0.1, d_comp=d_comp,
             fn=lambda *a: dual_infonce(*a, strip_rows=strip, route=route, col_grad="recompute"))


def test_recomputed_columns_gradcheck_and_opcheck_float64():
    rows, _ = _inputs(6, 6, 5, torch.float64, d_comp=3)
    scale = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    for route, keep in (("strips", False), ("strips", True), ("tiles", False)):
        op = lambda *a: dual_ce(*_branches(a[:4]), a[4], 0, 0.2, keep, 4, route, "recompute")
        assert torch.autograd.gradcheck(op, (*rows, scale))
        args = (*_branches(rows), scale, 0, 0.1, keep, 4, route, "recompute")
        torch.library.opcheck(torch.ops.himo_fast.dual_ce.default, args)


def test_col_grad_errors():
    rows, cols = _inputs(4, 9, 5, torch.float32, square=False)
    scale = torch.tensor(5.0)
    with pytest.raises(ValueError, match="col_grad must be 'auto', 'accumulate' or "
                                         "'recompute', got 'transpose'"):
        dual_ce(*_branches(rows), scale, col_grad="transpose")
    with pytest.raises(ValueError, match="col_grad 'recompute' needs square branches.*4 rows "
                                         "against 9 columns"):
        dual_ce(*_branches(rows, cols), scale, 2, col_grad="recompute")
    dual_ce(*_branches(rows, cols), scale, 2, col_grad="accumulate")  # columns accumulate
    # On the CPU "auto" accumulates (its rule: never recompute), even over strips of one
    # row: in-place addmm per strip and branch, where recomputing has none.
    from torch.profiler import profile
    accumulates = {}
    for col_grad in ("auto", "accumulate", "recompute"):
        with profile() as prof:
            ce, _ = dual_ce(*_branches(rows), scale, 0, 0.0, False, 1, col_grad=col_grad)
            ce.sum().backward()
        accumulates[col_grad] = sum(e.count for e in prof.key_averages() if e.key == "aten::addmm_")
    assert accumulates == {"auto": 8, "accumulate": 8, "recompute": 0}


def test_cpu_tiles_one_pair_has_exactly_zero_gradient():
    _one_pair_has_exactly_zero_gradient("cpu", lambda *a: dual_infonce(*a, route="tiles"))


def test_opcheck_tiles():
    for square in (True, False):
        rows, cols = _inputs(70, 140, 11, torch.float64, square=square, d_comp=4)
        scale = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
        args = (*_branches(rows, None if square else cols), scale, 0 if square else 33, 0.1,
                False, 64, "tiles")
        torch.library.opcheck(torch.ops.himo_fast.dual_ce.default, args)


def test_gradcheck_tiles_float64():
    rows, cols = _inputs(5, 15, 7, torch.float64, square=False, d_comp=3)
    scale = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: dual_ce(*_branches(a[:4], a[4:8]), a[8], 6, 0.2, False, 2, "tiles"),
        (*rows, *cols, scale))


def test_tiles_route_errors():
    rows, _ = _inputs(4, 4, 5, torch.float32)
    scale = torch.tensor(5.0)
    with pytest.raises(ValueError, match="route must be 'strips' or 'tiles', got 'tile'"):
        dual_ce(*_branches(rows), scale, route="tile")
    with pytest.raises(ValueError, match="keep_logits needs the strips route"):
        dual_ce(*_branches(rows), scale, keep_logits=True, route="tiles")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("square", [True, False])
def test_cuda_tiles_match_reference(cuda, dtype, square):
    # d % 8 == 0 takes the 16-byte loads, the others the scalar ones; 4099 rows need two
    # lse calls at strip 2048 and span many column tiles.
    for B, N, d, strip, d_comp in [(1, 3, 5, 0, None), (33, 99, 31, 8, 9), (257, 771, 96, 0, 37),
                                   (4099, 4099, 64, 2048, 8)]:
        _compare(B, B if square else N, d, dtype, cuda, square, 0.1, d_comp=d_comp,
                 fn=lambda *a: dual_infonce(*a, kernel_dtype=dtype, strip_rows=strip,
                                            route="tiles"))


def test_cuda_tiles_one_pair_has_exactly_zero_gradient(cuda):
    def fn(rows, cols, scale, offset, eps):
        bf = tuple(tuple(t.to(torch.bfloat16) for t in pair) for pair in rows)
        return dual_infonce(bf, None, scale, offset, eps, kernel_dtype=torch.bfloat16,
                            route="tiles")
    _one_pair_has_exactly_zero_gradient(cuda, fn)


def test_cuda_tiles_opcheck_and_fp32_refused(cuda):
    rows, cols = _inputs(70, 140, 24, torch.bfloat16, cuda, square=False, d_comp=5)
    scale = torch.tensor(8.0, device=cuda, requires_grad=True)
    args = (*_branches(rows, cols), scale, 33, 0.1, False, 0, "tiles")
    torch.library.opcheck(torch.ops.himo_fast.dual_ce.default, args)
    rows32 = [t.detach().float() for t in rows]
    with pytest.raises(TypeError, match="tiles route takes bfloat16 or float16"):
        dual_ce(*_branches(rows32), scale.detach(), route="tiles")


def test_cuda_route_switch_is_checked_and_restored():
    before = himo_fast.backends.CUDA_ROUTE
    with himo_fast.backends.cuda_route("tiles"):
        assert himo_fast.backends.CUDA_ROUTE == "tiles"
    assert himo_fast.backends.CUDA_ROUTE == before
    with pytest.raises(ValueError, match="route must be 'strips' or 'tiles', got 'fast'"):
        with himo_fast.backends.cuda_route("fast"):
            pass
    assert himo_fast.backends.CUDA_ROUTE == before


def test_cuda_backend_takes_the_route(cuda):
    # The backend's bf16 dual InfoNCE by either route: the same losses to bf16's tolerance,
    # not the same bits (the routes sum the exponentials in different orders).
    rows, _ = _inputs(300, 300, 64, torch.bfloat16, cuda, d_comp=24)
    impl = himo_fast.backends.select("cuda", cuda)
    s = torch.tensor(20.0, device=cuda)
    with himo_fast.backends.cuda_route("tiles"):
        tiles = torch.stack(impl.dual_infonce(_pairs(rows), None, s))
    strips = torch.stack(impl.dual_infonce(_pairs(rows), None, s))
    assert torch.allclose(tiles, strips, rtol=2e-2) and not torch.equal(tiles, strips)


CUDA_MEMORY_PROBE = """
import sys, torch
from himo_fast import backends
from himo_fast.dual_infonce import dual_infonce
from test_dual_infonce import _inputs, _pairs
n, d = 32768, 2048
rows, _ = _inputs(n, n, d, torch.bfloat16, "cuda")
s = torch.tensor(20.0, device="cuda", requires_grad=True)
route, col_grad = sys.argv[1:]
if col_grad == "auto":  # the backend, as MoLo calls it
    f = backends.select("cuda", "cuda").dual_infonce
else:
    f = lambda *a: dual_infonce(*a, kernel_dtype=torch.bfloat16, route=route, col_grad=col_grad)
for _ in range(2):  # the first call warms cuBLAS up
    for t in rows: t.grad = None
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with backends.cuda_route(route):
        g, c = f(_pairs(rows), None, s, 0, 0.1)
    (g + c).backward(); torch.cuda.synchronize()
print(base, torch.cuda.max_memory_allocated())
"""


@pytest.mark.parametrize("col_grad", ["auto", "recompute"])
@pytest.mark.parametrize("route", ["strips", "tiles"])
def test_cuda_backward_holds_one_fp32_accumulator(cuda, route, col_grad):
    # N=32768, d=2048, bf16, square, forward + backward. Beyond the inputs and their
    # gradients (each of the 4: N x d bf16, 128 MiB): one fp32 accumulator of a columns'
    # gradient (256 MiB; "auto" accumulates at this N, 1024 rows a strip; "recompute" has
    # none) and one strip of weights (2^25 of them: the strips route's fp32 logits and
    # their bf16 copy, the tiles' bf16 only). Before 2026-12-07 the rows' gradient was a
    # second fp32 accumulator and each strip's Wᵀ·R a third fp32 [N, d] tensor: ≥ 768 MiB.
    n, d = 32768, 2048
    out = assert_ran(run_fresh(CUDA_MEMORY_PROBE, route, col_grad))
    base, peak = map(int, out.split()[-2:])
    extra = peak - base - 4 * n * d * 2
    accumulator = n * d * 4 if col_grad == "auto" else 0
    bound = accumulator + (2**25) * (6 if route == "strips" else 2) + 64 * 2**20
    print(f"{route}, {col_grad}: extra {extra / 2**20:.1f} MiB beyond inputs and gradients, "
          f"bound {bound / 2**20:.0f} MiB")
    assert 0 < extra < bound


def _tiles_forward_largest_allocation(n, d, device, dtype):
    """The largest single allocation of a square tiles forward at N = n (no backward)."""
    ts = [torch.nn.functional.normalize(torch.randn(n, w, device=device), dim=-1).to(dtype)
          for w in (d, d, 2, 2)]
    s = torch.tensor(10.0, device=device)
    if device == "cpu":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:
            ce, _ = dual_ce(ts[:2], ts[2:], s, 0, 0.1, False, 0, "tiles")
        assert torch.isfinite(ce).all()
        return max(e.cpu_memory_usage for e in prof.events())
    dual_ce(ts[:2], ts[2:], s, 0, 0.1, False, 0, "tiles")  # warm-up
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ce, _ = dual_ce(ts[:2], ts[2:], s, 0, 0.1, False, 0, "tiles")
    torch.cuda.synchronize()
    assert torch.isfinite(ce).all()
    return torch.cuda.max_memory_allocated() - base


def test_cpu_tiles_column_partials_bounded_by_a_strip():
    # The lse calls' column partials (2 values per column and row block of 64 rows) stay
    # within 2 x strip_elements values (2^20 on the CPU: 8 MiB of fp32) where the device's
    # 4096 rows a call would take 2 x 64 x N: at N = 17000, 61 row blocks a call (8.30 MB)
    # where 64 took 8.70 MB. The partials are the forward's largest allocation.
    largest = _tiles_forward_largest_allocation(17000, 4, "cpu", torch.float32)
    assert 2 * 60 * 17000 * 4 < largest <= 2 * 2**20 * 4, largest


def test_cuda_tiles_column_partials_bounded_by_a_strip(cuda):
    # N = 262144: 128 row blocks a launch (256 MiB of partials) where the device's 528
    # would take 1.06 GiB; the whole forward beyond its inputs within that and 16 MiB.
    extra = _tiles_forward_largest_allocation(262144, 64, cuda, torch.bfloat16)
    print(f"tiles forward at N=262144: {extra / 2**20:.1f} MiB beyond the inputs")
    assert 2**28 <= extra <= 2**28 + 16 * 2**20, extra


def _one_pair_has_exactly_zero_gradient(device, fn=dual_infonce):
    # One pair: softmax = target = 1, so the exact gradient is 0. Formed as s·P·b - s·b
    # it would be rounding noise of size ulp(s); the kernel forms g·(P - y) per logit.
    # Every other pair of trials, the image is both branches' a (the op's short form).
    for trial in range(20):
        rows, _ = _inputs(1, 1, 5, torch.float32, device)
        if trial // 2 % 2:
            rows[2] = rows[0]
        scale = torch.tensor(13.0, device=device, requires_grad=True)
        g, c = fn(_pairs(rows), None, scale, 0, 0.1 * (trial % 2))
        (g + 0.6 * c).backward()
        for t in rows + [scale]:
            assert torch.count_nonzero(t.grad) == 0, t.grad
        assert abs(g.item()) < 1e-5 and abs(c.item()) < 1e-5  # log 1, up to one rounding


def test_one_pair_has_exactly_zero_gradient():
    _one_pair_has_exactly_zero_gradient("cpu")


def test_cuda_one_pair_has_exactly_zero_gradient(cuda):
    _one_pair_has_exactly_zero_gradient(cuda)


def test_opcheck_both_modes():
    for square in (True, False):
        rows, cols = _inputs(9, 27, 11, torch.float64, square=square, d_comp=4)
        scale = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
        branches = _branches(rows, None if square else cols)
        for keep in (False, True):
            args = (*branches, scale, 0 if square else 7, 0.1, keep, 4)
            torch.library.opcheck(torch.ops.himo_fast.dual_ce.default, args)


def test_gradcheck_float64():
    # Both outputs (cross entropies and log-sum-exps) carry gradients.
    rows, cols = _inputs(5, 15, 7, torch.float64, square=False, d_comp=3)
    scale = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: dual_ce(*_branches(a[:4], a[4:8]), a[8], 6, 0.2, False, 2),
                                    (*rows, *cols, scale))
    rows, _ = _inputs(6, 6, 5, torch.float64)
    assert torch.autograd.gradcheck(lambda *a: dual_ce(*_branches(a[:4]), a[4], 0, 0.1, True, 4), (*rows, scale))


@pytest.mark.parametrize("square", [True, False], ids=["square", "rectangular"])
def test_kept_logits_give_the_recomputed_gradient(square):
    # The CPU forward keeps its logits when they fit; the backward from them equals the
    # backward that recomputes them (empty logits), and they survive a second backward.
    rows, cols = _inputs(7, 19, 6, torch.float64, square=square, d_comp=3)
    s = torch.tensor(9.0, dtype=torch.float64)
    offset = 0 if square else 5
    feats = [t.detach() for t in rows] + ([] if square else [t.detach() for t in cols])
    branches = _branches(feats[:4], None if square else feats[4:])
    args = (*branches, s, offset, 0.1)
    ce, nll, logits = torch.ops.himo_fast.dual_ce(*args, True, 3)
    jobs = 2 if square else 4
    assert logits.shape == (jobs, 7, 7 if square else 19)
    # the unscaled dot products of the GEMMs: img·txtᵀ first
    assert rel(logits[0], feats[0] @ (feats[1] if square else feats[5]).T) <= 1e-14
    g_ce, g_nll = torch.rand_like(ce), torch.rand_like(nll)
    backward = lambda kept: [*(lambda g, c, s: (*g, *c, s))(
        *torch.ops.himo_fast.dual_ce_backward(g_ce, g_nll, nll, kept, *args, 3))]
    kept, again, fresh = backward(logits), backward(logits), backward(logits.new_empty(0))
    for a, b, c in zip(kept, again, fresh):
        assert torch.equal(a, b)
        assert rel(a, c) <= 1e-13
    with pytest.raises(ValueError, match="logits must be empty or the forward's"):
        backward(logits[:1])


def test_logits_are_not_kept_beyond_the_bound(monkeypatch):
    # The cpu backend asks the op to keep its logits only while they fit the bound.
    from himo_fast import backends, ops
    n = int((backends.CPU_LOGITS_KEPT / 2) ** 0.5) + 1  # square: 2 matrices of n² > the bound
    kept = []
    real = torch.ops.himo_fast.dual_ce

    def spy(*args):
        out = real(*args)
        kept.append(out[2].shape)
        return out
    monkeypatch.setattr(ops.torch.ops.himo_fast, "dual_ce", spy, raising=False)
    impl = backends.select("cpu", "cpu")
    for size in (n, n - 1):
        rows, _ = _inputs(size, size, 2, torch.float32)
        impl.dual_infonce(_pairs([t.detach() for t in rows]), None, torch.tensor(2.0))
    assert kept == [(0,), (2, n - 1, n - 1)]


def test_torch_compile_fullgraph_equals_eager():
    # float64, so that a real difference is not lost in the reordering compile may do.
    v, u = pairs(24, 16, torch.float64)
    s = torch.tensor(11.0, dtype=torch.float64, requires_grad=True)
    loss = himo_fast.MoLo(backend="cpu")
    compiled_loss = torch.compile(loss, fullgraph=True)  # AOTAutograd compiles the backward

    def step(fn):
        for t in (v, u, s):
            t.grad = None
        out = fn(v, u, s)
        out.backward()
        return [out.detach()] + [t.grad.clone() for t in (v, u, s)]

    eager = step(loss)
    compiled = step(compiled_loss)
    for a, b in zip(compiled, eager):
        assert rel(a, b) <= 1e-10


def test_op_rejects_bad_input():
    rows, cols = _inputs(4, 8, 6, torch.float32, square=False, d_comp=3)
    rows, cols = [t.detach() for t in rows], [t.detach() for t in cols]
    s = torch.tensor(3.0)
    op = lambda r, c, *rest: [*_branches(r, c), *rest]
    bad = [
        (op([rows[0].double(), *rows[1:]], cols, s), TypeError, "dtype"),
        (op([rows[0][:, :5].contiguous(), *rows[1:]], cols, s), ValueError, "feature dim"),
        (op([*rows[:3], rows[1]], cols, s), ValueError, "comp_branch has feature dim 6 but its a_r has 3"),
        (op([rows[0].t(), *rows[1:]], cols, s), ValueError, "feature dim|contiguous"),
        (op([torch.randn(4, 12)[:, ::2], *rows[1:]], cols, s), ValueError, "contiguous"),
        ([rows[:2] + cols[:1], rows[2:] + cols[2:], s], ValueError, r"\[a_r, b_r\] \(square\) or"),
        ([rows[:2], rows[2:] + cols[2:], s], ValueError,
         r"comp_branch must be \[a_r, b_r\] or \[b_r\] \(the global branch is square\), got 4"),
        ([rows[:2] + cols[:2], rows[3:], s], ValueError,
         r"comp_branch must be \[a_r, b_r, a_c, b_c\] or \[b_r, b_c\].*got 1"),
        # the b side alone: of the global a's width, rows and columns
        ([rows[:2] + cols[:2], [rows[3], cols[3]], s], ValueError,
         "comp_branch has feature dim 3 but global a_r has 6"),
        ([rows[:2], [rows[1][:3]], s], ValueError, "row tensors must have 4 rows"),
        (op(rows, cols, torch.ones(2)), ValueError, "scale"),
        (op(rows, [c[:3] for c in cols], s), ValueError, "columns"),
        (op(rows, cols, s, 5), ValueError, "label_offset must be in \\[0, 4\\].*got 5"),
        (op(rows, None, s, 1), ValueError, "label_offset must be in \\[0, 0\\].*got 1"),
        (op(rows, cols, s, 0, 1.0), ValueError, "label_smoothing must be in \\[0, 1\\), got 1"),
        (op([r.half() for r in rows], None, s), TypeError, "float32 or float64"),
        (op(rows, None, s.half()), TypeError, "float32 or float64, got Half"),
        (op(rows, None, s.double()), TypeError, "in the scale's dtype"),
    ]
    for args, exc, needle in bad:
        with pytest.raises(exc, match=needle):
            torch.ops.himo_fast.dual_ce(*args)


RUNTIME_PROBE = """
import torch
from himo_fast import _extension
assert _extension.extension() is not None, _extension.unavailable_reason(need_cuda=False)
x = torch.randn(3, 4)
try:
    torch.ops.himo_fast.dual_ce([x, x], [x, x], torch.tensor(2.0), 7)
except ValueError as err:
    print(err)
"""


def test_error_messages_format_numbers_in_a_fresh_process():
    # An extension linked with its own static libstdc++ segfaults (or prints no digits) when
    # it formats an integer into a message: seen on a GPU machine; setup.py now links the
    # shared one by name. A fresh process, so that a crash fails this test, not the session.
    out = assert_ran(run_fresh(RUNTIME_PROBE))
    assert "label_offset must be in [0, 0]" in out and "got 7" in out, out


MEMORY_PROBE = """
import sys, torch
from himo_fast.dual_infonce import dual_infonce
def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
torch.manual_seed(0)
N, d, strip = 8192, 256, int(sys.argv[1])
img, txt, comp = [torch.nn.functional.normalize(torch.randn(N, d), dim=-1).requires_grad_() for _ in range(3)]
s = torch.tensor(10.0, requires_grad=True)
f = [img, txt, img, comp]  # the component branch at full width d (the unfactored form)
w = [t[:64].detach().clone().requires_grad_() for t in f]
g, c = dual_infonce(((w[0], w[1]), (w[2], w[3])), None, s, 0, 0.1)  # warm-up on a tiny batch: thread pools, libraries
(g + c).backward()
base = kib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
g, c = dual_infonce(((f[0], f[1]), (f[2], f[3])), None, s, 0, 0.1, strip_rows=strip)
(g + c).backward()
print(base, kib("VmHWM"))
"""


def _peak_extra_bytes(strip_rows):
    out = assert_ran(run_fresh(MEMORY_PROBE, str(strip_rows), timeout=900))
    base, peak = map(int, out.split()[-2:])
    return (peak - base) * 1024


def test_memory_stays_far_below_one_n_by_n_matrix():
    # N=8192, d=256, square, forward + backward. Inputs are 3 x 8 MiB, their gradients
    # 3 x 8 MiB more; one N x N fp32 matrix is 256 MiB.
    n_by_n = 8192 * 8192 * 4
    extra = _peak_extra_bytes(0)
    print(f"peak extra {extra / 2**20:.1f} MiB vs one N x N fp32 matrix {n_by_n / 2**20:.0f} MiB")
    assert 0 < extra < n_by_n / 2
    # The probe can see a violation: one strip of all rows holds 2 N x N matrices.
    assert _peak_extra_bytes(8192) > n_by_n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("square", [True, False])
def test_cuda_matches_reference(cuda, dtype, square):
    for B, N, d, strip in [(1, 3, 5, 0), (33, 99, 31, 8), (257, 771, 96, 0)]:
        _compare(B, B if square else N, d, dtype, cuda, square, 0.1, strip)


@pytest.mark.parametrize("route,dtype", [("strips", torch.float32), ("strips", torch.bfloat16),
                                         ("tiles", torch.bfloat16), ("tiles", torch.float16)])
def test_cuda_recomputed_columns_match_reference(cuda, route, dtype):
    # col_grad "recompute" on the GPU (the kernels with the two sides swapped, the kept
    # strip count, the tiles' weights kernel): the float64 reference at SPEC 4's
    # tolerances, odd sizes and several strips.
    for B, d, strip in [(1, 5, 0), (33, 31, 8), (257, 96, 64)]:
        _compare(B, B, d, dtype, cuda, True, 0.1, d_comp=7,
                 fn=lambda *a: dual_infonce(*a, kernel_dtype=dtype, strip_rows=strip,
                                            route=route, col_grad="recompute"))
