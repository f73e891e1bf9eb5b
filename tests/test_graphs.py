"""Stages replayed from graphs (himo_fast/graphs.py) against their eager ops: HiDe
(factors.HiDeStage) and the fused dual InfoNCE (dual_infonce.FusedDualCE).

On the CPU a stand-in runner plays the CUDA graph: its replay re-runs the captured function
and copies the results into the tensors the capture returned, so that, as with a real
graph, every replay overwrites the same static buffers. The buffer, clone and generation
logic is therefore tested here; on a GPU the last tests run it with CUDA graphs.
"""
import warnings

import pytest
import torch

import himo_fast
from himo_fast import backends, graphs
from himo_fast.dual_infonce import dual_infonce
from himo_fast.factors import TORCH_OPS, hide_factors, materialize
from conftest import pairs, rel


def _copy_into(static, new):
    if isinstance(static, torch.Tensor):
        static.copy_(new)
    elif static is not None:
        for s, n in zip(static, new):
            _copy_into(s, n)


class StandIn:
    """A graph that re-runs its function into the buffers of the capture."""
    captures = 0

    def capture(self, fn):
        StandIn.captures += 1
        self.fn = fn
        self.out = fn()
        self.replays = 0
        return self.out

    def replay(self):
        self.replays += 1
        _copy_into(self.out, self.fn())


class FailingRunner(StandIn):
    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")


def _hide(u, cache, ops=TORCH_OPS):
    return hide_factors(u, 0.9, ops=ops, graphs=cache)


def _value_and_grad(u, weight, cache, ops=TORCH_OPS):
    """u' of HiDe on u, a fixed linear functional of it and its gradient."""
    u = u.detach().requires_grad_()
    out = materialize(_hide(u, cache, ops))
    (out * weight).sum().backward()
    return out.detach(), u.grad


def _text(n, d, dtype=torch.float64, seed=0):
    return pairs(n, d, dtype, seed=seed, requires_grad=False)[1]


# ---------------------------------------------------------------- HiDe


@pytest.mark.parametrize("n,d,dtype", [(24, 40, torch.float64), (60, 16, torch.float64),
                                       (33, 48, torch.float32)])
def test_hide_graphed_equals_eager_bit_for_bit_across_batches(n, d, dtype):
    """Gram space (N <= d) and covariance space; one capture, then replays on new
    batches (a new m each time)."""
    cache = graphs.GraphCache(StandIn)
    for seed in range(3):
        u = _text(n, d, dtype, seed)
        weight = torch.randn(n, d, dtype=dtype)
        got = _value_and_grad(u, weight, cache)
        want = _value_and_grad(u, weight, None)
        for g, w in zip(got, want):
            assert torch.equal(g, w), rel(g, w)
    (entry,) = cache.entries.values()
    # capture's own replay (filling the saved state) + one per call
    assert entry.forward_runner.replays == 4 and entry.backward_runner.replays == 3


def test_outputs_are_not_overwritten_by_a_later_call():
    cache = graphs.GraphCache(StandIn)
    first = _hide(_text(20, 30, seed=1), cache)
    kept = [t.clone() for t in first[:3]]
    _hide(_text(20, 30, seed=2), cache)
    for t, k in zip(first[:3], kept):
        assert torch.equal(t, k)


def test_backward_of_an_earlier_forward_replays_it_first():
    """Three forwards, then their backwards out of order: each gradient is its own
    input's (the stand-in's saved state is the latest forward's, as a graph's would be)."""
    cache = graphs.GraphCache(StandIn)
    inputs = [_text(28, 36, seed=s) for s in (3, 4, 5)]
    weights = [torch.randn(28, 36, dtype=torch.float64) for _ in inputs]
    want = [_value_and_grad(u, w, None)[1] for u, w in zip(inputs, weights)]
    leaves = [u.detach().requires_grad_() for u in inputs]
    losses = [(materialize(_hide(u, cache)) * w).sum() for u, w in zip(leaves, weights)]
    got = {}
    for i in (0, 2, 1):
        (got[i],) = torch.autograd.grad(losses[i], leaves[i])
        assert torch.equal(got[i], want[i]), rel(got[i], want[i])
    for i in got:  # a later backward does not overwrite a gradient handed out before
        assert torch.equal(got[i], want[i]), rel(got[i], want[i])


def test_gradient_of_some_outputs_only():
    """Upstream gradients that are None (an output unused) count as zero, as eagerly, also
    after a backward that filled every static gradient buffer."""
    u = _text(30, 20, seed=6)
    cache = graphs.GraphCache(StandIn)
    _value_and_grad(u, torch.randn(30, 20, dtype=torch.float64), cache)  # all three used
    w = torch.randn(30, 20, dtype=torch.float64)  # Z is N x min(N, d) in the masked layout
    grads = []
    for cache_or_none in (cache, None):
        leaf = u.detach().requires_grad_()
        coords = _hide(leaf, cache_or_none).coords  # Z only: B's and ū's gradients are None
        (coords * w).sum().backward()
        grads.append(leaf.grad)
    assert torch.equal(*grads)


def test_one_entry_per_key_and_least_recently_used_dropped():
    cache = graphs.GraphCache(StandIn)
    before = StandIn.captures
    sizes = range(10, 10 + graphs.MAX_ENTRIES + 2)
    for n in sizes:
        _hide(_text(n, 12, seed=n), cache)
    _hide(_text(sizes[-1], 12), cache)  # an entry reused: no capture
    assert len(cache.entries) == graphs.MAX_ENTRIES
    assert StandIn.captures - before == 2 * len(sizes)  # forward + backward each
    shapes = [key[3][0][0] for key in cache.entries]
    assert (10, 12) not in shapes and shapes[-1] == (sizes[-1], 12)
    _hide(_text(20, 12, seed=1).float(), cache)  # the dtype is in the key
    assert StandIn.captures - before == 2 * (len(sizes) + 1)
    _hide(_text(20, 12, seed=1).float(), graphs.GraphCache(StandIn))  # a cache of its own
    hide_factors(_text(20, 12, seed=1).float(), 0.5, ops=TORCH_OPS, graphs=cache)  # so is τ
    assert StandIn.captures - before == 2 * (len(sizes) + 3)
    precision = torch.get_float32_matmul_precision()
    try:  # and the fp32 matmul precision, which a graph fixes when it is captured
        torch.set_float32_matmul_precision("high" if precision == "highest" else "highest")
        _hide(_text(20, 12, seed=1).float(), cache)
    finally:
        torch.set_float32_matmul_precision(precision)
    assert StandIn.captures - before == 2 * (len(sizes) + 4)


def test_failed_capture_warns_once_and_runs_eagerly():
    cache = graphs.GraphCache(FailingRunner)
    u = _text(16, 24, seed=7)
    weight = torch.randn(16, 24, dtype=torch.float64)
    with pytest.warns(UserWarning, match="HiDeStage could not be captured"):
        got = _value_and_grad(u, weight, cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _value_and_grad(u, weight, cache)
    want = _value_and_grad(u, weight, None)
    for g, a, w in zip(got, again, want):
        assert torch.equal(g, w) and torch.equal(a, w)
    assert not cache.entries and len(cache.failed) == 1


def test_eager_under_inference_mode_torch_compile_and_above_the_size_cap(monkeypatch):
    cache = graphs.GraphCache(StandIn)
    u = _text(18, 26, seed=8)
    want = materialize(_hide(u, None))
    with torch.inference_mode():
        assert torch.equal(materialize(_hide(u, cache)), want)
    compiled = torch.compile(lambda t: materialize(_hide(t, cache)), backend="eager",
                             fullgraph=True)
    assert torch.equal(compiled(u), want)
    monkeypatch.setattr(graphs, "MAX_ELEMENTS", u.numel() - 1)
    assert torch.equal(materialize(_hide(u, cache)), want)
    assert not cache.entries
    monkeypatch.setattr(graphs, "MAX_ELEMENTS", u.numel())
    assert torch.equal(materialize(_hide(u, cache)), want)
    assert len(cache.entries) == 1


def test_hide_stays_eager_where_its_capture_route_would_be_slower(monkeypatch):
    """HiDeOps.graphable (the triton backend's: backends._pca_captures_well) keeps HiDe out
    of graphs where its eigensolver while capturing is not the eager one."""
    pytest.importorskip("triton")
    asked = []
    ops = TORCH_OPS._replace(graphable=lambda k, tau: asked.append((k, tau)) or k <= 20)
    cache = graphs.GraphCache(StandIn)
    for n in (18, 26):  # k = min(N, d) = 18 (graphed), then 24 (eager)
        u = _text(n, 24, seed=n)
        assert torch.equal(materialize(_hide(u, cache, ops)), materialize(_hide(u, None, ops)))
    assert asked == [(18, 0.9), (24, 0.9)] and len(cache.entries) == 1

    captures_well = backends._pca_captures_well
    monkeypatch.setattr(backends.ops, "SYM_EIGH_ON_CUDA", False)
    assert captures_well(256, 0.999)  # the Triton solver, eagerly and captured
    assert captures_well(768, 0.9) and captures_well(1024, 0.5)  # subspace iteration
    assert not captures_well(768, 0.95)  # eagerly syevd; captured, the grid reduction
    assert not captures_well(1025, 0.5)  # captured: Jacobi
    monkeypatch.setattr(backends, "SUBSPACE_ITERATION_MAX", 256)
    assert not captures_well(768, 0.9)
    monkeypatch.setattr(backends.ops, "SYM_EIGH_ON_CUDA", True)
    assert captures_well(512, 0.99) and not captures_well(513, 0.99)  # XsyevBatched
    assert backends.triton_hide_ops("cuda").graphable is captures_well
    assert backends.triton_hide_ops("cpu").graphable is None


def test_double_backward_is_refused():
    cache = graphs.GraphCache(StandIn)
    u = _text(14, 22, seed=9).requires_grad_()
    out = materialize(_hide(u, cache)).pow(2).sum()
    with pytest.raises(RuntimeError, match="HiDeStage .* no double backward"):
        torch.autograd.grad(out, u, create_graph=True)


# ---------------------------------------------------------------- the fused dual InfoNCE


def _dual_ce_value_and_grads(rows, cols, offset, eps, cache, seed):
    rows = [[t.detach().requires_grad_() for t in pair] for pair in rows]
    cols = None if cols is None else [[t.detach().requires_grad_() for t in p] for p in cols]
    s = torch.tensor(7.0, dtype=rows[0][0].dtype, requires_grad=True)
    g, c = dual_infonce(rows, cols, s, offset, eps, kernel_dtype=rows[0][0].dtype, fused=True,
                        graphs=cache)
    w = torch.rand(2, generator=torch.Generator().manual_seed(seed), dtype=g.dtype)
    (w[0] * g + w[1] * c).backward()
    leaves = [t for pair in rows + (cols or []) for t in pair] + [s]
    return [g.detach(), c.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("square", [True, False])
def test_dual_infonce_graphed_equals_the_fused_op(triton_device, square):
    """Square (every row against every column) and rectangular (B local rows against N
    gathered columns, label offset), ε = 0.1; values and every gradient bit for bit."""
    if triton_device.type == "cuda":
        pytest.skip("the stand-in runs on CPU tensors (CUDA graphs: the tests below)")
    cache = graphs.GraphCache(StandIn)
    b, n, d, m = (9, 9, 13, 5) if square else (5, 12, 13, 5)
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        v, u = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        ci, ct = torch.randn(n, m, generator=g), torch.randn(n, m, generator=g)
        cols = [[v, u], [ci, ct]]
        rows = cols if square else [[t[n - b:] for t in pair] for pair in cols]
        args = (rows, None if square else cols, 0 if square else n - b, 0.1)
        got = _dual_ce_value_and_grads(*args, cache, seed)
        want = _dual_ce_value_and_grads(*args, None, seed)
        for x, y in zip(got, want):
            assert torch.equal(x, y), rel(x, y)
    (entry,) = cache.entries.values()
    assert entry.backward_runner.replays == 2


def test_molo_on_the_triton_stages_from_graphs(triton_device):
    """The whole loss on the triton backend's implementation with both stages from the
    stand-in's graphs: the same bits as without graphs, and the reference backend's value
    and gradients to float64 precision, over two batches."""
    if triton_device.type == "cuda":
        pytest.skip("the stand-in runs on CPU tensors (CUDA graphs: the tests below)")
    ops = backends.triton_hide_ops("cpu")
    cache = graphs.GraphCache(StandIn)
    graphed, eager = backends.triton_impl(ops, cache), backends.triton_impl(ops)
    loss = himo_fast.MoLo()
    for seed in (10, 11):
        v, u = pairs(40, 24, seed=seed)
        s = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
        results = []
        for impl in (graphed, eager):
            value = loss._loss(impl, v, u, s, None, False)
            results.append([value, *torch.autograd.grad(value, (v, u, s))])
        want = himo_fast.MoLo(backend="reference")(v, u, s)
        want = [want, *torch.autograd.grad(want, (v, u, s))]
        for g, e, w in zip(*results, want):
            assert torch.equal(g, e)
            assert rel(g, w, floor=1e-6) <= 1e-10
    # 40 texts of 24: HiDe as the fused reconstruction (N > d)
    assert {type(key[0]).__name__ for key in cache.entries} == {"HiDeReconstructionStage",
                                                                "FusedDualCE"}


def test_triton_backend_has_graphs_on_cuda_only(monkeypatch):
    """The dispatch: the triton backend's stages get a GraphCache on CUDA (unless
    $HIMO_FAST_GRAPHS=0), none on CPU tensors (the interpreter)."""
    pytest.importorskip("triton")
    seen = {}
    monkeypatch.setattr(backends, "triton_impl",
                        lambda ops, graphs=None: seen.setdefault("graphs", graphs))
    monkeypatch.setattr(backends, "GRAPHS", True)
    backends._build_triton("cuda")
    assert isinstance(seen.pop("graphs"), graphs.GraphCache)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backends._build_triton("cpu")
    assert seen.pop("graphs") is None
    monkeypatch.setattr(backends, "GRAPHS", False)
    backends._build_triton("cuda")
    assert seen.pop("graphs") is None


# ------------------------------------- the CUDA route: CUDA graphs, or the stand-in on the CPU
# The same bodies on a GPU (CUDA graphs, the recipe's sizes, under sync-debug "error") and
# on the CPU (Triton's interpreter running the CUDA route's kernels, the stand-in, small
# sizes), so that a slip in the test itself shows up before a GPU runs it.


def _cuda_route(device, cuda_case, cpu_case):
    """(graph cache, case, HiDe's ops, a call that forbids host syncs) for this device."""
    ops = backends.triton_hide_ops("cuda")
    if device.type == "cuda":
        return graphs.GraphCache(), cuda_case, ops, _no_sync
    n, d = cpu_case[:2]
    if min(n, d) > 64:
        # Subspace iteration (block 96, certified at 500 x 200 in test_subspace_iteration.py)
        # on torch's products, its steps' torch twins and LAPACK: interpreted, the Triton
        # kernels take minutes a call at this size (they have tests of their own); what
        # is tested here is the graphs over this route's saved state (its PartialBasis).
        from himo_fast import subspace_iteration as si
        route = lambda small, tau, gram: si.top_subspace(
            small, tau, gram, torch.linalg.eigh, lambda a, run: torch.linalg.eigh(a), block=96)
        ops = TORCH_OPS._replace(subspace=route)
    return graphs.GraphCache(StandIn), cpu_case, ops, lambda fn: fn()


def _no_sync(fn):
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("case,partial", [
    (((128, 768, torch.float32), (24, 40, torch.float32)), False),
    (((1024, 768, torch.float32), (500, 200, torch.float32)), True),
    (((96, 64, torch.float64), (30, 20, torch.float64)), False)],
    ids=["gram", "subspace_iteration", "float64"])
def test_cuda_route_hide_from_graphs_equals_eager(triton_device, case, partial):
    """The triton backend's HiDe on its CUDA route (the Triton eigensolver; subspace
    iteration on the covariance at 1024 x 768, and on the CPU at 500 x 200) from graphs
    against the same ops eagerly, on new batches; on a GPU the capture itself and every
    replay without a host sync."""
    cache, (n, d, dtype), ops, no_sync = _cuda_route(triton_device, *case)
    warm = _text(n, d, dtype).to(triton_device)
    # eager warm-up: Triton compiles, the solvers' one-off set-up (host copies) is cached
    _value_and_grad(warm, torch.ones_like(warm), None, ops)
    for seed in (1, 2):
        u = _text(n, d, dtype, seed).to(triton_device)
        weight = torch.randn(n, d, dtype=dtype, generator=torch.Generator().manual_seed(seed))
        weight = weight.to(triton_device)
        got = no_sync(lambda: _value_and_grad(u, weight, cache, ops))
        want = _value_and_grad(u, weight, None, ops)
        # Same kernels on the same inputs; cuBLAS may pick another algorithm in a capture.
        for g, w in zip(got, want):
            assert rel(g, w, floor=1e-6) <= 1e-5
    (entry,) = cache.entries.values()
    assert not cache.failed and (entry.constants.partial is not None) == partial


def _rank_step(impl, v, u, s, b, dtype):
    """One rank of the local-loss recipe on one device: its b rows (the last slice) against
    every column, HiDe on its own texts, the others' components stood in by their texts."""
    n = v.shape[0]
    vl, ul = v[n - b:], u[n - b:]
    comp = impl.reconstruction(ul, 0.9).to(dtype)  # b <= d here: the factors (HiDeStage)
    cols = None
    if n > b:
        cols = ((v, u), (v, torch.cat([u[: n - b], comp])))
    g, c = impl.dual_infonce(((vl, ul), (vl, comp)), cols, s, n - b, 0.1)
    return torch.autograd.grad(g + 0.5 * c, (v, u, s)) + (g.detach(), c.detach())


@pytest.mark.parametrize("case", [((128, 1024, 768, torch.bfloat16), (6, 20, 24, torch.float32)),
                                  ((256, 256, 768, torch.float32), (12, 12, 24, torch.float32)),
                                  ((2048, 2048, 256, torch.bfloat16), (40, 40, 24, torch.float32))],
                         ids=["paper_rank", "square", "tall"])
def test_cuda_route_loss_from_graphs_equals_eager(triton_device, case):
    """Both stages of the triton backend from graphs against the same backend without:
    rectangular (the paper's rank) and square, new batches; on a GPU without a host sync."""
    cache, (b, n, d, dtype), ops, no_sync = _cuda_route(triton_device, *case)
    graphed, eager = backends.triton_impl(ops, cache), backends.triton_impl(ops)
    s = torch.tensor(30.0, device=triton_device, requires_grad=True)
    for seed in (0, 1, 2):
        v, u = (t.to(triton_device).requires_grad_()
                for t in pairs(n, d, dtype, seed=seed, requires_grad=False))
        if seed == 0:  # eager warm-up (compiles, one-off set-up), then the captures
            _rank_step(eager, v, u, s, b, dtype)
        got = no_sync(lambda: _rank_step(graphed, v, u, s, b, dtype))
        want = _rank_step(eager, v, u, s, b, dtype)
        tol = 1e-5 if dtype != torch.bfloat16 else 1e-2
        for g, w in zip(got, want):
            assert rel(g, w, floor=1e-6) <= tol
    hide_stage = "HiDeReconstructionStage" if b > d else "HiDeStage"  # tall: N > d, fused
    assert {type(key[0]).__name__ for key in cache.entries} == {hide_stage, "FusedDualCE"}
    assert not cache.failed
