"""Tiny random deformable DETRs of every family (built from configs, nothing is downloaded),
and the recomputation oracle their tests share.

d_model 16 (32 for Deformable DETR, whose GroupNorm has 32 groups), 2 heads, 2 decoder
layers, 7 queries, backbones of a few thousand weights. Their parameters are perturbed
(transformers starts the attention weights at zero, i.e. uniform) and the sampling offsets
spread wide, so that points fall between cells and outside the maps.
"""

from __future__ import annotations

import inspect
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub, whatever happens below
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers as tf  # noqa: E402

from detr_viz.sampling_capture import FAMILIES  # noqa: E402

LABELS = {0: "cat", 1: "dog"}
# family -> (H, W) of the test image: a few cells per level on every backbone
SIZES = {"deformable_detr": (96, 128), "rt_detr": (64, 96), "rt_detr_v2": (64, 96),
         "rt_detr_v2_discrete": (64, 96), "d_fine": (64, 96), "deimv2": (64, 96),
         "lw_detr": (64, 96),
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


def tiny_config(family: str, **extra):
    """``extra``: Deformable DETR's variant (``with_box_refine``, ``two_stage``)."""
    if family == "deformable_detr":
        extra = {"with_box_refine": True, **extra}
        return tf.DeformableDetrConfig(
            d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=7,
            encoder_n_points=2, decoder_n_points=3, num_feature_levels=4,
            backbone_config=_resnet(tf.ResNetConfig), id2label=LABELS, **extra)
    if family == "rt_detr":
        return tf.RTDetrConfig(backbone_config=_resnet(tf.RTDetrResNetConfig), **_rt_common())
    if family.startswith("rt_detr_v2"):
        method = "discrete" if family.endswith("discrete") else "default"
        return tf.RTDetrV2Config(backbone_config=_resnet(tf.RTDetrResNetConfig),
                                 **_rt_common(decoder_method=method))
    if family in ("d_fine", "deimv2"):  # DEIMv2: D-FINE's decoder with gateways
        backbone = tf.HGNetV2Config(
            stem_channels=[3, 8, 8], stage_in_channels=[8, 16, 32, 48],
            stage_mid_channels=[8, 8, 16, 16], stage_out_channels=[16, 32, 48, 64],
            stage_num_blocks=[1, 1, 1, 1], stage_numb_of_layers=[1, 1, 1, 1],
            hidden_sizes=[16, 32, 48, 64], out_features=["stage2", "stage3", "stage4"])
        common = _rt_common(lqe_hidden_dim=8, max_num_bins=8)
        common.update(encoder_in_channels=[32, 48, 64], decoder_n_points=[3, 2, 4])
        config = tf.DFineConfig if family == "d_fine" else tf.Deimv2Config
        return config(backbone_config=backbone, **common)
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
           "d_fine": "DFineForObjectDetection", "deimv2": "Deimv2ForObjectDetection",
           "lw_detr": "LwDetrForObjectDetection",
           "rf_detr": "RfDetrForObjectDetection"}


def tiny_model(family: str, seed: int = 0, dtype=torch.float64, **extra) -> torch.nn.Module:
    """A random tiny ``family`` model (eval, no grad) in ``dtype``, the same for the same seed
    whatever the dtype (built and perturbed in float32, then converted)."""
    torch.manual_seed(seed)
    model = getattr(tf, CLASSES[family])(tiny_config(family, **extra))
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


class ModuleCalls:
    """The bound arguments and output of every given module's calls, in call order."""

    def __init__(self, modules):
        self.modules, self.calls = list(modules), []

    def __enter__(self):
        def record(module, args, kwargs, output):
            bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
            self.calls.append((module, dict(bound), output[0][0]))

        self.handles = [m.register_forward_hook(record, with_kwargs=True) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def hooks(model) -> int:
    """How many forward (pre-)hooks the model's modules hold. transformers 5 leaves hooks of
    its own (its output recorders, installed on a first forward), so tests compare counts
    before and after a capture instead of expecting none."""
    tables = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
              "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")
    return sum(len(getattr(m, t, {})) for m in model.modules() for t in tables)


def decoder_modules(model):
    attribute = FAMILIES[model.config.model_type][0]
    return [getattr(layer, attribute) for layer in model.model.decoder.layers]


def recompute(module, bound, locations, weights, shapes, counts, sampler) -> torch.Tensor:
    """(N, d_model): the module's output from locations (N, heads, levels, points, 2) and
    weights (N, heads, levels, points) by a plain sampler per level, summed, projected."""
    value = bound["encoder_hidden_states"][0]  # (S, d_model)
    if hasattr(module, "value_proj"):
        value = module.value_proj(value)
    if bound.get("attention_mask") is not None:
        value = value.masked_fill(~bound["attention_mask"][0, :, None], 0.0)
    count, heads = weights.shape[:2]
    value = value.view(value.shape[0], heads, -1)  # (S, heads, d)
    out, start = 0.0, 0
    for level, ((h, w), points) in enumerate(zip(shapes, counts, strict=True)):
        v = value[start:start + h * w].permute(1, 2, 0).reshape(heads, -1, h, w)
        xy = locations[:, :, level, :points].transpose(0, 1)  # (heads, N, P, 2)
        if sampler == "bilinear":
            sampled = F.grid_sample(v, 2 * xy - 1, mode="bilinear", padding_mode="zeros",
                                    align_corners=False)  # (heads, d, N, P)
        else:  # the one cell round(x * w), clamped to the map
            col = (xy[..., 0] * w + 0.5).floor().long().clamp(0, w - 1)
            row = (xy[..., 1] * h + 0.5).floor().long().clamp(0, h - 1)
            flat = v.flatten(2)  # (heads, d, h * w)
            index = (row * w + col).flatten(1)[:, None].expand(-1, flat.shape[1], -1)
            sampled = flat.gather(2, index).view(heads, -1, *xy.shape[1:3])
        out = out + torch.einsum("hdnp,nhp->nhd", sampled, weights[:, :, level, :points])
        start += h * w
    out = out.reshape(count, -1)
    return module.output_proj(out) if hasattr(module, "output_proj") else out


def small_processor(family: str):
    """The family's image processor at a size with a few cells per level for the tiny models
    (saved beside them, as a checkpoint's preprocessor_config.json)."""
    if family in ("deformable_detr", "lw_detr"):
        short, long = (96, 128) if family == "deformable_detr" else (64, 96)
        return tf.DeformableDetrImageProcessor(size={"shortest_edge": short,
                                                     "longest_edge": long})
    if family == "rf_detr":
        return tf.RfDetrImageProcessor(size={"shortest_edge": 56, "longest_edge": 84})
    return tf.RTDetrImageProcessor(size={"height": 64, "width": 96})
