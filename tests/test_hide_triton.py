"""HiDe and the full loss through the ``triton`` backend (himo_fast.kernels) against the
exact float64 reference: decaying and isotropic spectra, tau in {0.5, 0.9, 0.99}, odd
N and d on both sides of N = d; the chosen m; gradients; degenerate batches (and the
cuda backend's twin of the narrow-u' test, which shares its body)."""
import pytest
import torch

import himo_fast
from himo_fast import backends
from himo_fast import pca
from himo_fast.reference import component_count, hide_reference
from conftest import assert_ran, loss_rel, pairs, rel, run_fresh

SHAPES = [(33, 48), (70, 31), (45, 45)]  # N < d, N > d, N = d


@pytest.mark.parametrize("decay", [True, False], ids=["decaying", "isotropic"])
@pytest.mark.parametrize("tau", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("n,d", SHAPES)
def test_hide_equals_exact_reconstruction_and_m(triton_device, decay, tau, n, d):
    OPS = backends.triton_hide_ops(triton_device.type)
    _, u = pairs(n, d, torch.float32, decay=decay, requires_grad=False)
    u = u.to(triton_device)
    ours = himo_fast.hide(u, tau, backend="triton")
    exact = hide_reference(u.double().cpu(), tau)
    assert ours.dtype == torch.float32 and ours.shape == u.shape
    assert rel(ours.cpu(), exact) <= 1e-4
    # The m the kernels' covariance gives is the exact one.
    _, x = OPS.centre(u)
    m_ours = pca.principal_subspace(x, tau, OPS.small_matrix).m
    assert int(m_ours) == int(component_count(u.double().cpu(), tau))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs(triton_device, dtype):
    _, u = pairs(40, 24, torch.float64, requires_grad=False)
    ours = himo_fast.hide(u.to(triton_device, dtype), 0.9, backend="triton")
    assert ours.dtype == torch.float32
    assert rel(ours.cpu(), hide_reference(u.to(dtype).double(), 0.9)) <= 1e-4


def _loss_matches_reference(v, u, device):
    """MoLo through triton (fp32) against the float64 reference: value and gradients."""
    v, u = v.to(device).requires_grad_(), u.to(device).requires_grad_()
    s = torch.tensor(12.0, device=device, requires_grad=True)
    ours = himo_fast.MoLo(backend="triton")(v, u, s)
    ours.backward()
    v64, u64, s64 = (t.detach().double().cpu().requires_grad_() for t in (v, u, s))
    ref = himo_fast.MoLo(backend="reference")(v64, u64, s64)
    ref.backward()
    assert loss_rel(ours, ref) <= 2e-4
    for a, b in zip((v, u, s), (v64, u64, s64)):
        assert torch.isfinite(a.grad).all()
        assert rel(a.grad.cpu(), b.grad) <= 2e-4


@pytest.mark.parametrize("n,d", SHAPES)
def test_full_loss_matches_reference_value_and_gradient(triton_device, n, d):
    _loss_matches_reference(*pairs(n, d, torch.float32, requires_grad=False), triton_device)


def _loss_takes_the_fused_reconstruction_in_the_features_dtype(backend, device, dtype):
    """N > d, narrow features: the loss asks the fused reconstruction for u' in their dtype
    (the dual InfoNCE's on both fused backends), not fp32 then cast: the same loss and
    gradients as the cast route, bit for bit, and the reference's at SPEC 4's tolerance."""
    import dataclasses
    v, u = pairs(40, 24, torch.float64, requires_grad=False)
    impl = backends.select(backend, u.to(device))
    seen = []

    def spy(t, tau, dtype=None):
        out = impl.hide_reconstruction(t, tau, dtype)
        seen.append(out.dtype)
        return out

    routes = {"narrow": dataclasses.replace(impl, hide_reconstruction=spy),
              "cast": dataclasses.replace(impl, hide_reconstruction=lambda t, tau, dtype=None:
                                          impl.hide_reconstruction(t, tau))}
    got = {}
    for name, route in routes.items():
        leaves = [t.to(device, dtype).requires_grad_() for t in (v, u)]
        s = torch.tensor(12.0, device=device, requires_grad=True)
        value = himo_fast.MoLo()._loss(route, *leaves, s, None, False)
        got[name] = [value, *torch.autograd.grad(value, (*leaves, s))]
    assert seen == [dtype]
    for a, b in zip(got["narrow"], got["cast"]):
        assert a.dtype == b.dtype and torch.isfinite(a).all()
        assert torch.equal(a, b)  # one row block at this size: the same rounding of u'
    v64, u64 = (t.to(dtype).double().requires_grad_() for t in (v, u))
    s64 = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
    ref = himo_fast.MoLo(backend="reference")(v64, u64, s64)
    want = [ref, *torch.autograd.grad(ref, (v64, u64, s64))]
    assert loss_rel(got["narrow"][0].cpu(), want[0]) <= 2e-2
    for a, b in zip(got["narrow"][1:], want[1:]):
        assert rel(a.float().cpu(), b) <= 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_takes_the_fused_reconstruction_in_the_features_dtype(triton_device, dtype):
    _loss_takes_the_fused_reconstruction_in_the_features_dtype("triton", triton_device, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_backend_loss_takes_the_fused_reconstruction_in_the_features_dtype(cuda, dtype):
    # The cuda backend's twin (torch products, its own dual InfoNCE): the same coupling.
    if "cuda" not in himo_fast.available_backends("cuda"):
        pytest.skip("the cuda backend is not built")
    _loss_takes_the_fused_reconstruction_in_the_features_dtype("cuda", cuda, dtype)


def test_float64_gradcheck_through_the_kernels(triton_device):
    v, u = pairs(7, 5, torch.float64, requires_grad=False)
    v, u = v.to(triton_device).requires_grad_(), u.to(triton_device).requires_grad_()
    s = torch.tensor(6.0, dtype=torch.float64, device=triton_device, requires_grad=True)
    loss = himo_fast.MoLo(tau=0.8, backend="triton")
    assert torch.autograd.gradcheck(lambda a, b, c: loss(a, b, c), (v, u, s))


def test_degenerate_batches_are_finite(triton_device):
    base = torch.nn.functional.normalize(torch.randn(1, 16), dim=-1)
    v, _ = pairs(6, 16, torch.float32, requires_grad=False)
    cases = {"one pair": (v[:1], base), "identical captions": (v, base.expand(6, 16))}
    for name, (img, txt) in cases.items():
        img = img.to(triton_device).clone().requires_grad_()
        txt = txt.to(triton_device).clone().requires_grad_()
        s = torch.tensor(10.0, device=triton_device, requires_grad=True)
        out = himo_fast.MoLo(backend="triton")(img, txt, s)
        out.backward()
        assert torch.isfinite(out), name
        for t in (img, txt, s):
            assert torch.isfinite(t.grad).all(), name


@pytest.fixture
def small_eigh_backend(triton_device, monkeypatch):
    """The triton backend with the eigensolver it runs on CUDA (for Gram / covariance
    matrices up to SMALL_MAX: kernels.tridiagonal_eigh). Under the interpreter the backend
    otherwise uses LAPACK's, and these tests put the Triton solver in its place."""
    if triton_device.type == "cpu":
        ops = backends.triton_hide_ops("cpu", eigh=backends._capturable_eigh)
        monkeypatch.setitem(backends._BUILT, ("triton", "cpu"), backends.triton_impl(ops))
    return triton_device


def _texts_with_spectrum(n, d, lam, seed=0):
    """n texts in d dims whose centred Gram matrix has exactly the eigenvalues lam (the
    rest zero): X̂ = U diag(√λ) Wᵀ with U orthonormal and orthogonal to 1, plus a mean."""
    g = torch.Generator().manual_seed(seed)
    ones = torch.ones(n, 1, dtype=torch.float64) / n ** 0.5
    u = torch.linalg.qr(torch.cat([ones, torch.randn(n, len(lam), dtype=torch.float64,
                                                     generator=g)], 1))[0][:, 1:]
    w = torch.linalg.qr(torch.randn(d, len(lam), dtype=torch.float64, generator=g))[0]
    mean = torch.randn(1, d, dtype=torch.float64, generator=g)
    return u * torch.as_tensor(lam, dtype=torch.float64).sqrt() @ w.T + mean


@pytest.mark.parametrize("n,d,decay,tau", [(33, 48, True, 0.5), (33, 48, True, 0.99),
                                         (33, 48, False, 0.5), (33, 48, False, 0.99),
                                         (45, 28, True, 0.9)],
                         ids=["gram-decaying-0.5", "gram-decaying-0.99", "gram-isotropic-0.5",
                              "gram-isotropic-0.99", "covariance-decaying-0.9"])
def test_small_eigh_hide_has_the_exact_m_and_gradient(small_eigh_backend, n, d, decay, tau):
    """HiDe on the small-matrix solver (N < d: the N² Gram matrix; N > d: the d²
    covariance): the float64 m, the reconstruction, and the full loss's value and gradients
    against the reference."""
    dev = small_eigh_backend
    v, u = pairs(n, d, torch.float32, decay=decay, requires_grad=False)
    ours = himo_fast.hide(u.to(dev), tau, backend="triton")
    assert rel(ours.cpu(), hide_reference(u.double(), tau)) <= 1e-4
    ops = backends.triton_hide_ops("cpu", eigh=backends._capturable_eigh)
    m = pca.principal_subspace(ops.centre(u.to(dev))[1], tau, ops.small_matrix, ops.eigh).m
    assert int(m) == int(component_count(u.double(), tau))
    _loss_matches_reference(v, u, dev)


def test_small_eigh_hide_float64_is_exact(small_eigh_backend):
    """float64 through the small-matrix solver: within SPEC's 1e-8 of the reference,
    value and gradient."""
    dev = small_eigh_backend
    _, u = pairs(29, 40, torch.float64, requires_grad=False)
    weight = torch.randn(29, 40, dtype=torch.float64)
    grads = []
    for backend, device in (("triton", dev), ("reference", "cpu")):
        x = u.to(device).requires_grad_()
        out = himo_fast.hide(x, 0.9, backend=backend)
        (out * weight.to(device)).sum().backward()
        grads.append((out.detach().cpu(), x.grad.cpu()))
    assert rel(grads[0][0], grads[1][0]) <= 1e-8 and rel(grads[0][1], grads[1][1]) <= 1e-8


def test_small_eigh_degenerate_and_rank_deficient_batches(small_eigh_backend):
    """Identical captions (X̂ = 0: a zero Gram matrix), one pair, and 20 texts that are 3
    distinct ones repeated (a 17-fold zero eigenvalue): the reference's value, finite
    gradients."""
    dev = small_eigh_backend
    base = torch.nn.functional.normalize(torch.randn(3, 16, dtype=torch.float64), dim=-1)
    v, _ = pairs(20, 16, torch.float64, requires_grad=False)
    cases = {"identical captions": (v[:6], base[:1].expand(6, 16)), "one pair": (v[:1], base[:1]),
             "3 distinct of 20": (v, base[torch.arange(20) % 3])}
    for name, (img, txt) in cases.items():
        got, want = [], []
        for backend, device, out in (("triton", dev, got), ("reference", "cpu", want)):
            a = img.to(device).float().requires_grad_()
            b = txt.to(device).float().requires_grad_()
            s = torch.tensor(10.0, device=device, requires_grad=True)
            loss = himo_fast.MoLo(backend=backend)(a, b, s)
            loss.backward()
            out.extend([loss.detach().cpu(), a.grad.cpu(), b.grad.cpu()])
        assert all(torch.isfinite(t).all() for t in got), name
        assert loss_rel(got[0], want[0]) <= 2e-4, name
        assert rel(got[1], want[1]) <= 2e-4, name  # the images' gradient
        assert torch.isfinite(want[2]).all()


def test_small_eigh_tie_at_the_cutoff(small_eigh_backend):
    """Policy for an eigenvalue repeated across the cutoff (λ_3 = λ_4 = 1, m = 3 at τ = 0.7
    of the spectrum 4, 2, 1, 1, 0.5, 0.5): m is the authors' count, and the kept subspace is
    m directions of the top-m-plus-tie eigenspace, which ones being arbitrary (the authors'
    SVD picks some too). So the reconstruction keeps exactly λ_1 + … + λ_m of the variance,
    lies in the span of the top 4, and the gradient is finite (the clamped gap)."""
    dev = small_eigh_backend
    lam = [4.0, 2.0, 1.0, 1.0, 0.5, 0.5]
    u64 = _texts_with_spectrum(24, 40, lam)
    tau = 0.7  # cumulative 4/9, 6/9, 7/9 >= 0.7: m = 3, with λ_4 = λ_3
    assert int(component_count(u64, tau)) == 3
    u = u64.float().to(dev).requires_grad_()
    out = himo_fast.hide(u, tau, backend="triton")
    (out * torch.randn(24, 40, device=dev)).sum().backward()
    x_hat = (out.detach().double().cpu() - u64.mean(0))
    assert abs((x_hat ** 2).sum().item() - 7.0) <= 1e-4 * 7
    top4 = torch.linalg.svd(u64 - u64.mean(0), full_matrices=False)[2][:4]  # right vectors
    assert (x_hat - x_hat @ top4.T @ top4).norm() <= 1e-5 * x_hat.norm()
    assert torch.isfinite(u.grad).all()


# The triton backend decomposes the small matrix with kernels.tridiagonal_eigh up to 256²,
# by subspace iteration up to 1024² (test_subspace_iteration.py) and himo_fast::sym_eigh
# above (cuSOLVER's syevd, its info flag left on the device), so nothing in HiDe reads the
# device on the host: the sync-debug test passed on an H100 (with syevd). syevd cannot be
# captured in a CUDA graph (test_sym_eigh.py); while a stream is capturing, Jacobi replaces
# it there (backends._capturable_eigh).
def _molo_step(v, u, s):
    for t in (v, u, s):
        t.grad = None
    loss = himo_fast.MoLo(backend="triton")(v, u, s)
    loss.backward()
    return loss


def test_cuda_no_host_sync_in_forward_backward(cuda):
    v, u = (t.to(cuda).requires_grad_() for t in pairs(96, 64, torch.float32, requires_grad=False))
    s = torch.tensor(10.0, device=cuda, requires_grad=True)
    _molo_step(v, u, s)  # warm-up: Triton compiles, cuBLAS initialises
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _molo_step(v, u, s)
    finally:
        torch.cuda.set_sync_debug_mode(0)


CAPTURE = """
import sys, torch
from test_hide_triton import _molo_step
from conftest import pairs, rel
n, d, dtype = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3])
def fresh(seed):
    return [t.cuda() for t in pairs(n, d, dtype, seed=seed, requires_grad=False)]
v, u = (t.requires_grad_() for t in fresh(0))
s = torch.tensor(10.0, device="cuda", requires_grad=True)
stream = torch.cuda.Stream()
stream.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(stream):  # warm-up (and the capture-time solver compiled)
    for _ in range(2):
        _molo_step(v, u, s)
torch.cuda.current_stream().wait_stream(stream)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    captured = _molo_step(v, u, s)
captured_grads = [t.grad for t in (v, u, s)]  # the graph writes these on each replay
# bfloat16 gradients: a difference at rounding level flips some elements by one bf16 ulp.
tol = 1e-4 if dtype == torch.float32 else 2e-3
# Replays on new batches (a different cutoff m each time: it is data, not shape), against
# eager steps on the same inputs. At 1024 x 768 both run subspace iteration on the 768²
# covariance (its certificate and the predicated fallback decided on the device).
for seed in (1, 2):
    new_v, new_u = fresh(seed)
    with torch.no_grad():
        v.copy_(new_v)
        u.copy_(new_u)
    graph.replay()
    got = [t.detach().clone() for t in [captured] + captured_grads]
    want = [_molo_step(v, u, s).detach()] + [t.grad for t in (v, u, s)]
    errs = [rel(g, w, floor=1e-6) for g, w in zip(got, want)]
    assert max(errs) <= tol, errs
print("ok")
"""


@pytest.mark.parametrize("n,d,dtype", [(96, 64, "float32"), (1024, 768, "bfloat16")])
def test_cuda_graph_capture_of_forward_backward(cuda, n, d, dtype):
    """In a fresh process: a capture that failed would break the context for later tests."""
    assert "ok" in assert_ran(run_fresh(CAPTURE, str(n), str(d), dtype))
