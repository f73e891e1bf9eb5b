"""The partial eigensolver (himo_fast/subspace_iteration.py) and HiDe through it
(pca.principal_subspace(partial=True)) against exact float64 eigendecompositions:
the eigenpairs, the chosen m, the reconstruction, the gradient with its complement term,
the fallbacks (isotropic spectrum, degenerate batch) and the warm start."""
import pytest
import torch

from himo_fast import pca
from himo_fast.factors import hide_factors, materialize
from himo_fast.reference import component_count, hide_reference
from himo_fast.subspace_iteration import deflated_resolvent, start_block, top_eigenpairs
from conftest import pairs, rel


@pytest.fixture(autouse=True)
def small_sides_too(monkeypatch):
    # The partial path is tested on small sides (fast); in use it starts at 256.
    monkeypatch.setattr(pca, "PARTIAL_MIN_SIZE", 0)


def _small_matrix(n, d, dtype, decay=True):
    _, u = pairs(n, d, dtype, decay=decay, requires_grad=False)
    x = u - u.mean(0)
    return x, pca.gram_or_cov(x, n <= d)


def _exact(a):
    lam, vec = torch.linalg.eigh(a.double())
    return lam.flip(0), vec.flip(1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
@pytest.mark.parametrize("n,d", [(301, 200), (150, 257)])  # covariance side, Gram side
def test_top_eigenpairs_span_the_exact_top_subspace(dtype, tol, n, d):
    _, a = _small_matrix(n, d, dtype)
    lam, vec = _exact(a)
    total = a.diagonal().sum()
    cut = lambda theta: int(pca.cutoff_from_eigvals(theta, 0.8, total)[0])
    m = int(pca.cutoff_from_eigvals(lam, 0.8)[0])
    r = 2 * m + 16
    theta, block, ratio = top_eigenpairs(a, r, cut, 0.7, start=start_block(a.shape[0], r, a))
    assert theta.shape == (r,) and block.shape == (a.shape[0], r)
    assert (theta[:-1] >= theta[1:]).all() and 0 < ratio <= 0.7
    assert cut(theta) == m
    assert rel(theta[:m], lam[:m]) <= tol
    p_exact = vec[:, :m] @ vec[:, :m].T
    p_ours = block[:, :m].double() @ block[:, :m].double().T
    assert rel(p_ours, p_exact) <= tol
    assert rel(block.T @ block, torch.eye(r, dtype=dtype)) <= 10 * torch.finfo(dtype).eps * r


def test_top_eigenpairs_refuses_a_block_without_the_cutoff():
    _, a = _small_matrix(301, 200, torch.float64, decay=False)  # m ≈ 3/4 of the space
    cut = lambda theta: int(pca.cutoff_from_eigvals(theta, 0.9, a.diagonal().sum())[0])
    assert top_eigenpairs(a, 40, cut, 0.7, start=start_block(200, 40, a)) is None


@pytest.mark.parametrize("exact_deflation", [True, False], ids=["ritz-exact", "ritz-rough"])
def test_deflated_resolvent_equals_the_eigen_sum(exact_deflation):
    torch.manual_seed(0)
    k, r, m = 90, 30, 12
    vec = torch.linalg.qr(torch.randn(k, k, dtype=torch.float64))[0]
    lam = torch.linspace(5.0, 0.0, k, dtype=torch.float64) ** 2  # distinct, one zero
    a = vec @ torch.diag(lam) @ vec.T
    defl = vec[:, m:r]
    if not exact_deflation:  # Ritz vectors of a subspace that is off by 1e-2
        rough = torch.linalg.qr(defl + 1e-2 * torch.randn(k, r - m, dtype=torch.float64))[0]
        rough = rough - vec[:, :m] @ (vec[:, :m].T @ rough)
        rough = torch.linalg.qr(rough)[0]
        theta, w = torch.linalg.eigh(rough.T @ a @ rough)
        defl, values = rough @ w, theta
    else:
        values = lam[m:r]
    rhs = torch.randn(k, m, dtype=torch.float64)
    floor = torch.tensor(1e-12, dtype=torch.float64)
    ours = deflated_resolvent(a, vec[:, :m], lam[:m], defl, values, rhs,
                              float(lam[r] / lam[m - 1]), floor)
    rest = vec[:, m:]
    want = torch.stack([rest @ ((rest.T @ rhs[:, i]) / (lam[i] - lam[m:])) for i in range(m)], 1)
    assert rel(ours, want) <= 1e-10
    zero = deflated_resolvent(a, vec[:, :m], lam[:m], defl, values, torch.zeros_like(rhs), 0.5, floor)
    assert torch.equal(zero, torch.zeros_like(rhs))


# (N, d) with a small side large enough for a partial block (2r < k); N > d and N < d.
SHAPES = [(301, 200), (150, 257)]


@pytest.mark.parametrize("tau", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("n,d", SHAPES)
def test_partial_path_gives_the_exact_m_and_reconstruction(tau, n, d):
    u = pairs(n, d, torch.float32, requires_grad=False)[1]
    sub = pca.principal_subspace(u - u.mean(0), tau, partial=True)
    m_exact = int(component_count(u.double(), tau))
    ours = hide_factors(u, tau, sliced=True, partial=True)
    assert rel(materialize(ours), hide_reference(u.double(), tau)) <= 1e-4
    assert ours.coords.shape[1] == m_exact
    if tau < 0.99:  # at 0.99 the cutoff is too deep for a block under half the space
        assert sub.complement is not None and sub.basis.shape[1] < min(n, d) // 2


@pytest.mark.parametrize("sliced", [True, False], ids=["sliced", "masked"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.float64, 1e-8)])
@pytest.mark.parametrize("n,d", SHAPES)
def test_partial_gradient_equals_the_exact_one(dtype, tol, n, d, sliced):
    u = pairs(n, d, dtype)[1]
    u64 = u.detach().double().requires_grad_()
    upstream = torch.randn(n, d, dtype=torch.float64)
    x = u.detach() - u.detach().mean(0)
    assert pca.principal_subspace(x, 0.9, partial=True).complement is not None
    (materialize(hide_factors(u, 0.9, sliced=sliced, partial=True)) * upstream.to(dtype)).sum().backward()
    (materialize(hide_factors(u64, 0.9, sliced=True)) * upstream).sum().backward()
    assert torch.isfinite(u.grad).all()
    assert rel(u.grad, u64.grad) <= tol


def test_float64_gradcheck_through_the_partial_path():
    u = pairs(90, 80, torch.float64)[1]
    x = u.detach() - u.detach().mean(0)
    assert pca.principal_subspace(x, 0.5, partial=True).complement is not None
    fn = lambda t: materialize(hide_factors(t, 0.5, sliced=True, partial=True))
    assert torch.autograd.gradcheck(fn, (u,), fast_mode=True)


def test_small_sides_are_decomposed_in_full(monkeypatch):
    monkeypatch.setattr(pca, "PARTIAL_MIN_SIZE", 256)
    x, _ = _small_matrix(301, 200, torch.float32)
    sub = pca.principal_subspace(x, 0.5, partial=True)
    assert sub.complement is None and sub.basis.shape == (200, 200)


def test_isotropic_spectrum_falls_back_to_the_full_decomposition():
    x, _ = _small_matrix(301, 200, torch.float32, decay=False)
    sub = pca.principal_subspace(x, 0.9, partial=True)
    assert sub.complement is None and sub.basis.shape == (200, 200)  # m ≈ 150: no block pays
    lam, _ = _exact(pca.gram_or_cov(x, False))
    assert int(sub.m) == int(pca.cutoff_from_eigvals(lam, 0.9)[0])


def test_degenerate_batch_is_exact_and_finite():
    base = torch.nn.functional.normalize(torch.randn(1, 300), dim=-1)
    u = (base.expand(200, 300) + 1e-9 * torch.randn(200, 300)).clone().requires_grad_()
    out = materialize(hide_factors(u, 0.9, sliced=True, partial=True))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(u.grad).all()
    assert rel(out, hide_reference(u.detach().double(), 0.9)) <= 1e-4


def test_warm_start_from_a_previous_basis_gives_the_same_subspace():
    x, a = _small_matrix(301, 200, torch.float32)
    cold = pca.principal_subspace(x, 0.9, partial=True)
    x2, _ = _small_matrix(301, 200, torch.float32)  # the next batch
    warm = pca.principal_subspace(x2, 0.9, partial=True, warm=cold.basis)
    fresh = pca.principal_subspace(x2, 0.9, partial=False)
    assert int(warm.m) == int(fresh.m)
    m = int(warm.m)
    p_warm = warm.basis[:, :m].double() @ warm.basis[:, :m].double().T
    p_fresh = fresh.basis[:, :m].double() @ fresh.basis[:, :m].double().T
    assert rel(p_warm, p_fresh) <= 1e-4
