"""Fine-tuned DETRs of any size: a Hugging Face folder and a DETR-repository training checkpoint.

transformers' ``DetrForObjectDetection`` built from a small config (3 named classes, 50 queries,
4 + 4 layers of 4 heads, hidden size 128) with random weights is the oracle: detr-viz loads its
``save_pretrained`` folder, and the same weights saved as the DETR repository saves a training
checkpoint (``model``, ``args``, ``optimizer``, ``epoch``), and must compute what transformers
computes, in float64, for every layer and head.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import DetrConfig, DetrForObjectDetection  # noqa: E402

from detr_viz import analyze, capture  # noqa: E402
from detr_viz.errors import ArgumentError, UnsafeCheckpointError, WrongVariantError  # noqa: E402
from detr_viz.testing import recipe_input  # noqa: E402
from detr_viz.weights import describe_checkpoint, load_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("offline", "one_torch_thread")
NAMES = ("cat", "dog", "fox")
SIZES = {"num_queries": 50, "encoder_layers": 4, "decoder_layers": 4, "d_model": 128,
         "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 256,
         "decoder_ffn_dim": 256}


def float32_positions(model: DetrForObjectDetection) -> None:
    """HF's sine positions in float32, as DETR (and detr-viz) compute them (see
    test_hf_checkpoint.py): a float64 run then compares the two models exactly."""
    embedding = model.model.position_embedding
    forward = embedding.forward
    embedding.forward = lambda shape, device, dtype, mask=None: forward(
        shape, device, torch.float32, mask).to(dtype)


@pytest.fixture(scope="module", params=[False, True], ids=["stride32", "dc5"])
def finetuned(request, tmp_path_factory):
    """(transformers model in float64, its save_pretrained folder, DETR-repository .pth)."""
    dilation = request.param
    config = DetrConfig(num_labels=3, id2label=dict(enumerate(NAMES)), use_timm_backbone=True,
                        backbone="resnet50", dilation=dilation, use_pretrained_backbone=False,
                        **SIZES)
    torch.manual_seed(7)
    model = DetrForObjectDetection(config)
    with torch.no_grad():  # random running statistics and queries, so nothing is trivial
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
        for name, param in model.named_parameters():  # peaky attention: heads differ clearly
            if "q_proj.weight" in name or "k_proj.weight" in name:
                param.mul_(8)
    model.set_attn_implementation("eager")
    model = model.eval().requires_grad_(False)
    folder = tmp_path_factory.mktemp("hf-finetuned")
    model.save_pretrained(folder)
    ours = load_model(checkpoint=folder)
    args = argparse.Namespace(backbone="resnet50", dilation=dilation, nheads=4, enc_layers=4,
                              dec_layers=4, hidden_dim=128, dim_feedforward=256, num_queries=50,
                              pre_norm=False, position_embedding="sine", lr=1e-4,
                              output_dir="out", device="cuda", masks=False, aux_loss=True)
    pth = folder.parent / f"{folder.name}-checkpoint.pth"
    torch.save({"model": ours.state_dict(), "args": args, "epoch": 49,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}},
               pth)
    float32_positions(model)
    return model.double(), folder, pth


def assert_computes_like(ours, hf) -> None:
    """Logits, boxes and every layer's and head's attention equal transformers' (float64)."""
    ours = ours.double()
    x = recipe_input(160, 224).double()  # a 5 x 7 grid, 10 x 14 with DC5
    with torch.inference_mode():
        with capture(ours, features=False) as cap:
            out = ours(x)
        want = hf(pixel_values=x, output_attentions=True)
    np.testing.assert_allclose(out["pred_logits"], want.logits, rtol=0, atol=1e-9)
    np.testing.assert_allclose(out["pred_boxes"], want.pred_boxes, rtol=0, atol=1e-9)
    for layer in range(4):
        for head in range(4):
            cross = want.cross_attentions[layer][0, head].numpy()  # (50, HW)
            np.testing.assert_allclose(cap.decoder[layer].dense(head), cross, rtol=0, atol=1e-9)
            encoder = want.encoder_attentions[layer][0, head].numpy()  # (HW, HW)
            np.testing.assert_allclose(cap.encoder[layer].dense(head), encoder, rtol=0,
                                       atol=1e-9)
    assert want.cross_attentions[-1].std() > 1e-3  # maps that can tell a wrong head apart


def test_hf_folder_of_any_size_computes_what_transformers_computes(finetuned):
    hf, folder, _ = finetuned
    model = load_model(checkpoint=folder)
    spec = model.spec
    assert (spec.family, spec.num_classes, spec.labels, spec.num_queries) == ("detr", 3, NAMES, 50)
    assert (spec.encoder_layers, spec.decoder_layers, spec.heads, spec.d_model, spec.ffn_dim) == (
        4, 4, 4, 128, 256)
    assert spec.dilation == hf.config.dilation and model.stride == spec.stride
    assert spec.assumed == () and not spec.official
    assert spec.title == (f"{folder.name} (DETR R50{'-DC5' if spec.dilation else ''}, 3 classes, "
                          "50 queries, 4+4 layers x 4 heads)")
    assert_computes_like(model, hf)


def test_detr_repository_checkpoint_with_args(finetuned):
    hf, _, pth = finetuned
    model = load_model(checkpoint=pth, labels=list(NAMES))
    assert model.spec.assumed == () and model.spec.labels == NAMES
    assert model.spec.dilation == hf.config.dilation  # from args: shapes cannot tell
    assert model.spec.name == pth.stem
    assert_computes_like(model, hf)


def test_bare_state_dict_says_what_it_assumed_and_takes_the_users_values(finetuned, tmp_path):
    hf, _, pth = finetuned
    bare = tmp_path / "bare.pth"
    torch.save(torch.load(pth, weights_only=False)["model"], bare)
    spec = describe_checkpoint(bare)
    assert spec.heads == 8 and not spec.dilation
    assert any("8 heads" in a for a in spec.assumed) and any("DC5" in a for a in spec.assumed)
    assert spec.labels == ("class 0", "class 1", "class 2")
    model = load_model(checkpoint=bare, heads=4, dilation=hf.config.dilation)
    assert model.spec.assumed == ()
    assert_computes_like(model, hf)


def test_users_values_must_agree_with_the_checkpoints_record(finetuned):
    _, folder, pth = finetuned
    with pytest.raises(WrongVariantError, match="heads = 4 .its own record says so., not 8"):
        load_model(checkpoint=pth, heads=8)
    with pytest.raises(WrongVariantError, match="leave that setting empty"):
        describe_checkpoint(folder, dilation=not describe_checkpoint(folder).dilation)


def test_labels_that_do_not_fit_get_a_clear_message(finetuned, tmp_path):
    _, folder, pth = finetuned
    with pytest.raises(ArgumentError, match="lists 2 names, but the checkpoint has 3 classes.*"
                                            "class 0"):
        load_model(checkpoint=pth, labels=["cat", "dog"])
    coco = tmp_path / "instances.json"
    coco.write_text('{"images": [], "categories": [{"id": 1, "name": "dog"}, '
                    '{"id": 3, "name": "cat"}]}')
    with pytest.raises(ArgumentError, match="names class id 3, but the checkpoint has 3 classes"):
        load_model(checkpoint=folder, labels=coco)


def test_analysis_of_a_finetuned_model_names_its_classes(finetuned):
    _, folder, _ = finetuned
    model = load_model(checkpoint=folder)
    analysis = analyze(model, Image.new("RGB", (200, 140), (120, 80, 40)), short_side=140)
    assert analysis.spec is model.spec and analysis.num_queries == 50
    assert analysis.probabilities.shape == (50, 3) and analysis.num_heads == 4
    detections = analysis.detections(0.0)
    assert len(detections) == 50 and {d.name for d in detections} <= set(NAMES)
    assert all(d.name == NAMES[d.label] for d in detections)
    assert analysis.decoder_attention(detections[0].query, layer=3, head=2).shape == \
        analysis.feature_hw
    match = analysis.queries_for_box(detections[0].box, label="fox", k=1)[0]
    assert match.query == detections[0].query and match.expected[1] == "fox"


class Payload:  # pickled inside args: loading must refuse it without ever calling it
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_args_holding_an_object_is_refused_without_running_it(finetuned, tmp_path):
    _, _, pth = finetuned
    checkpoint = torch.load(pth, weights_only=False)
    checkpoint["args"].evil = Payload(tmp_path / "it-ran")
    path = tmp_path / "evil.pth"
    torch.save(checkpoint, path)
    with pytest.raises(UnsafeCheckpointError, match="contains code"):
        load_model(checkpoint=path)
    assert not (tmp_path / "it-ran").exists()
    torch.load(path, weights_only=False)  # the payload is in the file: an unsafe load runs it
    assert (tmp_path / "it-ran").is_dir()


def test_variants_detr_viz_cannot_rebuild_say_why(finetuned, tmp_path):
    _, _, pth = finetuned
    state = torch.load(pth, weights_only=False)["model"]
    pre_norm = tmp_path / "pre_norm.pth"
    torch.save({"model": state | {"transformer.encoder.norm.weight": torch.ones(128)}}, pre_norm)
    with pytest.raises(WrongVariantError, match="pre-norm DETR"):
        load_model(checkpoint=pre_norm)
    small = {k: v for k, v in state.items() if not k.startswith("backbone.0.body.layer3.5.")}
    resnet_like = tmp_path / "five_blocks.pth"
    torch.save(small, resnet_like)
    with pytest.raises(WrongVariantError, match="5 blocks in layer3"):
        load_model(checkpoint=resnet_like)


def test_segmentation_checkpoint_gives_its_detector(finetuned, tmp_path):
    hf, _, pth = finetuned
    state = torch.load(pth, weights_only=False)["model"]
    panoptic = {f"detr.{k}": v for k, v in state.items()}
    panoptic |= {"bbox_attention.q_linear.weight": torch.zeros(128, 128),
                 "mask_head.lay1.weight": torch.zeros(8, 8, 3, 3)}
    path = tmp_path / "panoptic.pth"
    torch.save({"model": panoptic, "args": torch.load(pth, weights_only=False)["args"]}, path)
    assert_computes_like(load_model(checkpoint=path), hf)
