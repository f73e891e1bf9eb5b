"""himo_fast.reference against an independent transcription of the authors' code."""
import pytest
import torch

import himo_fast
from himo_fast.reference import component_count, hide_reference
from conftest import loss_rel, pairs, rel
from official import official_hide, official_loss, official_m

TOL = {torch.float64: 1e-8, torch.float32: 2e-4}


def _grads(fn, v, u, s):
    v, u, s = (t.detach().clone().requires_grad_() for t in (v, u, s))
    out = fn(v, u, s)
    total = out[0] + out[1]
    total.backward()
    return [total.detach()] + [t.grad for t in (v, u, s)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,d,tau,lam,eps", [
    (2, 8, 0.9, 1.0, 0.1), (16, 32, 0.9, 1.0, 0.1), (37, 53, 0.5, 0.3, 0.0),
    (64, 24, 0.99, 2.0, 0.2), (33, 33, 0.7, 1.0, 0.1), (128, 96, 0.9, 1.0, 0.1)])
def test_loss_matches_official(dtype, n, d, tau, lam, eps):
    v, u = pairs(n, d, dtype)
    s = torch.tensor(14.0, dtype=dtype, requires_grad=True)
    ours = _grads(lambda a, b, c: list(himo_fast.MoLo(tau=tau, lam=lam, label_smoothing=eps,
                                                       backend="reference")(a, b, c, output_dict=True).values()), v, u, s)
    # Against the authors' loss in float64: their own float32 result is off by up to 2e-4
    # on some inputs (N=128, d=96, seed 42: 2.1e-4 against float64; ours 6.7e-6).
    ref = _grads(lambda a, b, c: official_loss(a, b, c, tau=tau, lam=lam, eps=eps),
                 v.double(), u.double(), s.double())
    assert loss_rel(ours[0], ref[0]) <= TOL[dtype]
    for a, b in zip(ours[1:], ref[1:]):
        assert torch.isfinite(a).all()
        assert rel(a, b) <= TOL[dtype]


@pytest.mark.parametrize("n,d", [(12, 40), (40, 12), (17, 17)])
@pytest.mark.parametrize("tau", [0.5, 0.9, 0.99])
def test_hide_matches_official_and_m(n, d, tau):
    _, u = pairs(n, d, requires_grad=False)
    assert rel(hide_reference(u, tau), official_hide(u, tau)) <= 1e-10
    assert int(component_count(u, tau)) == official_m(u, tau)


@pytest.mark.parametrize("n,d", [(6, 9), (9, 5)])
def test_gradcheck_hide_and_molo(n, d):
    v, u = pairs(n, d)
    s = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: hide_reference(x, 0.8), (u,))
    loss = himo_fast.MoLo(tau=0.8, backend="reference")
    assert torch.autograd.gradcheck(lambda a, b, c: loss(a, b, c), (v, u, s))


def _degenerate_batches():
    _, u = pairs(8, 16, requires_grad=False)
    v, _ = pairs(8, 16, requires_grad=False)
    one = torch.nn.functional.normalize(torch.randn(1, 16, dtype=torch.float64), dim=-1)
    same = one.expand(8, 16).clone()
    dup = torch.cat([u[:4], u[:4]])
    direction = torch.nn.functional.normalize(torch.randn(2, 16, dtype=torch.float64), dim=-1)
    rank_one = torch.nn.functional.normalize(direction[0] + torch.linspace(-1, 1, 8, dtype=torch.float64)[:, None] * direction[1], dim=-1)
    return {
        "one_pair": (v[:1], one, 0.9),
        "identical_captions": (v, same, 0.9),
        "duplicated_pairs": (torch.cat([v[:4], v[:4]]), dup, 0.9),
        "tau_one": (v, u, 1.0),
        "rank_one": (v, rank_one, 0.9),
    }


@pytest.mark.parametrize("name", list(_degenerate_batches()))
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_degenerate_batches_finite_and_official_value(name, backend):
    if backend not in himo_fast.available_backends("cpu"):
        pytest.skip(f"{backend} not available on CPU tensors here")
    v, u, tau = _degenerate_batches()[name]
    v, u = v.clone().requires_grad_(), u.clone().requires_grad_()
    s = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    out = himo_fast.MoLo(tau=tau, backend=backend)(v, u, s)
    out.backward()
    with torch.no_grad():
        expected = sum(official_loss(v, u, s, tau=tau))
    assert loss_rel(out, expected) <= 1e-8
    for t in (v, u, s):
        assert torch.isfinite(t.grad).all(), name


def test_tau_one_reconstructs_exactly_with_identity_gradient():
    _, u = pairs(10, 30)
    out = hide_reference(u, 1.0)
    assert rel(out, u) <= 1e-10
    w = torch.randn_like(u)
    (out * w).sum().backward()
    assert rel(u.grad, w) <= 1e-8


def test_official_svd_gradient_is_nan_where_ours_is_finite():
    # Documents why the exact subspace gradient exists: identical captions break SVD.
    u = torch.nn.functional.normalize(torch.randn(1, 8, dtype=torch.float64), dim=-1).expand(4, 8).clone().requires_grad_()
    official_hide(u, 0.9).sum().backward()
    assert not torch.isfinite(u.grad).all()
    u2 = u.detach().clone().requires_grad_()
    (hide_reference(u2, 0.9) * torch.randn(4, 8, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(u2.grad).all()


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_nan_features_never_give_a_finite_loss(backend):
    if backend not in himo_fast.available_backends("cpu"):
        pytest.skip(f"{backend} not available on CPU tensors here")
    v, u = pairs(8, 16, torch.float32, requires_grad=False)
    for target in (v, u):
        bad = target.clone()
        bad[3, 2] = float("nan")
        args = (bad, u) if target is v else (v, bad)
        out = himo_fast.MoLo(backend=backend)(*args, torch.tensor(10.0))
        assert not torch.isfinite(out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_within_2e_2(dtype):
    v, u = pairs(32, 48, torch.float64, requires_grad=False)
    s = torch.tensor(14.0)
    ref = sum(official_loss(v, u, s.double()))
    ours = himo_fast.MoLo(backend="reference")(v.to(dtype), u.to(dtype), s)
    assert ours.dtype == torch.float32
    assert loss_rel(ours, ref) <= 2e-2


@pytest.mark.parametrize("n,d", [(7, 13), (13, 7), (9, 9)])
def test_factors_sliced_equal_masked(n, d):
    """The exact-size factors (CPU backend) and the fixed-size masked ones (no sync) give
    the same reconstruction and gradient; gradcheck through both consumers. (Z and B alone
    depend on the choice of basis inside the subspace; only Z Bᵀ is a function of u.)"""
    from himo_fast.factors import hide_factors, materialize, component_image, component_text
    v, u = pairs(n, d)
    w = torch.randn(n, d, dtype=torch.float64)
    out = {}
    for sliced in (True, False):
        u.grad = None
        f = hide_factors(u, 0.8, sliced=sliced)
        assert f.basis.shape[1] == (int(component_count(u, 0.8)) if sliced else min(n, d))
        # the factored similarity equals the materialised one
        sim = component_image(f, v) @ component_text(f).T
        assert rel(sim, v @ materialize(f).T) <= 1e-12
        ((materialize(f) * w).sum() + sim.sum()).backward()
        out[sliced] = (materialize(f).detach(), u.grad.clone())
        def consumers(x, y):
            f = hide_factors(x, 0.8, sliced=sliced)
            return materialize(f), component_image(f, y) @ component_text(f).T
        assert torch.autograd.gradcheck(consumers, (u, v))
    assert rel(out[True][0], out[False][0]) <= 1e-12
    assert rel(out[True][1], out[False][1]) <= 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_row_blocks_give_the_unblocked_values_and_gradient(monkeypatch, dtype):
    """The covariance and the backward's products over N go by row blocks in float64
    (bounded memory at large N): 37 rows of width 7 in blocks of 5 (the last of 2) give
    what one block gives, to float64 rounding, for both layouts; gradcheck through them."""
    from himo_fast import pca
    from himo_fast.factors import hide_factors, materialize, component_image, component_text
    assert [(r.start, r.stop) for r in pca.row_blocks(12, 7)] == [(0, 12)]
    monkeypatch.setattr(pca, "PCA_BLOCK_ELEMENTS", 35)
    assert [(r.start, r.stop) for r in pca.row_blocks(12, 7)] == [(0, 5), (5, 10), (10, 12)]
    v, u = pairs(37, 7)
    v, u = (t.detach().to(dtype).requires_grad_() for t in (v, u))
    w = torch.randn(37, 7, dtype=dtype)

    def run(sliced):
        u.grad = v.grad = None
        f = hide_factors(u, 0.8, sliced=sliced)
        loss = (materialize(f) * w).sum() + (component_image(f, v) @ component_text(f).T).sum()
        loss.backward()
        return loss.detach(), u.grad.clone(), v.grad.clone()

    for sliced in (True, False):
        blocked = run(sliced)
        monkeypatch.setattr(pca, "PCA_BLOCK_ELEMENTS", 1 << 22)
        whole = run(sliced)
        monkeypatch.setattr(pca, "PCA_BLOCK_ELEMENTS", 35)
        for a, b in zip(blocked, whole):
            assert a.dtype == dtype and rel(a, b) <= (1e-12 if dtype == torch.float64 else 1e-6)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda x: materialize(hide_factors(x, 0.8)), (u,))


def test_hide_memory_at_n_262144_is_a_few_fp32_copies():
    """HiDe forward + backward at N=262144, d=768 (float32, masked factors) on meta
    tensors: what it holds beyond its input is X̂ (saved; Z is X̂ itself), the incoming
    gradient of Z and the outgoing one of u, one N x d float32 each (768 MiB), plus
    float64 row blocks. Whole float64 copies of the batch (1.5 GiB each) and Z = X̂V with V
    d wide took it to 13 GiB before 2026-12-07."""
    from conftest import LiveStorage
    from himo_fast.factors import hide_factors
    n, d = 262144, 768
    u = torch.empty(n, d, device="meta").requires_grad_()
    with LiveStorage() as live:
        f = hide_factors(u, 0.9)
        torch.autograd.backward([f.coords, f.basis], [torch.empty_like(f.coords), torch.empty_like(f.basis)])
    copy = n * d * 4
    print(f"peak {live.peak / 2**20:.0f} MiB = {live.peak / copy:.2f} N x d float32 copies")
    assert 3 * copy < live.peak < 3 * copy + 320 * 2**20  # blocks: 8 of 32 MiB at most


def _weighted(fn, text, w):
    """fn(text) and ∂(Σ w·fn(text))/∂text, fresh."""
    t = text.detach().clone().requires_grad_()
    out = fn(t)
    (out * w.to(out.dtype)).sum().backward()
    return out.detach(), t.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d,tau,block", [(37, 7, 0.8, 35), (37, 7, 1.0, 35), (130, 129, 0.9, 0),
                                           (1000, 24, 0.5, 4000)])
def test_fused_reconstruction_equals_the_factors_route(monkeypatch, dtype, n, d, tau, block):
    """hide_reconstruction = materialize(hide_factors(·)) for N > d: u' bit for bit (the
    same forward), the gradient to rounding, over several row blocks (block: elements a
    block) or one, with X̂'s rows recomputed from the texts in the backward."""
    from himo_fast import pca
    from himo_fast.factors import hide_factors, hide_reconstruction, materialize
    if block:
        monkeypatch.setattr(pca, "PCA_BLOCK_ELEMENTS", block)
    _, u = pairs(n, d)
    u = u.detach().clone()
    u[:, :3] *= 4  # a few strong directions
    u = u.to(dtype)
    w = torch.randn(n, d, dtype=torch.float64)
    fused = _weighted(lambda t: hide_reconstruction(t, tau), u, w)
    route = _weighted(lambda t: materialize(hide_factors(t, tau)), u, w)
    assert fused[1].dtype == dtype and fused[0].dtype == route[0].dtype
    assert torch.equal(fused[0], route[0])
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-3}[dtype]
    assert 0 < rel(fused[1], route[1]) <= tol or torch.equal(fused[1], route[1])
    if dtype == torch.bfloat16:  # u' asked in the texts' dtype, as the loss asks for it
        narrow = _weighted(lambda t: hide_reconstruction(t, tau, dtype=dtype), u, w)
        cast = _weighted(lambda t: materialize(hide_factors(t, tau)).to(dtype), u, w)
        assert narrow[0].dtype == dtype and torch.equal(narrow[0], cast[0])
        assert 0 < rel(narrow[1], cast[1]) <= tol or torch.equal(narrow[1], cast[1])
    if dtype == torch.float64:  # and the reference twin, gradient of any order
        ref = _weighted(lambda t: hide_reference(t, tau), u, w)
        assert rel(fused[0], ref[0]) <= 1e-12 and rel(fused[1], ref[1]) <= 1e-10


def test_fused_reconstruction_gradcheck_degenerate_and_errors(monkeypatch):
    from himo_fast import pca
    from himo_fast.factors import hide_factors, hide_reconstruction, materialize
    monkeypatch.setattr(pca, "PCA_BLOCK_ELEMENTS", 40)  # 23 rows of 6: blocks of 6 rows
    _, u = pairs(23, 6)
    assert torch.autograd.gradcheck(lambda t: hide_reconstruction(t, 0.8), (u.detach().requires_grad_(),))
    # identical captions (X̂ = 0) and a rank-one batch: finite, the factors route's values
    same = torch.randn(1, 6, dtype=torch.float64).expand(23, 6).contiguous()
    rank_one = torch.randn(23, 1, dtype=torch.float64) * torch.randn(1, 6, dtype=torch.float64)
    w = torch.randn(23, 6, dtype=torch.float64)
    for text in (same, rank_one):
        fused = _weighted(lambda t: hide_reconstruction(t, 0.9), text, w)
        route = _weighted(lambda t: materialize(hide_factors(t, 0.9)), text, w)
        assert all(torch.isfinite(x).all() for x in fused)
        assert torch.equal(fused[0], route[0]) and rel(fused[1], route[1]) <= 1e-12
    with pytest.raises(ValueError, match="for N > d .*got N=6, d=6"):
        hide_reconstruction(torch.randn(6, 6), 0.9)
    t = u.detach().requires_grad_()
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(hide_reconstruction(t, 0.9).pow(2).sum(), t, create_graph=True)


RECONSTRUCTION_MEMORY_PROBE = """
import sys, torch
from himo_fast.factors import hide_factors, hide_reconstruction, materialize
n, d = 65536, 768
fn = {"factors": lambda t: materialize(hide_factors(t, 0.9)),
      "fused": lambda t: hide_reconstruction(t, 0.9)}[sys.argv[1]]
t = torch.randn(n, d, device="cuda").to(torch.bfloat16).requires_grad_()
w = torch.randn(n, d, device="cuda")
for _ in range(2):  # the first call warms cuSOLVER and cuBLAS up
    t.grad = None
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(t)
    kept = torch.cuda.memory_allocated() - base - out.numel() * 4
    (out * w).sum().backward(); del out; torch.cuda.synchronize()
print(kept, torch.cuda.max_memory_allocated() - base)
"""


def test_cuda_fused_reconstruction_holds_less(cuda):
    """On the allocator, N=65536, d=768, bf16 texts: what HiDe keeps from its forward for
    its backward (beyond u') and the forward+backward peak, fused against the factors'
    route. Counted on meta tensors (LiveStorage): kept 2.1 → 1.1 N x d fp32 copies (X̂ as
    Z and as saved state, against ū and the texts the caller holds), peak 5.6 → 3.1."""
    from conftest import assert_ran, run_fresh
    copy = 65536 * 768 * 4
    seen = {}
    for route in ("factors", "fused"):
        seen[route] = [int(x) / copy for x in assert_ran(run_fresh(RECONSTRUCTION_MEMORY_PROBE, route)).split()[-2:]]
    print(seen)
    (kept_f, peak_f), (kept_u, peak_u) = seen["factors"], seen["fused"]
    assert kept_u < 0.3 and kept_f > 0.9 and peak_u < peak_f - 1.5, seen


def test_fused_reconstruction_compiled_equals_eager():
    """torch.compile(fullgraph) traces the fused reconstruction's autograd function (on
    torch 2.11 too: tests/test_gpu_machine_stack.py)."""
    from himo_fast.factors import hide_reconstruction
    _, u = pairs(24, 16)
    w = torch.randn(24, 16, dtype=torch.float64)
    fn = lambda t: (hide_reconstruction(t, 0.9) * w).sum()
    eager = _weighted(lambda t: hide_reconstruction(t, 0.9), u, w)
    compiled = _weighted(torch.compile(lambda t: hide_reconstruction(t, 0.9), fullgraph=True), u, w)
    assert fn(u).isfinite()
    for a, b in zip(eager, compiled):
        assert rel(a, b) <= 1e-12
    # u' asked narrow (bf16 texts), as the loss asks for it
    u16 = u.detach().to(torch.bfloat16)
    narrow = lambda t: hide_reconstruction(t, 0.9, dtype=torch.bfloat16)
    eager = _weighted(narrow, u16, w)
    compiled = _weighted(torch.compile(narrow, fullgraph=True), u16, w)
    for a, b in zip(eager, compiled):
        assert a.dtype == b.dtype == torch.bfloat16 and rel(a.float(), b.float()) <= 4e-3


@pytest.mark.parametrize("n,d", [(24, 16), (12, 20)])  # covariance, Gram
def test_factors_compiled_equal_eager(n, d):
    """torch.compile(fullgraph) traces HiDe's autograd function: same values and gradient.
    torch 2.11's dynamo (the GPU machine's; tests/test_gpu_machine_stack.py) dropped the
    gradient of an output that was also a saved tensor: B (covariance) or Z (Gram)."""
    from himo_fast.factors import hide_factors, materialize, component_image, component_text
    v, u = pairs(n, d)
    w = torch.randn(n, d, dtype=torch.float64)

    def consumers(x, y):
        f = hide_factors(x, 0.9)
        return (materialize(f) * w).sum() + (component_image(f, y) @ component_text(f).T).sum()

    out = []
    for fn in (consumers, torch.compile(consumers, fullgraph=True)):
        u.grad = v.grad = None
        loss = fn(u, v)
        loss.backward()
        out.append((loss.detach(), u.grad.clone(), v.grad.clone()))
    for a, b in zip(*out):
        assert rel(a, b) <= 1e-10
