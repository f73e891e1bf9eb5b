"""HiDe replayed from graphs (himo_fast/hide_graph.py) against the eager path.

On the CPU a stand-in runner plays the CUDA graph: its replay re-runs the captured function
and copies the results into the tensors the capture returned, so that, as with a real
graph, every replay overwrites the same static buffers. The buffer, clone and generation
logic is therefore tested here; on a GPU the same tests run with CUDA graphs as well.
"""
import warnings

import pytest
import torch

import himo_fast
from himo_fast import backends, hide_graph
from himo_fast.factors import TORCH_OPS, hide_factors, materialize
from conftest import pairs, rel


def _copy_into(static, new):
    if isinstance(static, torch.Tensor):
        static.copy_(new)
    else:
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


def _hide(u, graphs, ops=TORCH_OPS):
    return hide_factors(u, 0.9, ops=ops, graphs=graphs)


def _value_and_grad(u, weight, graphs, ops=TORCH_OPS):
    """u' of HiDe on u, a fixed linear functional of it and its gradient."""
    u = u.detach().requires_grad_()
    out = materialize(_hide(u, graphs, ops))
    (out * weight).sum().backward()
    return out.detach(), u.grad


def _cases():
    # gram space (N <= d) and covariance space (N > d), float32 and float64
    return [(24, 40, torch.float64), (60, 16, torch.float64), (33, 48, torch.float32)]


@pytest.mark.parametrize("n,d,dtype", _cases())
def test_graphed_equals_eager_bit_for_bit_across_batches(n, d, dtype):
    cache = hide_graph.GraphCache(StandIn)
    for seed in range(3):  # one capture, then replays on new batches (a new m each time)
        u = pairs(n, d, dtype, seed=seed, requires_grad=False)[1]
        weight = torch.randn(n, d, dtype=dtype)
        got = _value_and_grad(u, weight, cache)
        want = _value_and_grad(u, weight, None)
        for g, w in zip(got, want):
            assert torch.equal(g, w), rel(g, w)
    (entry,) = cache.entries.values()
    # capture's own replay (filling the saved state) + one per call
    assert entry.forward_runner.replays == 4 and entry.backward_runner.replays == 3


def test_outputs_are_not_overwritten_by_a_later_call():
    cache = hide_graph.GraphCache(StandIn)
    u1, u2 = (pairs(20, 30, seed=s, requires_grad=False)[1] for s in (1, 2))
    first = _hide(u1, cache)
    kept = [t.clone() for t in first[:3]]
    _hide(u2, cache)
    for t, k in zip(first[:3], kept):
        assert torch.equal(t, k)


def test_backward_of_an_earlier_forward_replays_it_first():
    """Two forwards, then their backwards in either order: each gradient is its own
    input's (the stand-in's saved state is the latest forward's, as a graph's would be)."""
    cache = hide_graph.GraphCache(StandIn)
    inputs = [pairs(28, 36, seed=s, requires_grad=False)[1] for s in (3, 4, 5)]
    weights = [torch.randn(28, 36, dtype=torch.float64) for _ in inputs]
    want = [_value_and_grad(u, w, None)[1] for u, w in zip(inputs, weights)]
    leaves = [u.detach().requires_grad_() for u in inputs]
    losses = [(materialize(_hide(u, cache)) * w).sum() for u, w in zip(leaves, weights)]
    for i in (0, 2, 1):
        losses[i].backward()
        assert torch.equal(leaves[i].grad, want[i]), rel(leaves[i].grad, want[i])


def test_gradient_of_some_factors_only():
    """Upstream gradients that are None (a factor unused) count as zero, as eagerly, also
    after a backward that filled every static gradient buffer."""
    u = pairs(30, 20, seed=6, requires_grad=False)[1]
    cache = hide_graph.GraphCache(StandIn)
    _value_and_grad(u, torch.randn(30, 20, dtype=torch.float64), cache)  # all three used
    w = torch.randn(30, 20, dtype=torch.float64)  # Z is N x min(N, d) in the masked layout
    grads = []
    for graphs in (cache, None):
        leaf = u.detach().requires_grad_()
        coords = _hide(leaf, graphs).coords  # Z only: B's and ū's gradients are None
        (coords * w).sum().backward()
        grads.append(leaf.grad)
    assert torch.equal(*grads)


def test_one_entry_per_key_and_least_recently_used_dropped():
    cache = hide_graph.GraphCache(StandIn)
    before = StandIn.captures
    for n in range(10, 10 + hide_graph.MAX_ENTRIES + 2):
        _hide(pairs(n, 12, seed=n, requires_grad=False)[1], cache)
    _hide(pairs(10 + hide_graph.MAX_ENTRIES + 1, 12, seed=0, requires_grad=False)[1], cache)
    assert len(cache.entries) == hide_graph.MAX_ENTRIES
    assert StandIn.captures - before == 2 * (hide_graph.MAX_ENTRIES + 2)  # forward + backward
    shapes = [key[2] for key in cache.entries]
    assert (10, 12) not in shapes and shapes[-1] == (10 + hide_graph.MAX_ENTRIES + 1, 12)
    _hide(pairs(20, 12, seed=1, requires_grad=False)[1].float(), cache)  # dtype is in the key
    assert StandIn.captures - before == 2 * (hide_graph.MAX_ENTRIES + 3)


def test_failed_capture_warns_once_and_runs_eagerly():
    cache = hide_graph.GraphCache(FailingRunner)
    u = pairs(16, 24, seed=7, requires_grad=False)[1]
    weight = torch.randn(16, 24, dtype=torch.float64)
    with pytest.warns(UserWarning, match="could not be captured"):
        got = _value_and_grad(u, weight, cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _value_and_grad(u, weight, cache)
    want = _value_and_grad(u, weight, None)
    for g, a, w in zip(got, again, want):
        assert torch.equal(g, w) and torch.equal(a, w)
    assert not cache.entries and len(cache.failed) == 1


def test_eager_under_inference_mode_and_torch_compile():
    cache = hide_graph.GraphCache(StandIn)
    u = pairs(18, 26, seed=8, requires_grad=False)[1]
    with torch.inference_mode():
        got = materialize(_hide(u, cache))
    assert not cache.entries
    assert torch.equal(got, materialize(_hide(u, None)))

    compiled = torch.compile(lambda t: materialize(_hide(t, cache)), backend="eager",
                             fullgraph=True)
    assert torch.equal(compiled(u), got)
    assert not cache.entries


def test_double_backward_is_refused():
    cache = hide_graph.GraphCache(StandIn)
    u = pairs(14, 22, seed=9, requires_grad=False)[1].requires_grad_()
    out = materialize(_hide(u, cache)).pow(2).sum()
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out, u, create_graph=True)


def test_molo_with_graphed_hide_equals_the_reference():
    """The whole loss with HiDe from the stand-in's graphs, against the reference
    backend: value and gradients to float64 precision, over two batches."""
    cache = hide_graph.GraphCache(StandIn)
    impl = backends.Impl("graphed", lambda u, tau: hide_factors(u, tau, ops=TORCH_OPS,
                                                                 graphs=cache),
                         backends.reference.dual_infonce_reference)
    for seed in (10, 11):
        v, u = pairs(40, 24, seed=seed)
        s = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
        loss = himo_fast.MoLo()
        got = loss._loss(impl, v, u, s, None, False)
        grads = torch.autograd.grad(got, (v, u, s))
        want = himo_fast.MoLo(backend="reference")(v, u, s)
        want_grads = torch.autograd.grad(want, (v, u, s))
        assert abs(got.item() - want.item()) <= 1e-12 * abs(want.item())
        for g, w in zip(grads, want_grads):
            assert rel(g, w) <= 1e-10
    assert len(cache.entries) == 1


def test_triton_backend_on_cuda_uses_graphs_and_only_there(monkeypatch):
    """The dispatch: the triton backend's HiDe has a GraphCache on CUDA (unless
    $HIMO_FAST_HIDE_GRAPHS=0), none on CPU tensors (the interpreter)."""
    pytest.importorskip("triton")
    captured = {}
    monkeypatch.setattr(backends, "triton_impl",
                        lambda ops, graphs=None: captured.setdefault("graphs", graphs))
    monkeypatch.setattr(backends, "HIDE_GRAPHS", True)
    backends._build_triton("cuda")
    assert isinstance(captured.pop("graphs"), hide_graph.GraphCache)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backends._build_triton("cpu")
    assert captured.pop("graphs") is None
    monkeypatch.setattr(backends, "HIDE_GRAPHS", False)
    backends._build_triton("cuda")
    assert captured.pop("graphs") is None


# ---------------------------------------------------------------- on a GPU: real graphs

@pytest.mark.parametrize("n,d,dtype", [(128, 768, torch.float32), (1024, 768, torch.float32),
                                       (96, 64, torch.float64)])
def test_cuda_graphs_equal_eager_without_host_sync(cuda, n, d, dtype):
    """The triton backend's HiDe from CUDA graphs against the same ops eagerly, on new
    batches; the capture itself and every replay with set_sync_debug_mode("error")."""
    ops = backends.triton_hide_ops("cuda")
    warm = pairs(n, d, dtype, seed=0, requires_grad=False)[1].to(cuda)
    # eager warm-up: Triton compiles, the solvers' one-off set-up (host copies) is cached
    _value_and_grad(warm, torch.ones_like(warm), None, ops)
    torch.cuda.synchronize()
    cache = hide_graph.GraphCache()
    for seed in (1, 2, 3):
        u = pairs(n, d, dtype, seed=seed, requires_grad=False)[1].to(cuda)
        weight = torch.randn(n, d, dtype=dtype, device=cuda)
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = _value_and_grad(u, weight, cache, ops)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        want = _value_and_grad(u, weight, None, ops)
        # Same kernels on the same inputs; cuBLAS may pick another algorithm in a capture.
        for g, w in zip(got, want):
            assert rel(g, w, floor=1e-6) <= 1e-5
    assert len(cache.entries) == 1 and not cache.failed
