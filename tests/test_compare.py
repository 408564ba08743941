"""Matching two models' detections: IoU against torchvision, Hungarian against greedy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou as torchvision_box_iou

from detr_viz.analysis import Detection
from detr_viz.compare import Match, box_iou, match_detections
from detr_viz.errors import ArgumentError


def det(query, box, label=47, score=0.95) -> Detection:
    return Detection(query=query, label=label, name=f"class {label}", score=score,
                     box=tuple(float(v) for v in box))


def random_boxes(n, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    corner = rng.uniform(0, 800, (n, 2))
    return np.concatenate([corner, corner + rng.uniform(1, 300, (n, 2))], axis=1)


@pytest.mark.parametrize("n, m", [(1, 1), (7, 11), (30, 3)])
def test_box_iou_matches_torchvision(n, m):
    a, b = random_boxes(n, seed=n), random_boxes(m, seed=100 + m)
    b[0] = a[0]  # one identical pair: IoU 1
    expected = torchvision_box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()  # float64
    iou = box_iou(a, b)
    assert iou.shape == (n, m) and iou.dtype == np.float64
    np.testing.assert_allclose(iou, expected, rtol=1e-12, atol=1e-15)
    assert iou[0, 0] == pytest.approx(1)
    if n * m > 1:  # the random boxes also give partial overlaps and disjoint pairs
        assert ((iou > 0) & (iou < 1)).any() and (iou == 0).any()


def test_box_iou_edge_cases():
    touching = box_iou([[0, 0, 10, 10]], [[10, 0, 20, 10]])  # share an edge: no area
    assert touching[0, 0] == 0
    assert box_iou([[5, 5, 5, 5]], [[5, 5, 5, 5]])[0, 0] == 0  # no area at all: 0, not NaN
    inside = box_iou([[0, 0, 10, 10]], [[2, 2, 7, 7]])[0, 0]
    assert inside == pytest.approx(25 / 100)
    assert box_iou([], [[0, 0, 1, 1]]).shape == (0, 1)
    with pytest.raises(ArgumentError, match="x0 <= x1"):
        box_iou([[10, 0, 0, 10]], [[0, 0, 1, 1]])
    with pytest.raises(ArgumentError, match=r"\(n, 4\)"):
        box_iou([[0, 0, 1]], [[0, 0, 1, 1]])


def greedy(a, b, min_iou=0.5):
    """Best IoU first, each detection used once: the pairing Hungarian must beat below."""
    iou = box_iou([d.box for d in a], [d.box for d in b])
    pairs, used_a, used_b = [], set(), set()
    for i, j in sorted(np.ndindex(iou.shape), key=lambda ij: -iou[ij]):
        if iou[i, j] >= min_iou and i not in used_a and j not in used_b:
            pairs.append((i, j))
            used_a.add(i)
            used_b.add(j)
    return pairs


def test_hungarian_pairs_what_greedy_strands():
    # Along x (all boxes span y in [0, 10]): IoU(a0, b0) = 0.9 is the single best pair, but
    # taking it leaves a1 with b1 at 6/13 < 0.5. Pairing a0-b1 (0.8) and a1-b0 (8/12) keeps both.
    a = [det(1, (1, 0, 10, 10)), det(2, (-2, 0, 8, 10))]
    b = [det(5, (0, 0, 10, 10)), det(6, (2, 0, 11, 10))]
    assert greedy(a, b) == [(0, 0)]
    matching = match_detections(a, b)
    assert [(p.a.query, p.b.query) for p in matching.pairs] == [(1, 6), (2, 5)]
    assert [p.iou for p in matching.pairs] == pytest.approx([0.8, 8 / 12])
    assert matching.only_a == () and matching.only_b == ()


def test_class_mismatch_never_matches():
    box = (10, 10, 200, 200)
    matching = match_detections([det(1, box, label=1)], [det(2, box, label=2)])
    assert matching.pairs == ()
    assert [d.query for d in matching.only_a] == [1] and [d.query for d in matching.only_b] == [2]
    # with a same-class partner of lower IoU available, that one is taken instead
    other = det(3, (20, 20, 200, 200), label=1)
    matching = match_detections([det(1, box, label=1)], [det(2, box, label=2), other])
    assert [(p.a.query, p.b.query) for p in matching.pairs] == [(1, 3)]


def test_pairs_below_min_iou_are_dropped():
    a, b = [det(1, (0, 0, 10, 10))], [det(2, (0, 0, 10, 16))]  # IoU 100 / 160 = 0.625
    assert len(match_detections(a, b, min_iou=0.6).pairs) == 1
    assert match_detections(a, b, min_iou=0.7).pairs == ()
    with pytest.raises(ArgumentError, match="min_iou"):
        match_detections(a, b, min_iou=0)


def test_empty_lists():
    some = [det(1, (0, 0, 10, 10))]
    for a, b in [([], []), (some, []), ([], some)]:
        matching = match_detections(a, b)
        assert matching.pairs == () and matching.only_a == tuple(a)
        assert matching.only_b == tuple(b)


def test_swapping_the_sides_swaps_the_result():
    rng = np.random.default_rng(3)
    a = [det(q, box, label=int(rng.integers(1, 3))) for q, box in enumerate(random_boxes(12, 1))]
    moved = np.array([d.box for d in a]) + rng.normal(0, 15, (12, 4))
    moved = np.concatenate([np.minimum(moved[:, :2], moved[:, 2:]),
                            np.maximum(moved[:, :2], moved[:, 2:])], axis=1)
    b = [det(50 + q, box, label=d.label) for q, (d, box) in enumerate(zip(a, moved, strict=True))]
    b = b[5:] + b[:5] + [det(99, (0, 0, 5, 5))]
    ab, ba = match_detections(a, b, 0.3), match_detections(b, a, 0.3)
    assert len(ab.pairs) >= 3
    assert {(p.a, p.b, p.iou) for p in ab.pairs} == {(p.b, p.a, p.iou) for p in ba.pairs}
    assert set(ab.only_a) == set(ba.only_b) and set(ab.only_b) == set(ba.only_a)
    assert [p.a.query for p in ab.pairs] == sorted(p.a.query for p in ab.pairs)  # A's order
    for pair in ab.pairs:
        assert isinstance(pair, Match) and pair.a.label == pair.b.label and pair.iou >= 0.3
