"""Long texts for open_clip CLIP models, the Long-CLIP way (the paper trains on 248 tokens).

A pretrained text tower has 77 positions. Long-CLIP keeps the first 20 (well trained,
they carry short captions) bit for bit and stretches the rest 4x by linear interpolation
(the last position extrapolated from its neighbour), which gives 20 + 4·57 = 248 positions.
The causal attention mask and the model's context length follow; the tokenizer must be
built with the same context length (``open_clip.get_tokenizer(name, context_length=248)``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

KEEP = 20
LONG_CONTEXT = 248


def stretch_positions(pos: torch.Tensor, keep: int = KEEP, factor: int = 4) -> torch.Tensor:
    """(L, w) -> (keep + factor·(L - keep), w): first ``keep`` rows unchanged, each later
    gap interpolated ``factor`` ways, the last row extrapolated from the one before."""
    length = pos.shape[0]
    if not 0 < keep < length - 1:
        raise ValueError(f"keep must be in (0, {length - 1}) for {length} positions, got {keep}")
    tail = pos[keep:]
    nxt = torch.cat([tail[1:], (2 * tail[-1] - tail[-2])[None]])  # extrapolated past the end
    frac = torch.arange(factor, dtype=pos.dtype, device=pos.device).div(factor)[None, :, None]
    stretched = (tail[:, None] * (1 - frac) + nxt[:, None] * frac).reshape(-1, pos.shape[1])
    return torch.cat([pos[:keep], stretched])


def stretch_model(model: nn.Module, context_length: int = LONG_CONTEXT, keep: int = KEEP) -> nn.Module:
    """Stretch an open_clip CLIP model's text positions in place to ``context_length``."""
    text = model if hasattr(model, "positional_embedding") else getattr(model, "text", None)
    if text is None or not hasattr(text, "positional_embedding") or not hasattr(text, "attn_mask"):
        raise TypeError(f"stretch_model needs an open_clip CLIP text tower with positional "
                        f"embeddings and a causal mask, got {type(model).__name__}")
    old = text.positional_embedding.data
    length = old.shape[0]
    factor, rest = divmod(context_length - keep, length - keep)
    if rest or factor < 1:
        raise ValueError(f"context_length must be {keep} + k·{length - keep} (e.g. "
                         f"{keep + 4 * (length - keep)}), got {context_length}")
    text.positional_embedding = nn.Parameter(stretch_positions(old, keep, factor))
    mask = torch.full((context_length, context_length), float("-inf"), device=old.device).triu_(1)
    text.register_buffer("attn_mask", mask, persistent=False)
    text.context_length = context_length
    if text is not model and hasattr(model, "context_length"):
        model.context_length = context_length
    return model
