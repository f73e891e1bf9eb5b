import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


def pairs(n, d, dtype=torch.float64, seed=None, decay=True, requires_grad=True):
    """Fresh paired, L2-normalised features (SPEC 5): text with a decaying spectrum and a
    shared mean direction, images correlated with their texts; isotropic if not decay."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2**31, ()).item())
    spec = torch.arange(1, d + 1, dtype=torch.float64).pow(-0.7) if decay else torch.ones(d, dtype=torch.float64)
    text = torch.randn(n, d, generator=g, dtype=torch.float64) * spec
    if decay:
        text = text + 0.5 * spec.norm() / d ** 0.5 * torch.randn(d, generator=g, dtype=torch.float64)
    image = text + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64) * spec.mean()
    out = [torch.nn.functional.normalize(x, dim=-1).to(dtype) for x in (image, text)]
    return [x.requires_grad_(requires_grad) for x in out]


def rel(a, b, floor=1e-2):
    """‖a-b‖ / max(‖b‖, floor) in float64 (SPEC 4: gradients relative to max(‖g‖, 1e-2))."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp(min=floor)).item()


def loss_rel(a, b):
    """|a-b| / max(|b|, 1) (SPEC 4)."""
    a, b = float(torch.as_tensor(a).detach()), float(torch.as_tensor(b).detach())
    return abs(a - b) / max(abs(b), 1.0)


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")
