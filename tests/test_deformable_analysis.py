"""Deformable checkpoints loaded like any other and analysed into maps on one grid.

Each family is saved with ``save_pretrained`` (random weights, a small image processor config)
and loaded through ``load_model``. Oracles: predictions are transformers' own on the pixels its
image processor makes; a level's map on the finest grid is that level's splat (itself checked
against grid_sample in test_deformable_sampling.py) blown up cell by cell (``np.kron``) and
divided by the cells it covers; the encoder's incoming map is every token's splat read at the
clicked cell, one token at a time; anchors are the reference_points each decoder module was
called with, scaled by hand to the photo.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from detr_viz import analyze, load_model
from detr_viz.deformable import DeformableAnalysis, DeformableDetector
from detr_viz.errors import (
    ArgumentError,
    NotADetrCheckpointError,
    UnsafeCheckpointError,
    WeightsUnavailableError,
    WrongVariantError,
)
from detr_viz.explain import RAW, RELEVANCE, ROLLOUT
from detr_viz.families import load_family
from detr_viz.methods import METHOD, Explainer, decoder_maps, redraw_unavailable, replay_unavailable
from detr_viz.sampling import splat
from detr_viz.weights import describe_checkpoint

from conftest import files_read, raises
from deformable_models import ModuleCalls, decoder_modules, small_processor, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ("deformable_detr", "rt_detr", "rt_detr_v2", "d_fine", "deimv2", "lw_detr", "rf_detr")
ENCODER = {"deformable_detr": "deformable", "rt_detr": "dense", "rt_detr_v2": "dense",
           "d_fine": "dense", "deimv2": "dense", "lw_detr": None, "rf_detr": None}


def save(family: str, folder, **extra):
    model = tiny_model(family, dtype=torch.float32, **extra)
    model.save_pretrained(folder)
    small_processor(family).save_pretrained(folder)
    return folder


def saved(tmp_path_factory) -> dict:
    """family -> a folder holding its tiny model and processor (every family)."""
    return {f: save(f, tmp_path_factory.mktemp(f)) for f in FAMILIES}


def random_photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))


def analysed(folders: dict, photo: Image.Image) -> dict:
    """family -> (its model loaded in float64, the model's analysis of ``photo``)."""
    models = {f: load_family(folders[f], dtype=torch.float64) for f in FAMILIES}
    return {f: (models[f], analyze(models[f], photo)) for f in FAMILIES}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return saved(tmp_path_factory)


@pytest.fixture(scope="module")
def photo():
    return random_photo(5)


@pytest.fixture(scope="module")
def analyses(folders, photo):
    return analysed(folders, photo)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_model_reads_the_family_sizes_and_labels_from_config(folders, family):
    model = load_model(checkpoint=str(folders[family]))
    spec = model.spec
    assert isinstance(model, DeformableDetector) and spec.family == family
    assert spec.labels == ("cat", "dog") and spec.num_queries == 7
    assert (spec.decoder_layers, spec.heads) == (2, 2)
    assert spec.encoder_layers == {"deformable_detr": 2, "lw_detr": 0, "rf_detr": 0}.get(family, 1)
    assert describe_checkpoint(folders[family]) == spec
    assert spec.architecture.startswith({"deformable_detr": "Deformable DETR", "rt_detr": "RT-DETR",
                                         "rt_detr_v2": "RT-DETRv2", "d_fine": "D-FINE",
                                         "deimv2": "DEIMv2",
                                         "lw_detr": "LW-DETR", "rf_detr": "RF-DETR"}[family])


def test_loading_reads_config_json_once_so_spec_and_model_come_from_one_reading(folders,
                                                                             monkeypatch):
    from detr_viz import deformable

    read = files_read(monkeypatch, deformable)
    model = deformable.load_deformable(folders["rt_detr"])
    assert read.count("config.json") == 1
    assert (model.spec.decoder_layers, model.spec.num_queries) == (
        model.hf.config.decoder_layers, model.hf.config.num_queries) == (2, 7)


@pytest.mark.parametrize("family", FAMILIES)
def test_predictions_are_transformers_own_on_its_processors_pixels(analyses, folders, photo,
                                                                    family):
    model, analysis = analyses[family]
    assert isinstance(analysis, DeformableAnalysis)
    inputs = type(small_processor(family)).from_pretrained(folders[family])(
        images=photo, return_tensors="pt")
    pixels = inputs["pixel_values"].double()
    with torch.no_grad():
        out = model.hf(pixel_values=pixels)
    np.testing.assert_allclose(analysis.probabilities, out.logits[0].sigmoid().numpy(),
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(analysis.boxes, out.pred_boxes[0].numpy(), rtol=0, atol=1e-6)
    assert analysis.frame.photo_size == (160, 120)
    assert analysis.frame.padded_size == (pixels.shape[3], pixels.shape[2])
    assert analysis.encoder_kind == ENCODER[family]
    assert analysis.num_decoder_layers == 2 and analysis.num_heads == 2


def blown_up(level_map: np.ndarray, factor: int, shape) -> np.ndarray:
    """Each cell of a coarse map shared equally among the factor x factor fine cells it
    covers, cut (or padded with zeros) to ``shape``."""
    fine = np.kron(level_map, np.ones((factor, factor))) / factor**2
    out = np.zeros(shape)
    h, w = min(shape[0], fine.shape[0]), min(shape[1], fine.shape[1])
    out[:h, :w] = fine[:h, :w]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_maps_are_each_levels_splat_spread_over_the_finest_cells(analyses, family):
    _, a = analyses[family]
    for query, layer, head in ((0, 0, 0), (3, -1, None), (6, 1, 1)):
        levels = splat(a.capture.decoder, a.level_shapes, query, layer, head)
        expected = [blown_up(m.numpy(), a.strides[i] // a.strides[0], a.feature_hw)
                    for i, m in enumerate(levels)]
        for level, want in enumerate(expected):
            np.testing.assert_allclose(a.decoder_attention(query, layer, head, level=level), want,
                                       rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(a.decoder_attention(query, layer, head), sum(expected),
                                   rtol=1e-5, atol=1e-7)
    maps = decoder_maps(Explainer(None, a), RAW, [2, 5], layer=0, head=1)
    np.testing.assert_array_equal(maps, a.decoder_attentions([2, 5], 0, 1))


def test_encoder_incoming_is_every_tokens_weight_on_the_clicked_cell(analyses):
    _, a = analyses["deformable_detr"]
    stack, shapes = a.capture.encoder, a.level_shapes
    point = (70.0, 45.0)  # photo pixels
    for level, layer, head in ((0, -1, None), (1, 0, 1), (2, 1, 0)):
        row, col = a.level_grid(level).cell_at(*point)
        tokens = [splat(stack, shapes, t, layer, head)[level][row, col].item()
                  for t in range(stack.weights.shape[1])]
        starts = (*a.capture.level_start_index, len(tokens))
        expected = sum(
            blown_up(np.reshape(tokens[starts[i]:starts[i + 1]], (h, w)),
                     a.strides[i] // a.strides[0], a.feature_hw)
            for i, (h, w) in enumerate(shapes))
        got = a.encoder_attention(point, layer, head, "incoming", level=level)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
        assert got.max() > 0


def dense_weight_on_cell(xy, weights, sampler, cell, shape, head):
    """Every point's share of ``cell`` computed for all points at once (the oracle)."""
    (h, w), (row, col) = shape, cell
    if head is not None:
        xy, weights = xy[:, head:head + 1], weights[:, head:head + 1]
    padding = np.isnan(xy[..., 0])
    u = np.where(padding, -9.0, xy[..., 0] * w - 0.5)
    v = np.where(padding, -9.0, xy[..., 1] * h - 0.5)
    if sampler == "bilinear":
        share = np.clip(1 - np.abs(u - col), 0, None) * np.clip(1 - np.abs(v - row), 0, None)
    else:
        share = ((np.clip(np.floor(u + 1), 0, w - 1) == col)
                 & (np.clip(np.floor(v + 1), 0, h - 1) == row))
    return (share * np.where(padding, 0.0, weights)).sum(axis=(-1, -2)) / xy.shape[1]


@pytest.mark.parametrize("sampler", ["bilinear", "discrete"])
def test_a_clicks_weight_per_token_reads_only_nearby_points_and_equals_the_dense_sum(sampler):
    """The incoming map of a click looks up the points sorted by cell; every cell (edges and
    corners included), with points outside the level, on cell borders and padding, equals
    the sum over every point."""
    from types import SimpleNamespace

    from detr_viz.deformable import _weight_on_cell

    rng = np.random.default_rng(0)
    tokens, heads, levels, count, (h, w) = 40, 3, 2, 4, (5, 7)
    xy = rng.uniform(-0.3, 1.3, (2, tokens, heads, levels, count, 2))  # some outside
    xy[0, :5, :, 1, :, 0] = (np.arange(1, 6)[:, None, None] + 0.5) / w  # on cell centres
    xy[0, 5:8, :, 1, :, 0] = 3 / w  # on a border between two cells
    xy[1, 10:14, 1] = np.nan  # padding slots
    weights = rng.uniform(0, 1, (2, tokens, heads, levels, count))
    stack = SimpleNamespace(locations=torch.from_numpy(xy), weights=torch.from_numpy(weights),
                            sampler=sampler)
    shapes = ((9, 9), (h, w))
    cached = {}
    for layer in (0, 1):
        for head in (None, 2):
            for cell in [(r, c) for r in range(h) for c in range(w)]:
                got = _weight_on_cell(cached, stack, layer, head, 1, cell, shapes).numpy()
                want = dense_weight_on_cell(xy[layer][:, :, 1], weights[layer][:, :, 1],
                                            sampler, cell, (h, w), head)
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert list(cached) == [("cells", 1, 1)]  # one (layer, level) kept at a time


def test_encoder_outgoing_is_the_splat_of_the_token_under_the_point(analyses):
    _, a = analyses["deformable_detr"]
    for level in range(a.num_levels):
        grid = a.level_grid(level)
        for cell in ((0, 0), (grid.shape[0] - 1, 1)):
            centre = grid.cell_center(*cell)
            token = a.token_at(centre, level)
            assert token == a.capture.level_start_index[level] + grid.cell_index(*cell)
            levels = splat(a.capture.encoder, a.level_shapes, token, -1, None)
            expected = sum(blown_up(m.numpy(), a.strides[i] // a.strides[0], a.feature_hw)
                           for i, m in enumerate(levels))
            np.testing.assert_allclose(a.encoder_attention(centre, direction="outgoing",
                                                           level=level),
                                       expected, rtol=1e-5, atol=1e-7)
            points = a.encoder_points(centre, level)
            assert points.stack == "encoder" and points.index == token


@pytest.mark.parametrize("family", ("rt_detr", "d_fine"))
def test_dense_encoder_maps_are_the_aifi_rows_and_columns(analyses, family):
    _, a = analyses[family]
    level, attention = a.capture.dense_level, a.capture.dense_encoder[0].numpy()
    h, w = a.level_shapes[level]
    point = (100.0, 30.0)
    row, col = a.level_grid(level).cell_at(*point)
    cell = row * w + col
    factor = a.strides[level] // a.strides[0]
    for direction, values in (("outgoing", attention.mean(0)[cell]),
                              ("incoming", attention[1][:, cell])):
        head = None if direction == "outgoing" else 1
        got = a.encoder_attention(point, 0, head, direction)
        np.testing.assert_allclose(got, blown_up(values.reshape(h, w), factor, a.feature_hw),
                                   rtol=1e-5, atol=1e-7)
    assert abs(a.encoder_attention(point, direction="outgoing").sum() - 1) < 1e-5
    with raises(ArgumentError, "level 2 only", "not level 0"):
        a.encoder_attention(point, level=0)
    with raises(ArgumentError, "dense", "no sampling points"):
        a.encoder_points(point)


def test_models_without_an_encoder_say_so(analyses):
    _, a = analyses["lw_detr"]
    assert a.num_layers == 0
    with raises(ArgumentError, "LW-DETR", "no transformer encoder"):
        a.encoder_attention((10.0, 10.0))


@pytest.mark.parametrize("family", ("deformable_detr", "rt_detr", "d_fine"))
def test_anchor_boxes_are_the_references_each_decoder_layer_was_given(folders, photo, family):
    model = load_family(folders[family], dtype=torch.float64)
    with ModuleCalls(decoder_modules(model.hf)) as calls:
        a = analyze(model, photo)
    width, height = photo.size
    for layer, (_, bound, _) in enumerate(calls.calls):
        reference = bound["reference_points"][0, :, 0].numpy()  # (Q, 2 | 4), level 0's
        if reference.shape[1] == 2:
            reference = np.concatenate([reference, np.zeros_like(reference)], axis=1)
        cx, cy, w, h = reference.T
        # no padding here, so normalised means the photo (RT-DETR squashes it: both axes)
        expected = np.stack([(cx - w / 2) * width, (cy - h / 2) * height,
                             (cx + w / 2) * width, (cy + h / 2) * height], axis=1)
        for query in (0, 4):
            np.testing.assert_allclose(a.anchor_boxes(query)[layer], expected[query],
                                       rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(a.anchor_boxes(2)[-1], a.boxes_xyxy()[2], rtol=1e-6)


def test_methods_that_need_dense_matrices_say_why(analyses):
    _, a = analyses["rt_detr"]
    assert METHOD[RAW].unavailable(a) is None and METHOD[ROLLOUT].unavailable(a) is None
    why = METHOD[RELEVANCE].unavailable(a)
    assert "not defined for RT-DETR" in why and "Raw attention" in why
    with raises(ArgumentError, "deformable attention"):
        decoder_maps(Explainer(None, a), RELEVANCE, [0])
    assert replay_unavailable(a, "Faithfulness deletes tokens") is None
    assert "its own DETR's layers only" in redraw_unavailable(a, "The sanity check")


def test_bad_controls_say_what_is_valid(analyses):
    _, a = analyses["deformable_detr"]
    with raises(ArgumentError, "level 4 is out of range (0..3)"):
        a.decoder_attention(0, level=4)
    with raises(ArgumentError, "layer 2 is out of range"):
        a.decoder_attention(0, layer=2)
    with raises(ArgumentError, "query 7 is out of range"):
        a.sampling_points(7)
    with raises(ArgumentError, "no 'content' attention term"):
        a.decoder_attention(0, term="content")


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_bad_checkpoints_get_a_clear_message(tmp_path):
    remote = save("rt_detr", tmp_path / "remote")
    edit_config(remote, auto_map={"AutoModel": "modeling_mine.MyDetr"})
    with raises(UnsafeCheckpointError, "own Python code", "never runs code"):
        load_model(checkpoint=str(remote))
    other = save("rt_detr", tmp_path / "other")
    edit_config(other, model_type="yolos")
    with raises(NotADetrCheckpointError, "yolos", "RT-DETR"):
        load_model(checkpoint=str(other))
    mismatched = save("rt_detr", tmp_path / "mismatched")
    edit_config(mismatched, decoder_ffn_dim=48)
    with raises(WrongVariantError, "does not fit", "mismatched keys"):
        load_model(checkpoint=str(mismatched))
    hub = save("d_fine", tmp_path / "hub")
    edit_config(hub, backbone_config=None, backbone="microsoft/resnet-50")
    with raises(WrongVariantError, "look up on the Hub"):
        load_model(checkpoint=str(hub))
    foreign = save("rt_detr", tmp_path / "foreign")
    edit_config(foreign, backbone_config={"model_type": "convnext"})
    with raises(WrongVariantError, "convnext backbone", "cannot build offline"):
        load_model(checkpoint=str(foreign))
    empty = save("lw_detr", tmp_path / "empty")
    (empty / "model.safetensors").unlink()
    with raises(WeightsUnavailableError, "no model.safetensors"):
        load_model(checkpoint=str(empty))
    with raises(WrongVariantError, "leave heads and DC5 empty"):
        load_model(checkpoint=str(save("rf_detr", tmp_path / "heads")), heads=4)
    processor = save("rt_detr", tmp_path / "processor")
    path = processor / "preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()),
                                "image_processor_type": "SamImageProcessor"}))
    with raises(WrongVariantError, "SamImageProcessor", "RTDetrImageProcessor"):
        load_model(checkpoint=str(processor))


def test_without_a_processor_config_the_familys_defaults_apply(tmp_path, photo):
    folder = save("rt_detr", tmp_path / "plain")
    (folder / "preprocessor_config.json").unlink()
    analysis = analyze(load_model(checkpoint=str(folder)), photo)
    assert analysis.frame.input_size == (640, 640)  # RT-DETR squashes every photo to 640x640
    assert analysis.grid.shape == (80, 80) and analysis.stride == 8
    vit = save("lw_detr", tmp_path / "vit")  # not the class default (800 x 1333): 640 x 640
    (vit / "preprocessor_config.json").unlink()
    assert analyze(load_model(checkpoint=str(vit)), photo).frame.input_size == (640, 640)


def test_a_model_that_cannot_take_its_input_says_where_the_size_comes_from(folders, photo,
                                                                           monkeypatch):
    model = load_model(checkpoint=str(folders["rf_detr"]))

    def refuse(*args, **kwargs):
        raise RuntimeError("shape '[1, 4, 12, 4, 16, 192]' is invalid for input of size 633600")

    monkeypatch.setattr(model.hf.model, "forward", refuse)
    with raises(ArgumentError, "RF-DETR DINOv2 could not run on its", "is invalid",
                "preprocessor_config.json"):
        analyze(model, photo)


def test_export_holds_the_sampling_points_and_references(analyses):
    import io

    from detr_viz import export

    _, a = analyses["deformable_detr"]
    view = export.View(threshold=0.0, decoder_layer=0, decoder_head=1, decoder_level=2,
                       points=((30.0, 40.0),), encoder_level=1)
    data = np.load(io.BytesIO(export.to_npz(a, view)))
    np.testing.assert_allclose(data["encoder_maps"][0],
                               a.encoder_attention((30.0, 40.0), level=1), rtol=1e-6)
    queries = [d.query for d in a.detections(0.0)]
    np.testing.assert_array_equal(data["queries"], queries)
    np.testing.assert_allclose(data["decoder_maps"], a.decoder_attentions(queries, 0, 1, level=2),
                               rtol=1e-6)
    np.testing.assert_allclose(data["sampling_xy"][2], a.sampling_points(queries[2], 0).locations,
                               rtol=1e-6)
    np.testing.assert_allclose(data["sampling_weights"][2],
                               a.sampling_points(queries[2], 0).weights, rtol=1e-6)
    np.testing.assert_allclose(data["references_xyxy"][1], a.anchor_boxes(queries[1]), rtol=1e-6)
    assert data["level_strides"].tolist() == list(a.strides)
    settings = json.loads(str(data["settings"]))
    assert settings["decoder_level"] == 2 and "Deformable DETR" in settings["model"]
    assert settings["encoder_level"] == 1
    _, without = analyses["rf_detr"]  # no encoder: the points are kept, no maps around them
    data = np.load(io.BytesIO(export.to_npz(without, export.View(threshold=0.0,
                                                                  points=((3.0, 4.0),)))))
    assert data["encoder_maps"].shape[0] == 0 and data["points_xy"].shape == (1, 2)
    assert json.loads(str(data["settings"]))["encoder_layer"] is None


def test_overlap_shares_are_blocks_for_whole_ratios_and_keep_each_cells_weight():
    from detr_viz.deformable import _overlap

    np.testing.assert_allclose(_overlap(8, 8, 2, 32), np.kron(np.eye(2), np.ones((4, 1))) / 4)
    shares = _overlap(10, 8, 6, 14)  # a 14-pixel patch over 8-pixel cells
    inside = [c for c in range(6) if (c + 1) * 14 <= 80]
    np.testing.assert_allclose(shares[:, inside].sum(axis=0), 1.0)
    assert shares[1, 0] == pytest.approx(6 / 14) and shares[0, 1] == 0  # [8, 14) of [0, 14)
