"""Conditional DETR and DAB-DETR from Hugging Face folders, with transformers itself as the oracle.

Tiny random models (d_model 32, 2 heads, 2 + 2 layers, 7 queries, 3 named classes, a 4-stage
ResNet of 8..64 channels) are built from configs here, saved with ``save_pretrained`` and loaded
back through detr-viz, in float64 (no hub, no pretrained backbone, no socket may connect). The
captured factors must give transformers' own ``output_attentions=True`` (eager) weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub, whatever happens below
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    ConditionalDetrConfig,
    ConditionalDetrForObjectDetection,
    DabDetrConfig,
    DabDetrForObjectDetection,
    ResNetConfig,
)
from transformers.models.dab_detr import modeling_dab_detr  # noqa: E402

from detr_viz.errors import (  # noqa: E402
    ArgumentError,
    CorruptCheckpointError,
    NotADetrCheckpointError,
    UnsafeCheckpointError,
    WeightsUnavailableError,
    WrongVariantError,
)
from detr_viz.hf_capture import capture_hf  # noqa: E402
from detr_viz.hf_families import cast_dab_queries, load_hf_family, open_hf_family  # noqa: E402

from conftest import RunsShell, hooked_modules, raises  # noqa: E402

FAMILIES = ("conditional_detr", "dab_detr")
LABELS = {0: "cat", 1: "dog", 2: "bird"}
H, W = 96, 128  # a 3 x 4 feature grid at stride 32

pytestmark = pytest.mark.usefixtures("offline", "one_torch_thread", "no_sockets")


@pytest.fixture
def no_sockets(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tests must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)



def tiny_config(family: str, **extra):
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                            layer_type="basic", out_features=["stage4"])
    sizes = {"encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2,
             "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
             "num_queries": 7, "id2label": LABELS, "backbone_config": backbone} | extra
    if family == "conditional_detr":
        return ConditionalDetrConfig(d_model=32, **sizes)
    return DabDetrConfig(hidden_size=32, **sizes)


@pytest.fixture(scope="module")
def built():
    """family -> a float32 model with random weights (fixed seed), as it was before saving."""
    models = {}
    for index, family in enumerate(FAMILIES):
        torch.manual_seed(index)
        cls = ConditionalDetrForObjectDetection if family == "conditional_detr" else (
            DabDetrForObjectDetection)
        model = cls(tiny_config(family))
        model.set_attn_implementation("eager")  # as loaded: same kernels, same numbers
        with torch.no_grad():  # DAB-DETR starts its box head at zero: give it something to do
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        models[family] = model.eval()
    return models


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory) -> dict[str, Path]:
    folders = {}
    for family, model in built.items():
        folders[family] = tmp_path_factory.mktemp(family)
        model.save_pretrained(folders[family])
    return folders


@pytest.fixture(scope="module")
def loaded(saved):
    """family -> the saved folder loaded by detr-viz in float64."""
    return {family: load_hf_family(folder, torch.float64) for family, folder in saved.items()}


def image(seed=0) -> torch.Tensor:
    return torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def right_padding(columns: int = 32) -> torch.Tensor:
    """pixel_mask with the rightmost ``columns`` pixel columns padded (0)."""
    mask = torch.ones(1, H, W, dtype=torch.long)
    mask[..., W - columns:] = 0
    return mask


@contextlib.contextmanager
def float64_softmax():
    """transformers' DAB-DETR takes its softmax in float32 whatever the dtype; make it float64
    there so that its own weights are an exact float64 oracle."""
    functional = modeling_dab_detr.nn.functional
    original = functional.softmax

    def softmax(x, dim=None, dtype=None, **kwargs):
        return original(x, dim=dim, **kwargs)

    functional.softmax = softmax
    try:
        yield
    finally:
        functional.softmax = original


def transformers_run(model, pixel_mask=None):
    with torch.no_grad():
        return model(pixel_values=image(), pixel_mask=pixel_mask, output_attentions=True)


def dense(factors, head: int) -> torch.Tensor:
    return torch.from_numpy(factors.dense(head))


# Capture against transformers' own attention


@pytest.mark.parametrize("padded", [False, True], ids=["whole", "padded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_factors_give_transformers_attention(loaded, family, padded):
    model, mask = loaded[family], right_padding() if padded else None
    with float64_softmax() if family == "dab_detr" else contextlib.nullcontext():
        cap, want = capture_hf(model, image(), mask), transformers_run(model, mask)
        with torch.no_grad():  # no hooks, no output_attentions
            plain = model(pixel_values=image(), pixel_mask=mask)
    parts = [(cap.encoder, want.encoder_attentions, (12, 12)),
             (cap.decoder, want.cross_attentions, (7, 12)),
             (cap.decoder_self, want.decoder_attentions, (7, 7))]
    for captured, theirs, shape in parts:
        assert len(captured) == len(theirs) == 2
        for layer, (factors, weights) in enumerate(zip(captured, theirs, strict=True)):
            assert factors.shape == shape and factors.num_heads == 2
            for head in range(2):
                got = dense(factors, head)
                assert torch.allclose(got, weights[0, head], rtol=0, atol=1e-9), (layer, head)
    # Outputs are the model's own, and the hooks did not change them
    assert torch.equal(cap.logits, plain.logits[0]) and torch.equal(cap.boxes, plain.pred_boxes[0])
    assert cap.logits.shape == (7, 3) and cap.boxes.shape == (7, 4)
    assert torch.equal(cap.probabilities, plain.logits[0].sigmoid())
    assert cap.family == family and cap.grid == (3, 4)


def test_dab_detr_float32_softmax_is_within_its_rounding(loaded):
    """Unpatched, a float64 DAB-DETR's softmax casts its logits to float32 and back: its own
    weights are then off by about |logit| * 6e-8 (2e-7 measured here) from the exact ones."""
    cap, want = capture_hf(loaded["dab_detr"], image()), transformers_run(loaded["dab_detr"])
    gaps = [(dense(f, h) - w[0, h]).abs().max() for f, w in zip(
        cap.encoder + cap.decoder, want.encoder_attentions + want.cross_attentions, strict=True)
            for h in range(2)]
    assert 0 < max(gaps) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_cells_get_no_attention(loaded, family):
    cap = capture_hf(loaded[family], image(), right_padding(32))
    expected = torch.zeros(3, 4, dtype=torch.bool)
    expected[:, 3] = True  # pixels 96..127 are padding: the last column of 32-pixel cells
    assert torch.equal(cap.padding, expected)
    keys = expected.flatten()
    for factors in cap.encoder + cap.decoder + cap.content + cap.spatial:
        for head in range(2):
            weights = dense(factors, head)
            assert torch.all(weights[:, keys] == 0) and torch.all(weights[:, ~keys] > 0)
            ones = torch.ones(weights.shape[0], dtype=torch.float64)
            assert torch.allclose(weights.sum(-1), ones, rtol=0, atol=1e-12)
    assert not capture_hf(loaded[family], image()).padding.any()


# Conditional DETR: content and spatial terms, reference points


def cross_attention_inputs(model, mask=None) -> list[dict]:
    """The keyword arguments each decoder cross-attention module was called with."""
    calls = []
    handles = [layer.encoder_attn.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(kwargs), with_kwargs=True)
        for layer in model.model.decoder.layers]
    try:
        with torch.no_grad():
            model(pixel_values=image(), pixel_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def content_and_spatial_logits(module, call) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent recomputation, (heads, Q, S) each, from the paper's definition: per head,
    content q_c . k_c and spatial q_s . k_s, both scaled by 1 / sqrt(2 * head_dim)."""
    q_c = module.q_content_proj(call["hidden_states"])[0]  # (Q, D)
    k_c = module.k_content_proj(call["encoder_hidden_states"])[0]  # (S, D)
    k_s = module.k_pos_proj(call["encoder_position_embeddings"])[0]
    if call["query_position_embeddings"] is not None:  # first layer: position in the content
        q_c = q_c + module.q_pos_proj(call["query_position_embeddings"])[0]
        k_c = k_c + k_s
    q_s = module.q_pos_sine_proj(call["query_sine_embed"])[0]
    heads, scale = module.num_attention_heads, (2 * module.head_dim) ** -0.5
    split = [t.reshape(t.shape[0], heads, -1).transpose(0, 1) for t in (q_c, k_c, q_s, k_s)]
    q_c, k_c, q_s, k_s = split
    return q_c @ k_c.transpose(1, 2) * scale, q_s @ k_s.transpose(1, 2) * scale


@pytest.mark.parametrize("padded", [False, True], ids=["whole", "padded"])
def test_conditional_content_and_spatial_terms(loaded, padded):
    model, mask = loaded["conditional_detr"], right_padding() if padded else None
    cap = capture_hf(model, image(), mask)
    want = transformers_run(model, mask).cross_attentions
    keys = cap.padding.flatten()
    calls = cross_attention_inputs(model, mask)
    for layer, call in enumerate(calls):
        module = model.model.decoder.layers[layer].encoder_attn
        with torch.no_grad():
            content, spatial = content_and_spatial_logits(module, call)
        content, spatial = (t.masked_fill(keys, -torch.inf) for t in (content, spatial))
        # the two terms add up to the model's logits...
        assert torch.allclose((content + spatial).softmax(-1), want[layer][0], rtol=0, atol=1e-12)
        for head in range(2):  # ...and each is captured on its own
            got_c, got_s = dense(cap.content[layer], head), dense(cap.spatial[layer], head)
            assert torch.allclose(got_c, content[head].softmax(-1), rtol=0, atol=1e-12)
            assert torch.allclose(got_s, spatial[head].softmax(-1), rtol=0, atol=1e-12)
            assert (got_c - got_s).abs().max() > 1e-3  # the split is not one map twice
    assert len(cap.content) == len(cap.spatial) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_full_cross_attention_is_content_times_spatial(loaded, family):
    """softmax(a + b) = softmax(a) * softmax(b), renormalised: for both families the captured
    terms multiply back to the full weights that transformers computes (checked above)."""
    with float64_softmax() if family == "dab_detr" else contextlib.nullcontext():
        cap = capture_hf(loaded[family], image(), right_padding())
    keys = ~cap.padding.flatten()
    for full, content, spatial in zip(cap.decoder, cap.content, cap.spatial, strict=True):
        for head in range(2):
            product = (dense(content, head) * dense(spatial, head))[:, keys]
            product /= product.sum(-1, keepdim=True)
            assert torch.allclose(product, dense(full, head)[:, keys], rtol=1e-12, atol=0)
            assert (dense(content, head) - dense(full, head)).abs().max() > 1e-3


def test_conditional_reference_points(loaded):
    model = loaded["conditional_detr"]
    cap = capture_hf(model, image())
    with torch.no_grad():
        exposed = model.model(pixel_values=image()).reference_points  # (Q, B, 2)
        head = model.model.decoder.ref_point_head
        independent = head(model.model.query_position_embeddings.weight).sigmoid()
    assert cap.reference_points.shape == (7, 2) and cap.anchors is None
    assert torch.equal(cap.reference_points, exposed[:, 0])
    assert torch.allclose(cap.reference_points, independent, rtol=0, atol=1e-15)


def test_dab_detr_anchors(loaded):
    model = loaded["dab_detr"]
    cap = capture_hf(model, image(), right_padding())
    with torch.no_grad():
        exposed = model.model(pixel_values=image(), pixel_mask=right_padding()).reference_points
    assert cap.anchors.shape == (2, 7, 4) and cap.reference_points is None
    assert torch.equal(cap.anchors, exposed[:, 0])  # (layers, B, Q, 4) in transformers
    # layer 0 starts from the learned anchors; layer 1 from boxes refined by layer 0
    learned = model.model.query_refpoint_embeddings.weight.sigmoid()
    assert torch.equal(cap.anchors[0], learned)
    assert (cap.anchors[1] - cap.anchors[0]).abs().max() > 1e-3
    assert torch.all((cap.anchors > 0) & (cap.anchors < 1))


# Hooks


def test_capture_leaves_no_hooks_even_on_failure(loaded):
    model = loaded["conditional_detr"]
    before = hooked_modules(model)
    capture_hf(model, image())
    assert hooked_modules(model) == before

    def fail(*args):
        raise RuntimeError("failed half-way")

    handle = model.model.decoder.layers[1].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="half-way"):
            capture_hf(model, image())
    finally:
        handle.remove()
    assert hooked_modules(model) == before


def test_threads_sharing_a_model_get_their_own_capture(loaded):
    model = loaded["conditional_detr"]
    alone = [capture_hf(model, image(seed)) for seed in (0, 1)]
    results, errors = {}, []
    barrier = threading.Barrier(2)

    def run(seed):
        barrier.wait()
        try:
            for _ in range(5):
                results[seed] = capture_hf(model, image(seed))
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for seed, want in enumerate(alone):
        got = results[seed]
        assert torch.equal(got.logits, want.logits)
        for mine, theirs in zip(got.encoder + got.decoder + got.spatial,
                                want.encoder + want.decoder + want.spatial, strict=True):
            assert torch.equal(mine.q, theirs.q) and torch.equal(mine.lse, theirs.lse)


def test_capture_refuses_what_it_cannot_show(loaded):
    with raises(ArgumentError, "(1, 3, H, W)", "(2, 3, 96, 128)"):
        capture_hf(loaded["dab_detr"], torch.cat([image(), image()]))
    with raises(ArgumentError, "(1, 3, H, W)", "(1, 2, 96, 128)"):
        capture_hf(loaded["dab_detr"], image()[:, :2])
    with raises(ArgumentError, "Conditional DETR or DAB-DETR"):
        capture_hf(torch.nn.Linear(2, 2), image())


# Loading and vetting


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_folder_computes_what_the_saved_model_did(built, saved, loaded, family):
    model = loaded[family]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "eager" and model.dtype == torch.float64
    original = built[family].double()
    if family == "dab_detr":
        cast_dab_queries(original)
    try:
        with torch.no_grad():
            want = original(pixel_values=image(1), pixel_mask=right_padding())
            got = model(pixel_values=image(1), pixel_mask=right_padding())
    finally:
        built[family].float()
    assert torch.equal(got.logits, want.logits) and torch.equal(got.pred_boxes, want.pred_boxes)
    in_float32 = load_hf_family(saved[family])  # the default dtype, the weights as saved
    state = built[family].state_dict()
    assert all(torch.equal(t, state[k]) for k, t in in_float32.state_dict().items())


def legacy_name(name: str) -> str:
    """A transformers 5.x Conditional DETR key as 4.x named it (microsoft/conditional-detr-*
    on the Hub holds these names)."""
    short = {"q_pos_sine": "qpos_sine", "q_content": "qcontent", "q_pos": "qpos",
             "k_content": "kcontent", "k_pos": "kpos", "v": "v"}
    name = name.replace("model.backbone.", "model.backbone.conv_encoder.")
    name = re.sub(r"(self_attn|encoder_attn)\.o_proj\.", r"\1.out_proj.", name)
    name = re.sub(r"layers\.(\d+)\.mlp\.fc", r"layers.\1.fc", name)
    return re.sub(r"decoder\.layers\.(\d+)\.(self_attn|encoder_attn)\.(q_pos_sine|q_content|q_pos"
                  r"|k_content|k_pos|v)_proj", lambda m: f"decoder.layers.{m[1]}."
                  f"{'sa' if m[2] == 'self_attn' else 'ca'}_{short[m[3]]}_proj", name)


def test_legacy_key_names_load_to_the_same_model(built, saved, tmp_path):
    """A file in transformers 4.x names (as the Hub holds) loads to the same weights."""
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "config.json").write_text((saved["conditional_detr"] / "config.json").read_text())
    state = built["conditional_detr"].state_dict()
    renamed = {legacy_name(k): t.contiguous() for k, t in state.items()}
    assert "model.decoder.layers.1.ca_qpos_sine_proj.weight" in renamed
    assert "model.encoder.layers.0.fc1.weight" in renamed
    assert sum(a != b for a, b in zip(state, renamed, strict=True)) > len(state) // 2
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    got = load_hf_family(folder).state_dict()
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


@pytest.mark.parametrize("family", FAMILIES)
def test_open_describes_the_checkpoint(saved, family):
    info = open_hf_family(saved[family])
    assert (info.family, info.weights, info.folder) == (
        family, saved[family] / "model.safetensors", saved[family])
    assert info.labels == ("cat", "dog", "bird") and info.num_labels == 3
    assert (info.num_queries, info.encoder_layers, info.decoder_layers) == (7, 2, 2)
    assert (info.encoder_heads, info.decoder_heads, info.d_model, info.stride) == (2, 2, 32, 32)
    assert info.backbone == "transformers ResNet [1, 1, 1, 1]"
    assert open_hf_family(saved[family] / "model.safetensors") == info
    assert open_hf_family(saved[family] / "config.json") == info


def config_folder(path: Path, config: dict, weights: str | None = "model.safetensors") -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    if weights:
        (path / weights).write_bytes(b"")  # vetting never reads it
    return path


def hub_config(family: str, **fields) -> dict:
    """config.json as transformers 4.x wrote it for microsoft/conditional-detr-resnet-50 and
    IDEA-Research/dab-detr-resnet-50: a timm backbone named by the legacy fields."""
    model_type = {"conditional_detr": "conditional_detr", "dab_detr": "dab-detr"}[family]
    return {"model_type": model_type, "use_timm_backbone": True, "backbone": "resnet50",
            "backbone_config": None, "dilation": False, "num_queries": 300,
            "id2label": {str(i): f"class {i}" for i in range(91)}} | fields


@pytest.mark.parametrize(
    ("fields", "stride", "backbone", "queries"),
    [({}, 32, "timm resnet50", 300),
     ({"dilation": True, "backbone": "resnet101"}, 16, "timm resnet101", 300),
     ({"backbone_kwargs": {"out_indices": [1, 2, 3, 4], "output_stride": 16}}, 16,
      "timm resnet50", 300),
     ({"num_patterns": 3}, 32, "timm resnet50", 900)],
)
def test_open_reads_hub_configs(tmp_path, fields, stride, backbone, queries):
    info = open_hf_family(config_folder(tmp_path / "c", hub_config("dab_detr", **fields)))
    assert (info.stride, info.backbone, info.num_queries) == (stride, backbone, queries)
    assert info.labels[90] == "class 90" and info.num_labels == 91 and info.d_model == 256


def test_timm_dc5_backbone_builds_offline_at_stride_16(tmp_path):
    config = tiny_config("conditional_detr", backbone_config=None, use_timm_backbone=True,
                         backbone="resnet18", dilation=True)
    folder = tmp_path / "dc5"
    ConditionalDetrForObjectDetection(config).save_pretrained(folder)
    info = open_hf_family(folder)
    assert (info.stride, info.backbone) == (16, "timm resnet18")
    cap = capture_hf(load_hf_family(folder, torch.float64), image())
    assert cap.grid == (H // 16, W // 16) and cap.encoder[0].shape == (48, 48)


@pytest.mark.parametrize(
    ("config", "words"),
    [({"model_type": "yolos"}, ['"yolos" model', "Conditional DETR", "DAB-DETR"]),
     ({"model_type": "owlvit"}, ['"owlvit" model', '"conditional_detr"']),
     ({"model_type": "resnet", "architectures": ["ResNetForImageClassification"]},
      ['"resnet" model', '"dab-detr"']),
     ({"model_type": "vit"}, ['"vit" model', "DETR (model_type"]),
     ({"model_type": "detr"}, ['"detr" model', "detr_viz.load_model"]),
     ({"num_queries": 100}, ["no transformers model"]),
     (hub_config("conditional_detr", architectures=["ConditionalDetrForSegmentation"]),
      ["ConditionalDetrForSegmentation", "ConditionalDetrForObjectDetection"])],
)
def test_other_models_are_refused_by_name(tmp_path, config, words):
    folder = config_folder(tmp_path / "m", config)
    with raises(NotADetrCheckpointError, folder / "config.json", *words):
        open_hf_family(folder)


@pytest.mark.parametrize(
    ("fields", "words"),
    [({"backbone": "resnet50d"}, ["resnet50d", "not a plain ResNet"]),
     ({"backbone_config": {"model_type": "swin"}}, ["swin model, not a ResNet"]),
     ({"use_timm_backbone": False, "backbone": "microsoft/resnet-50"},
      ["microsoft/resnet-50", "Hub"]),
     ({"backbone_kwargs": {"out_indices": [1, 2, 3]}}, ["last stage (layer4)"]),
     ({"backbone_kwargs": {"output_stride": 8}}, ["output_stride 8"])],
)
def test_backbones_we_cannot_build_offline_are_refused(tmp_path, fields, words):
    folder = config_folder(tmp_path / "b", hub_config("conditional_detr", **fields))
    with raises(WrongVariantError, "cannot build offline", *words):
        open_hf_family(folder)


def test_label_ids_with_gaps_are_refused(tmp_path):
    labels = {"0": "cat", "1": "dog", "3": "bird"}
    folder = config_folder(tmp_path / "l", hub_config("dab_detr", id2label=labels))
    with raises(WrongVariantError, "0..2", "id2label"):
        open_hf_family(folder)


def test_missing_files_and_broken_json(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with raises(WeightsUnavailableError, empty, "no config.json"):
        open_hf_family(empty)
    no_weights = config_folder(tmp_path / "w", hub_config("dab_detr"), weights=None)
    with raises(WeightsUnavailableError, no_weights, "model.safetensors or pytorch_model.bin"):
        load_hf_family(no_weights)
    broken = config_folder(tmp_path / "j", {})
    (broken / "config.json").write_text('{"model_type": "dab-detr", ')
    with raises(CorruptCheckpointError, broken / "config.json", "JSON"):
        open_hf_family(broken)


def copy_with(source: Path, target: Path, change) -> Path:
    """``source`` checkpoint copied to ``target`` with ``change`` applied to its state dict."""
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    state = load_file(source / "model.safetensors")
    change(state)
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_weights_that_do_not_fit_name_the_keys(saved, tmp_path):
    source = saved["conditional_detr"]
    missing = copy_with(source, tmp_path / "m", lambda s: s.pop("class_labels_classifier.weight"))
    with raises(WrongVariantError, "missing keys: class_labels_classifier.weight", "config.json"):
        load_hf_family(missing)
    extra = copy_with(source, tmp_path / "u", lambda s: s.update(stray=torch.zeros(2)))
    with raises(WrongVariantError, "unexpected keys: stray"):
        load_hf_family(extra)
    shape = copy_with(source, tmp_path / "s", lambda s: s.update(
        {"class_labels_classifier.bias": torch.zeros(5)}))
    with raises(WrongVariantError, "class_labels_classifier.bias"):
        load_hf_family(shape)


def test_damaged_or_unsafe_weights_are_refused(saved, tmp_path):
    damaged = copy_with(saved["dab_detr"], tmp_path / "d", lambda s: None)
    data = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(data[: len(data) // 2])
    with raises(CorruptCheckpointError, damaged / "model.safetensors", "copy it again"):
        load_hf_family(damaged)
    marker, unsafe = tmp_path / "pwned", tmp_path / "bin"
    unsafe.mkdir()
    (unsafe / "config.json").write_text((saved["dab_detr"] / "config.json").read_text())
    torch.save({"class_embed.weight": RunsShell(marker)}, unsafe / "pytorch_model.bin")
    with raises(UnsafeCheckpointError, "never runs code"):
        load_hf_family(unsafe)
    assert not marker.exists()
