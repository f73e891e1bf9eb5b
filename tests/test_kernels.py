"""Each Triton kernel of himo_fast.kernels against its PyTorch twin: fresh random inputs,
odd sizes, every input dtype, forward and backward. On CPU tensors under the interpreter
here (conftest sets TRITON_INTERPRET=1 without a GPU), compiled on a GPU."""
import pytest
import torch

from conftest import rel

SIZES = [(1, 5), (37, 53), (70, 33), (64, 64)]  # N < d, N > d, square, one row
IN_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


def _fresh(shape, dtype, device):
    return torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d", SIZES)
def test_centre_and_gram_or_cov(triton_device, dtype, n, d):
    from himo_fast.kernels import centre, gram_or_cov
    u = _fresh((n, d), dtype, triton_device) + 0.7  # an offset mean, as CLIP's cone
    mean, x = centre(u)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == acc and x.dtype == acc and mean.shape == (1, d)
    u64 = u.double().cpu()  # the twin in float64 on the same (rounded) inputs
    assert rel(mean.cpu(), u64.mean(0, keepdim=True)) <= IN_TOL[dtype]
    x64 = u64 - u64.mean(0, keepdim=True)
    assert (x.cpu().double() - x64).abs().max() <= 8 * IN_TOL[dtype]
    for gram in (True, False):
        small = gram_or_cov(x, gram)
        want = x.double().cpu() @ x.double().cpu().T if gram else x.double().cpu().T @ x.double().cpu()
        assert small.shape == want.shape and torch.equal(small, small.T)
        assert rel(small.cpu(), want, floor=1e-30) <= IN_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (37, 53, 20), (70, 33, 41)])
def test_matmul_bias_and_transposed_views(triton_device, dtype, m, k, n):
    from himo_fast.kernels import matmul_bias
    a = _fresh((k, m), dtype, triton_device).T  # a transposed view: strides honoured
    b = _fresh((k, n), dtype, triton_device)
    bias = _fresh((n,), dtype, triton_device)
    out = matmul_bias(a, b, bias)
    want = a.double() @ b.double() + bias.double()
    assert rel(out.double(), want, floor=1e-30) <= IN_TOL[dtype]
    assert rel(matmul_bias(a, b).double(), a.double() @ b.double(), floor=1e-30) <= IN_TOL[dtype]


def test_product_backward_and_gradcheck(triton_device):
    from himo_fast.kernels import product
    a = _fresh((9, 7), torch.float64, triton_device).requires_grad_()
    b = _fresh((11, 7), torch.float64, triton_device).T.requires_grad_()  # (7, 11) view
    bias = _fresh((1, 11), torch.float64, triton_device).requires_grad_()
    assert torch.autograd.gradcheck(product, (a, b, bias))
    assert torch.autograd.gradcheck(lambda x, y: product(x, y), (a, b))


def test_bad_arguments_are_refused(triton_device):
    from himo_fast.kernels import centre, matmul_bias
    with pytest.raises(ValueError, match="2-D"):
        centre(torch.randn(3, device=triton_device))
    with pytest.raises(TypeError, match="int64"):
        centre(torch.ones(3, 4, dtype=torch.int64, device=triton_device))
    with pytest.raises(ValueError, match="inner dimensions"):
        matmul_bias(torch.randn(3, 4, device=triton_device), torch.randn(5, 2, device=triton_device))
    with pytest.raises(ValueError, match="bias must have 2"):
        matmul_bias(torch.randn(3, 4, device=triton_device), torch.randn(4, 2, device=triton_device),
                    bias=torch.ones(3, device=triton_device))


def _spectrum_matrix(k, kind, seed):
    """Symmetric test matrices: PSD with a decaying spectrum (HiDe's), indefinite, and the
    degenerate ones (zero, identity: every eigenvalue repeated, rank one); with a given
    spectrum in a random basis: clustered (a third of the eigenvalues within 1e-13 of each
    other, a third 1e-9 apart), a chain (consecutive gaps 5e-4, under the solver's cluster
    threshold, spanning 1/3 of the norm) with a null space, and a spectrum over 20 decades."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k + 3, k, dtype=torch.float64, generator=g)
    spectra = {
        "clustered": lambda i: torch.where(i < k // 3, 1 + 1e-13 * i,
                                           torch.where(i < 2 * k // 3, 2 + 1e-9 * i, 3 + i)),
        "chain": lambda i: torch.where(i < k // 2, 0.0, 1 + 5e-4 * i * 1000 / (3 * k)),
        "twenty decades": lambda i: 10.0 ** (-20 * i / max(k - 1, 1)),
    }
    if kind in spectra:
        basis = torch.linalg.qr(x[:k])[0]
        return basis * spectra[kind](torch.arange(k, dtype=torch.float64)) @ basis.T
    if kind == "decaying":
        y = x * torch.arange(1, k + 1, dtype=torch.float64) ** -0.8
        return y.T @ y
    if kind == "indefinite":
        return x[:k] + x[:k].T
    if kind == "rank one":
        return x[:1].T @ x[:1]
    return torch.zeros(k, k, dtype=torch.float64) if kind == "zero" else torch.eye(k, dtype=torch.float64)


# Few and small: under the interpreter each of the (k-1)·SWEEPS launches costs ≈ 0.1 s.
JACOBI_CASES = [(1, "decaying", torch.float32), (7, "decaying", torch.float64),
                (10, "decaying", torch.float32), (5, "indefinite", torch.float64),
                (6, "rank one", torch.float32), (3, "zero", torch.float32),
                (4, "identity", torch.float64)]


@pytest.mark.parametrize("k,kind,dtype", JACOBI_CASES)
def test_jacobi_eigh_matches_eigh(triton_device, k, kind, dtype):
    from himo_fast.kernels.eigh import jacobi_eigh
    a64 = _spectrum_matrix(k, kind, seed=k)
    a = a64.to(triton_device, dtype)
    a64 = a.double().cpu()  # the twin on the same (rounded) input
    w, v = jacobi_eigh(a)
    assert w.dtype == v.dtype == dtype and w.shape == (k,) and v.shape == (k, k)
    w, v = w.double().cpu(), v.double().cpu()
    tol = 1e-13 if dtype == torch.float64 else 1e-6  # float64 inside: float32 only rounds the output
    scale = max(a64.norm().item(), 1e-30)
    assert torch.isfinite(w).all() and torch.isfinite(v).all()
    assert (w - torch.linalg.eigvalsh(a64)).norm() / scale <= tol  # ascending, as eigh
    assert (a64 @ v - v * w).norm() / scale <= 10 * tol
    assert (v.T @ v - torch.eye(k, dtype=torch.float64)).abs().max() <= 10 * tol


def test_jacobi_eigh_sweeps_are_what_converges_it(triton_device):
    """One sweep leaves an odd-size matrix visibly undiagonalised; the default converges."""
    from himo_fast.kernels.eigh import SWEEPS, jacobi_eigh
    a = _spectrum_matrix(9, "indefinite", seed=1).to(triton_device)
    want = torch.linalg.eigvalsh(a.cpu())
    err = {s: ((jacobi_eigh(a, sweeps=s)[0].cpu() - want).norm() / want.norm()).item()
           for s in (1, SWEEPS)}
    assert err[1] > 1e-4 and err[SWEEPS] <= 1e-13, err


def test_jacobi_eigh_refuses_bad_input(triton_device):
    from himo_fast.kernels.eigh import jacobi_eigh
    with pytest.raises(ValueError, match=r"square matrix, got shape \(3, 4\)"):
        jacobi_eigh(torch.randn(3, 4, device=triton_device))
    with pytest.raises(TypeError, match="float32 or float64, got torch.float16"):
        jacobi_eigh(torch.randn(3, 3, device=triton_device).half())
    with pytest.raises(ValueError, match="sweeps must be a non-negative int, got -1"):
        jacobi_eigh(torch.eye(3, device=triton_device), sweeps=-1)


# Under the interpreter a launch of the one-program kernels costs ≈ 0.02-0.1 s a row of n:
# n <= 40 here, and one 100 x 100 case for the register-resident reduction at its size.
TRIDIAGONAL_CASES = [(1, "decaying", torch.float64, None), (2, "indefinite", torch.float32, None),
                     (17, "decaying", torch.float64, None), (24, "indefinite", torch.float64, "program"),
                     (30, "clustered", torch.float64, None), (33, "clustered", torch.float64, "grid"),
                     (36, "chain", torch.float64, None), (31, "twenty decades", torch.float64, "grid"),
                     (20, "rank one", torch.float32, "program"), (16, "zero", torch.float64, None),
                     (19, "identity", torch.float64, "grid"), (100, "decaying", torch.float64, None)]


@pytest.mark.parametrize("k,kind,dtype,reduction", TRIDIAGONAL_CASES)
def test_tridiagonal_eigh_matches_eigh(triton_device, k, kind, dtype, reduction):
    """Eigenvalues, residual and orthogonality at float64 working precision against LAPACK,
    with each reduction (registers, one program's tiles, the grid's), on the spectra where
    inverse iteration is fragile: repeated and clustered eigenvalues, null spaces, 20
    decades of range."""
    from himo_fast.kernels.eigh import tridiagonal_eigh
    a = _spectrum_matrix(k, kind, seed=k).to(triton_device, dtype)
    a64 = a.double().cpu()
    w, v = tridiagonal_eigh(a, reduction=reduction)
    assert w.dtype == v.dtype == dtype and w.shape == (k,) and v.shape == (k, k)
    w, v = w.double().cpu(), v.double().cpu()
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    scale = max(a64.norm().item(), 1e-30)
    assert torch.isfinite(w).all() and torch.isfinite(v).all()
    assert (w - torch.linalg.eigvalsh(a64)).norm() / scale <= tol
    assert (a64 @ v - v * w).norm() / scale <= 10 * tol
    assert (v.T @ v - torch.eye(k, dtype=torch.float64)).abs().max() <= 10 * tol


@pytest.mark.parametrize("k", [128, 200, 256, 768])
def test_tridiagonal_eigh_at_hides_sizes_on_gpu(cuda, k):
    """On a GPU, at the sizes HiDe meets (128² per rank; 200 and 256 on the one-program
    tiles; 768, the covariance at d = 768, on the grid reduction of a capture): LAPACK's
    accuracy in float64, on a decaying and a rank-deficient Gram matrix, with no host sync."""
    from himo_fast.kernels.eigh import tridiagonal_eigh
    for kind in ("decaying", "rank one"):
        a = _spectrum_matrix(k, kind, seed=k).to(cuda)
        tridiagonal_eigh(a)  # compile outside the sync check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            w, v = tridiagonal_eigh(a)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        a64, w, v = a.cpu(), w.cpu(), v.cpu()
        scale = a64.norm()
        assert (w - torch.linalg.eigvalsh(a64)).norm() / scale <= 1e-13, kind
        assert (a64 @ v - v * w).norm() / scale <= 1e-12, kind
        assert (v.T @ v - torch.eye(k, dtype=torch.float64)).abs().max() <= 1e-12, kind


def test_tridiagonal_eigh_clusters_and_shifts(triton_device):
    """The clusters the inverse iteration re-orthonormalises: chains of eigenvalues whose
    consecutive gaps are within CLUSTER·‖T‖ (here ‖T‖ = 2: gaps up to 2e-3), each index
    with its chain's first index and, there, its length; equal eigenvalues get shifts
    10ε‖T‖ apart."""
    from himo_fast.kernels.eigh import CLUSTER, FLOAT64_EPS, _shifts_and_clusters_kernel
    f64 = dict(dtype=torch.float64, device=triton_device)
    w = torch.tensor([0, 0, 0, 1e-5, 0.5, 0.9, 0.9005, 0.901, 2.0, 2.0], **f64)
    n = len(w)
    d, e = torch.zeros(n, **f64), torch.zeros(n, **f64)
    d[0] = 2.0  # Gershgorin bounds [0, 2]: ‖T‖ = 2
    shift = torch.empty(n, **f64)
    start, size = (torch.empty(n, dtype=torch.int32, device=triton_device) for _ in range(2))
    run = torch.ones(1, dtype=torch.int32, device=triton_device)
    _shifts_and_clusters_kernel[(1,)](run, d, e, w, shift, start, size, n, NP=16,
                                      CLUSTER=CLUSTER)
    assert start.tolist() == [0, 0, 0, 0, 4, 5, 5, 5, 8, 8]
    assert [size[i].item() for i in (0, 4, 5, 8)] == [4, 1, 3, 2]
    delta = 10 * FLOAT64_EPS.value * 2.0
    want = w.clone()
    want[1], want[2], want[9] = delta, 2 * delta, 2.0 + delta
    assert torch.allclose(shift, want, rtol=0, atol=1e-18)


def test_tridiagonal_eigh_on_fresh_random_spectra(triton_device):
    """Fresh sizes and spectra each run (the seed is printed on failure): eigenvalues drawn
    from a handful of values (exact repeats), from a normal distribution, or clustered
    around a few centres within 1e-12, in a random basis."""
    from himo_fast.kernels.eigh import tridiagonal_eigh
    seed = int(torch.randint(0, 2**31, ()))
    g = torch.Generator().manual_seed(seed)
    for trial in range(6):
        k = int(torch.randint(1, 14, (), generator=g))
        kind = trial % 3
        if kind == 0:
            lam = torch.randint(-2, 3, (k,), generator=g).double()
        elif kind == 1:
            lam = torch.randn(k, dtype=torch.float64, generator=g)
        else:
            centres = torch.randn(3, dtype=torch.float64, generator=g)
            lam = centres[torch.randint(0, 3, (k,), generator=g)] \
                + 1e-12 * torch.rand(k, dtype=torch.float64, generator=g)
        basis = torch.linalg.qr(torch.randn(k, k, dtype=torch.float64, generator=g))[0]
        a = basis * lam @ basis.T
        w, v = (t.cpu() for t in tridiagonal_eigh(a.to(triton_device)))
        scale = max(a.norm().item(), 1e-30)
        where = f"seed {seed}, trial {trial}, k {k}, kind {kind}"
        assert (w - torch.linalg.eigvalsh(a)).norm() / scale <= 1e-13, where
        assert (a @ v - v * w).norm() / scale <= 1e-12, where
        assert (v.T @ v - torch.eye(k, dtype=torch.float64)).abs().max() <= 1e-12, where


def test_tridiagonal_eigh_rounds_are_what_separates_a_cluster(triton_device):
    """One round of inverse iteration leaves vectors of a cluster mixed with their
    neighbours' (residual ≫ ε); the default rounds converge it."""
    from himo_fast.kernels.eigh import ROUNDS, tridiagonal_eigh
    a = _spectrum_matrix(24, "chain", seed=2).to(triton_device)
    res = {r: ((a @ v - v * w).norm() / a.norm()).item()
           for r in (1, ROUNDS) for w, v in [tridiagonal_eigh(a, rounds=r)]}
    assert res[ROUNDS] <= 1e-13 and res[1] > 100 * res[ROUNDS], res


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the NaN fill
@pytest.mark.parametrize("reduction", ["registers", "program", "grid"])
def test_tridiagonal_eigh_run_flag_skips_every_launch(triton_device, reduction, monkeypatch):
    """run = 0 (read by the kernels on the device): no kernel writes anything. Fresh
    buffers are filled with NaN here, so the eigenvalues and eigenvectors come back all
    NaN (nothing computed them) and the input is untouched; run = 1 is the plain solve."""
    from himo_fast.kernels import eigh as eigh_mod
    a = _spectrum_matrix(20, "decaying", seed=4).to(triton_device)
    one = torch.ones(1, dtype=torch.int32, device=triton_device)
    w, v = eigh_mod.tridiagonal_eigh(a, reduction=reduction)
    w1, v1 = eigh_mod.tridiagonal_eigh(a, reduction=reduction, run=one)
    assert torch.equal(w1, w) and torch.equal(v1, v) and torch.isfinite(v).all()
    empty = torch.empty

    def nan_empty(*size, **kwargs):
        t = empty(*size, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", nan_empty)
    before = a.clone()
    zero = torch.zeros(1, dtype=torch.int32, device=triton_device)
    w0, v0 = eigh_mod.tridiagonal_eigh(a, reduction=reduction, run=zero)
    assert torch.equal(a, before) and w0.isnan().all() and v0.isnan().all()
    w1, v1 = eigh_mod.tridiagonal_eigh(a, reduction=reduction, run=one)
    assert torch.allclose(w1, w, rtol=0, atol=1e-14) and torch.isfinite(v1).all()
    with pytest.raises(ValueError, match="run must be a one-element int32 tensor"):
        eigh_mod.tridiagonal_eigh(a, run=torch.ones(1, device=triton_device))


def test_tridiagonal_eigh_refuses_bad_input(triton_device):
    from himo_fast.kernels.eigh import TRIDIAGONAL_MAX, tridiagonal_eigh
    with pytest.raises(ValueError, match=r"square matrix, got shape \(3, 4\)"):
        tridiagonal_eigh(torch.randn(3, 4, device=triton_device))
    with pytest.raises(TypeError, match="float32 or float64, got torch.bfloat16"):
        tridiagonal_eigh(torch.eye(3, device=triton_device).bfloat16())
    with pytest.raises(ValueError, match=f"at most {TRIDIAGONAL_MAX} x {TRIDIAGONAL_MAX}, got"):
        tridiagonal_eigh(torch.eye(TRIDIAGONAL_MAX + 1, device=triton_device))
    with pytest.raises(ValueError, match="rounds must be a positive int, got 0"):
        tridiagonal_eigh(torch.eye(3, device=triton_device), rounds=0)
    with pytest.raises(ValueError, match="reduction must be one of .* got 'qr'"):
        tridiagonal_eigh(torch.eye(3, device=triton_device), reduction="qr")
    w, v = tridiagonal_eigh(torch.empty(0, 0, device=triton_device))
    assert w.shape == (0,) and v.shape == (0, 0)


def test_eigh_dispatch_off_capture(triton_device):
    """Outside a CUDA-graph capture the triton backend's eigh is, on a GPU, the Triton
    tridiagonal solver up to SMALL_MAX and the sync-free eigh (syevd) above; under the
    interpreter LAPACK's (the interpreted solver is tested above). While capturing:
    tests/test_hide_triton.py."""
    from himo_fast import backends
    from himo_fast.kernels.eigh import SMALL_MAX, tridiagonal_eigh
    eigh = backends.triton_hide_ops(triton_device.type).eigh
    on_gpu = triton_device.type == "cuda"
    sizes = (9, SMALL_MAX + 1) if on_gpu else (9,)
    for k in sizes:
        a = _spectrum_matrix(k, "decaying", seed=3).to(triton_device, torch.float32)
        want = tridiagonal_eigh(a) if on_gpu and k <= SMALL_MAX else backends.sync_free_eigh(a)
        for x, y in zip(eigh(a), want):
            assert torch.equal(x, y), k
