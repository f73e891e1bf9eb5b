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


def _config_code(config: tuple) -> int:
    """A stable 63-bit code of the loss's configuration (repr of floats is exact)."""
    import hashlib
    return int.from_bytes(hashlib.sha256(repr(config).encode()).digest()[:8], "little") >> 1


_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_check_group = {}


def _host_group():
    """A gloo group for the host-side check (the default group where it is gloo), so that
    it costs a small CPU message and never a device synchronisation."""
    if dist.get_backend() == "gloo":
        return None
    if "group" not in _check_group:  # collective: every rank reaches it on its first call
        _check_group["group"] = dist.new_group(backend="gloo")
    return _check_group["group"]


def check_ranks(*, rank: int, world_size: int, features: torch.Tensor, config: tuple) -> None:
    """Before any collective: the process group exists and matches ``rank``/``world_size``,
    and every rank has the same batch size, width, dtype and loss configuration. A
    mismatch raises the same ValueError on every rank; gloo would otherwise abort the
    process ("Received data size doesn't match") or the ranks compute different
    objectives silently. Costs one all_gather of 4 integers on the host."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"world_size={world_size} but no torch.distributed process group is "
                         "initialised (call torch.distributed.init_process_group first)")
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ValueError(f"rank={rank}, world_size={world_size} disagree with the process group "
                         f"(rank {dist.get_rank()} of {dist.get_world_size()})")
    mine = torch.tensor([features.shape[0], features.shape[1], _DTYPE_CODES[features.dtype],
                         _config_code(config)], dtype=torch.int64)
    every = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine, group=_host_group())
    every = torch.stack(every)
    problems = []
    if (every[:, 0] != every[0, 0]).any():
        problems.append(f"batch sizes differ across ranks: {every[:, 0].tolist()} (MoLo, like "
                        "open_clip's ClipLoss, needs equal per-rank batches: drop the last "
                        "uneven batch, e.g. DataLoader(drop_last=True))")
    if (every[:, 1] != every[0, 1]).any():
        problems.append(f"feature widths differ across ranks: {every[:, 1].tolist()}")
    if (every[:, 2] != every[0, 2]).any():
        problems.append("feature dtypes differ across ranks")
    if (every[:, 3] != every[0, 3]).any():
        problems.append("the ranks' MoLo configurations differ (tau, lam, label_smoothing, "
                        "local_loss, gather_with_grad, pca_scope must agree); this rank has "
                        f"{config}")
    if problems:
        raise ValueError("himo_fast.MoLo: " + "; ".join(problems))
