"""Evaluation metrics of the paper (section 4.2): HiMo@K and retrieval Recall@K.

HiMo@K asks whether an image's matching score grows as its caption gets more complete.
A caption of n sentences is cut into K contiguous segments of roughly equal length, the
remainder going to the later segments (n=5, K=3: [1], [2, 3], [4, 5]); t_k is the
concatenation of the first k segments and s_k the image's score against t_k.

- K = 2, 3: strict monotonic accuracy, the percentage of pairs with s_1 < s_2 (< s_3).
- K > 3: the mean over pairs of the Pearson correlation between k and s_k.
"""
from __future__ import annotations

import re

import torch

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(caption: str) -> list[str]:
    """The caption's sentences (split after . ! or ? followed by white space)."""
    return [s for s in _SENTENCE_END.split(caption.strip()) if s]


def segments(items: list, k: int) -> list[list]:
    """``items`` cut into ``k`` contiguous segments, sizes differing by at most one, the
    larger ones last (the paper's n=5, K=3 example: 1, 2, 2)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if len(items) < k:
        raise ValueError(f"need at least k={k} items to cut into k segments, got {len(items)}")
    base, extra = divmod(len(items), k)
    sizes = [base + (1 if i >= k - extra else 0) for i in range(k)]
    out, start = [], 0
    for size in sizes:
        out.append(items[start:start + size])
        start += size
    return out


def prefixes(caption: str, k: int) -> list[str]:
    """t_1 .. t_k: the first 1 .. k segments of the caption's sentences, joined."""
    segs = segments(sentences(caption), k)
    return [" ".join(s for seg in segs[:i + 1] for s in seg) for i in range(k)]


def _check_scores(scores: torch.Tensor) -> torch.Tensor:
    scores = torch.as_tensor(scores)
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be (pairs, K) with K >= 2, got shape {tuple(scores.shape)}")
    return scores.double()


def monotonic_accuracy(scores) -> float:
    """Percentage of rows whose scores strictly increase (HiMo@2, HiMo@3)."""
    s = _check_scores(scores)
    return 100.0 * (s[:, 1:] > s[:, :-1]).all(1).double().mean().item()


def pearson_monotonicity(scores) -> float:
    """Mean over rows of the Pearson correlation between k = 1..K and the scores
    (HiMo@K, K > 3). A row with constant scores has no correlation and counts as 0."""
    s = _check_scores(scores)
    k = torch.arange(1, s.shape[1] + 1, dtype=s.dtype)
    kc = k - k.mean()
    sc = s - s.mean(1, keepdim=True)
    den = kc.norm() * sc.norm(dim=1)
    rho = torch.where(den > 0, (sc @ kc) / den.clamp(min=torch.finfo(s.dtype).tiny),
                      torch.zeros_like(den))
    return rho.mean().item()


def himo_at_k(scores) -> float:
    """HiMo@K as the paper defines it: accuracy (%) for K <= 3, mean Pearson for K > 3."""
    s = _check_scores(scores)
    return monotonic_accuracy(s) if s.shape[1] <= 3 else pearson_monotonicity(s)


def recall_at_k(image_features: torch.Tensor, text_features: torch.Tensor, ks=(1, 5)) -> dict:
    """Image->text and text->image Recall@K (%) for paired rows (row i matches row i)."""
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError("image_features and text_features must be paired (N, d) tensors, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    sim = image_features.double() @ text_features.double().T
    n = sim.shape[0]
    truth = sim.diagonal()
    # rank of the true match = number of candidates scoring strictly higher
    rank_i2t = (sim > truth[:, None]).sum(1)
    rank_t2i = (sim > truth[None, :]).sum(0)
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = 100.0 * (rank_i2t < k).double().mean().item()
        out[f"text_to_image_R@{k}"] = 100.0 * (rank_t2i < k).double().mean().item()
    return out
