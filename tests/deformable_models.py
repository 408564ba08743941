"""Tiny random deformable DETRs of every family, built from configs (nothing is downloaded).

d_model 16 (32 for Deformable DETR, whose GroupNorm has 32 groups), 2 heads, 2 decoder
layers, 7 queries, backbones of a few thousand weights. Their parameters are perturbed
(transformers starts the attention weights at zero, i.e. uniform) and the sampling offsets
spread wide, so that points fall between cells and outside the maps.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub, whatever happens below
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers as tf  # noqa: E402

LABELS = {0: "cat", 1: "dog"}
# family -> (H, W) of the test image: a few cells per level on every backbone
SIZES = {"deformable_detr": (96, 128), "rt_detr": (64, 96), "rt_detr_v2": (64, 96),
         "rt_detr_v2_discrete": (64, 96), "d_fine": (64, 96), "lw_detr": (64, 96),
         "rf_detr": (56, 84)}


def _resnet(cls):
    return cls(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
               layer_type="basic", out_features=["stage2", "stage3", "stage4"])


def _rt_common(**extra) -> dict:
    return dict(encoder_hidden_dim=16, encoder_in_channels=[16, 32, 64], encoder_ffn_dim=32,
                encoder_attention_heads=2, d_model=16, num_queries=7,
                decoder_in_channels=[16, 16, 16], decoder_ffn_dim=32, decoder_n_points=3,
                decoder_layers=2, decoder_attention_heads=2, num_denoising=0, id2label=LABELS,
                **extra)


def tiny_config(family: str):
    if family == "deformable_detr":
        return tf.DeformableDetrConfig(
            d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=7,
            encoder_n_points=2, decoder_n_points=3, num_feature_levels=4,
            backbone_config=_resnet(tf.ResNetConfig), with_box_refine=True, id2label=LABELS)
    if family == "rt_detr":
        return tf.RTDetrConfig(backbone_config=_resnet(tf.RTDetrResNetConfig), **_rt_common())
    if family.startswith("rt_detr_v2"):
        method = "discrete" if family.endswith("discrete") else "default"
        return tf.RTDetrV2Config(backbone_config=_resnet(tf.RTDetrResNetConfig),
                                 **_rt_common(decoder_method=method))
    if family == "d_fine":
        backbone = tf.HGNetV2Config(
            stem_channels=[3, 8, 8], stage_in_channels=[8, 16, 32, 48],
            stage_mid_channels=[8, 8, 16, 16], stage_out_channels=[16, 32, 48, 64],
            stage_num_blocks=[1, 1, 1, 1], stage_numb_of_layers=[1, 1, 1, 1],
            hidden_sizes=[16, 32, 48, 64], out_features=["stage2", "stage3", "stage4"])
        common = _rt_common(lqe_hidden_dim=8, max_num_bins=8)
        common.update(encoder_in_channels=[32, 48, 64], decoder_n_points=[3, 2, 4])
        return tf.DFineConfig(backbone_config=backbone, **common)
    decoder = dict(d_model=16, decoder_ffn_dim=32, decoder_n_points=3, decoder_layers=2,
                   decoder_self_attention_heads=2, decoder_cross_attention_heads=2,
                   num_queries=7, group_detr=1, id2label=LABELS)
    if family == "lw_detr":
        vit = tf.LwDetrViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=64, pretrain_image_size=64, patch_size=16,
                                 window_block_indices=[0], out_indices=[1, 2], num_windows=1)
        return tf.LwDetrConfig(backbone_config=vit, projector_scale_factors=[2.0, 0.5], **decoder)
    if family == "rf_detr":
        from transformers.models.rf_detr.configuration_rf_detr import RfDetrDinov2Config

        dino = RfDetrDinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=56, patch_size=14, out_indices=[1, 2], num_windows=1)
        return tf.RfDetrConfig(backbone_config=dino, **decoder)
    raise KeyError(family)


CLASSES = {"deformable_detr": "DeformableDetrForObjectDetection",
           "rt_detr": "RTDetrForObjectDetection", "rt_detr_v2": "RTDetrV2ForObjectDetection",
           "rt_detr_v2_discrete": "RTDetrV2ForObjectDetection",
           "d_fine": "DFineForObjectDetection", "lw_detr": "LwDetrForObjectDetection",
           "rf_detr": "RfDetrForObjectDetection"}


def tiny_model(family: str, seed: int = 0, dtype=torch.float64) -> torch.nn.Module:
    """A random tiny ``family`` model (eval, no grad) in ``dtype``, the same for the same seed
    whatever the dtype (built and perturbed in float32, then converted)."""
    torch.manual_seed(seed)
    model = getattr(tf, CLASSES[family])(tiny_config(family))
    wide = 40.0 if family == "rf_detr" else 3.0  # its proposals are boxes of ~0.04 x 0.04
    with torch.no_grad():
        for name, p in model.named_parameters():
            spread = wide if name.endswith("sampling_offsets.bias") else 0.1
            p.add_(torch.randn_like(p) * spread)
    model.set_attn_implementation("eager")  # so output_attentions returns the dense softmax
    return model.eval().to(dtype).requires_grad_(False)


def photo(family: str, seed: int = 0) -> torch.Tensor:
    """A float64 random image of the family's test size, (1, 3, H, W)."""
    h, w = SIZES[family]
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)
