"""Hugging Face Conditional DETR and DAB-DETR checkpoints: vetted from config.json, loaded offline.

A checkpoint is a folder (a Hub download or ``save_pretrained`` output) holding ``config.json``
and ``model.safetensors`` or ``pytorch_model.bin``. :func:`open_hf_family` reads config.json as
JSON (nothing imported, nothing run, nothing downloaded) and describes the model in an
:class:`HFFamilyCheckpoint`; :func:`load_hf_family` builds transformers' model from that config
with a random-initialised backbone (timm or transformers' ResNet, never a pretrained download),
loads the weights (safetensors, or ``torch.load(weights_only=True)``), and insists that every key
fits. transformers is imported only there, so detr-viz imports without it.

The backbone comes from config.json as transformers 4.x and 5.x read it: ``backbone_config`` if
present (``timm_backbone``: its ``backbone`` name and ``output_stride``; ``resnet``: transformers'
own ResNet, never dilated), else the 4.x fields ``use_timm_backbone`` (default true),
``backbone`` (default ``resnet50``), ``backbone_kwargs`` and ``dilation`` (DC5: output stride 16).
:func:`load_hf_family` hands transformers that explicit ``backbone_config``, so transformers never
resolves a backbone name on the Hub.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from detr_viz.errors import (
    CorruptCheckpointError,
    NotADetrCheckpointError,
    UnsafeCheckpointError,
    WeightsUnavailableError,
    WrongVariantError,
)
from detr_viz.hf_checkpoint import (
    SUPPORTED,
    WEIGHT_FILES,
    last_stage_problem,
    read_json,
    weights_file,
)

# model_type in config.json -> (family, transformers class)
FAMILIES = {"conditional_detr": ("conditional_detr", "ConditionalDetrForObjectDetection"),
            "dab-detr": ("dab_detr", "DabDetrForObjectDetection")}
_TIMM_RESNET = re.compile(r"resnet\d+")  # timm's plain ResNets: resnet18, 34, 50, 101, 152...
_DROPPED = ("backbone", "use_timm_backbone", "backbone_kwargs", "use_pretrained_backbone")


@dataclass(frozen=True)
class HFFamilyCheckpoint:
    """A vetted Conditional DETR or DAB-DETR checkpoint, as its config.json describes it.

    ``stride``: model-input pixels per cell of the feature grid the transformer sees (32, or 16
    for a dilated DC5 backbone). ``num_queries``: the decoder's queries Q (DAB-DETR with
    ``num_patterns`` P > 0 has num_queries * P). ``labels[i]`` names class i of the (Q,
    num_labels) sigmoid scores; these families have no "no object" class.
    """

    folder: Path  # holds config.json
    weights: Path  # model.safetensors or pytorch_model.bin
    family: str  # "conditional_detr" | "dab_detr"
    backbone: str  # e.g. "timm resnet50", "transformers ResNet [3, 4, 6, 3]"
    stride: int
    num_labels: int
    num_queries: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    d_model: int
    labels: tuple[str, ...]


def open_hf_family(folder: str | os.PathLike[str],
                   config: dict[str, Any] | None = None) -> HFFamilyCheckpoint:
    """Vet the checkpoint folder (or a file in it: its weights file, config.json) from its
    config.json alone (``config``: what :func:`read_family_config` already read from it).

    Raises :class:`WeightsUnavailableError` (no config.json, no weights file),
    :class:`CorruptCheckpointError` (config.json is not a JSON object),
    :class:`NotADetrCheckpointError` (another model type, or not the detector architecture) or
    :class:`WrongVariantError` (a backbone we cannot build offline, label ids with gaps).
    """
    path = Path(folder).expanduser()
    folder = path.parent if path.is_file() else path
    config = read_family_config(folder) if config is None else config
    family, _ = FAMILIES[config["model_type"]]
    weights = path if path.name in WEIGHT_FILES and path.is_file() else weights_file(folder)
    if weights is None:
        raise WeightsUnavailableError(
            f"{folder} holds config.json but no {' or '.join(WEIGHT_FILES)}: copy the weights "
            "file of the same Hugging Face repository into it."
        )
    backbone = backbone_config(config, folder / "config.json")
    labels = config_labels(config, folder / "config.json")
    hidden = config.get("d_model", config.get("hidden_size", 256))
    patterns = config.get("num_patterns", 0) if family == "dab_detr" else 0
    return HFFamilyCheckpoint(
        folder=folder, weights=weights, family=family, backbone=_describe(backbone),
        stride=16 if backbone.get("output_stride") == 16 else 32, num_labels=len(labels),
        num_queries=config.get("num_queries", 300) * max(1, patterns),
        encoder_layers=config.get("encoder_layers", 6),
        decoder_layers=config.get("decoder_layers", 6),
        encoder_heads=config.get("encoder_attention_heads", 8),
        decoder_heads=config.get("decoder_attention_heads", 8), d_model=hidden, labels=labels,
    )


def read_family_config(folder: Path) -> dict[str, Any]:
    """config.json in ``folder`` as a dict, checked to describe a supported detector."""
    path = folder / "config.json"
    if not path.is_file():
        raise WeightsUnavailableError(
            f"{folder} has no config.json, so it is not a Hugging Face checkpoint folder. Name "
            "a folder holding config.json and model.safetensors (or pytorch_model.bin)."
        )
    config = read_json(path)
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind not in FAMILIES:
        what = f'a "{kind}" model' if kind else "no transformers model (no model_type)"
        hint = " Load a DETR checkpoint with detr_viz.load_model." if kind == "detr" else ""
        raise NotADetrCheckpointError(
            f"{path} describes {what}, which detr-viz cannot explain here. detr-viz supports "
            f"{SUPPORTED}.{hint}"
        )
    wanted = FAMILIES[kind][1]
    architectures = config.get("architectures") or [wanted]
    if wanted not in architectures:
        raise NotADetrCheckpointError(
            f"{path} describes a {', '.join(map(str, architectures))}, not the detector "
            f"({wanted}) detr-viz shows."
        )
    return config


def backbone_config(config: dict[str, Any], source: Path) -> dict[str, Any]:
    """The explicit ``backbone_config`` transformers builds for ``config`` (timm's ResNets with
    ``pretrained=False``, or transformers' ResNet); WrongVariantError for anything else."""
    spec = config.get("backbone_config")
    if spec is None and config.get("use_timm_backbone", True):  # transformers 4.x fields
        extra = config.get("backbone_kwargs") or {}
        spec = {"model_type": "timm_backbone", "backbone": config.get("backbone") or "resnet50",
                "num_channels": extra.get("in_chans", config.get("num_channels", 3)),
                "features_only": True, "out_indices": extra.get("out_indices", [1, 2, 3, 4]),
                "output_stride": extra.get("output_stride", 16 if config.get("dilation") else None)}
    elif spec is None and config.get("backbone"):
        raise _unsupported(source, f"it names backbone {config['backbone']!r} without its config, "
                           "which transformers would look up on the Hub")
    spec = {"model_type": "resnet", "out_features": ["stage4"]} if spec is None else dict(spec)
    kind = spec.get("model_type")
    if kind == "timm_backbone":
        name = str(spec.get("backbone"))
        if not _TIMM_RESNET.fullmatch(name.removeprefix("timm/").split(".")[0]):
            raise _unsupported(source, f"its timm backbone is {name}, not a plain ResNet")
        if spec.get("output_stride") not in (None, 32, 16):
            raise _unsupported(source, f"its backbone has output_stride {spec['output_stride']}")
        _check_last_stage(spec, source, "layer4")
        return spec | {"use_pretrained_backbone": False}
    if kind == "resnet":
        _check_last_stage(spec, source, "stage4")
        return spec
    raise _unsupported(source, f"its backbone is a {kind or 'unknown'} model, not a ResNet")


def _check_last_stage(spec: dict[str, Any], source: Path, stage: str) -> None:
    if (why := last_stage_problem(spec, stage)) is not None:
        raise _unsupported(source, why)


def _unsupported(source: Path, why: str) -> WrongVariantError:
    return WrongVariantError(
        f"{source} has a backbone detr-viz cannot build offline: {why}. Supported are ResNets: "
        "timm's resnet18/34/50/101/... (DC5 too) and transformers' own ResNet."
    )


def _describe(spec: dict[str, Any]) -> str:
    if spec["model_type"] == "timm_backbone":
        return f"timm {spec['backbone']}"
    return f"transformers ResNet {list(spec.get('depths', [3, 4, 6, 3]))}"


def config_labels(config: dict[str, Any], source: Path) -> tuple[str, ...]:
    id2label = config.get("id2label")
    if not isinstance(id2label, dict):
        return tuple(f"LABEL_{i}" for i in range(config.get("num_labels", 2)))
    try:
        ids = {int(k): str(v) for k, v in id2label.items()}
    except ValueError:
        ids = {}
    if sorted(ids) != list(range(len(id2label))):
        raise WrongVariantError(
            f"{source} numbers its classes {sorted(id2label)[:6]}..., not 0..{len(id2label) - 1} "
            "without gaps, so its scores cannot be named; fix id2label in config.json."
        )
    return tuple(ids[i] for i in range(len(ids)))


def load_hf_family(folder: str | os.PathLike[str], dtype: torch.dtype = torch.float32,
                   config: dict[str, Any] | None = None):
    """transformers' ``ConditionalDetrForObjectDetection`` / ``DabDetrForObjectDetection`` from
    ``folder`` (as :func:`open_hf_family` takes it): eval mode, ``requires_grad`` off, eager
    attention, parameters in ``dtype``. ``config``: config.json as :func:`read_family_config`
    already read it (the caller's spec and the model then come from one reading).

    Built from the vetted config.json with a random-initialised backbone, then every weight from
    the folder's file (legacy transformers 4.x key names are renamed by transformers). Raises as
    :func:`open_hf_family`, plus :class:`WrongVariantError` when keys are missing, unexpected or
    of another shape, :class:`UnsafeCheckpointError` for a pickle holding code and
    :class:`CorruptCheckpointError` for an unreadable weights file.
    """
    import transformers

    info = open_hf_family(folder, config)
    raw = read_family_config(info.folder) if config is None else config
    config_class = transformers.CONFIG_MAPPING[raw["model_type"]]
    fields = {k: v for k, v in raw.items() if k not in _DROPPED}
    fields["backbone_config"] = backbone_config(raw, info.folder / "config.json")
    config = config_class.from_dict(fields)
    model_class = getattr(transformers, FAMILIES[raw["model_type"]][1])
    try:
        model, loading = model_class.from_pretrained(
            info.folder, config=config, local_files_only=True, trust_remote_code=False,
            attn_implementation="eager", dtype=dtype, output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported in the loading info, refused below
            use_safetensors=info.weights.suffix == ".safetensors")
    except Exception as exc:  # transformers raises many types for a damaged file
        raise loading_error(info.weights, exc) from exc
    check_loading(loading, info.weights)
    if info.family == "dab_detr":
        cast_dab_queries(model)
    return model.eval().requires_grad_(False)


def cast_dab_queries(model: torch.nn.Module) -> None:
    """Let a DAB-DETR run in any dtype: transformers (5.25) builds its decoder's zero queries in
    float32 whatever the model's dtype, so a float64 or bfloat16 model fails in its first decoder
    layer. A forward pre-hook on ``model.model.decoder`` casts them to the decoder's dtype (zeros
    stay zeros: the result is what a float32 model computes, in the model's dtype)."""

    def cast(module, args, kwargs):
        queries, dtype = kwargs.get("inputs_embeds"), module.layernorm.weight.dtype
        if queries is None or queries.dtype == dtype:
            return None
        return args, {**kwargs, "inputs_embeds": queries.to(dtype)}

    model.model.decoder.register_forward_pre_hook(cast, with_kwargs=True)


def loading_error(path: Path, exc: Exception) -> Exception:
    text = str(exc)
    if "weights_only" in text or "Weights only load failed" in text:
        return UnsafeCheckpointError(
            f"{path} holds pickled code, and detr-viz never runs code from a checkpoint "
            "(torch.load(weights_only=True) refused it). Use the model.safetensors file instead."
        )
    return CorruptCheckpointError(
        f"{path} could not be read as model weights ({type(exc).__name__}: {text[:300]}); it is "
        "damaged or incomplete: copy it again from the repository."
    )


def check_loading(loading: dict[str, Any], path: Path) -> None:
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in loading.get(kind) or ())
        if keys:
            more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
            problems.append(f"{kind.replace('_', ' ')}: {', '.join(keys[:4])}{more}")
    if problems:
        raise WrongVariantError(
            f"{path} does not fit the model its config.json describes ({'; '.join(problems)}). "
            "Use the weights file and config.json of the same checkpoint."
        )
