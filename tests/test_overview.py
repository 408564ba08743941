"""Every-layer-every-head overview maps, against Analysis' one-map accessors as the oracle."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from detr_viz import INCOMING, OUTGOING, ArgumentError, analyze
from detr_viz.overview import (
    MEAN,
    decoder_overview,
    encoder_overview,
    head_top_cells,
    peak_cells,
)

from conftest import recipe_model

# Both sides compute the same float32 softmax, but as one (8, n, d) x (8, d, S) batched product
# against eight (1, n, d) x (1, d, S) ones (for the mean: a mean of 8 float32 values in torch
# vs NumPy). Measured (one CPU): they differ by at most 2.4e-7 relative, while either is up to
# 1.0e-5 relative from the float64 maps (largest on the smallest weights). Two float32 paths on
# another CPU can be twice that apart: rtol 3e-5; atol for weights below 1e-9 (down to 1e-37).
RTOL, ATOL = 3e-5, 1e-9


def photo(width=480, height=360, seed=1) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def analysis():
    return analyze(recipe_model("detr_resnet50"), photo(), short_side=320, max_size=533)


def test_decoder_overview_is_every_layer_and_head(analysis):
    query = 42
    maps = decoder_overview(analysis, query)
    assert maps.shape == (6, 9, *analysis.feature_hw) and maps.dtype == np.float32
    assert analysis.num_heads == 8 and MEAN % 9 == 8  # the last column
    for layer in range(6):
        for head in range(8):
            np.testing.assert_allclose(maps[layer, head],
                                       analysis.decoder_attention(query, layer, head),
                                       rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(maps[layer, MEAN], analysis.decoder_attention(query, layer),
                                   rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(maps[:, MEAN], maps[:, :MEAN].mean(axis=1))
    np.testing.assert_allclose(maps.sum(axis=(2, 3)), 1, atol=1e-5)  # rows of a softmax


@pytest.mark.parametrize("direction", [INCOMING, OUTGOING])
def test_encoder_overview_is_every_layer_and_head(analysis, direction):
    point = (300.0, 100.0)
    maps = encoder_overview(analysis, point, direction)
    assert maps.shape == (6, 9, *analysis.feature_hw) and maps.dtype == np.float32
    for layer in range(6):
        for head in [*range(8), None]:
            expected = analysis.encoder_attention(point, layer, head, direction)
            np.testing.assert_allclose(maps[layer, MEAN if head is None else head], expected,
                                       rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(maps[:, MEAN], maps[:, :MEAN].mean(axis=1))
    sums = maps.sum(axis=(2, 3))
    if direction == OUTGOING:
        np.testing.assert_allclose(sums, 1, atol=1e-5)
    else:  # a column does not sum to 1: telling the two readings apart
        assert np.abs(sums - 1).max() > 1e-2


def test_overview_maps_differ_between_heads_and_layers(analysis):
    """Guard against one head or layer repeated everywhere (a wrong axis in the stacking)."""
    maps = decoder_overview(analysis, 7)
    assert not np.allclose(maps[5, 0], maps[5, 1])
    assert not np.allclose(maps[0, 3], maps[5, 3])


def test_peak_cells_are_each_maps_argmax():
    rng = np.random.default_rng(0)
    maps = rng.random((6, 9, 5, 7))
    peaks = peak_cells(maps)
    assert peaks.shape == (6, 9, 2)
    for layer in range(6):
        for head in range(9):
            r, c = peaks[layer, head]
            assert maps[layer, head, r, c] == maps[layer, head].max()
    one = np.zeros((3, 4))
    one[2, 1] = 1
    assert tuple(peak_cells(one)) == (2, 1)  # (row, col), not (x, y)
    assert tuple(peak_cells(np.zeros((3, 4)))) == (0, 0)  # ties: the first in row-major order


def test_head_top_cells_are_sorted_and_exact():
    rng = np.random.default_rng(1)
    maps = rng.random((8, 5, 7))
    top = head_top_cells(maps, 4)
    assert top.shape == (8, 4, 2)
    for head in range(8):
        values = [maps[head, r, c] for r, c in top[head]]
        assert values == sorted(values, reverse=True)
        assert values[0] == maps[head].max()
        assert values[-1] == np.sort(maps[head].ravel())[-4]  # nothing higher was left out
        assert len({tuple(cell) for cell in top[head]}) == 4
    flat = np.zeros((1, 2, 3))
    assert top.dtype.kind == "i"
    assert head_top_cells(flat, 6)[0].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_bad_arguments_are_clear_errors(analysis):
    with pytest.raises(ArgumentError, match="query 100"):
        decoder_overview(analysis, 100)
    with pytest.raises(ArgumentError, match="direction"):
        encoder_overview(analysis, (10, 10), "sideways")
    with pytest.raises(ArgumentError, match="outside"):
        encoder_overview(analysis, (-1, 10))
    with pytest.raises(ArgumentError, match="k must"):
        head_top_cells(np.zeros((8, 2, 3)), 7)
    with pytest.raises(ArgumentError, match="k must"):
        head_top_cells(np.zeros((8, 2, 3)), 0)
    with pytest.raises(ArgumentError, match="heads, h, w"):
        head_top_cells(np.zeros((2, 3)), 1)
    with pytest.raises(ArgumentError, match="h, w"):
        peak_cells(np.zeros(5))
