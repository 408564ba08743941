"""Read a Hugging Face ``transformers`` DETR checkpoint as an official DETR state dict.

Such a checkpoint is a folder (a ``facebook/detr-resnet-50`` download, or ``save_pretrained``
output) holding ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``. Nothing here
imports ``transformers`` or runs code from the folder: ``config.json`` is read as JSON, the
weights with ``safetensors`` (or, by the caller, ``torch.load(weights_only=True)``).

The variant comes from ``config.json`` alone, as transformers would build the model:
``backbone_config`` if present (``timm_backbone``: its ``backbone`` and ``output_stride`` 16 for
DC5; ``resnet``: its ``depths``, never dilated), else the transformers 4.x fields
``use_timm_backbone`` (default true), ``backbone`` (default ``resnet50``) and ``dilation``.

Key names are converted by :mod:`detr_viz.hf_keys`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from detr_viz.errors import (
    CorruptCheckpointError,
    MissingDependencyError,
    NotADetrCheckpointError,
    WeightsUnavailableError,
    WrongVariantError,
)
from detr_viz.model import VARIANTS

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # transformers' order of preference
HF_REPOS = {  # variant -> the Hub repository of its transformers port
    "detr_resnet50": "facebook/detr-resnet-50",
    "detr_resnet50_dc5": "facebook/detr-resnet-50-dc5",
    "detr_resnet101": "facebook/detr-resnet-101",
    "detr_resnet101_dc5": "facebook/detr-resnet-101-dc5",
}
# DetrConfig fields the released models have (missing = transformers' default): a checkpoint
# that differs only in sizes is a fine-tuned DETR; one that differs in _REQUIRED cannot be rebuilt
_RELEASED = {"num_queries": 100, "d_model": 256, "encoder_layers": 6, "decoder_layers": 6,
             "encoder_attention_heads": 8, "decoder_attention_heads": 8, "encoder_ffn_dim": 2048,
             "decoder_ffn_dim": 2048}
_REQUIRED = {"activation_function": "relu", "position_embedding_type": "sine", "num_channels": 3}
SUPPORTED = ('DETR (model_type "detr"), Conditional DETR ("conditional_detr"), DAB-DETR '
             '("dab-detr"), and the deformable Deformable DETR ("deformable_detr"), RT-DETR '
             '("rt_detr", "rt_detr_v2"), D-FINE ("d_fine"), DEIMv2 ("deimv2"), LW-DETR ("lw_detr") '
             'and RF-DETR ("rf_detr")')
_RESNET_DEPTHS = {(3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101"}
_RESNET_REQUIRED = {"layer_type": "bottleneck", "embedding_size": 64, "hidden_act": "relu",
                    "hidden_sizes": [256, 512, 1024, 2048], "downsample_in_bottleneck": False,
                    "downsample_in_first_stage": False, "num_channels": 3}


@dataclass(frozen=True)
class HFCheckpoint:
    """A vetted Hugging Face DETR checkpoint: where it is and what ``config.json`` says."""

    folder: Path  # holds config.json
    weights: Path  # model.safetensors or pytorch_model.bin (or the file the user named)
    variant: str | None  # a released model's name, e.g. "detr_resnet50_dc5"; None: fine-tuned
    timm_backbone: bool  # backbone key layout: timm/torchvision names, else transformers' ResNet
    record: dict[str, Any]  # what shapes cannot tell, as DETR's args: nheads, dilation, backbone
    labels: tuple[str, ...] | None  # id2label in id order (None: transformers' placeholders)


def is_hf_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is to be read as a Hugging Face checkpoint: a folder, a ``.safetensors``
    file, or a ``pytorch_model.bin`` with a ``config.json`` beside it (without one, such a file
    is read as a plain torch checkpoint)."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        return True
    return path.name == "pytorch_model.bin" and (path.parent / "config.json").is_file()


def weights_file(folder: Path) -> Path | None:
    """The weights file transformers would read in ``folder``, or None."""
    return next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)


def open_checkpoint(path: str | os.PathLike[str]) -> HFCheckpoint:
    """Vet the checkpoint at ``path`` (a folder, or a weights file in one) from its config.json.

    Raises :class:`WeightsUnavailableError` (no config.json or no weights file),
    :class:`CorruptCheckpointError` (config.json is not JSON), :class:`NotADetrCheckpointError`
    (another model type, or DETR without the detection heads) or :class:`WrongVariantError`
    (a DETR that is not one of the four released COCO models).
    """
    path = Path(path).expanduser()
    folder, weights = (path, weights_file(path)) if path.is_dir() else (path.parent, path)
    if weights is None:
        raise WeightsUnavailableError(
            f"The folder {folder} holds no {' or '.join(WEIGHT_FILES)}, so it is not a Hugging "
            "Face checkpoint. Name an official .pth file itself, or a folder holding config.json "
            "and the weights file of a Hugging Face DETR checkpoint."
        )
    config = read_config(folder / "config.json", weights)
    backbone, dilation, timm = backbone_of(config, folder / "config.json")
    labels = _labels(config, folder / "config.json")
    released = (labels is None or len(labels) == 91) and config.get("num_labels", 91) == 91 \
        and all(config.get(k, v) == v for k, v in _RELEASED.items())
    variant = {(v.backbone, v.dilation): n for n, v in VARIANTS.items()}[backbone, dilation] \
        if released else None
    heads = config.get("encoder_attention_heads", 8)
    if config.get("decoder_attention_heads", 8) != heads or \
            config.get("decoder_ffn_dim", 2048) != config.get("encoder_ffn_dim", 2048):
        raise _unsupported(folder / "config.json", "its encoder and decoder differ in heads or "
                           "feed-forward size, which DETR's code does not allow")
    record = {"nheads": heads, "dilation": dilation, "backbone": backbone}
    return HFCheckpoint(folder, weights, variant, timm, record, labels)


def _labels(config: dict[str, Any], source: Path) -> tuple[str, ...] | None:
    """id2label's names in id order; None for transformers' placeholders (LABEL_0, ...)."""
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        by_id = {int(k): str(v) for k, v in id2label.items()}
    except ValueError:
        raise _unsupported(source, "its id2label has ids that are not integers") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise _unsupported(source, "its id2label ids are not 0, 1, 2, ... without gaps")
    names = tuple(by_id[i] for i in range(len(by_id)))
    return None if names == tuple(f"LABEL_{i}" for i in range(len(names))) else names


def checkpoint_variant(path: str | os.PathLike[str]) -> str | None:
    """The variant (e.g. ``"detr_resnet101_dc5"``) of the Hugging Face checkpoint at ``path``,
    from its config.json (None for a fine-tuned DETR of other sizes); typed errors as
    :func:`open_checkpoint`."""
    return open_checkpoint(path).variant


def read_json(path: Path) -> Any:
    """``path`` parsed as JSON; an unreadable or malformed file is a CorruptCheckpointError."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(
            f"{path} cannot be read as JSON ({exc}); copy it again from the repository."
        ) from exc


def read_config(path: Path, weights: Path) -> dict[str, Any]:
    """config.json at ``path`` (of the checkpoint ``weights``) as a dict, vetted to be a DETR
    detector detr-viz can rebuild (any sizes; ReLU, sine positions, RGB input)."""
    if not path.is_file():
        raise WeightsUnavailableError(
            f"{weights} has no config.json beside it, so its variant (backbone, DC5) is "
            "unknown. Copy config.json from the same Hugging Face repository into "
            f"{path.parent}."
        )
    config = read_json(path)
    if not isinstance(config, dict) or config.get("model_type") != "detr":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise NotADetrCheckpointError(
            f"{path} describes a {kind or 'non-transformers'} model, not one detr-viz "
            f"explains. Supported: {SUPPORTED}, such as facebook/detr-resnet-50, "
            "microsoft/conditional-detr-resnet-50, IDEA-Research/dab-detr-resnet-50 and "
            "checkpoints fine-tuned from them."
        )
    architectures = config.get("architectures") or ["DetrForObjectDetection"]
    if "DetrForObjectDetection" not in architectures:
        raise NotADetrCheckpointError(
            f"{path} describes a {', '.join(map(str, architectures))}, not the DETR detector "
            "(DetrForObjectDetection) detr-viz shows."
        )
    wrong = [f"{k} is {config[k]!r}, not {v!r}" for k, v in _REQUIRED.items()
             if config.get(k, v) != v]
    if wrong:
        raise WrongVariantError(
            f"{path} is a DETR detr-viz cannot rebuild: {'; '.join(wrong)}."
        )
    return config


def backbone_of(config: dict[str, Any], source: Path) -> tuple[str, bool, bool]:
    """(torchvision ResNet name, dilation, timm layout) that transformers builds for ``config``."""
    spec = config.get("backbone_config")
    if spec is None and config.get("use_timm_backbone", True):  # transformers 4.x fields,
        extra = config.get("backbone_kwargs") or {}  # read as 4.x's DetrConvEncoder read them
        stride = extra.get("output_stride", 16 if config.get("dilation") else None)
        spec = {"model_type": "timm_backbone", "backbone": config.get("backbone") or "resnet50",
                "output_stride": stride, "out_indices": extra.get("out_indices")}
    elif spec is None and config.get("backbone"):
        raise _unsupported(source, f"it names backbone {config['backbone']!r} without its config")
    spec = {"model_type": "resnet"} if spec is None else spec  # transformers' default backbone
    kind = spec.get("model_type") if isinstance(spec, dict) else None
    if kind == "timm_backbone":
        return _timm_backbone(spec, source), spec.get("output_stride") == 16, True
    if kind == "resnet":
        if config.get("dilation"):  # transformers ignores it here: the model runs at stride 32
            raise _unsupported(source, "dilation (DC5) with transformers' ResNet, which cannot "
                               "dilate; set dilation to false or use a timm backbone")
        return _resnet_backbone(spec, source), False, False
    raise _unsupported(source, f"its backbone is a {kind or 'unknown'} model, not a ResNet")


def _timm_backbone(spec: dict[str, Any], source: Path) -> str:
    name = str(spec.get("backbone"))  # "resnet50", "timm/resnet50.a1_in1k", ...
    arch = name.removeprefix("timm/").split(".")[0]
    if arch not in ("resnet50", "resnet101"):
        raise _unsupported(source, f"its timm backbone is {name}, not resnet50 or resnet101")
    if spec.get("output_stride") not in (None, 32, 16):
        raise _unsupported(source, f"its backbone has output_stride {spec['output_stride']}")
    _check_last_stage(spec, source, "layer4")
    return arch


def _resnet_backbone(spec: dict[str, Any], source: Path) -> str:
    depths = tuple(spec.get("depths", (3, 4, 6, 3)))
    wrong = [f"{k} is {spec[k]!r}" for k, v in _RESNET_REQUIRED.items() if spec.get(k, v) != v]
    if depths not in _RESNET_DEPTHS or wrong:
        what = "; ".join(wrong) or f"depths are {list(depths)}"
        raise _unsupported(source, f"its ResNet is not a ResNet-50 or -101 v1.5 ({what})")
    _check_last_stage(spec, source, "stage4")
    return _RESNET_DEPTHS[depths]


def _check_last_stage(spec: dict[str, Any], source: Path, stage: str) -> None:
    if (why := last_stage_problem(spec, stage)) is not None:
        raise _unsupported(source, why)


def last_stage_problem(spec: dict[str, Any], stage: str) -> str | None:
    """Why a backbone config does not feed the transformer its last stage ``stage`` (what
    DETR-family models read), or None."""
    features, indices = spec.get("out_features"), spec.get("out_indices")
    if (features and features[-1] != stage) or (indices and indices[-1] not in (4, -1)):
        return f"its backbone does not output its last stage ({stage})"
    return None


def _unsupported(source: Path, why: str) -> WrongVariantError:
    return WrongVariantError(
        f"{source} is a DETR config detr-viz cannot reproduce: {why}. Supported are DETRs "
        f"with a ResNet-50 or -101 backbone, like the released models "
        f"({', '.join(HF_REPOS.values())}) and those fine-tuned from them."
    )


def read_safetensors(path: Path, *, shapes_only: bool = False) -> dict[str, Tensor]:
    """The tensors in a ``.safetensors`` file (CPU; ``shapes_only``: empty tensors of their
    shapes on the meta device, from the header alone); damage raises CorruptCheckpointError."""
    try:
        if shapes_only:
            with safe_open(path, framework="pt") as f:
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta")
                        for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptCheckpointError(
            f"{path} is not a readable safetensors file ({path.stat().st_size} bytes: {exc}); "
            "it is damaged or incomplete: delete it and download it again."
        ) from exc


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, read now, as huggingface_hub resolves it:
    ``$HF_HUB_CACHE``, else ``$HUGGINGFACE_HUB_CACHE`` (its older name), else ``$HF_HOME/hub``,
    else ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        xdg = env.get("XDG_CACHE_HOME") or "~/.cache"
        cache = os.path.join(env.get("HF_HOME") or os.path.join(xdg, "huggingface"), "hub")
    return Path(os.path.expandvars(cache)).expanduser()


def cached_snapshot(variant: str) -> Path | None:
    """The hub-cache snapshot of ``HF_REPOS[variant]`` holding config.json and a weights file:
    the revision ``refs/main`` names if it is complete, else the newest complete one, else None.

    Layout: ``<hub cache>/models--facebook--detr-resnet-50/snapshots/<revision>/``.
    """
    repo = "models--" + HF_REPOS[variant].replace("/", "--")
    return cached_repo_snapshot(hub_cache_dir() / repo)


def cached_repo_snapshot(repo: Path) -> Path | None:
    """The snapshot of the hub-cache repository folder ``repo`` (``models--org--name``) that
    :func:`cached_snapshot` would choose, or None."""
    try:
        snapshots = sorted((repo / "snapshots").iterdir(), key=_mtime, reverse=True)
    except OSError:  # not in the cache
        return None
    try:
        main = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        main = ""
    snapshots.sort(key=lambda p: p.name != main)  # stable: refs/main first, then newest
    return next((p for p in snapshots if is_complete(p)), None)


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds config.json and a weights file (a partial download may not)."""
    return (folder / "config.json").is_file() and weights_file(folder) is not None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def import_transformers(architecture: str):
    """The ``transformers`` module, or a MissingDependencyError saying how to install it (the
    families run in its code; DETR never needs it)."""
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(
            f"{architecture} runs in Hugging Face transformers' code, which is not "
            f"installed here ({exc}). Install detr-viz's requirements: python -m pip install "
            "-r requirements.txt -c requirements.lock") from exc
    return transformers
