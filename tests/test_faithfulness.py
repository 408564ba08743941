"""Deletion / insertion curves and the energy pointing game, against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detr_viz import faithfulness
from detr_viz.faithfulness import Curve, pointing_energy, random_baseline, score_maps
from detr_viz.geometry import FeatureGrid
from detr_viz.image import preprocess

from conftest import double_model, photo, small_analysis

STEPS = 4


def model_probability(model, image, features: torch.Tensor, query: int, label: int) -> float:
    """The FULL model (backbone included) with its input_proj output replaced by ``features``."""
    hook = model.input_proj.register_forward_hook(lambda m, i, o: features[None])
    try:
        with torch.inference_mode():
            logits = model(preprocess(image, short_side=96, max_size=160).tensor.double())
    finally:
        hook.remove()
    return float(logits["pred_logits"][0, query].softmax(-1)[label])


def direct_curves(model, analysis, image, attention, query, label, steps):
    """Deletion and insertion done by hand: tokens ranked by the map, replaced by the mean."""
    src = analysis.inputs.src[0]
    c, h, w = src.shape
    order = sorted(range(h * w), key=lambda i: (-float(attention.ravel()[i]), i))
    mean = src.reshape(c, -1).mean(1)
    deletion, insertion = [], []
    for k in np.round(np.linspace(0, 1, steps + 1) * h * w).astype(int):
        deleted, inserted = src.clone(), mean[:, None, None].expand(c, h, w).clone()
        for cell in order[:k]:
            r, col = divmod(cell, w)
            deleted[:, r, col] = mean
            inserted[:, r, col] = src[:, r, col]
        deletion.append(model_probability(model, image, deleted, query, label))
        insertion.append(model_probability(model, image, inserted, query, label))
    return np.array(deletion), np.array(insertion)


def test_curves_equal_deleting_and_inserting_tokens_by_hand():
    analysis, model = small_analysis(), double_model("detr_resnet50")
    query = int(np.argmax(analysis.scores))
    label = int(analysis.probabilities[query].argmax())
    attention = analysis.decoder_attention(query)
    scores = score_maps(model, analysis, query, {"raw": attention}, steps=STEPS)
    deletion, insertion = direct_curves(model, analysis, photo(160, 96), attention, query, label,
                                        STEPS)
    got = scores["raw"]
    np.testing.assert_allclose(got.deletion.probability, deletion, atol=1e-10, rtol=0)
    np.testing.assert_allclose(got.insertion.probability, insertion, atol=1e-10, rtol=0)
    np.testing.assert_allclose(got.deletion.fractions, np.linspace(0, 1, STEPS + 1))
    assert got.deletion.probability[0] == pytest.approx(analysis.probabilities[query, label],
                                                        abs=1e-6)
    assert (got.query, got.label) == (query, label)


def test_random_baseline_serves_every_query_and_shares_the_ends():
    analysis, model = small_analysis(), double_model("detr_resnet50")
    base = random_baseline(model, analysis, steps=STEPS, seed=3)
    assert base.deletion.shape == base.insertion.shape == (STEPS + 1, 100, 91)
    np.testing.assert_array_equal(base.deletion[0], base.insertion[-1])  # nothing changed
    np.testing.assert_array_equal(base.deletion[-1], base.insertion[0])  # all baseline tokens
    again = random_baseline(model, analysis, steps=STEPS, seed=3)
    np.testing.assert_array_equal(again.deletion, base.deletion)
    other = random_baseline(model, analysis, steps=STEPS, seed=4)
    assert not np.array_equal(other.deletion[1:-1], base.deletion[1:-1])
    query = int(np.argmax(analysis.scores))
    maps = {"raw": analysis.decoder_attention(query), "flat": np.ones(analysis.feature_hw)}
    alone = score_maps(model, analysis, query, maps, steps=STEPS)
    shared = score_maps(model, analysis, query, maps, steps=STEPS, baseline=base)
    for name in maps:
        np.testing.assert_allclose(shared[name].deletion.probability,
                                   alone[name].deletion.probability, atol=1e-12, rtol=0)
        np.testing.assert_allclose(shared[name].insertion.probability,
                                   alone[name].insertion.probability, atol=1e-12, rtol=0)
    deletion, insertion = base.curves(query, alone["raw"].label)
    assert deletion.probability[0] == pytest.approx(alone["raw"].deletion.probability[0])
    # a constant map ranks the cells in row-major order, whatever its value: the same tokens go
    # at each step (float64; batched with other maps, the sums may round in another order)
    np.testing.assert_allclose(
        score_maps(model, analysis, query, {"x": np.full(analysis.feature_hw, 7.0)},
                   steps=STEPS, baseline=base)["x"].deletion.probability,
        shared["flat"].deletion.probability, atol=1e-12, rtol=0)


def test_progress_reports_every_batch(monkeypatch):
    analysis, model = small_analysis(), double_model("detr_resnet50")
    monkeypatch.setattr(faithfulness, "BATCH", 2)
    reports = []
    score_maps(model, analysis, 0, {"raw": analysis.decoder_attention(0)}, steps=STEPS,
               progress=lambda done, total: reports.append((done, total)))
    total = 2 + 2 * (STEPS - 1)
    assert reports == [(d, total) for d in range(2, total + 1, 2)]


def test_auc_is_the_trapezoid_area():
    f = np.linspace(0, 1, 5)
    assert Curve(f, np.full(5, 0.4)).auc == pytest.approx(0.4)
    assert Curve(f, f).auc == pytest.approx(0.5)
    assert Curve(f, np.array([1.0, 0, 0, 0, 0])).auc == pytest.approx(0.125)


GRID = FeatureGrid(original_size=(200, 100), input_size=(400, 200), shape=(7, 13), stride=32)


def pixel_oracle(z, grid, box):
    """Spread each cell's mass evenly over its model-input pixels inside the image; count the
    pixels whose centre lies in the box (upsampled 4x per input pixel for precision)."""
    (w, h), s, k = grid.input_size, grid.stride, 4
    ys, xs = (np.arange(h * k) + 0.5) / k, (np.arange(w * k) + 0.5) / k
    rows, cols = (ys // s).astype(int), (xs // s).astype(int)
    counts = np.zeros(grid.shape)
    np.add.at(counts, (rows[:, None], cols[None, :]), 1)
    mass = z[rows[:, None], cols[None, :]] / counts[rows[:, None], cols[None, :]]
    sx, sy = grid.scale
    inside = ((xs[None] >= box[0] * sx) & (xs[None] < box[2] * sx)
              & (ys[:, None] >= box[1] * sy) & (ys[:, None] < box[3] * sy))
    return (mass * inside).sum() / z.sum()


@pytest.mark.parametrize("box", [(0, 0, 200, 100), (10, 5, 60, 40), (150.5, 20, 200, 97.25),
                                 (0, 0, 8, 8), (199, 99, 200, 100)])
def test_pointing_energy_equals_the_pixel_count(box):
    z = np.random.default_rng(1).random(GRID.shape)
    assert pointing_energy(z, GRID, box) == pytest.approx(pixel_oracle(z, GRID, box), abs=1e-9)


def test_pointing_energy_of_one_cell():
    z = np.zeros(GRID.shape)
    z[2, 3] = 5.0
    x0, y0, x1, y1 = GRID.cell_bounds(2, 3)
    assert pointing_energy(z, GRID, (x0, y0, x1, y1)) == pytest.approx(1.0)
    assert pointing_energy(z, GRID, (x0, y0, (x0 + x1) / 2, y1)) == pytest.approx(0.5)
    assert pointing_energy(z, GRID, (0, 0, x0, y0)) == 0.0
    assert np.isnan(pointing_energy(np.zeros(GRID.shape), GRID, (0, 0, 10, 10)))


@pytest.mark.parametrize("fraction", [(0, 0, 1, 1), (0.1, 0.2, 0.6, 0.9), (0.7, 0.0, 1.0, 0.3)])
def test_a_uniform_map_puts_in_the_box_what_random_maps_do_on_average(fraction):
    """The random order's "in the box" (chance): equal weight on every cell, counted as the
    pixel oracle counts it, and the mean over random maps."""
    analysis = small_analysis()
    w, h = analysis.grid.original_size
    box = (fraction[0] * w, fraction[1] * h, fraction[2] * w, fraction[3] * h)
    chance = faithfulness.uniform_pointing(analysis, box)
    assert chance == pytest.approx(pixel_oracle(np.ones(analysis.grid.shape), analysis.grid,
                                                box), abs=1e-3)  # the oracle: 1/4-pixel steps
    rng = np.random.default_rng(0)
    shares = [pointing_energy(rng.random(analysis.grid.shape), analysis.grid, box)
              for _ in range(2000)]
    assert np.mean(shares) == pytest.approx(chance, abs=0.01)


def test_clear_errors():
    analysis, model = small_analysis(), double_model("detr_resnet50")
    with pytest.raises(Exception, match="steps"):
        score_maps(model, analysis, 0, {"raw": analysis.decoder_attention(0)}, steps=1)
    with pytest.raises(Exception, match="feature grid"):
        score_maps(model, analysis, 0, {"raw": np.ones((2, 2))}, steps=STEPS)
    with pytest.raises(Exception, match="out of range"):
        score_maps(model, analysis, 100, {}, steps=STEPS)
