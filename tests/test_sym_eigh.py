"""himo_fast::sym_eigh, the eigendecomposition HiDe's triton backend uses: the CPU twin
(LAPACK) here, the cuSOLVER kernel without a host sync on a GPU; both against
torch.linalg.eigh, opcheck, bad input."""
import pytest
import torch

import himo_fast
from himo_fast import backends, ops
from conftest import assert_ran, rel, run_fresh

pytestmark = pytest.mark.skipif("cpu" not in himo_fast.available_backends("cpu"),
                                reason="compiled extension not built")


def _psd(k, dtype, device="cpu", rank=None):
    x = torch.randn(rank or k + 3, k, dtype=torch.float64)
    return (x.T @ x).to(device, dtype)


def _check(a, algorithm="syevd"):
    w, v, info = torch.ops.himo_fast.sym_eigh(a, algorithm)
    w_ref = torch.linalg.eigvalsh(a.double().cpu())
    tol = 1e-10 if a.dtype == torch.float64 else 1e-5
    assert int(info) == 0 and info.dtype == torch.int32
    assert rel(w.cpu(), w_ref) <= tol
    # A V = V diag(w), V orthonormal (eigenvectors themselves are only defined up to sign)
    assert rel((a @ v).cpu(), (v * w).cpu()) <= 10 * tol
    assert rel((v.T @ v).cpu(), torch.eye(a.shape[0], dtype=torch.float64)) <= 10 * tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 7, 64])
def test_cpu_matches_torch_eigh(dtype, k):
    _check(_psd(k, dtype))
    _check(_psd(k, dtype, rank=2))  # rank-deficient: repeated zero eigenvalues
    _check(_psd(k, dtype), "syev_batched")  # the CPU twin is LAPACK whatever the algorithm


def test_opcheck():
    assert ops.REGISTERED
    torch.library.opcheck(torch.ops.himo_fast.sym_eigh.default, (_psd(5, torch.float64),))
    torch.library.opcheck(torch.ops.himo_fast.sym_eigh.default, (_psd(4, torch.float32), "syev_batched"))


def test_bad_input():
    with pytest.raises(ValueError, match="square matrix, got shape"):
        torch.ops.himo_fast.sym_eigh(torch.randn(3, 4))
    with pytest.raises(TypeError, match="float32 or float64, got Half"):
        torch.ops.himo_fast.sym_eigh(torch.randn(3, 3).half())
    with pytest.raises(ValueError, match="algorithm must be 'syevd' or 'syev_batched', got 'qr'"):
        torch.ops.himo_fast.sym_eigh(torch.eye(3), "qr")


def test_sync_free_eigh_is_torch_eigh_on_cpu():
    a = _psd(9, torch.float64)
    for x, y in zip(backends.sync_free_eigh(a), torch.linalg.eigh(a)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_kernel_without_host_sync(cuda, dtype):
    from himo_fast import _extension
    if not _extension.extension().built_with_cusolver():
        pytest.fail("built with CUDA but without cuSOLVER's sym_eigh (see setup.py cusolver())")
    a = _psd(200, dtype, cuda)
    _check(a)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        w, _ = backends.sync_free_eigh(a)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert rel(w.cpu(), torch.linalg.eigvalsh(a.double().cpu())) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_syev_batched_matches_eigh(cuda, dtype):
    # Whether it syncs or captures is measured by benchmarks/eigh_probe.py, not asserted.
    _check(_psd(200, dtype, cuda), "syev_batched")
    _check(_psd(33, dtype, cuda, rank=3), "syev_batched")


CAPTURE = """
import torch
from himo_fast import backends
x = torch.randn(203, 200, dtype=torch.float64)
a = (x.T @ x).to("cuda", torch.float32)
w, _ = backends.sync_free_eigh(a)
stream = torch.cuda.Stream()
stream.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(stream):
    backends.sync_free_eigh(a)  # warm-up: handle and workspace outside the capture
torch.cuda.current_stream().wait_stream(stream)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    w_g, _ = backends.sync_free_eigh(a)
graph.replay()
torch.cuda.synchronize()
assert ((w_g - w).norm() / w.norm()).item() <= 1e-6
"""


# Measured on an H100 (benchmarks/results/20261122T221211Z-NVIDIA_H100_80GB_HBM3.txt):
# syevd returns CUSOLVER_STATUS_INTERNAL_ERROR (7) inside a capture; it is not capturable.
# strict: a cuSOLVER that captures turns this into a failure that asks to drop the mark.
# (HiDe's triton backend switches solver while capturing: kernels/eigh.py.)
@pytest.mark.xfail(reason="cuSOLVER syevd cannot be captured in a CUDA graph", strict=True)
def test_cuda_kernel_in_a_graph_capture(cuda):
    assert_ran(run_fresh(CAPTURE))
