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
def test_masked_matmul_with_mask_bias_and_transposed_views(triton_device, dtype, m, k, n):
    from himo_fast.kernels import masked_matmul
    a = _fresh((k, m), dtype, triton_device).T  # a transposed view: strides honoured
    b = _fresh((k, n), dtype, triton_device)
    mask = (torch.rand(n, device=triton_device) < 0.6).to(dtype)
    bias = _fresh((n,), dtype, triton_device)
    out = masked_matmul(a, b, mask, bias)
    want = a.double() @ (b.double() * mask.double()) + bias.double()
    assert rel(out.double(), want, floor=1e-30) <= IN_TOL[dtype]
    assert rel(masked_matmul(a, b).double(), a.double() @ b.double(), floor=1e-30) <= IN_TOL[dtype]


def test_product_backward_and_gradcheck(triton_device):
    from himo_fast.kernels import product
    a = _fresh((9, 7), torch.float64, triton_device).requires_grad_()
    b = _fresh((11, 7), torch.float64, triton_device).T.requires_grad_()  # (7, 11) view
    bias = _fresh((1, 11), torch.float64, triton_device).requires_grad_()
    assert torch.autograd.gradcheck(product, (a, b, bias))
    assert torch.autograd.gradcheck(lambda x, y: product(x, y), (a, b))


def test_bad_arguments_are_refused(triton_device):
    from himo_fast.kernels import centre, masked_matmul
    with pytest.raises(ValueError, match="2-D"):
        centre(torch.randn(3, device=triton_device))
    with pytest.raises(TypeError, match="int64"):
        centre(torch.ones(3, 4, dtype=torch.int64, device=triton_device))
    with pytest.raises(ValueError, match="inner dimensions"):
        masked_matmul(torch.randn(3, 4, device=triton_device), torch.randn(5, 2, device=triton_device))
    with pytest.raises(ValueError, match="mask must have 2"):
        masked_matmul(torch.randn(3, 4, device=triton_device), torch.randn(4, 2, device=triton_device),
                      mask=torch.ones(3, device=triton_device))
