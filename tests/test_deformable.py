"""Deformable DETR's sampling points, with the attention module's own output as the oracle.

Tiny random transformers models (d_model 32, 2 heads, 3 points, 4 levels from a 3-stage
ResNet of 8..64 channels plus one stride-2 extra level, 2 + 2 layers, 7 queries) are built from
configs here, never downloaded: plain, with box refinement, and two-stage. Their parameters are
perturbed (transformers starts the attention weights at zero, i.e. uniform) and the sampling
offsets spread wide, so that points fall between cells and outside the maps.
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub, whatever happens below
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import (  # noqa: E402
    DeformableDetrConfig,
    DeformableDetrForObjectDetection,
    ResNetConfig,
)

from detr_viz.deformable_capture import capture_deformable  # noqa: E402
from detr_viz.deformable_maps import level_grids, photo_pixels, splat, splat_level  # noqa: E402
from detr_viz.errors import ArgumentError  # noqa: E402
from detr_viz.geometry import FeatureGrid  # noqa: E402

from conftest import hooked_modules, raises  # noqa: E402

VARIANTS = {"plain": {}, "box_refine": {"with_box_refine": True},
            "two_stage": {"with_box_refine": True, "two_stage": True,
                          "two_stage_num_proposals": 7}}
H, W = 96, 128  # levels at strides 8, 16, 32, 64: 12x16, 6x8, 3x4, 2x2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(**extra) -> DeformableDetrConfig:
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                            layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    return DeformableDetrConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=7,
        encoder_n_points=3, decoder_n_points=3, num_feature_levels=4, backbone_config=backbone,
        id2label={0: "cat", 1: "dog", 2: "bird"}, **extra)


@pytest.fixture(scope="module")
def built():
    """variant -> a float64 model with random weights (fixed seed)."""
    models = {}
    for index, (name, extra) in enumerate(VARIANTS.items()):
        torch.manual_seed(index)
        model = DeformableDetrForObjectDetection(tiny_config(**extra))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                spread = 3.0 if pname.endswith("sampling_offsets.bias") else 0.1
                p.add_(torch.randn_like(p) * spread)
        models[name] = model.eval().double().requires_grad_(False)
    return models


def photo(seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def padded_mask() -> torch.Tensor:
    """Real pixels in the top-left 40 x 60: valid ratios below 1 on every level."""
    mask = torch.zeros(1, H, W, dtype=torch.long)
    mask[:, :40, :60] = 1
    return mask


class ModuleCalls:
    """The call arguments and output of every deformable attention module of one stack."""

    def __init__(self, model, part: str):
        layers = model.model.decoder.layers if part == "decoder" else model.model.encoder.layers
        self.modules = [layer.encoder_attn if part == "decoder" else layer.self_attn
                        for layer in layers]
        self.calls: dict[int, tuple[dict, torch.Tensor]] = {}

    def __enter__(self):
        def record(index, module, args, kwargs, output):
            self.calls[index] = (dict(kwargs), output[0])

        self.handles = [m.register_forward_hook(
            lambda m, a, k, o, i=i: record(i, m, a, k, o), with_kwargs=True)
            for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def bilinear_recompute(module, kwargs, locations, weights, shapes) -> torch.Tensor:
    """The module's output (Q, d_model) from captured locations (Q, heads, levels, points, 2)
    and weights: F.grid_sample on each level's values, summed with the weights, projected."""
    value = module.value_proj(kwargs["encoder_hidden_states"])[0]  # (S, d_model)
    if kwargs.get("attention_mask") is not None:
        value = value.masked_fill(~kwargs["attention_mask"][0, :, None], 0.0)
    queries, heads = weights.shape[:2]
    value = value.view(value.shape[0], heads, -1)  # (S, heads, d)
    out, start = 0.0, 0
    for level, (h, w) in enumerate(shapes):
        v = value[start:start + h * w].permute(1, 2, 0).reshape(heads, -1, h, w)
        grid = 2 * locations[:, :, level].transpose(0, 1) - 1  # (heads, Q, P, 2)
        sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # (heads, d, Q, P)
        out = out + torch.einsum("hdqp,qhp->qhd", sampled, weights[:, :, level])
        start += h * w
    return module.output_proj(out.reshape(queries, -1))


def splat_recompute(module, kwargs, capture, layer, encoder=False) -> torch.Tensor:
    """The same output from the splatted maps: per query and head, the concatenated level maps
    (S,) times that head's values (S, d)."""
    value = module.value_proj(kwargs["encoder_hidden_states"])[0]
    if kwargs.get("attention_mask") is not None:
        value = value.masked_fill(~kwargs["attention_mask"][0, :, None], 0.0)
    weights = capture.encoder_weights if encoder else capture.weights
    queries, heads = weights.shape[1:3]
    value = value.view(value.shape[0], heads, -1)
    rows = [[torch.cat([m.flatten() for m in splat(capture, q, layer, h, encoder=encoder)])
             @ value[:, h] for h in range(heads)] for q in range(queries)]
    return module.output_proj(torch.stack([torch.cat(r) for r in rows]))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("masked", [False, True], ids=["full", "padded"])
def test_captured_points_give_the_modules_output(built, variant, masked):
    """The oracle: every decoder layer's output recomputed from the captured locations and
    weights, by grid_sample and by the splatted maps, is the module's own, float64 to 1e-9."""
    model, mask = built[variant], padded_mask() if masked else None
    with ModuleCalls(model, "decoder") as calls:
        cap = capture_deformable(model, photo(), mask)
    assert len(calls.calls) == cap.locations.shape[0] == 2
    assert cap.locations.shape == (2, 7, 2, 4, 3, 2) and cap.weights.shape == (2, 7, 2, 4, 3)
    assert cap.spatial_shapes == ((12, 16), (6, 8), (3, 4), (2, 2))
    assert cap.level_start_index == (0, 192, 240, 252)
    assert (cap.valid_ratios < 1).all() if masked else (cap.valid_ratios == 1).all()
    outside = (cap.locations < 0) | (cap.locations > 1)
    assert outside.any() and not outside.all()  # the zero padding is exercised
    for layer, (kwargs, output) in calls.calls.items():
        module = calls.modules[layer]
        by_sampler = bilinear_recompute(module, kwargs, cap.locations[layer],
                                        cap.weights[layer], cap.spatial_shapes)
        torch.testing.assert_close(by_sampler, output[0], rtol=0, atol=1e-9)
        by_splat = splat_recompute(module, kwargs, cap, layer)
        torch.testing.assert_close(by_splat, output[0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("variant", VARIANTS)
def test_references_are_what_each_layer_started_from(built, variant):
    """locations = reference x valid ratio + offset (transformers' rule, recomputed from the
    module's input): the references are the ones each layer used."""
    model = built[variant]
    with ModuleCalls(model, "decoder") as calls:
        cap = capture_deformable(model, photo(1), padded_mask())
    widths = [r.shape[-1] for r in cap.references]
    assert widths == {"plain": [2, 2], "box_refine": [2, 4], "two_stage": [4, 4]}[variant]
    shapes = torch.tensor(cap.spatial_shapes, dtype=torch.float64).flip(-1)  # (levels, (w, h))
    for layer, (kwargs, _) in calls.calls.items():
        module, ref = calls.modules[layer], cap.references[layer]
        query = kwargs["hidden_states"] + kwargs["position_embeddings"]
        offsets = module.sampling_offsets(query)[0].view(7, 2, 4, 3, 2)
        if ref.shape[-1] == 2:
            scaled = ref[:, None, :] * cap.valid_ratios  # (Q, levels, 2)
            expected = scaled[:, None, :, None] + offsets / shapes[:, None]
        else:
            scaled = ref[:, None, :] * cap.valid_ratios.repeat(1, 2)  # (Q, levels, 4)
            expected = (scaled[:, None, :, None, :2]
                        + offsets / 3 * scaled[:, None, :, None, 2:] * 0.5)
        torch.testing.assert_close(cap.locations[layer], expected, rtol=0, atol=1e-12)
    if variant != "plain":  # refined: layer 1 starts from layer 0's output box
        assert not torch.equal(cap.references[0][:, :2], cap.references[1][:, :2])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("masked", [False, True], ids=["full", "padded"])
def test_encoder_points_give_the_modules_output(built, variant, masked):
    """The same oracle for every token of every encoder layer (deformable self-attention)."""
    model = built[variant]
    with ModuleCalls(model, "encoder") as calls:
        cap = capture_deformable(model, photo(2), padded_mask() if masked else None, encoder=True)
    assert len(calls.calls) == 2 and cap.encoder_locations.shape == (2, 256, 2, 4, 3, 2)
    assert cap.encoder_weights.shape == (2, 256, 2, 4, 3)
    for layer, (kwargs, output) in calls.calls.items():
        module = calls.modules[layer]
        by_sampler = bilinear_recompute(module, kwargs, cap.encoder_locations[layer],
                                        cap.encoder_weights[layer], cap.spatial_shapes)
        torch.testing.assert_close(by_sampler, output[0], rtol=0, atol=1e-9)
    few = replace(cap, encoder_weights=cap.encoder_weights[:, :20],
                  encoder_locations=cap.encoder_locations[:, :20])
    for layer, (kwargs, output) in calls.calls.items():
        by_splat = splat_recompute(calls.modules[layer], kwargs, few, layer, encoder=True)
        torch.testing.assert_close(by_splat, output[0, :20], rtol=0, atol=1e-9)


@pytest.mark.parametrize("variant", VARIANTS)
def test_weights_sum_to_one_per_head(built, variant):
    cap = capture_deformable(built[variant], photo(3))
    totals = cap.weights.sum(dim=(-1, -2))  # (layers, Q, heads)
    torch.testing.assert_close(totals, torch.ones_like(totals), rtol=0, atol=1e-12)
    assert (cap.weights > 0).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_capture_leaves_predictions_bit_for_bit(built, variant):
    """float32, the dtype users run: capture on equals capture off bit for bit. The float32
    points are judged by their distance from the float64 run of the same weights on the same
    image, relative to the model's own float32-vs-float64 drift measured here (no number copied
    from one machine), and that bound is checked to be far below what a wrong capture (another
    layer's or another query's points) would be off by."""
    model = DeformableDetrForObjectDetection(tiny_config(**VARIANTS[variant]))
    model.load_state_dict(built[variant].state_dict())
    model = model.eval().float().requires_grad_(False)
    image = photo(4)  # float64; the float32 runs get this very image, rounded
    with torch.inference_mode():
        plain = model(pixel_values=image.float())
    cap = capture_deformable(model, image.float())
    assert torch.equal(cap.logits, plain.logits[0])
    assert torch.equal(cap.boxes, plain.pred_boxes[0])
    with_encoder = capture_deformable(model, image.float(), encoder=True)
    assert torch.equal(with_encoder.logits, plain.logits[0])
    assert torch.equal(with_encoder.locations, cap.locations)
    assert hooked_modules(model) == []
    exact = capture_deformable(built[variant], image)

    def far(a, b):
        return (a.double() - b).abs().max().item()

    drift = max(far(cap.logits, exact.logits), far(cap.boxes, exact.boxes))
    bound = 100 * drift
    assert far(cap.locations, exact.locations) <= bound
    assert far(cap.weights, exact.weights) <= bound
    wrong = (exact.locations.flip(0), exact.locations.roll(1, dims=1))  # layers, queries
    assert all(far(w, exact.locations) > 100 * bound for w in wrong)


def test_hooks_are_removed_when_the_forward_fails(built):
    model = built["plain"]

    def fail(module, args):
        raise RuntimeError("boom")

    handle = model.model.decoder.layers[-1].register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            capture_deformable(model, photo(), encoder=True)
    finally:
        handle.remove()
    assert hooked_modules(model) == []


def test_two_threads_see_only_their_own_points(built):
    model = built["box_refine"]
    alone = [capture_deformable(model, photo(seed)) for seed in (5, 6)]
    together: dict[int, object] = {}
    barrier = threading.Barrier(2)

    def run(seed):
        barrier.wait()
        for _ in range(3):
            together[seed] = capture_deformable(model, photo(seed))

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (5, 6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed, solo in zip((5, 6), alone, strict=True):
        assert torch.equal(together[seed].locations, solo.locations)
        assert torch.equal(together[seed].references[1], solo.references[1])
    assert hooked_modules(model) == []


def test_splat_is_grid_samples_bilinear_weights():
    """splat_level(points) . values = sum_p weight_p * grid_sample(values, point_p), for points
    inside, on the border and outside a 5 x 7 map."""
    gen = torch.Generator().manual_seed(7)
    points = torch.rand(200, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(200, generator=gen, dtype=torch.float64)
    values = torch.randn(5 * 7, 3, generator=gen, dtype=torch.float64)
    grid = (2 * points - 1)[None, None]  # (1, 1, N, 2)
    sampled = F.grid_sample(values.T.reshape(1, 3, 5, 7), grid, mode="bilinear",
                            padding_mode="zeros", align_corners=False)[0, :, 0]  # (3, N)
    expected = sampled @ weights
    got = splat_level(points, weights, (5, 7)).flatten() @ values
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_splat_conserves_the_weight_of_points_inside(built):
    cap = capture_deformable(built["two_stage"], photo(8))
    half_cell = torch.tensor([[0.5 / w, 0.5 / h] for h, w in cap.spatial_shapes],
                             dtype=torch.float64)[:, None]  # (levels, 1, 2)
    inside = cap.locations.clamp(min=half_cell, max=1 - half_cell)
    clamped = replace(cap, locations=inside)
    for query in range(7):
        total = sum(m.sum() for m in splat(clamped, query, layer=1))  # mean of heads
        torch.testing.assert_close(total, torch.tensor(1.0, dtype=torch.float64), rtol=0,
                                   atol=1e-12)
        for head in range(2):
            maps = splat(cap, query, layer=0, head=head)
            assert [m.shape for m in maps] == [torch.Size(s) for s in cap.spatial_shapes]
            assert all((m >= 0).all() for m in maps) and sum(m.sum() for m in maps) <= 1 + 1e-12


def test_photo_pixels_put_cell_centres_on_feature_grid_centres():
    original, model_input = (640, 480), (W, H)  # the photo, shrunk to the 128 x 96 input
    shapes = ((12, 16), (6, 8), (3, 4), (2, 2))
    grids = level_grids(shapes, original, model_input)
    assert [g.stride for g in grids] == [8, 16, 32, 64]
    cells = [(5, 9), (2, 7), (1, 0), (1, 1)]  # one (row, col) per level
    locations = torch.tensor([[[(c + 0.5) / w, (r + 0.5) / h]]
                              for (r, c), (h, w) in zip(cells, shapes, strict=True)],
                             dtype=torch.float64)
    got = photo_pixels(locations, grids)  # (levels, 1 point, 2)
    for level, (grid, (r, c)) in enumerate(zip(grids, cells, strict=True)):
        assert got[level, 0].tolist() == pytest.approx(grid.cell_center(r, c), abs=1e-9)
    corner = photo_pixels(torch.ones(4, 1, 2), grids)  # (1, 1) on every level: (4, 1, 2)
    assert corner[0, 0].tolist() == pytest.approx([640, 480])  # 12 x 16 at stride 8: no overhang
    assert corner[3, 0].tolist() == pytest.approx([640, 640])  # 2 x 2 at stride 64 overhangs


def test_bad_requests_say_what_to_do(built):
    cap = capture_deformable(built["plain"], photo())
    with raises(ArgumentError, "encoder=True"):
        splat(cap, 0, encoder=True)
    with raises(ArgumentError, "query 7", "0..6"):
        splat(cap, 7)
    with raises(ArgumentError, "head 2"):
        splat(cap, 0, head=2)
    with raises(ArgumentError, "unpadded input"):
        level_grids(((5, 5),), (640, 480), (W, H))
    with raises(ArgumentError, "one RGB image"):
        capture_deformable(built["plain"], torch.zeros(2, 3, H, W, dtype=torch.float64))
    with raises(ArgumentError, "DeformableDetrForObjectDetection"):
        capture_deformable(torch.nn.Linear(2, 2), photo())
    assert isinstance(grids := level_grids(((3, 4),), (W, H), (W, H))[0], FeatureGrid)
    assert grids.stride == 32
