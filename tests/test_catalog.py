"""The model picker's list: every checkpoint found on disk, described or with its problem."""

from __future__ import annotations

import argparse
import dataclasses
import shutil

import pytest
import torch

from detr_viz.catalog import find_checkpoints
from detr_viz.download import WEIGHTS_ENV
from detr_viz.model import build_model
from detr_viz.spec import ModelSpec
from detr_viz.testing import write_weights_folder
from detr_viz.weights import describe_checkpoint

pytestmark = pytest.mark.usefixtures("offline")
SMALL = ModelSpec(num_classes=2, labels=("class 0", "class 1"), num_queries=5, encoder_layers=1,
                  decoder_layers=2, heads=2, d_model=16, ffn_dim=8, name="small", official=False)


def test_lists_fine_tuned_checkpoints_and_problems_but_not_the_released_files(monkeypatch,
                                                                              tmp_path):
    folder = tmp_path / "weights"
    write_weights_folder(str(folder), ("detr_resnet50",))  # an official name: a variant
    state = build_model(SMALL).state_dict()
    args = argparse.Namespace(nheads=2, dilation=True, backbone="resnet50")
    torch.save({"model": state, "args": args, "epoch": 3}, folder / "checkpoint0049.pth")
    torch.save(state, folder / "bare.pt")
    (folder / "broken.pth").write_bytes(b"not a checkpoint")
    (folder / "notes.txt").write_text("ignored: not a checkpoint suffix")
    cache = tmp_path / "hub"
    snapshot = cache / "models--me--my-detr" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    monkeypatch.setenv(WEIGHTS_ENV, str(folder))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    found = {f.path.name: f for f in find_checkpoints()}
    assert set(found) == {"checkpoint0049.pth", "bare.pt", "broken.pth"}  # the snapshot is empty
    trained = found["checkpoint0049.pth"].spec
    assert (trained.heads, trained.dilation, trained.num_queries, trained.assumed) == (
        2, True, 5, ())
    assert trained == describe_checkpoint(folder / "checkpoint0049.pth")  # peeking is exact
    assert found["bare.pt"].spec.heads == 8 and found["bare.pt"].spec.assumed
    assert found["broken.pth"].spec is None and "damaged" in found["broken.pth"].title
    assert found["broken.pth"].title.startswith("broken.pth (cannot be loaded: ")


def test_hugging_face_folders_and_the_hub_cache(monkeypatch, tmp_path):
    import transformers  # requirements-dev.txt: the oracle of every Hugging Face test

    config = transformers.DetrConfig(
        num_labels=2, id2label={0: "cup", 1: "mug"}, num_queries=5, encoder_layers=1,
        decoder_layers=2, d_model=16, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=8, decoder_ffn_dim=8, use_timm_backbone=True, backbone="resnet50",
        use_pretrained_backbone=False)
    cache = tmp_path / "hub"
    snapshot = cache / "models--me--mugs" / "snapshots" / "abc"
    transformers.DetrForObjectDetection(config).save_pretrained(snapshot)
    folder = tmp_path / "weights"
    shutil.copytree(snapshot, folder / "mugs-v2")
    monkeypatch.setenv(WEIGHTS_ENV, str(folder))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    found = find_checkpoints()
    assert [f.path for f in found] == [folder / "mugs-v2", snapshot]
    for item in found:
        assert item.spec.labels == ("cup", "mug") and item.spec.assumed == ()
        assert item.spec == describe_checkpoint(item.path)


def test_a_checkpoint_is_read_again_only_when_it_changes(monkeypatch, tmp_path):
    """The picker looks again every 30 s; each look must not reopen every training checkpoint
    (that cost 150-250 ms of page time), yet a rewritten one must be described anew."""
    import detr_viz.weights

    folder = tmp_path / "weights"
    folder.mkdir()
    args = argparse.Namespace(nheads=2, dilation=False, backbone="resnet50")
    path = folder / "checkpoint.pth"
    torch.save({"model": build_model(SMALL).state_dict(), "args": args}, path)
    monkeypatch.setenv(WEIGHTS_ENV, str(folder))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    reads = []
    real = detr_viz.weights.describe_checkpoint
    monkeypatch.setattr(detr_viz.weights, "describe_checkpoint",
                        lambda p, **kw: reads.append(p) or real(p, **kw))
    first = find_checkpoints()
    assert find_checkpoints() == first and reads == [path]
    bigger = dataclasses.replace(SMALL, num_queries=7)
    torch.save({"model": build_model(bigger).state_dict(), "args": args}, path)
    assert find_checkpoints()[0].spec.num_queries == 7 and reads == [path, path]
    path.unlink()
    assert find_checkpoints() == []
