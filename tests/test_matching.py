"""queries_for_box: planted boxes are found, IoU against a pixel-counting oracle, the sentence."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from detr_viz import COCO_CLASSES, ArgumentError
from detr_viz.matching import iou, match_box

from conftest import small_analysis

DOG, CAT = COCO_CLASSES.index("dog"), COCO_CLASSES.index("cat")


def planted(analysis, boxes_xyxy: np.ndarray, probabilities: np.ndarray | None = None):
    """``analysis`` with its predictions replaced: boxes given in photo pixels (xyxy)."""
    width, height = analysis.original_size
    x0, y0, x1, y1 = boxes_xyxy.T
    cxcywh = np.stack([(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width,
                       (y1 - y0) / height], axis=1).astype(np.float32)
    probabilities = analysis.probabilities if probabilities is None else probabilities
    return dataclasses.replace(analysis, boxes=cxcywh,
                               probabilities=probabilities.astype(np.float32))


def random_boxes(rng, n: int, size: tuple[int, int]) -> np.ndarray:
    corners = rng.integers(0, [size[0], size[1], size[0], size[1]], (n, 4))
    x0, x1 = np.sort(corners[:, [0, 2]], axis=1).T
    y0, y1 = np.sort(corners[:, [1, 3]], axis=1).T
    return np.stack([x0, y0, x1 + 1, y1 + 1], axis=1).astype(np.float64)


def test_iou_equals_counted_pixels():
    rng = np.random.default_rng(0)
    size = (60, 40)
    boxes = random_boxes(rng, 50, size)
    for box in random_boxes(rng, 5, size):
        def mask(b):
            m = np.zeros(size[::-1], bool)
            m[int(b[1]):int(b[3]), int(b[0]):int(b[2])] = True
            return m
        expected = [(mask(b) & mask(box)).sum() / (mask(b) | mask(box)).sum() for b in boxes]
        np.testing.assert_allclose(iou(boxes, tuple(box)), expected, rtol=1e-12)


def test_a_planted_box_finds_its_query():
    base = small_analysis()  # 160 x 96 photo
    rng = np.random.default_rng(1)
    boxes = random_boxes(rng, base.num_queries, (160, 96)) * 0.3  # all in the top-left corner
    drawn = (60.0, 30.0, 140.0, 90.0)
    boxes[41] = (64, 30, 140, 86)  # IoU 0.887 with the drawn box
    boxes[7] = (40, 20, 120, 80)  # overlaps less
    analysis = planted(base, boxes)
    matches = analysis.queries_for_box(drawn, k=3)
    assert [m.query for m in matches][:2] == [41, 7]
    assert matches[0].iou == pytest.approx(76 * 56 / (80 * 60), abs=1e-6)
    np.testing.assert_allclose(matches[0].box, boxes[41], atol=1e-3)
    assert matches[1].iou == pytest.approx(60 * 50 / (80 * 60 + 80 * 60 - 60 * 50), abs=1e-6)
    # corners in any order, and a box hanging off the photo is clipped to it
    again = analysis.queries_for_box((140, 90, 60, 30))
    assert [m.query for m in again] == [m.query for m in matches]
    clipped = analysis.queries_for_box((60, 30, 500, 90))  # x1 clipped to 160
    assert clipped[0].iou == pytest.approx(iou(boxes[41:42], (60, 30, 160, 90))[0], abs=1e-6)


def test_equal_boxes_rank_by_the_expected_class_and_the_sentence_says_why():
    base = small_analysis()
    n = base.num_queries
    boxes = np.tile([[0.0, 0.0, 10.0, 10.0]], (n, 1))
    boxes[41] = boxes[12] = (50, 20, 130, 80)
    probabilities = np.full((n, 91), 0.0001)
    probabilities[41, [DOG, CAT]] = 0.31, 0.52
    probabilities[12, [DOG, CAT]] = 0.05, 0.90
    analysis = planted(base, boxes, probabilities)
    best_dog = analysis.queries_for_box((50, 20, 130, 80), label="dog", k=2)
    assert [m.query for m in best_dog] == [41, 12]
    assert best_dog[0].sentence == ("query 41 found this box (IoU 1.00) but gave 'dog' 0.31 and "
                                    "'cat' 0.52")
    assert best_dog[0].expected == (DOG, "dog", pytest.approx(0.31))
    assert [c for c, _, _ in best_dog[0].top][:2] == [CAT, DOG] and len(best_dog[0].top) == 5
    assert [m.query for m in analysis.queries_for_box((50, 20, 130, 80), CAT, k=2)] == [12, 41]
    best = analysis.queries_for_box((50, 20, 130, 80), k=1)  # no class: the best score first
    assert [m.query for m in best] == [12]
    no_object = 1 - 0.05 - 0.90 - 89 * 0.0001  # 0.04
    assert best[0].sentence == ("query 12 found this box (IoU 1.00) and gave 'cat' 0.90 "
                                f"(no object {no_object:.2f})")


def test_queries_without_overlap_are_not_matches():
    boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    probabilities = np.full((2, 91), 0.01)
    matches = match_box(boxes, probabilities, (0, 0, 5, 5), (40, 40), k=3)
    assert [m.query for m in matches] == [0]


@pytest.mark.parametrize("box, label, k, message", [
    ((10, 10, 10, 50), None, 3, "no area"),
    ((500, 500, 600, 600), None, 3, "no area"),
    ((0, 0, float("nan"), 5), None, 3, "four finite numbers"),
    ((0, 0, 5), None, 3, "four finite numbers"),
    ((0, 0, 50, 50), "unicorn", 3, "not a class of this model"),
    ((0, 0, 50, 50), 91, 3, "out of range"),
    ((0, 0, 50, 50), None, 0, "at least 1"),
])
def test_bad_requests_say_what_to_do(box, label, k, message):
    with pytest.raises(ArgumentError, match=message):
        small_analysis().queries_for_box(box, label, k)
