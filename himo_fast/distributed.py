"""Feature gathering with open_clip's ``gather_features`` semantics, for any number of
feature tensors (images, texts, text components)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (all_gather with gradient)


def gather(features, *, local_loss: bool, gather_with_grad: bool, rank: int, world_size: int):
    """All-gather each tensor along dim 0 exactly as open_clip's ClipLoss does.

    ``gather_with_grad``: gradients flow back to every rank's slice. Otherwise the gather
    carries no gradient, and (unless ``local_loss``) the local slice is put back so that
    the local features keep theirs.
    """
    out = []
    for t in features:
        if gather_with_grad:
            out.append(torch.cat(torch.distributed.nn.all_gather(t), dim=0))
            continue
        parts = [torch.empty_like(t) for _ in range(world_size)]
        dist.all_gather(parts, t.contiguous())
        if not local_loss:
            parts[rank] = t
        out.append(torch.cat(parts, dim=0))
    return out


def with_local_slice(gathered: torch.Tensor, local: torch.Tensor, rank: int) -> torch.Tensor:
    """``gathered`` with this rank's slice replaced by the gradient-carrying local tensor."""
    if not local.requires_grad or gathered.requires_grad:
        return gathered
    b = local.shape[0]
    return torch.cat([gathered[: rank * b], local, gathered[(rank + 1) * b:]], dim=0)
