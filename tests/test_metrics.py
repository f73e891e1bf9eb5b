"""HiMo@K and Recall@K on hand-made inputs whose answers are known."""
import pytest
import torch

from himo_fast.train import metrics


def test_segments_follow_the_paper():
    assert metrics.segments([1, 2, 3, 4, 5], 3) == [[1], [2, 3], [4, 5]]
    assert metrics.segments([1, 2, 3, 4, 5, 6], 2) == [[1, 2, 3], [4, 5, 6]]
    assert metrics.segments([1, 2, 3], 3) == [[1], [2], [3]]
    with pytest.raises(ValueError, match="at least k=3"):
        metrics.segments([1, 2], 3)
    with pytest.raises(ValueError, match="k must be"):
        metrics.segments([1, 2], 0)


def test_prefixes():
    cap = "A red circle. It is large! It is on the left. Above it is a square. The square is blue."
    t = metrics.prefixes(cap, 3)
    assert t == ["A red circle.", "A red circle. It is large! It is on the left.", cap]


def test_monotonic_accuracy_known_answers():
    s = torch.tensor([[0.1, 0.2, 0.3],   # increasing
                      [0.1, 0.3, 0.2],   # not
                      [0.2, 0.2, 0.3],   # tie: not strict
                      [0.0, 0.5, 0.9]])  # increasing
    assert metrics.monotonic_accuracy(s) == 50.0
    assert metrics.himo_at_k(s) == 50.0
    assert metrics.monotonic_accuracy(s[:, :2]) == 75.0


def test_pearson_known_answers():
    s = torch.tensor([[1.0, 2.0, 3.0, 4.0],    # rho = 1
                      [4.0, 3.0, 2.0, 1.0],    # rho = -1
                      [0.5, 0.5, 0.5, 0.5],    # constant: 0
                      [1.0, 3.0, 2.0, 4.0]])   # rho = 0.8
    assert metrics.pearson_monotonicity(s) == pytest.approx((1 - 1 + 0 + 0.8) / 4)
    assert metrics.himo_at_k(s) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="scores"):
        metrics.himo_at_k(torch.ones(3))


def test_recall_known_answers():
    img = torch.eye(4)
    txt = torch.eye(4)[[0, 1, 3, 2]]  # pairs 2 and 3 swapped
    r = metrics.recall_at_k(img, txt, ks=(1, 2))
    assert r["image_to_text_R@1"] == 50.0 and r["text_to_image_R@1"] == 50.0
    assert r["image_to_text_R@2"] == 100.0  # the swapped ones are beaten by exactly one
    txt3 = torch.eye(4)[[1, 2, 3, 0]]  # every true match scores 0 and is beaten by one 1
    assert metrics.recall_at_k(img, txt3, ks=(1,))["text_to_image_R@1"] == 0.0
    with pytest.raises(ValueError, match="paired"):
        metrics.recall_at_k(img, txt[:3])


def test_ragged_scores_and_the_two_methods():
    ragged = [[0.1, 0.2], [0.3, 0.1, 0.2, 0.4], [1.0, 2.0, 3.0]]  # K = 2, 4, 3
    rho = [1.0, metrics._pearson(torch.tensor([0.3, 0.1, 0.2, 0.4], dtype=torch.float64)), 1.0]
    assert metrics.himo_at_k(ragged, method="pearson") == pytest.approx(sum(rho) / 3)
    assert 0.0 < rho[1] < 1.0
    with pytest.raises(ValueError, match="method='pearson'"):
        metrics.himo_at_k(ragged)  # the paper's rule needs one K
    square = torch.tensor([[0.1, 0.3, 0.2], [0.1, 0.2, 0.3]])
    assert metrics.himo_at_k(square, method="paper") == 50.0
    assert metrics.himo_at_k(square, method="pearson") == pytest.approx((0.5 + 1.0) / 2)
    assert metrics.himo_at_k([r.tolist() for r in square]) == 50.0  # lists like tensors
    with pytest.raises(ValueError, match="method must be"):
        metrics.himo_at_k(square, method="spearman")
    with pytest.raises(ValueError, match=">= 2 scores"):
        metrics.himo_at_k([[0.1, 0.2], [0.3]], method="pearson")


def test_prefix_scores_for_user_prefix_lists():
    # A toy encoder: each text's features are its word counts of "red" and "circle".
    encode = lambda texts: torch.tensor([[t.count("red"), t.count("circle")] for t in texts],
                                        dtype=torch.float64)
    img = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    lists = [["red", "red circle"], ["circle", "red circle", "red red circle"]]
    s = metrics.prefix_scores(img, lists, encode)
    assert [len(r) for r in s] == [2, 3]
    assert s[0].tolist() == pytest.approx([2 ** -0.5, 1.0])
    assert s[1].tolist() == pytest.approx([0.0, 2 ** -0.5, 2 / 5 ** 0.5])
    assert metrics.himo_at_k(s, method="pearson") == pytest.approx(
        (1.0 + metrics._pearson(s[1])) / 2)
    with pytest.raises(ValueError, match="2 lists for 1 images"):
        metrics.prefix_scores(img[:1], lists, encode)
