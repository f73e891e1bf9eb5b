"""The fused Triton dual InfoNCE (kernels/infonce.py, op himo_fast::fused_dual_ce) against
the float64 reference: on the GPU, else on CPU tensors under Triton's interpreter."""
import pytest
import torch

pytest.importorskip("triton")

from himo_fast import backends, ops  # noqa: E402
from himo_fast.reference import dual_infonce_reference as reference_dual_infonce  # noqa: E402
from himo_fast.kernels import infonce  # noqa: E402
from conftest import run_fresh, assert_ran  # noqa: E402
from test_dual_infonce import (_branches, _compare, _inputs,  # noqa: E402
                               _one_pair_has_exactly_zero_gradient, compare_op_forms,
                               compiled_equals_eager, compiled_shared_image_equals_eager)


def _fused(device):
    return backends.select("triton", device).dual_infonce


# Odd sizes; widths below one tile, across BLOCK_D chunks (300 > 256) and a factored
# component branch (d_comp).
SHAPES = [(1, 3, 5, None), (7, 21, 13, 1), (33, 65, 31, None), (66, 131, 300, 9)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("square", [True, False], ids=["square", "rectangular"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("route", ["auto", "recompute", "strips"])
def test_matches_reference(triton_device, dtype, square, eps, route, monkeypatch):
    # The backward's two routes (kernels/infonce.py: ce_grad, strips_backward) and auto's
    # choice between them by width; strips of 64 rows, so that 66 rows make two (in the
    # backward, and in the square forward's column merge).
    monkeypatch.setattr(infonce, "BACKWARD", route)
    monkeypatch.setattr(infonce, "STRIP_ELEMENTS", 1)
    monkeypatch.setattr(infonce, "COL_PROGRAMS", 1)
    shapes = SHAPES if dtype in (torch.float64, torch.float32) else SHAPES[1:3]
    for B, N, d, d_comp in shapes:
        _compare(B, B if square else N, d, dtype, triton_device, square, eps, d_comp=d_comp,
                 fn=_fused(triton_device))


@pytest.mark.parametrize("route", ["recompute", "strips"])
def test_one_pair_has_exactly_zero_gradient(triton_device, route, monkeypatch):
    monkeypatch.setattr(infonce, "BACKWARD", route)
    _one_pair_has_exactly_zero_gradient(triton_device, _fused(triton_device))


@pytest.mark.parametrize("route", ["recompute", "strips"])
def test_opcheck_both_ops(triton_device, route, monkeypatch):
    monkeypatch.setattr(infonce, "BACKWARD", route)
    for square in (True, False):
        rows, cols = _inputs(9, 27, 11, torch.float64, triton_device, square=square, d_comp=4)
        scale = torch.tensor(8.0, dtype=torch.float64, device=triton_device, requires_grad=True)
        branches = _branches(rows, None if square else cols)
        offset = 0 if square else 7
        torch.library.opcheck(ops.fused_dual_ce, (*branches, scale, offset, 0.1))
        ce, nll = ops.fused_dual_ce(*branches, scale, offset, 0.1)
        grads = (torch.randn_like(ce), torch.randn_like(nll))
        detached = [[t.detach() for t in b] for b in branches]
        torch.library.opcheck(ops.fused_dual_ce_backward,
                              (*grads, nll.detach(), *detached, scale.detach(), offset, 0.1))


@pytest.mark.parametrize("route", ["recompute", "strips"])
def test_gradcheck_float64(triton_device, route, monkeypatch):
    monkeypatch.setattr(infonce, "BACKWARD", route)
    # Both outputs (cross entropies and log-sum-exps) carry gradients. Fast mode (random
    # projections of the Jacobian): each finite difference is a run of the interpreter.
    rows, cols = _inputs(4, 11, 6, torch.float64, triton_device, square=False, d_comp=3)
    scale = torch.tensor(6.0, dtype=torch.float64, device=triton_device, requires_grad=True)
    op = lambda *a: ops.fused_dual_ce(*_branches(a[:4], a[4:8]), a[8], 5, 0.2)
    assert torch.autograd.gradcheck(op, (*rows, *cols, scale), fast_mode=True)
    rows, _ = _inputs(5, 5, 4, torch.float64, triton_device)
    op = lambda *a: ops.fused_dual_ce(*_branches(a[:4]), a[4], 0, 0.1)
    assert torch.autograd.gradcheck(op, (*rows, scale), fast_mode=True)


def _fused_op(eps=0.1):
    """(forward, backward) of the Triton driver as compare_op_forms calls them."""
    def forward(glob, comp, scale, offset):
        return (*infonce.dual_ce(glob, comp, scale, offset, eps), None)

    def backward(g_ce, g_nll, nll, _, glob, comp, scale, offset):
        return infonce.dual_ce_backward(g_ce, g_nll, nll, glob, comp, scale, offset, eps)
    return forward, backward


@pytest.mark.parametrize("route", ["recompute", "strips"])
@pytest.mark.parametrize("square", [True, False], ids=["square", "rectangular"])
def test_comp_branch_by_its_b_side_sums_the_image_gradient_in_place(triton_device, route,
                                                                    square, monkeypatch):
    # Both backward routes add into the global branch's gradients (ce_grad's ADD tiles,
    # strips_backward's p_into/q_into), over two strips of rows and several d chunks.
    monkeypatch.setattr(infonce, "BACKWARD", route)
    monkeypatch.setattr(infonce, "STRIP_ELEMENTS", 1)
    monkeypatch.setattr(infonce, "BLOCK_D_MAX", 16)
    cases = [(torch.float64, 1e-13), (torch.float32, 1e-6)]
    if triton_device != "cpu":
        cases += [(torch.bfloat16, 1e-2), (torch.float16, 1e-2)]
    for dtype, tol in cases:
        compare_op_forms(*_fused_op(), 66, 66 if square else 131, 37, dtype, triton_device,
                         square, tol)


def test_stage_gives_a_shared_image_once(triton_device, monkeypatch):
    # The triton backend's stage passes a shared image once; the gradients match the
    # reference, and the op's own opcheck holds on the short form.
    sizes = []
    real = infonce.dual_ce
    monkeypatch.setattr(infonce, "dual_ce", lambda g, c, *a: sizes.append(len(c)) or real(g, c, *a))
    for square in (True, False):
        _compare(29, 29 if square else 70, 19, torch.float64, triton_device, square, 0.1,
                 fn=_fused(triton_device), shared=True)
    assert sizes == [1, 2]
    rows, cols = _inputs(9, 27, 11, torch.float64, triton_device, square=False)
    scale = torch.tensor(8.0, dtype=torch.float64, device=triton_device, requires_grad=True)
    glob, short = [rows[0], rows[1], cols[0], cols[1]], [rows[3], cols[3]]
    torch.library.opcheck(ops.fused_dual_ce, (glob, short, scale, 7, 0.1))


def test_label_logit_is_the_callers_dot_product(triton_device):
    # The forward takes each row's label logit from ref, not from its tile: with a ref
    # shifted by +3 the nll of that row moves as the log-sum-exp with that logit changed.
    p = torch.randn(5, 8, dtype=torch.float64, device=triton_device)
    q = torch.randn(9, 8, dtype=torch.float64, device=triton_device)
    s = torch.tensor([2.0], dtype=torch.float64, device=triton_device)
    x = (s * p @ q.T).cpu()
    ref = x[torch.arange(5), torch.arange(5) + 2].clone()
    ref[1] += 3.0
    want = x.clone()
    want[torch.arange(5), torch.arange(5) + 2] = ref
    want = torch.logsumexp(want, 1) - ref
    got = infonce.lse_rows(p, q, s, ref.to(triton_device), 2).cpu()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_bad_input_is_refused_before_any_work(triton_device):
    rows, _ = _inputs(4, 4, 6, torch.float32, triton_device)
    rows = [t.detach() for t in rows]
    s = torch.tensor(3.0, device=triton_device)
    g, c = _branches(rows)
    with pytest.raises(ValueError, match="label_smoothing"):
        infonce.dual_ce(g, c, s, 0, 1.0)
    with pytest.raises(ValueError, match="label_offset"):
        infonce.dual_ce(g, c, s, 1, 0.0)
    with pytest.raises(TypeError, match="float32 or float64"):
        infonce.dual_ce(g, c, s.half(), 0, 0.0)
    with pytest.raises(TypeError, match="features must be"):
        infonce.dual_ce([g[0].double(), g[1].double()], c, s, 0, 0.0)
    with pytest.raises(ValueError, match=r"comp_branch must be \[a_r, b_r\] or \[b_r\]"):
        infonce.dual_ce(g, c + c, s, 0, 0.0)
    with pytest.raises(ValueError, match="global_branch must be"):
        infonce.dual_ce(g[:1], c, s, 0, 0.0)
    with pytest.raises(ValueError, match="one width"):  # the b side alone, of the a's width
        infonce.dual_ce(g, [g[1][:, :3].contiguous()], s, 0, 0.0)
    with pytest.raises(ValueError, match="one width"):
        infonce.dual_ce([g[0], g[1][:, :3]], c, s, 0, 0.0)
    with pytest.raises(ValueError, match="rows"):
        infonce.dual_ce([g[0], g[1][:3]], c, s, 0, 0.0)
    with pytest.raises(ValueError, match="columns < 4 rows"):
        infonce.dual_ce(g + [g[0][:2], g[1][:2]], c + [c[0][:2], c[1][:2]], s, 0, 0.0)
    with pytest.raises(ValueError, match="must be"):
        infonce.dual_ce([], c, s, 0, 0.0)


def test_cuda_memory_stays_far_below_one_n_by_n_matrix(cuda):
    # N=16384, d=512, bf16, square, forward + backward: one N x N fp32 matrix is 1 GiB.
    # Beyond the inputs and their gradients: at d=512 the strip route's 64 MiB strip of
    # weights and its 32 MiB fp32 accumulator (the forward's column partials, 32 MiB, are
    # gone by then), plus O(N) statistics.
    out = run_fresh("""
import torch
from himo_fast import backends
from test_dual_infonce import _inputs, _pairs
rows, _ = _inputs(16384, 16384, 512, torch.bfloat16, "cuda")
s = torch.tensor(20.0, device="cuda", requires_grad=True)
f = backends.select("triton", "cuda").dual_infonce
g, c = f(_pairs(rows), None, s, 0, 0.1); (g + c).backward()  # warm-up: compiles
for t in rows: t.grad = None
torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
base = torch.cuda.memory_allocated()
g, c = f(_pairs(rows), None, s, 0, 0.1); (g + c).backward(); torch.cuda.synchronize()
print(base, torch.cuda.max_memory_allocated())
""")
    base, peak = map(int, assert_ran(out).split()[-2:])
    grads = 4 * 16384 * 512 * 2
    extra = peak - base - grads
    print(f"extra {extra / 2**20:.1f} MiB beyond inputs and gradients")
    assert extra < 160 * 2**20


def test_d_chunks_cover_every_column_once():
    for K in (1, 5, 16, 255, 256, 300, 512, 768, 1024):
        for block in (16, 64, 256, 512):
            cols = [c for d0, w, n in infonce.d_chunks(K, block) for c in range(d0, d0 + w * n)]
            assert cols[:K] == list(range(K)) and len(cols) - K < 16 + block, (K, block)
    assert infonce.d_chunks(768, 512) == [(0, 512, 1), (512, 256, 1)]
    assert infonce.d_chunks(768, 256) == [(0, 256, 3)]


def test_narrow_chunks_and_other_tiles_give_the_same_result(triton_device, monkeypatch):
    # Several BLOCK_D chunks plus a tail launch, and tiles other than the default ones:
    # what the GPU tile sweep (benchmarks/infonce_tiles.py) may pick must stay exact.
    monkeypatch.setattr(infonce, "BLOCK_D_MAX", 16)
    monkeypatch.setattr(infonce, "FWD_BLOCKS", dict(infonce.FWD_BLOCKS, BLOCK_M=16, BLOCK_N=32, BLOCK_K=16))
    monkeypatch.setattr(infonce, "BWD_BLOCKS", dict(infonce.BWD_BLOCKS, BLOCK_M=32, BLOCK_N=16, BLOCK_K=32))
    monkeypatch.setattr(infonce, "WEIGHT_BLOCKS", dict(infonce.WEIGHT_BLOCKS, BLOCK_M=16, BLOCK_N=32))
    monkeypatch.setattr(infonce, "STRIP_ELEMENTS", 1)  # strips of 16 rows
    monkeypatch.setattr(infonce, "COL_PROGRAMS", 1)  # column merges over strips of 16 rows
    for route in ("recompute", "strips"):
        monkeypatch.setattr(infonce, "BACKWARD", route)
        for square in (True, False):
            _compare(19, 19 if square else 50, 45, torch.float32, triton_device, square, 0.1,
                     d_comp=3, fn=_fused(triton_device))


def test_auto_route_is_strips_only_where_dp_chunks_would_repeat():
    assert infonce.BACKWARD == "auto"
    assert not infonce.use_strips(73) and not infonce.use_strips(256)
    assert infonce.use_strips(257) and infonce.use_strips(768)


def test_torch_compile_fullgraph_equals_eager(triton_device):
    # The op is opaque to Dynamo; AOTAutograd traces it with its fake kernel and compiles
    # the backward through its registered autograd.
    rows, cols = _inputs(10, 30, 8, torch.float64, triton_device, square=False, d_comp=3)
    scale = torch.tensor(7.0, dtype=torch.float64, device=triton_device, requires_grad=True)
    fn = _fused(triton_device)
    compiled_equals_eager(
        lambda *a: sum(fn(((a[0], a[1]), (a[2], a[3])), ((a[4], a[5]), (a[6], a[7])), a[8], 10, 0.1)),
        rows + cols + [scale])
    compiled_shared_image_equals_eager(fn, triton_device)  # the short form


def test_fp32_dot_precision_follows_torch_matmul_setting(triton_device):
    # open_clip's training sets allow_tf32: the fused kernels then take TF32 products, as
    # torch.mm does for ClipLoss's logits and the strip driver's; IEEE by default.
    t = torch.randn(3, 4, device=triton_device)
    assert infonce.dot_precision(t) == "ieee"
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert infonce.dot_precision(t) == "tf32"
        assert infonce.dot_precision(t.double()) == "ieee" and infonce.dot_precision(t.bfloat16()) == "ieee"
        # TF32's products: within its 10-bit mantissa of the reference (SPEC 4's fp32
        # bar assumes IEEE products)
        rows, _ = _inputs(33, 33, 31, torch.float32, triton_device)
        scale = torch.tensor(13.0, device=triton_device)
        g, c = _fused(triton_device)(((rows[0], rows[1]), (rows[2], rows[3])), None, scale, 0, 0.1)
        up = [t.detach().double().cpu() for t in rows]
        gr, cr = reference_dual_infonce(((up[0], up[1]), (up[2], up[3])), None, scale.double().cpu(), 0, 0.1)
        assert abs(g.item() - gr.item()) < 1e-2 and abs(c.item() - cr.item()) < 1e-2
    finally:
        torch.set_float32_matmul_precision(old)
