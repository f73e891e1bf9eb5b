"""Evaluation metrics of the paper (section 4.2): HiMo@K and retrieval Recall@K.

HiMo@K asks whether an image's matching score grows as its caption gets more complete:
s_k is the image's score against t_k, the k-th of its increasingly complete prefixes.
``prefixes`` gives the paper's rule (a caption of n sentences cut into K contiguous
segments of roughly equal length, the remainder to the later ones: n=5, K=3 gives [1],
[2, 3], [4, 5]; t_k is the first k segments); any other prefix lists (HiMo-Docci's come
with the data, 2 to 17 per image) go through ``prefix_scores``.

Two conventions, ``himo_at_k(scores, method=...)``:

- ``"paper"`` (§4.2): strict monotonic accuracy for K ≤ 3, the percentage of images with
  s_1 < s_2 (< s_3); the mean over images of the Pearson correlation between k and s_k
  for K > 3. Needs one K for all images.
- ``"pearson"``: the mean Pearson correlation for every K, which is what the authors'
  released evaluation script computes (also for K = 2, 3, where it is ±1 per image), and
  how HiMo@K on HiMo-Docci is reported: over images whose prefix lists have different
  lengths (ragged scores).
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


def _rows(scores) -> list[torch.Tensor]:
    """Per-image score rows: a (pairs, K) tensor, or a list of per-image sequences of any
    lengths >= 2 (ragged)."""
    if isinstance(scores, torch.Tensor):
        return list(_check_scores(scores))
    rows = [torch.as_tensor(r, dtype=torch.float64).reshape(-1) for r in scores]
    if not rows:
        raise ValueError("scores must hold at least one image's scores")
    short = [i for i, r in enumerate(rows) if r.numel() < 2]
    if short:
        raise ValueError(f"every image needs >= 2 scores (prefixes); image {short[0]} has "
                         f"{rows[short[0]].numel()}")
    return rows


def monotonic_accuracy(scores) -> float:
    """Percentage of images whose scores strictly increase (HiMo@2, HiMo@3)."""
    rows = _rows(scores)
    return 100.0 * sum(bool((r[1:] > r[:-1]).all()) for r in rows) / len(rows)


def _pearson(r: torch.Tensor) -> float:
    k = torch.arange(1, r.numel() + 1, dtype=r.dtype)
    kc, rc = k - k.mean(), r - r.mean()
    den = float(kc.norm() * rc.norm())
    return float(rc @ kc) / den if den > 0 else 0.0


def pearson_monotonicity(scores) -> float:
    """Mean over images of the Pearson correlation between k = 1..K_i and the scores (each
    image with its own K_i when ragged). Constant scores have no correlation: 0."""
    rows = _rows(scores)
    return sum(_pearson(r) for r in rows) / len(rows)


METHODS = ("paper", "pearson")


def himo_at_k(scores, method: str = "paper") -> float:
    """HiMo@K of per-image prefix scores (a (pairs, K) tensor or ragged per-image lists).

    ``method="paper"``: accuracy (%) for K <= 3, mean Pearson for K > 3 (one K needed);
    ``method="pearson"``: mean Pearson for every K, as the authors' script computes it.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    rows = _rows(scores)
    if method == "pearson":
        return pearson_monotonicity(rows)
    ks = {r.numel() for r in rows}
    if len(ks) > 1:
        raise ValueError(f"method='paper' needs one K for every image, got K in {sorted(ks)}; "
                         "ragged prefix lists are scored with method='pearson'")
    return monotonic_accuracy(rows) if ks.pop() <= 3 else pearson_monotonicity(rows)


def prefix_scores(image_features: torch.Tensor, prefix_lists, encode_text) -> list[torch.Tensor]:
    """Scores s_ik = cos(image_i, t_ik) for user-supplied prefix lists (one list of
    increasingly complete texts per image, any lengths): ``encode_text(list[str]) -> (n, d)``
    features. Returns the ragged per-image scores for ``himo_at_k``."""
    if len(prefix_lists) != image_features.shape[0]:
        raise ValueError(f"prefix_lists has {len(prefix_lists)} lists for "
                         f"{image_features.shape[0]} images")
    flat = [t for lst in prefix_lists for t in lst]
    txt = torch.nn.functional.normalize(torch.as_tensor(encode_text(flat)).double(), dim=-1)
    img = torch.nn.functional.normalize(image_features.double(), dim=-1)
    owner = torch.repeat_interleave(torch.tensor([len(lst) for lst in prefix_lists]))
    scores = (txt * img[owner]).sum(-1)
    return list(scores.split([len(lst) for lst in prefix_lists]))


def recall_at_k(image_features: torch.Tensor, text_features: torch.Tensor, ks=(1, 5)) -> dict:
    """Image->text and text->image Recall@K (%) for paired rows (row i matches row i)."""
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError("image_features and text_features must be paired (N, d) tensors, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    sim = image_features.double() @ text_features.double().T
    truth = sim.diagonal()
    # rank of the true match = number of candidates scoring strictly higher
    rank_i2t = (sim > truth[:, None]).sum(1)
    rank_t2i = (sim > truth[None, :]).sum(0)
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = 100.0 * (rank_i2t < k).double().mean().item()
        out[f"text_to_image_R@{k}"] = 100.0 * (rank_t2i < k).double().mean().item()
    return out
