"""CLIP-like feature pairs (SPEC section 5), shared by the main job, tests and benchmarks:
texts with a decaying spectrum (i^-0.7) plus a shared mean direction (CLIP's "cone"),
images correlated with their texts, all L2-normalised; isotropic as the worst case."""
from __future__ import annotations

import torch


def clip_like_pairs(n: int, d: int, dtype=torch.float32, device="cpu", generator=None,
                    decay: bool = True):
    """(image, text), each (n, d), generated in float64 then cast."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    f64 = torch.float64
    spec = torch.arange(1, d + 1, dtype=f64).pow(-0.7) if decay else torch.ones(d, dtype=f64)
    text = torch.randn(n, d, generator=g, dtype=f64) * spec
    if decay:
        text = text + 0.5 * spec.norm() / d ** 0.5 * torch.randn(d, generator=g, dtype=f64)
    image = text + 0.7 * torch.randn(n, d, generator=g, dtype=f64) * spec.mean()
    return tuple(torch.nn.functional.normalize(x, dim=-1).to(device, dtype) for x in (image, text))
