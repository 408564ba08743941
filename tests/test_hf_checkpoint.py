"""Hugging Face DETR checkpoints, with transformers itself as the oracle, all offline.

transformers' ``DetrForObjectDetection`` is built from a config (no hub, no pretrained
backbone), filled with recipe weights under its own key names, and saved the way users get such
checkpoints: ``save_pretrained`` (transformers 5.x names) and files in the transformers 4.x
names the Hub holds (checked by letting transformers load them: no missing or unexpected keys).
detr-viz then loads the folder and must compute what transformers computes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub, whatever happens below
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig  # noqa: E402

from detr_viz import capture  # noqa: E402
from detr_viz.download import WEIGHTS_ENV  # noqa: E402
from detr_viz.errors import (  # noqa: E402
    CorruptCheckpointError,
    NotADetrCheckpointError,
    UnsafeCheckpointError,
    WeightsUnavailableError,
    WrongVariantError,
)
from detr_viz.export import _weights  # noqa: E402
from detr_viz.hf_checkpoint import cached_snapshot, checkpoint_variant, hub_cache_dir  # noqa: E402
from detr_viz.hf_keys import to_detr_state_dict  # noqa: E402
from detr_viz.model import get_variant  # noqa: E402
from detr_viz.testing import recipe_input, recipe_tensor  # noqa: E402
from detr_viz.weights import (  # noqa: E402
    check_state_dict,
    checkpoint_provenance,
    describe_sources,
    find_checkpoint,
    load_model,
    provenance_note,
)

from conftest import RunsShell, raises  # noqa: E402

R50, R50_DC5, R101, R101_DC5 = "detr_resnet50", "detr_resnet50_dc5", "detr_resnet101", (
    "detr_resnet101_dc5"
)
DEPTHS = {"resnet50": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3]}
# (torchvision backbone, timm backbone?, dilation) per layout under test
LAYOUTS = {
    "native": ("resnet50", False, False),  # transformers' own ResNet
    "timm": ("resnet50", True, False),  # what facebook/detr-resnet-50 on the Hub uses
    "timm-dc5": ("resnet50", True, True),  # transformers' ResNet cannot dilate
}

pytestmark = pytest.mark.usefixtures("offline", "one_torch_thread")



def hf_config(backbone: str, *, timm: bool, dilation: bool = False) -> DetrConfig:
    """A DetrConfig that builds without any hub (see benchmarks/hf_detr.py)."""
    if timm:
        kwargs = {"use_timm_backbone": True, "backbone": backbone, "dilation": dilation,
                  "use_pretrained_backbone": False}
    else:  # naming backbone= here would make transformers 5 look the name up on the Hub
        kwargs = {"use_timm_backbone": False, "dilation": False,
                  "backbone_config": ResNetConfig(depths=DEPTHS[backbone], out_features=["stage4"])}
    return DetrConfig(num_labels=91, num_queries=100, **kwargs)


def legacy_name(name: str) -> str:
    """A transformers 5.x DETR key as transformers 4.x named it (and the Hub's files hold)."""
    name = name.replace("model.backbone.", "model.backbone.conv_encoder.")
    return re.sub(r"\.mlp\.fc([12])\.", r".fc\1.", name.replace(".o_proj.", ".out_proj."))


def legacy_config(backbone: str, *, timm: bool, dilation: bool) -> dict:
    """config.json as transformers 4.x wrote it for facebook/detr-resnet-50 and its siblings."""
    config = {"model_type": "detr", "architectures": ["DetrForObjectDetection"],
              "num_queries": 100, "id2label": {str(i): f"class {i}" for i in range(91)},
              "use_pretrained_backbone": False, "dilation": dilation}
    if timm:
        return config | {"use_timm_backbone": True, "backbone": backbone, "backbone_config": None}
    resnet = {"model_type": "resnet", "depths": DEPTHS[backbone], "out_features": ["stage4"]}
    return config | {"use_timm_backbone": False, "backbone": None, "backbone_config": resnet}


@pytest.fixture(scope="module")
def hf_model():
    """layout -> eval-mode HF DETR (eager attention) holding recipe weights under HF names."""
    models = {}

    def get(layout: str) -> DetrForObjectDetection:
        if layout not in models:
            backbone, timm, dilation = LAYOUTS[layout]
            model = DetrForObjectDetection(hf_config(backbone, timm=timm, dilation=dilation))
            state = {k: recipe_tensor(k, t.shape) for k, t in model.state_dict().items()}
            model.load_state_dict(state, strict=True)
            model.set_attn_implementation("eager")  # output_attentions needs eager
            float32_positions(model)
            models[layout] = model.eval().requires_grad_(False)
        return models[layout]

    return get


@pytest.fixture(scope="module")
def saved(hf_model, tmp_path_factory):
    """(layout, names, file) -> a checkpoint folder: names "5.x" is save_pretrained's output,
    "4.x" a legacy config.json with the weights renamed back, in ``file``."""
    folders = {}

    def get(layout: str, names: str = "5.x", file: str = "model.safetensors") -> Path:
        key = (layout, names, file)
        if key not in folders:
            folder = tmp_path_factory.mktemp(f"{layout}-{names}")
            model = hf_model(layout)
            if names == "5.x":
                model.save_pretrained(folder)
                assert sorted(p.name for p in folder.iterdir()) == ["config.json", file]
            else:
                backbone, timm, dilation = LAYOUTS[layout]
                config = legacy_config(backbone, timm=timm, dilation=dilation)
                (folder / "config.json").write_text(json.dumps(config))
                old = {legacy_name(k): t.contiguous() for k, t in model.state_dict().items()}
                if file == "model.safetensors":
                    save_file(old, folder / file, metadata={"format": "pt"})
                else:
                    torch.save(old, folder / file)
            folders[key] = folder
        return folders[key]

    return get


CASES = [  # (layout, key names, weights file)
    ("native", "5.x", "model.safetensors"),
    ("native", "4.x", "pytorch_model.bin"),
    ("timm", "4.x", "model.safetensors"),  # the layout of facebook/detr-resnet-50 itself
    ("timm-dc5", "5.x", "model.safetensors"),
    ("timm-dc5", "4.x", "pytorch_model.bin"),
]
LEGACY = [case for case in CASES if case[1] == "4.x"]


@pytest.mark.parametrize("case", LEGACY, ids="-".join)
def test_legacy_files_are_what_transformers_reads(saved, hf_model, case):
    """The oracle for the 4.x names: transformers maps every key of the file to its model."""
    model, info = DetrForObjectDetection.from_pretrained(saved(*case), output_loading_info=True)
    assert not any(info.values()), info
    want = hf_model(case[0]).state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def float32_positions(model: DetrForObjectDetection) -> None:
    """Make HF compute the sine position embedding in float32, as the official DETR (and
    detr-viz) always do, so that a float64 run compares the two models exactly."""
    embedding = model.model.position_embedding
    forward = embedding.forward
    embedding.forward = lambda shape, device, dtype, mask=None: forward(
        shape, device, torch.float32, mask
    ).to(dtype)


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_loads_to_the_model_transformers_computes(saved, hf_model, case):
    folder = saved(*case)
    ours = load_model(checkpoint=folder, download=False)  # the variant from config.json
    backbone, _, dilation = LAYOUTS[case[0]]
    assert (ours.variant.backbone, ours.variant.dilation) == (backbone, dilation)
    hf = hf_model(case[0])
    # float64: measured differences are ~5e-15 (logits of size ~3); a wrong key mapping, a
    # transposed q/k/v or an undilated stage moves them by 1e-2 or more. The weights are float32
    # values either way, so this checks the float32 model as loaded.
    ours, hf = ours.double(), hf.double()
    try:
        x = recipe_input(160, 224).double()  # a 5 x 7 feature grid, 10 x 14 with DC5
        with torch.inference_mode():
            with capture(ours, features=False) as cap:
                out = ours(x)
            want = hf(pixel_values=x, output_attentions=True)
    finally:
        hf.float()
    assert torch.allclose(out["pred_logits"], want.logits, rtol=0, atol=1e-9)
    assert torch.allclose(out["pred_boxes"], want.pred_boxes, rtol=0, atol=1e-9)
    cross = want.cross_attentions[-1][0].numpy()  # (heads, 100, HW)
    ours_cross = np.stack([cap.decoder[5].rows(range(100), head=h) for h in range(8)])
    np.testing.assert_allclose(ours_cross, cross, rtol=0, atol=1e-9)
    rows = [0, 3, cross.shape[-1] - 1]
    encoder = want.encoder_attentions[-1][0][:, rows].numpy()  # (heads, 3, HW)
    ours_encoder = np.stack([cap.encoder[5].rows(rows, head=h) for h in range(8)])
    np.testing.assert_allclose(ours_encoder, encoder, rtol=0, atol=1e-9)
    assert cross.std() > 1e-3 and encoder.std() > 1e-3  # attention that can tell maps apart


def meta_state(config: DetrConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):  # keys and shapes only: no memory, no init time
        return DetrForObjectDetection(config).state_dict()


def config_folder(folder: Path, config: dict, weights: str = "model.safetensors") -> Path:
    """A checkpoint folder with ``config`` and an empty weights file (enough for the config)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / weights).touch()
    return folder


@pytest.mark.parametrize(
    ("variant", "timm", "dilation"),
    [(R101, False, False), (R101, True, False), (R101_DC5, True, True), (R50_DC5, True, True)],
)
@pytest.mark.parametrize("names", ["5.x", "4.x"])
def test_resnet101_and_dc5_keys_and_variants(tmp_path, variant, timm, dilation, names):
    """Key level (no weights): every HF key maps to one of ``variant``'s, with its shape."""
    backbone = get_variant(variant).backbone
    config = hf_config(backbone, timm=timm, dilation=dilation)
    state = meta_state(config)
    if names == "4.x":
        state = {legacy_name(k): t for k, t in state.items()}
    assert check_state_dict(to_detr_state_dict(state, timm_backbone=timm), variant)
    if names == "5.x":
        as_json = json.loads(config.to_json_string())
    else:
        as_json = legacy_config(backbone, timm=timm, dilation=dilation)
    assert checkpoint_variant(config_folder(tmp_path, as_json)) == variant


def variant_transformers_builds(config: dict) -> str:
    """The variant of the backbone transformers itself configures from ``config``."""
    backbone = DetrConfig.from_dict(config).backbone_config
    if backbone.model_type == "resnet":
        return {(3, 4, 6, 3): R50, (3, 4, 23, 3): R101}[tuple(backbone.depths)]
    name = backbone.backbone.removeprefix("timm/").split(".")[0].replace("resnet", "detr_resnet")
    return name + ("_dc5" if backbone.output_stride == 16 else "")


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"dilation": True},
        {"backbone": "resnet101"},
        {"backbone": "timm/resnet101.a1h_in1k", "dilation": True},
        {"backbone_config": {"model_type": "timm_backbone", "backbone": "resnet101",
                             "output_stride": 16, "out_indices": [1, 2, 3, 4]}},
        {"use_timm_backbone": False, "backbone": None},  # transformers' default ResNet-50
        {"use_timm_backbone": False, "backbone": None,
         "backbone_config": {"model_type": "resnet", "depths": [3, 4, 23, 3]}},
    ],
)
def test_variant_is_read_from_config_as_transformers_reads_it(tmp_path, change):
    config = base_config() | change
    assert checkpoint_variant(config_folder(tmp_path, config)) == variant_transformers_builds(
        config
    )


def test_backbone_kwargs_are_read_as_transformers_4_did(tmp_path):
    """transformers 4.x took the timm output stride from backbone_kwargs (5.x would ask the Hub
    what such a backbone name is, so it is no oracle here)."""
    config = base_config() | {"backbone_kwargs": {"out_indices": [1, 2, 3, 4], "output_stride": 16}}
    assert checkpoint_variant(config_folder(tmp_path, config)) == R50_DC5


def test_a_key_that_maps_to_nothing_is_reported(hf_model):
    state = dict(hf_model("native").state_dict())
    state["model.backbone.model.encoder.stages.0.layers.0.extra.weight"] = torch.zeros(1)
    del state["model.decoder.layers.5.encoder_attn.v_proj.bias"]
    with raises(WrongVariantError, "extra.weight is unexpected",
                "decoder.layers.5.multihead_attn.in_proj_bias is missing"):
        check_state_dict(to_detr_state_dict(state, timm_backbone=False), R50)


# Where checkpoints are found


def place_folder(src: Path, dest: Path) -> Path:
    """A copy of checkpoint folder ``src`` at ``dest``, its files hard-linked (they are 160 MB)."""
    dest.mkdir(parents=True)
    for file in src.iterdir():
        os.link(file, dest / file.name)
    return dest


def fake_hub_cache(root: Path, src: Path, revisions: dict[str, bool], main: str | None) -> Path:
    """huggingface_hub's layout for facebook/detr-resnet-50 under ``root``: blobs, snapshots of
    symlinks to them (complete ones, or config.json only) and refs/main."""
    repo = root / "models--facebook--detr-resnet-50"
    (repo / "blobs").mkdir(parents=True)
    for file in src.iterdir():
        os.link(file, repo / "blobs" / file.name)
    for i, (revision, complete) in enumerate(revisions.items()):
        snapshot = repo / "snapshots" / revision
        snapshot.mkdir(parents=True)
        for file in src.iterdir():
            if complete or file.name == "config.json":
                (snapshot / file.name).symlink_to(Path("../../blobs") / file.name)
        os.utime(snapshot, (1e9 + i, 1e9 + i))  # listed order = age order, oldest first
    if main is not None:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(main)
    return repo / "snapshots"


def test_hf_cache_is_found_and_loaded(monkeypatch, tmp_path, saved, hf_model):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = saved("timm", "4.x", "model.safetensors")
    snapshots = fake_hub_cache(tmp_path / "hub", folder, {"a1": True}, main="a1")
    assert find_checkpoint(R50) == snapshots / "a1"
    model = load_model(download=False)
    expected = to_detr_state_dict(hf_model("timm").state_dict(), timm_backbone=True)
    got = model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert checkpoint_provenance(snapshots / "a1", R50) == "huggingface"
    # what results say of it: a port that no hash can check, neither the release nor not
    assert "the transformers port of DETR" in provenance_note(model.spec)
    assert _weights(model.spec) == {"checkpoint": "a1", "official_release": None}


@pytest.mark.parametrize(
    ("revisions", "main", "chosen"),
    [
        ({"old": True, "new": True}, "old", "old"),  # refs/main wins over a newer snapshot
        ({"old": True, "new": True}, None, "new"),  # no refs/main: the newest
        ({"old": True, "new": False}, "new", "old"),  # refs/main only half downloaded
        ({"old": False}, "old", None),  # config.json alone is no checkpoint
    ],
)
def test_hf_cache_snapshot_choice(monkeypatch, tmp_path, saved, revisions, main, chosen):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshots = fake_hub_cache(tmp_path / "hub", saved("timm", "4.x"), revisions, main)
    assert cached_snapshot(R50) == (snapshots / chosen if chosen else None)
    assert cached_snapshot(R50_DC5) is None


def test_hf_cache_folder_follows_huggingface_hub(monkeypatch, tmp_path):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert hub_cache_dir() == tmp_path / "hf-home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub_cache_dir() == tmp_path / "cache"


def test_lookup_order(monkeypatch, tmp_path, saved, offline):
    """$DETR_VIZ_WEIGHTS official file, its HF folder, torch hub file, HF cache; first wins."""
    folder = saved("timm", "4.x")
    weights = tmp_path / "weights"
    weights.mkdir()
    monkeypatch.setenv(WEIGHTS_ENV, str(weights))
    snapshots = fake_hub_cache(tmp_path / "hf-hub", folder, {"a1": True}, main="a1")
    assert find_checkpoint(R50) == snapshots / "a1"
    hub_file = offline / "detr-r50-e632da11.pth"
    offline.mkdir(parents=True)
    hub_file.touch()
    assert find_checkpoint(R50) == hub_file
    hf_folder = place_folder(folder, weights / "detr-resnet-50")
    assert find_checkpoint(R50) == hf_folder
    (weights / "detr-r50-e632da11.pth").touch()
    assert find_checkpoint(R50) == weights / "detr-r50-e632da11.pth"


def test_weights_folder_itself_counts_only_for_its_variant(monkeypatch, tmp_path, saved):
    weights = place_folder(saved("timm-dc5"), tmp_path / "weights")
    monkeypatch.setenv(WEIGHTS_ENV, str(weights))
    assert find_checkpoint(R50_DC5) == weights
    assert find_checkpoint(R50) is None  # then the official file would be downloaded
    model = load_model(R50_DC5, download=False)
    assert model.variant.name == R50_DC5


def test_nothing_found_lists_every_source_including_hugging_face(tmp_path, offline):
    with raises(WeightsUnavailableError, "facebook/detr-resnet-50", "model.safetensors",
                tmp_path / "hf-hub" / "models--facebook--detr-resnet-50",
                offline / "detr-r50-e632da11.pth", WEIGHTS_ENV):
        load_model(R50, download=False)
    sources = describe_sources(R50_DC5)
    assert "detr-r50-dc5-f0fb7ef5.pth" in sources and "detr-resnet-50-dc5" in sources
    assert len(sources.splitlines()) == 6


# What the checkpoint is, and errors


def test_provenance(saved, tmp_path):
    folder = saved("native")
    assert checkpoint_provenance(folder, R50) == "huggingface"
    assert checkpoint_provenance(folder / "model.safetensors", R50) == "huggingface"
    torch.save({"model": {}}, tmp_path / "mine.pth")
    assert checkpoint_provenance(tmp_path / "mine.pth", R50) == "other"


def test_weights_file_inside_the_folder_loads_like_the_folder(saved):
    folder = saved("timm-dc5", "4.x", "pytorch_model.bin")
    by_file = load_model(checkpoint=folder / "pytorch_model.bin").state_dict()
    by_folder = load_model(R50_DC5, checkpoint=folder).state_dict()
    assert all(torch.equal(by_file[k], by_folder[k]) for k in by_folder)


@pytest.mark.parametrize(
    ("layout", "asked", "right"),
    [("timm-dc5", R50, R50_DC5), ("native", R50_DC5, R50), ("native", R101, R50)],
)
def test_wrong_variant_names_the_right_one(saved, layout, asked, right):
    with raises(WrongVariantError, f"of {right}", f"not of {asked}", f"Choose {right}"):
        load_model(asked, checkpoint=saved(layout))


def test_resnet101_config_for_resnet50_is_refused_before_reading(tmp_path):
    config = hf_config("resnet101", timm=False).to_dict()
    folder = config_folder(tmp_path / "r101", config)  # empty weights: never read
    with raises(WrongVariantError, "of detr_resnet101", "ResNet-101"):
        load_model(R50, checkpoint=folder)


def base_config() -> dict:
    return legacy_config("resnet50", timm=True, dilation=False)


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        ({"model_type": "yolos"}, NotADetrCheckpointError, "yolos model"),
        ({"architectures": ["DetrForSegmentation"]}, NotADetrCheckpointError,
         "DetrForSegmentation"),
        ({"encoder_attention_heads": 4}, WrongVariantError, "encoder and decoder differ"),
        ({"id2label": {"0": "cat", "2": "dog"}}, WrongVariantError, "without gaps"),
        ({"position_embedding_type": "learned"}, WrongVariantError, "'learned'"),
        ({"backbone": "resnet50d"}, WrongVariantError, "resnet50d"),
        ({"use_timm_backbone": False, "backbone": None, "dilation": True,
          "backbone_config": {"model_type": "resnet"}}, WrongVariantError, "cannot dilate"),
        ({"backbone_config": {"model_type": "resnet", "downsample_in_bottleneck": True}},
         WrongVariantError, "downsample_in_bottleneck"),
        ({"backbone_config": {"model_type": "swin"}}, WrongVariantError, "swin"),
    ],
)
def test_configs_detr_viz_cannot_reproduce_are_refused(tmp_path, change, error, words):
    folder = config_folder(tmp_path / "ckpt", base_config() | change)
    with raises(error, folder / "config.json", words):
        load_model(checkpoint=folder)


def test_missing_config_json_says_to_copy_it(tmp_path, saved):
    folder = tmp_path / "no-config"
    folder.mkdir()
    os.link(saved("native") / "model.safetensors", folder / "model.safetensors")
    for path in (folder, folder / "model.safetensors"):
        with raises(WeightsUnavailableError, "config.json", "Copy config.json"):
            load_model(R50, checkpoint=path)


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with raises(WeightsUnavailableError, tmp_path / "empty", "model.safetensors"):
        load_model(R50, checkpoint=tmp_path / "empty")


@pytest.mark.parametrize("damage", ["garbage", "half", "empty", "config"])
def test_unreadable_files_are_corrupt(tmp_path, saved, damage):
    source, folder = saved("native"), tmp_path / "ckpt"
    folder.mkdir()
    if damage == "config":
        os.link(source / "model.safetensors", folder / "model.safetensors")
        (folder / "config.json").write_text('{"model_type": "detr", ')
    else:
        shutil.copyfile(source / "config.json", folder / "config.json")
        data = (source / "model.safetensors").read_bytes()
        cut = {"garbage": b"\x12\x34not safetensors" * 20, "half": data[: len(data) // 2],
               "empty": b""}[damage]
        (folder / "model.safetensors").write_bytes(cut)
    with raises(CorruptCheckpointError, folder):
        load_model(R50, checkpoint=folder)


def test_pytorch_model_bin_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    folder = config_folder(tmp_path / "ckpt", base_config(), "pytorch_model.bin")
    torch.save({"model.input_projection.weight": RunsShell(marker)}, folder / "pytorch_model.bin")
    with raises(UnsafeCheckpointError, "never runs code"):
        load_model(checkpoint=folder)
    assert not marker.exists()


def test_hf_state_dict_saved_without_its_config_gets_a_hint(tmp_path, hf_model):
    path = tmp_path / "pytorch_model.bin"  # no config.json beside it: read as a plain file
    torch.save(dict(list(hf_model("native").state_dict().items())[-6:]), path)  # the heads
    with raises(NotADetrCheckpointError, "Hugging Face", "config.json"):
        load_model(R50, checkpoint=path)
