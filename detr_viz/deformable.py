"""Deformable DETRs on the page and in notebooks: vetted and loaded offline, run once, explored.

    model = load_model(checkpoint="rtdetr-r18/")          # a folder: config.json + weights
    analysis = analyze(model, "photo.heic")               # a DeformableAnalysis
    points = analysis.sampling_points(17, layer=-1)       # photo pixels (heads, levels, points, 2)
    heat = analysis.decoder_attention(17, layer=-1)       # (h, w) on the finest level's grid
    boxes = analysis.anchor_boxes(17)                     # the reference of every layer, then
                                                          # the final box (xyxy photo pixels)

Families (config.json's ``model_type``): Deformable DETR (plain, box refinement, two-stage),
RT-DETR, RT-DETRv2, D-FINE, DEIMv2, LW-DETR and RF-DETR, all in transformers' code, built from
the vetted config.json with their backbone never downloaded (transformers' own backbones, or a
timm ResNet with ``pretrained=False``), weights from safetensors or
``torch.load(weights_only=True)``, every key checked, never remote code. The photo goes
through the family's own image processor (the folder's ``preprocessor_config.json`` if it has
one, else the family's defaults: RT-DETR and D-FINE squash the photo to 640x640 without
normalising, LW-DETR and RF-DETR to 640x640 and 560x560 with ImageNet statistics; Deformable
DETR resizes it to short side 800): what the checkpoint was trained on, not DETR's transform.

Maps on one grid. A deformable model reads several feature levels (strides 8 to 64, or one
ViT level); the page draws maps on one grid, the finest level's over the photo. A level's map
(the sampler's own coefficients, :func:`detr_viz.sampling.splat`) goes onto it by area: a
level-l cell's weight is shared among the fine cells it covers in proportion to the overlap,
so a map's total is kept (up to what lies on padding or past the input's edge) and each level
shows as blocks of its own cell size. ``level=None`` sums the levels (the weights of all
points, each head summing to 1).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from detr_viz.analysis import INCOMING, OUTGOING, Analysis, Direction, _frozen, check_direction
from detr_viz.errors import (
    ArgumentError,
    DetrVizError,
    NotADetrCheckpointError,
    UnsafeCheckpointError,
    WeightsUnavailableError,
    WrongVariantError,
)
from detr_viz.geometry import FeatureGrid
from detr_viz.hf_checkpoint import WEIGHT_FILES, import_transformers, read_json, weights_file
from detr_viz.labels import Labels, config_names
from detr_viz.sampling import (
    InputFrame,
    SamplingPoints,
    level_strides,
    reference_pixels,
    sampling_points,
    splat,
)
from detr_viz.spec import FAMILIES as NAMES
from detr_viz.spec import ModelSpec


@dataclass(frozen=True)
class Family:
    """How one deformable family is found, built and fed."""

    model_class: str  # transformers' ...ForObjectDetection
    processor: str  # transformers' image processor for it
    heads_key: str  # config.json's field for the decoder's cross-attention heads
    deformable_encoder: bool = False
    dense_encoder: bool = False  # AIFI: a plain transformer layer on one level


DEFORMABLE = {
    "deformable_detr": Family("DeformableDetrForObjectDetection", "DeformableDetrImageProcessor",
                              "decoder_attention_heads", deformable_encoder=True),
    "rt_detr": Family("RTDetrForObjectDetection", "RTDetrImageProcessor",
                      "decoder_attention_heads", dense_encoder=True),
    "rt_detr_v2": Family("RTDetrV2ForObjectDetection", "RTDetrImageProcessor",
                         "decoder_attention_heads", dense_encoder=True),
    "d_fine": Family("DFineForObjectDetection", "RTDetrImageProcessor",
                     "decoder_attention_heads", dense_encoder=True),
    "deimv2": Family("Deimv2ForObjectDetection", "RTDetrImageProcessor",
                     "decoder_attention_heads", dense_encoder=True),
    "lw_detr": Family("LwDetrForObjectDetection", "DeformableDetrImageProcessor",
                      "decoder_cross_attention_heads"),
    "rf_detr": Family("RfDetrForObjectDetection", "RfDetrImageProcessor",
                      "decoder_cross_attention_heads"),
}
# backbone_config model types transformers builds itself, offline -> how the page names them
_OWN_BACKBONES = {"resnet": "ResNet", "rt_detr_resnet": "ResNet", "hgnet_v2": "HGNetV2",
                  "lw_detr_vit": "ViT", "rf_detr_dinov2": "DINOv2", "dinov3_vit": "DINOv3"}
_RESNET_DEPTHS = {("basic", (2, 2, 2, 2)): "R18", ("basic", (3, 4, 6, 3)): "R34",
                  ("bottleneck", (3, 4, 6, 3)): "R50", ("bottleneck", (3, 4, 23, 3)): "R101"}
_PROCESSORS = {f.processor for f in DEFORMABLE.values()}
# without a preprocessor_config.json: the square input the released models were trained at
# (their image processors' class defaults, 800 x 1333, do not fit the windowed ViT backbones)
_SQUARE = {"lw_detr": 640, "rf_detr": 560}
_DROPPED = ("backbone", "use_timm_backbone", "backbone_kwargs", "use_pretrained_backbone")


def is_deformable(model_type: str | None) -> bool:
    return model_type in DEFORMABLE


def read_deformable_config(folder: Path) -> dict[str, Any]:
    """config.json of a deformable family's checkpoint folder, vetted: the detector class,
    no request to run the checkpoint's own code."""
    path = folder / "config.json"
    config = read_json(path)
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind not in DEFORMABLE:
        raise NotADetrCheckpointError(f"{path} does not describe a deformable DETR "
                                      f"(model_type {kind!r}).")
    if config.get("auto_map"):
        raise UnsafeCheckpointError(
            f"{path} asks to run the checkpoint's own Python code (auto_map), and detr-viz "
            "never runs code from a checkpoint. Use a checkpoint of transformers' "
            f"{NAMES[kind]} class (config.json without auto_map).")
    wanted = DEFORMABLE[kind].model_class
    architectures = config.get("architectures") or [wanted]
    if wanted not in architectures:
        raise NotADetrCheckpointError(
            f"{path} describes a {', '.join(map(str, architectures))}, not the detector "
            f"({wanted}) detr-viz shows.")
    return config


def _backbone(config: dict[str, Any], source: Path) -> tuple[dict[str, Any] | None, str]:
    """(explicit backbone_config for transformers, or None for the class default; a short
    name). WrongVariantError for a backbone transformers would fetch from the Hub."""
    from detr_viz.hf_families import backbone_config

    spec = config.get("backbone_config")
    kind = spec.get("model_type") if isinstance(spec, dict) else None
    if config["model_type"] == "deformable_detr" and kind in (None, "timm_backbone"):
        spec = backbone_config(config, source)  # timm ResNets, pretrained=False; 4.x fields
        if spec.get("model_type") == "timm_backbone" and not (
                config.get("backbone_kwargs") or {}).get("out_indices"):
            levels = config.get("num_feature_levels", 4)  # what transformers 4.x chose
            spec["out_indices"] = [2, 3, 4] if levels > 1 else [4]
        kind = spec.get("model_type")
    elif spec is None:
        if config.get("backbone") or config.get("use_timm_backbone"):
            raise WrongVariantError(
                f"{source} names backbone {config.get('backbone')!r} without its config, which "
                "transformers would look up on the Hub; detr-viz builds backbones offline only.")
        return None, "default backbone"
    elif kind not in _OWN_BACKBONES:
        raise WrongVariantError(
            f"{source} has a {kind or 'unknown'} backbone, which detr-viz cannot build offline "
            f"(it builds {', '.join(sorted(_OWN_BACKBONES))} and timm ResNets).")
    spec = {k: v for k, v in spec.items() if k != "use_pretrained_backbone"} | (
        {"use_pretrained_backbone": False} if kind == "timm_backbone" else {})
    return spec, _backbone_name(spec)


def _backbone_name(spec: dict[str, Any]) -> str:
    kind = spec.get("model_type")
    if kind == "timm_backbone":
        name = str(spec.get("backbone", "resnet"))
        return {"resnet50": "R50", "resnet101": "R101"}.get(name, name)
    if kind in ("resnet", "rt_detr_resnet"):
        key = (spec.get("layer_type", "bottleneck"), tuple(spec.get("depths", (3, 4, 6, 3))))
        return _RESNET_DEPTHS.get(key, "ResNet")
    return _OWN_BACKBONES[kind]


def _folder(path: str | os.PathLike[str]) -> Path:
    path = Path(path).expanduser()
    return path.parent if path.is_file() else path


def describe_deformable(path: str | os.PathLike[str], *, labels: Labels | None = None
                        ) -> ModelSpec:
    """The :class:`ModelSpec` of a deformable checkpoint, from config.json alone. ``heads``
    is the decoder's cross-attention heads; ``encoder_layers`` the layers with attention the
    analysis keeps (deformable, or RT-DETR's AIFI layers; 0 for LW-DETR and RF-DETR)."""
    folder = _folder(path)
    return _spec(read_deformable_config(folder), folder, path, labels)


def _spec(config: dict[str, Any], folder: Path, path: str | os.PathLike[str],
          labels: Labels | None) -> ModelSpec:
    """describe_deformable's answer from the vetted config.json it read."""
    from detr_viz.hf_families import config_labels
    from detr_viz.weights import checkpoint_name

    kind, family = config["model_type"], DEFORMABLE[config["model_type"]]
    if weights_file(folder) is None:
        raise WeightsUnavailableError(
            f"{folder} holds config.json but no {' or '.join(WEIGHT_FILES)}: copy the weights "
            "file of the same Hugging Face repository into it.")
    _, backbone = _backbone(config, folder / "config.json")
    names = config_names(config_labels(config, folder / "config.json"), labels)
    if family.deformable_encoder:
        encoder = config.get("encoder_layers", 6)
    elif family.dense_encoder and config.get("encoder_type", "hybrid") == "hybrid":
        encoder = config.get("encoder_layers", 1) * len(config.get("encode_proj_layers", [2]))
    else:
        encoder = 0
    return ModelSpec(
        family=kind, backbone=backbone, dilation=False, num_classes=len(names),
        num_queries=config.get("num_queries", 300), encoder_layers=encoder,
        decoder_layers=config.get("decoder_layers", 6), heads=config.get(family.heads_key, 8),
        d_model=config.get("d_model", 256), ffn_dim=int(config.get("decoder_ffn_dim", 1024)),
        labels=names, name=checkpoint_name(folder), source=str(path), official=False)


class DeformableDetector(nn.Module):
    """A transformers deformable detector with its :class:`ModelSpec` and image processor.

    ``forward(pixel_values, pixel_mask=None)`` returns ``pred_logits`` (B, Q, C), raw logits
    (one sigmoid per class), and ``pred_boxes`` (B, Q, 4) normalised cxcywh."""

    def __init__(self, hf: nn.Module, spec: ModelSpec, processor):
        super().__init__()
        self.hf, self.spec, self.processor = hf, spec, processor

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor | None = None
                ) -> dict[str, Tensor]:
        extra = {} if pixel_mask is None else {"pixel_mask": pixel_mask}
        out = self.hf(pixel_values=pixel_values, **extra)
        return {"pred_logits": out.logits, "pred_boxes": out.pred_boxes}


def load_deformable(path: str | os.PathLike[str], *, labels: Labels | None = None,
                    dtype: torch.dtype = torch.float32) -> DeformableDetector:
    """The deformable checkpoint at ``path`` (a folder, or a file in it) as a
    :class:`DeformableDetector` (CPU, eval mode, no gradients, eager attention)."""
    folder = _folder(path)
    raw = read_deformable_config(folder)  # read once: the spec and the model agree
    spec = _spec(raw, folder, path, labels)
    transformers = import_transformers(spec.architecture)
    from detr_viz.hf_families import check_loading, loading_error

    fields = {k: v for k, v in raw.items() if k not in _DROPPED}
    backbone, _ = _backbone(raw, folder / "config.json")
    if backbone is not None:
        fields["backbone_config"] = backbone
    config = transformers.CONFIG_MAPPING[raw["model_type"]].from_dict(fields)
    weights = weights_file(folder)
    model_class = getattr(transformers, DEFORMABLE[raw["model_type"]].model_class)
    try:
        hf, loading = model_class.from_pretrained(
            folder, config=config, local_files_only=True, trust_remote_code=False,
            attn_implementation="eager", dtype=dtype, output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported in the loading info, refused below
            use_safetensors=weights.suffix == ".safetensors")
    except Exception as exc:  # transformers raises many types for a damaged file
        raise loading_error(weights, exc) from exc
    check_loading(loading, weights)
    processor = image_processor(folder, raw["model_type"])
    return DeformableDetector(hf, spec, processor).eval().requires_grad_(False)


def image_processor(folder: Path, model_type: str):
    """The family's transformers image processor: the folder's ``preprocessor_config.json``
    (read as JSON, one of the families' processor classes), else the class defaults."""
    import transformers

    name = DEFORMABLE[model_type].processor
    path = folder / "preprocessor_config.json"
    if path.is_file():
        recorded = read_json(path)
        kind = str(recorded.get("image_processor_type", name)) if isinstance(recorded, dict) \
            else ""
        base = kind.removesuffix("Fast").removesuffix("Pil")
        if base not in _PROCESSORS:
            raise WrongVariantError(f"{path} asks for image processor {kind!r}; detr-viz feeds "
                                    f"{NAMES[model_type]} with {name}.")
        return getattr(transformers, base).from_pretrained(folder, local_files_only=True)
    if model_type in _SQUARE:  # windowed ViTs: the released input, not the class default
        side = _SQUARE[model_type]
        return getattr(transformers, name)(size={"height": side, "width": side})
    return getattr(transformers, name)()


def model_inputs(model: DeformableDetector, image: Image.Image
                 ) -> tuple[Tensor, Tensor | None, InputFrame]:
    """(pixel_values (1, 3, H, W), pixel_mask (1, H, W) or None, the photo's frame) as the
    model's image processor makes them from the oriented RGB ``image``."""
    out = model.processor(images=image, return_tensors="pt")
    pixels = out["pixel_values"]
    mask = out.get("pixel_mask")
    padded = (int(pixels.shape[3]), int(pixels.shape[2]))
    if mask is not None and not bool(mask.all()):  # the real pixels: top-left, unpadded
        real = mask[0].bool()
        size = (int(real.any(0).sum()), int(real.any(1).sum()))
    else:
        size = padded
    return pixels, mask, InputFrame(photo_size=image.size, input_size=size, padded_size=padded)


def analyze_deformable(model: DeformableDetector, image: Image.Image, *,
                       encoder: bool = True) -> DeformableAnalysis:
    """One captured forward of ``model`` on the oriented RGB ``image`` (see
    :func:`detr_viz.analysis.analyze`): sigmoid scores, boxes, every decoder layer's sampling
    points, and with ``encoder`` the encoder's (deformable points per token, or RT-DETR's
    dense AIFI attention)."""
    from detr_viz.deformable_replay import record_tokens, tokens_from
    from detr_viz.sampling_capture import capture_sampling

    weight = next(model.hf.parameters())
    pixels, mask, frame = model_inputs(model, image)
    recorded: dict = {}
    try:
        with record_tokens(model.hf, recorded):
            cap = capture_sampling(model.hf, pixels.to(weight.device, weight.dtype),
                                   None if mask is None else mask.to(weight.device),
                                   encoder=encoder, self_attention=True)
    except DetrVizError:
        raise
    except (RuntimeError, ValueError) as exc:  # a shape the backbone cannot take
        w, h = frame.padded_size
        raise ArgumentError(
            f"{model.spec.architecture} could not run on its {w}x{h} input ({exc}). The "
            "image size comes from the checkpoint's preprocessor_config.json; if the folder "
            "has none, or it is not the one the model was trained with, copy it from the "
            "checkpoint's repository.") from exc
    strides = level_strides(cap.spatial_shapes, frame.padded_size)
    w_in, h_in = frame.input_size
    grid = FeatureGrid(original_size=frame.photo_size, input_size=frame.input_size,
                       shape=(math.ceil(h_in / strides[0]), math.ceil(w_in / strides[0])),
                       stride=strides[0])
    return DeformableAnalysis(
        spec=model.spec, grid=grid, probabilities=_frozen(cap.probabilities.float().numpy()),
        boxes=_frozen(cap.boxes.float().numpy()), encoder=(), decoder=(), decoder_self=(),
        inputs=tokens_from(recorded, pixels, mask), anchors=_frozen(_anchors(cap, frame)),
        frame=frame, capture=cap,
        strides=strides)


@dataclass(frozen=True, eq=False)
class DeformableAnalysis(Analysis):
    """An :class:`~detr_viz.analysis.Analysis` of a deformable detector: the same detections,
    boxes and controls, with sampling points where a dense model has attention matrices.

    ``capture``: every sampling point (:class:`~detr_viz.sampling_capture.SamplingCapture`);
    ``frame``: where the photo sits in the model input; ``strides[l]``: model-input pixels per
    cell of level l. ``grid``: the finest level over the photo, where maps are drawn (module
    docstring). ``encoder``/``decoder`` (dense factors) are empty: the methods below read the
    capture. ``inputs``: the tokens the transformer was given, per level
    (:class:`~detr_viz.deformable_replay.DeformableInputs`), for faithfulness scores.
    """

    frame: InputFrame | None = None
    capture: Any = None
    strides: tuple[int, ...] = ()
    _cached: dict = field(default_factory=dict, repr=False)  # per-click work kept (encoder)

    sparse = True  # a class attribute: methods built on dense matrices say they do not apply

    @property
    def num_layers(self) -> int:
        cap = self.capture
        if cap.encoder is not None:
            return cap.encoder.weights.shape[0]
        return len(cap.dense_encoder) if cap.dense_encoder is not None else 0

    @property
    def num_decoder_layers(self) -> int:
        return self.capture.decoder.weights.shape[0]

    @property
    def num_heads(self) -> int:
        return self.capture.decoder.weights.shape[2]

    @property
    def num_encoder_heads(self) -> int:
        cap = self.capture
        if cap.encoder is not None:
            return cap.encoder.weights.shape[2]
        return cap.dense_encoder[0].shape[0] if cap.dense_encoder is not None else 0

    @property
    def level_shapes(self) -> tuple[tuple[int, int], ...]:
        return self.capture.spatial_shapes

    @property
    def num_levels(self) -> int:
        return len(self.capture.spatial_shapes)

    @property
    def encoder_kind(self) -> str | None:
        """"deformable" (points per token), "dense" (RT-DETR's AIFI on one level), or None."""
        if self.capture.encoder is not None:
            return "deformable"
        return "dense" if self.capture.dense_encoder is not None else None

    def sampling_points(self, query: int, layer: int = -1) -> SamplingPoints:
        """Where object query ``query`` samples in decoder ``layer``, in photo pixels (see
        :class:`~detr_viz.sampling.SamplingPoints`)."""
        return sampling_points(self.capture, self.frame, query, layer)

    def token_at(self, point: tuple[float, float], level: int = 0) -> int:
        """The encoder token of level ``level`` whose cell holds ``point`` (photo pixels)."""
        row, col = self._cell_on(level, point)
        return self.capture.level_start_index[level] + row * self.level_shapes[level][1] + col

    def _cell_on(self, level: int, point: tuple[float, float]) -> tuple[int, int]:
        """(row, col) of ``point``'s cell on level ``level``'s captured map (a ViT level that
        stops short of the input's edge gives its last cell there)."""
        row, col = self.level_grid(level).cell_at(*point)
        h, w = self.level_shapes[level]
        return min(row, h - 1), min(col, w - 1)

    def encoder_points(self, point: tuple[float, float], level: int = 0, layer: int = -1
                       ) -> SamplingPoints:
        """Where the encoder token under ``point`` (level ``level``'s cell) samples in a
        deformable encoder's ``layer``."""
        if self.capture.encoder is None:
            raise ArgumentError(self.no_deformable_encoder())
        return sampling_points(self.capture, self.frame, self.token_at(point, level), layer,
                               encoder=True)

    def no_deformable_encoder(self) -> str:
        name = self.spec.architecture
        if self.capture.dense_encoder is not None:
            return (f"{name}'s encoder is dense (AIFI: plain attention on its coarsest level), "
                    "so its tokens have no sampling points; its attention is shown instead.")
        return f"{name} has no transformer encoder: its decoder reads the backbone's features."

    def level_grid(self, level: int) -> FeatureGrid:
        """Level ``level``'s cells over the photo: the cells over the resized photo (none of
        the padding's)."""
        if not 0 <= level < self.num_levels:
            raise ArgumentError(f"level {level} is out of range (0..{self.num_levels - 1}).")
        w_in, h_in = self.frame.input_size
        s = self.strides[level]
        shape = (math.ceil(h_in / s), math.ceil(w_in / s))
        return FeatureGrid(self.original_size, self.frame.input_size, shape, s)

    def decoder_attentions(self, queries: list[int], layer: int = -1, head: int | None = None,
                           term: str | None = None, level: int | None = None) -> np.ndarray:
        """(n, h, w) float32 on :attr:`grid`: each query's sampling weights in ``layer`` and
        ``head`` (None: the mean of heads), splatted as the sampler read them, of one
        ``level`` or all."""
        if term is not None:
            raise ArgumentError(f"{self.spec.architecture} has no {term!r} attention term.")
        return self.drawn(self.decoder_tokens(queries, layer, head, level), level)

    def decoder_attention(self, query: int, layer: int = -1, head: int | None = None,
                          term: str | None = None, level: int | None = None) -> np.ndarray:
        return self.decoder_attentions([query], layer, head, term, level)[0]

    def decoder_tokens(self, queries: list[int], layer: int = -1, head: int | None = None,
                       level: int | None = None) -> np.ndarray:
        """(n, S) float64 in token order (level by level, each row-major): the weight each
        query's points of ``layer`` and ``head`` put on each token, as the sampler read them;
        of one ``level`` (the others 0) or all. What :meth:`decoder_attentions` draws."""
        queries = self.checked_queries(queries)
        self._level(level)
        stack = self.capture.decoder
        layer = self._layer_index(layer, stack.weights.shape[0])
        rows = [torch.cat([m.flatten() for m in splat(stack, self.level_shapes, q, layer, head)])
                for q in queries]
        return self.only_level(torch.stack(rows).double().numpy() if rows else
                               np.zeros((0, self.num_tokens)), level)

    @property
    def num_tokens(self) -> int:
        """S: the tokens of every level."""
        return sum(h * w for h, w in self.level_shapes)

    def drawn(self, values: np.ndarray, level: int | None = None) -> np.ndarray:
        """(n, S) token values -> (n, h, w) float32 maps on :attr:`grid` (:meth:`on_grid`, one
        ``level`` or all): how every decoder map of these models is drawn."""
        if not len(values):
            return np.zeros((0, *self.feature_hw), np.float32)
        return np.stack([self.on_grid(self.token_levels(v), level) for v in values]).astype(
            np.float32)

    def only_level(self, values: np.ndarray, level: int | None) -> np.ndarray:
        """(..., S) token values with every level but ``level`` set to 0 (None: unchanged)."""
        if level is None:
            return values
        self._level(level)
        start = self.capture.level_start_index[level]
        h, w = self.level_shapes[level]
        out = np.zeros_like(values)
        out[..., start:start + h * w] = values[..., start:start + h * w]
        return out

    def photo_tokens(self) -> np.ndarray:
        """The tokens whose cells lie over the resized photo (not padding, not past a ViT
        level's edge), ascending (token order)."""
        out = []
        for level, ((h, w), start) in enumerate(zip(
                self.level_shapes, self.capture.level_start_index, strict=True)):
            gh, gw = self.level_grid(level).shape
            rows, cols = np.meshgrid(np.arange(min(h, gh)), np.arange(min(w, gw)),
                                     indexing="ij")
            out.append(start + (rows * w + cols).ravel())
        return np.sort(np.concatenate(out))

    def encoder_attention(self, point: tuple[float, float], layer: int = -1,
                          head: int | None = None, direction: Direction = INCOMING,
                          level: int | None = None) -> np.ndarray:
        """(h, w) float32 on :attr:`grid` around the point (photo pixels).

        Deformable encoder: ``"outgoing"``, where the token under the point (on ``level``,
        default 0) samples (its splatted weights, all levels); ``"incoming"``, how much weight
        every token puts on the cell under the point (of ``level``, default 0), each token
        drawn at its own cell. Dense (AIFI) encoder: its attention row or column of the cell
        under the point on the AIFI level (``level`` must be None or that level)."""
        check_direction(direction)
        kind = self.encoder_kind
        if kind is None:
            raise ArgumentError(self.no_deformable_encoder())
        if kind == "dense":
            return self._dense_encoder(point, layer, head, direction, level)
        level = 0 if level is None else level
        stack = self.capture.encoder
        layer = self._layer_index(layer, stack.weights.shape[0])
        if direction == OUTGOING:
            token = self.token_at(point, level)
            return self.on_grid(splat(stack, self.level_shapes, token, layer, head),
                                None).astype(np.float32)
        row, col = self._cell_on(level, point)
        per_token = _weight_on_cell(self._cached, stack, layer, head, level, (row, col),
                                    self.level_shapes)
        return self.on_grid(self._by_level(per_token), None).astype(np.float32)

    def _dense_encoder(self, point, layer, head, direction, level) -> np.ndarray:
        cap = self.capture
        dense = cap.dense_level
        if level not in (None, dense):
            raise ArgumentError(f"{self.spec.architecture}'s encoder attends on level {dense} "
                                f"only, not level {level}.")
        layer = self._layer_index(layer, len(cap.dense_encoder))
        attention = cap.dense_encoder[layer]  # (heads, S, S)
        heads = slice(None) if head is None else [self._checked("head", head,
                                                                attention.shape[0])]
        row, col = self._cell_on(dense, point)
        h, w = self.level_shapes[dense]
        cell = row * w + col
        # the clicked token's column or row of each head first: (heads, S), not (heads, S, S)
        picked = attention[heads, :, cell] if direction == INCOMING else attention[heads, cell]
        values = picked.double().mean(0)
        maps = [torch.zeros(s, dtype=torch.float64) for s in self.level_shapes]
        maps[dense] = values.view(h, w)
        return self.on_grid(tuple(maps), dense).astype(np.float32)

    def token_levels(self, values) -> tuple[Tensor, ...]:
        """A value per encoder token (S,), in sequence order -> one (h_l, w_l) map per level
        (for :meth:`on_grid`)."""
        return self._by_level(torch.as_tensor(np.asarray(values, dtype=np.float64)))

    def _by_level(self, per_token: Tensor) -> tuple[Tensor, ...]:
        starts = (*self.capture.level_start_index, per_token.shape[0])
        return tuple(per_token[starts[i]:starts[i + 1]].view(h, w)
                     for i, (h, w) in enumerate(self.level_shapes))

    def on_grid(self, maps: tuple[Tensor, ...], level: int | None) -> np.ndarray:
        """Per-level maps (padded grids, as captured) -> one (h, w) float64 map on
        :attr:`grid`, each level's cell shared by area among the fine cells it covers; one
        ``level``, or their sum."""
        h0, w0 = self.feature_hw
        s0 = self.strides[0]
        out = np.zeros((h0, w0))
        chosen = range(len(maps)) if level is None else [level]
        for i in chosen:
            m, s = maps[i].double().numpy(), self.strides[i]
            if s % s0 == 0:  # k x k fine cells per cell: repeat (no BLAS on the page's thread)
                k = s // s0
                fine = np.repeat(np.repeat(m, k, axis=0), k, axis=1)[:h0, :w0] / (k * k)
                out[:fine.shape[0], :fine.shape[1]] += fine
            else:  # any other ratio: shares of overlap
                out += _overlap(h0, s0, m.shape[0], s) @ m @ _overlap(w0, s0, m.shape[1], s).T
        return out

    def _level(self, level: int | None) -> None:
        if level is not None:
            self._checked("level", level, self.num_levels)

    @staticmethod
    def _checked(what: str, value: int, count: int) -> int:
        if not -count <= value < count:
            raise ArgumentError(f"{what} {value} is out of range (0..{count - 1}).")
        return value % count

    def _layer_index(self, layer: int, count: int) -> int:
        return self._checked("layer", layer, count)


def _anchors(cap, frame: InputFrame) -> np.ndarray:
    """(decoder layers, Q, 4): the reference each decoder layer started from, as normalised
    (cx, cy, w, h) of the photo (a point reference, as plain Deformable DETR's, has w = h = 0),
    so that :meth:`~detr_viz.analysis.Analysis.anchor_boxes` gives them in photo pixels."""
    width, height = frame.photo_size
    rows = []
    for reference in cap.decoder.references:
        xy = reference_pixels(reference[:, 0], cap.spatial_shapes, frame).numpy()
        if xy.shape[-1] == 2:
            xy = np.concatenate([xy, np.zeros_like(xy)], axis=-1)
        rows.append(xy / [width, height, width, height])
    return np.stack(rows)


def _overlap(fine: int, s_fine: int, coarse: int, s_coarse: int) -> np.ndarray:
    """(fine, coarse): the share of each coarse cell's extent [c s, (c + 1) s) that lies in
    each fine cell [j s', (j + 1) s') along one axis (model-input pixels)."""
    j = np.arange(fine)[:, None]
    c = np.arange(coarse)[None, :]
    lo = np.maximum(j * s_fine, c * s_coarse)
    hi = np.minimum((j + 1) * s_fine, (c + 1) * s_coarse)
    return np.clip(hi - lo, 0, None) / s_coarse


def _weight_on_cell(cached: dict, stack, layer: int, head: int | None, level: int,
                    cell: tuple[int, int], shapes) -> Tensor:
    """(tokens,) float64: the weight each token's points put on ``cell`` (row, col) of
    ``level`` in ``layer`` (mean of heads, or ``head``), with the sampler's coefficients.
    ``cached``: a dict keeping one (layer, level)'s points between clicks, sorted by the cell
    they fall in, so that a click reads only the points near its cell (17,760 tokens x 8 heads
    x 4 points for Deformable DETR at 800 x 1066: ~10 ms a click read whole, <1 ms so)."""
    (h, w), (row, col) = shapes[level], cell
    key = ("cells", layer, level)
    if key not in cached:
        cached.clear()  # one (layer, level) kept: ~18 MB for Deformable DETR at 800 x 1066
        cached[key] = _points_by_cell(stack, layer, level, (h, w))
    bins, order, u, v, weights, (tokens, heads, count) = cached[key]
    if stack.sampler == "bilinear":  # a point at (u, v) reads the cells floor(u) and the next
        near = [(r, c) for r in (row - 1, row) for c in (col - 1, col)]
    else:  # the one cell a discrete sampler reads
        near = [(row, col)]
    spans = [np.arange(*np.searchsorted(bins, [r * (w + 2) + c, r * (w + 2) + c + 1]))
             for r, c in near]
    at = np.concatenate(spans)  # positions in the sorted points
    entry = order[at]  # their index in (tokens, heads, points) order
    if head is not None:
        keep = (entry // count) % heads == head
        at, entry = at[keep], entry[keep]
    if stack.sampler == "bilinear":
        share = (np.clip(1 - np.abs(u[at] - col), 0, None)
                 * np.clip(1 - np.abs(v[at] - row), 0, None))
    else:
        share = np.ones(len(at))
    per_token = np.bincount(entry // (heads * count), weights=share * weights[at],
                            minlength=tokens)
    return torch.from_numpy(per_token / (heads if head is None else 1))


def _points_by_cell(stack, layer: int, level: int, shape: tuple[int, int]):
    """One (layer, level)'s sampling points sorted by the cell their sampler reads first:
    (bins sorted, the order that sorts them, u, v and weights in that order, (tokens, heads,
    points)). A bin is row * (w + 2) + col for rows -1..h-1 and cols -1..w-1 (a bilinear
    point left of or above the grid still reads cell 0); padding and points that read no cell
    go past the last. u, v: cell coordinates with cell centres at integers."""
    h, w = shape
    xy = stack.locations[layer][:, :, level].double().numpy()  # (tokens, heads, points, 2)
    weights = stack.weights[layer][:, :, level].double().numpy()
    padding = np.isnan(xy[..., 0])
    u = np.where(padding, -9.0, xy[..., 0] * w - 0.5).ravel()
    v = np.where(padding, -9.0, xy[..., 1] * h - 0.5).ravel()
    if stack.sampler == "bilinear":
        col, row = np.floor(u), np.floor(v)
    else:  # the cell it reads: clamped to the grid
        col, row = np.clip(np.floor(u + 1), 0, w - 1), np.clip(np.floor(v + 1), 0, h - 1)
    outside = padding.ravel() | (col < -1) | (col > w - 1) | (row < -1) | (row > h - 1)
    bins = np.where(outside, (h + 1) * (w + 2), row * (w + 2) + col).astype(np.int64)
    order = np.argsort(bins, kind="stable")
    return (bins[order], order, u[order], v[order],
            np.where(padding, 0.0, weights).ravel()[order], weights.shape)
