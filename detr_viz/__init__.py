"""detr-viz: see what a DETR object detector looks at.

Library entry points (all usable in a notebook, none imports streamlit):

    model = load_model("detr_resnet50")          # official weights, cached locally
    model = load_model(checkpoint="ckpt.pth", labels="classes.txt")  # your own DETR, any size
    analysis = analyze(model, "photo.jpg")       # one forward pass, everything captured
    analysis.detections(0.9)                     # boxes in photo pixels
    analysis.decoder_attention(query)            # (h, w) map of one object query
    analysis.encoder_attention((x, y))           # (h, w) map around a photo pixel
"""

from detr_viz.analysis import INCOMING, OUTGOING, Analysis, Detection, analyze
from detr_viz.capture import AttentionFactors, Capture, capture
from detr_viz.coco import COCO_CLASSES
from detr_viz.errors import (
    ArgumentError,
    CorruptCheckpointError,
    DetrVizError,
    DeviceUnavailableError,
    ImageError,
    MissingDependencyError,
    NotADetrCheckpointError,
    UnsafeCheckpointError,
    WeightsError,
    WeightsUnavailableError,
    WrongVariantError,
)
from detr_viz.geometry import FeatureGrid
from detr_viz.image import ModelInput, load_image, preprocess
from detr_viz.model import DETR, VARIANTS, build_model
from detr_viz.spec import ModelSpec
from detr_viz.weights import load_model

__all__ = [
    "COCO_CLASSES",
    "DETR",
    "INCOMING",
    "OUTGOING",
    "VARIANTS",
    "Analysis",
    "ArgumentError",
    "AttentionFactors",
    "Capture",
    "CorruptCheckpointError",
    "Detection",
    "DetrVizError",
    "DeviceUnavailableError",
    "FeatureGrid",
    "ImageError",
    "MissingDependencyError",
    "ModelSpec",
    "ModelInput",
    "NotADetrCheckpointError",
    "UnsafeCheckpointError",
    "WeightsError",
    "WeightsUnavailableError",
    "WrongVariantError",
    "analyze",
    "build_model",
    "capture",
    "load_image",
    "load_model",
    "preprocess",
]
