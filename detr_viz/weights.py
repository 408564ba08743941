"""Find, download, vet and load DETR checkpoints; a checkpoint file can never run code.

:func:`load_model` takes the first of (see :func:`describe_sources`): the explicit
``checkpoint`` path; ``$DETR_VIZ_WEIGHTS/<official name>``; a Hugging Face checkpoint in
``$DETR_VIZ_WEIGHTS`` (the folder ``<repo name>``, e.g. ``detr-resnet-50/``, or the folder itself
when its config.json is for the variant); ``<torch.hub.get_dir()>/checkpoints/<official name>``;
the Hugging Face hub cache (``models--facebook--detr-resnet-50/snapshots/*/``); a download of
``CHECKPOINT_URL + <official name>`` into the torch hub folder. A download streams into a
temporary file beside its destination, is checked against the SHA-256 prefix in its name, and
only then takes the final name, so a half file never sits there. Official files are read with
``torch.load(weights_only=True)`` only, Hugging Face ones (:mod:`detr_viz.hf_checkpoint`) with
safetensors or that, and the state dict's keys and shapes are compared with the variant's before
loading: a foreign, damaged or wrong-variant file raises a typed
:class:`~detr_viz.errors.WeightsError` saying what to do, never a silently wrong model.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from detr_viz.checkpoint_file import read_checkpoint, read_training_checkpoint
from detr_viz.checkpoint_spec import detection_state, detr_spec
from detr_viz.device import describe_device, resolve_device
from detr_viz.download import (
    Progress,
    cached_file_sha256,
    download_checkpoint,
    hash_prefix,
    manual_advice,
    verify_hash,
)
from detr_viz.errors import (
    NotADetrCheckpointError,
    WeightsUnavailableError,
    WrongVariantError,
)
from detr_viz.families import hf_family_of
from detr_viz.hf_checkpoint import (
    checkpoint_variant,
    is_hf_checkpoint,
    open_checkpoint,
    read_safetensors,
)
from detr_viz.hf_keys import to_detr_state_dict
from detr_viz.labels import Labels, read_labels
from detr_viz.lookup import (
    checkpoint_candidates,
    checkpoint_url,
    describe_sources,
    find_checkpoint,
    hf_advice,
    hf_checkpoint_candidates,
    hub_checkpoint_dir,
)
from detr_viz.model import DEFAULT_VARIANT, DETR, VARIANTS, Variant, build_model, get_variant
from detr_viz.spec import ModelSpec, official_spec

Downloader = Callable[[str, Path, Progress | None], Path]  # (url, dest, progress) -> dest
Shapes = dict[str, tuple[int, ...]]
Provenance = Literal["official", "huggingface", "other"]
DEVICE_ENV = "DETR_VIZ_DEVICE"  # the device load_model uses when none is given (default: auto)
LOG = logging.getLogger("detr_viz")
_HF_PREFIXES = ("class_labels_classifier.", "bbox_predictor.", "model.backbone.", "model.encoder.",
                "model.decoder.", "model.input_projection.", "model.query_position_embeddings.")
__all__ = [  # with names kept here from detr_viz.lookup and detr_viz.hf_checkpoint
    "check_state_dict",
    "checkpoint_candidates",
    "checkpoint_provenance",
    "checkpoint_url",
    "checkpoint_variant",
    "describe_checkpoint",
    "describe_provenance",
    "describe_sources",
    "find_checkpoint",
    "hf_checkpoint_candidates",
    "hub_checkpoint_dir",
    "is_official_release",
    "load_checkpoint",
    "load_model",
    "provenance_note",
    "read_checkpoint",
    "read_model",
    "read_training_checkpoint",
    "resolve_checkpoint",
    "weights_provenance",
]


def load_model(
    variant: str | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    *,
    download: bool | Downloader | None = None,
    device: str | torch.device | None = None,
    labels: Labels | None = None,
    heads: int | None = None,
    dilation: bool | None = None,
) -> DETR:
    """A DETR with its weights loaded (``strict=True``), in eval mode, on ``device``; its
    :class:`~detr_viz.spec.ModelSpec` is ``model.spec``.

    ``variant`` names a released COCO model (``"detr_resnet50"``, ...): its official weights,
    or ``checkpoint`` vetted to be that variant's. ``variant`` None with a ``checkpoint``: any
    DETR that checkpoint holds, fine-tuned ones included (any number of classes, queries,
    layers, heads and sizes; R50 or R101; DC5 or not), described by
    :func:`describe_checkpoint`; a Hugging Face folder's config.json, or a DETR training
    checkpoint's ``args``, says what its shapes cannot. ``heads`` and ``dilation`` fill in what
    such a checkpoint does not record (default 8 heads, no DC5, listed in ``spec.assumed``).
    ``labels``: class names, a path to a labels file or a list (see
    :func:`detr_viz.labels.read_labels`); default: the checkpoint's own, COCO's for 91 classes,
    else "class 7". Neither given: ``"detr_resnet50"``.
    ``download``: None or True uses :func:`download_checkpoint`; False never downloads (a missing
    file raises :class:`WeightsUnavailableError`); a callable ``(url, dest, progress) -> path``
    replaces the downloader. ``progress(done, total)`` reports download bytes.
    ``device``: ``"auto"`` (CUDA, else Apple MPS, else the CPU), or one forced (``"cpu"``,
    ``"cuda"``, ``"cuda:1"``, ``"mps"``; see :func:`detr_viz.device.resolve_device`); None
    means ``$DETR_VIZ_DEVICE``, else ``"auto"``. The choice is logged (logger ``detr_viz``) and
    read back with :func:`detr_viz.device.model_device`; analyses of the model are CPU records.
    """
    target = resolve_device(device if device is not None else os.environ.get(DEVICE_ENV) or None)
    if variant is None and checkpoint is not None:
        path = resolve_checkpoint(DEFAULT_VARIANT, checkpoint)
        if hf_family_of(path):  # Conditional DETR, DAB-DETR: transformers' code
            from detr_viz.families import load_family

            model = load_family(path, labels=labels, heads=heads, dilation=dilation)
            LOG.info("detr-viz runs %s on %s", model.spec.title, describe_device(target))
            return model.to(target)
        spec, state = read_model(path, labels=labels, heads=heads, dilation=dilation)
    else:
        variant = variant or DEFAULT_VARIANT
        path = resolve_checkpoint(variant, checkpoint, progress, download=download)
        state = load_checkpoint(path, variant)
        spec = _official(variant, str(path), labels, heads, dilation)
    model = build_model(spec)
    model.load_state_dict(state, strict=True)
    LOG.info("detr-viz runs %s on %s", spec.title, describe_device(target))
    return model.to(target).eval()


def describe_checkpoint(
    path: str | os.PathLike[str], *, labels: Labels | None = None, heads: int | None = None,
    dilation: bool | None = None, peek: bool = False,
) -> ModelSpec:
    """What the checkpoint at ``path`` holds (family, sizes, classes, labels), vetted as
    :func:`load_model` vets it, without building the model. ``peek``: read shapes only where
    the file format allows (memory-mapped ``.pth``, safetensors headers)."""
    path = Path(path).expanduser()
    if hf_family_of(path):
        from detr_viz.families import describe_family

        return describe_family(path, labels=labels, heads=heads, dilation=dilation)
    return read_model(path, labels=labels, heads=heads, dilation=dilation, peek=peek)[0]


def read_model(
    path: Path, *, labels: Labels | None = None, heads: int | None = None,
    dilation: bool | None = None, peek: bool = False,
) -> tuple[ModelSpec, dict[str, Tensor]]:
    """(spec, state dict under the official names) of the DETR checkpoint at ``path``: a
    released file (by its official name), a DETR training or state-dict ``.pth``, or a
    Hugging Face folder (or its weights file). ``peek``: see :func:`describe_checkpoint` (the
    state dict then holds shapes only, or nothing for a released model)."""
    if is_hf_checkpoint(path):
        hf = open_checkpoint(path)
        if hf.variant is not None:  # a transformers port of a released model
            state = {} if peek else _load_hf_checkpoint(path, hf.variant)
            return _official(hf.variant, str(path), labels, heads, dilation), state
        raw = read_safetensors(hf.weights, shapes_only=peek) if \
            hf.weights.suffix == ".safetensors" else read_training_checkpoint(hf.weights,
                                                                              mmap=peek)[0]
        state = detection_state(to_detr_state_dict(raw, timm_backbone=hf.timm_backbone))
        spec = detr_spec(state, name=checkpoint_name(hf.folder), source=str(path),
                         record=hf.record,
                         heads=heads, dilation=dilation, labels=labels,
                         record_labels=hf.labels)
        return spec, _vetted(state, spec)
    owner = next((n for n, v in VARIANTS.items() if v.checkpoint == path.name), None)
    if owner is not None:  # a released file, by its name: DC5 or not is known
        state = {} if peek else load_checkpoint(path, owner)
        return _official(owner, str(path), labels, heads, dilation), state
    state, record = read_training_checkpoint(path, mmap=peek)
    state = detection_state(state)
    spec = detr_spec(state, name=path.stem, source=str(path), record=record, heads=heads,
                     dilation=dilation, labels=labels)
    return spec, _vetted(state, spec)


def checkpoint_name(folder: Path) -> str:
    """A checkpoint folder's name for people: ``org/name`` for a hub-cache snapshot
    (``models--org--name/snapshots/<revision>``), else the folder's name."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.removeprefix("models--").replace("--", "/")
    return folder.name


def _official(variant: str, source: str, labels: Labels | None, heads: int | None,
              dilation: bool | None) -> ModelSpec:
    spec = official_spec(variant)
    if heads not in (None, spec.heads) or dilation not in (None, spec.dilation):
        raise WrongVariantError(
            f"{source} is the released {variant} ({spec.heads} heads, "
            f"{'DC5' if spec.dilation else 'no DC5'}); leave heads and dilation empty.")
    names = read_labels(labels, spec.num_classes) if labels is not None else spec.labels
    return replace(spec, labels=names, source=source)


def _vetted(state: dict[str, Tensor], spec: ModelSpec) -> dict[str, Tensor]:
    """``state`` if its keys and shapes are exactly those of a DETR built from ``spec``."""
    with torch.device("meta"):
        expected = {k: tuple(t.shape) for k, t in DETR(spec).state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in state.items()}
    if actual != expected:
        diffs = _differences(actual, expected)
        raise WrongVariantError(
            f"{spec.source} looks like a {spec.architecture} but does not fit one: "
            + "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
            + ".")
    return state


def is_official_release(path: str | os.PathLike[str], variant: str) -> bool:
    """Whether the file at ``path`` is byte for byte the released checkpoint of ``variant``.

    Compares its SHA-256 with the prefix in the official file name (0.3 s for 160 MB, computed
    once per file version and process: loading it already did). A file that loads but is not
    the release (fine-tuned, re-saved, a stand-in) gives False, and so do folders and missing
    files, so a page can say that its detections are not those of the published model.
    """
    path = Path(path)
    expected = hash_prefix(get_variant(variant).checkpoint)
    return path.is_file() and cached_file_sha256(path).startswith(expected)


def checkpoint_provenance(path: str | os.PathLike[str], variant: str) -> Provenance:
    """Where the checkpoint at ``path`` comes from, for a page to say so.

    ``"official"``: byte for byte the released file of ``variant`` (:func:`is_official_release`).
    ``"huggingface"``: a Hugging Face checkpoint (a folder with config.json, or its weights
    file), such as the transformers port ``facebook/detr-resnet-50``. Its bytes cannot be
    verified: the DETR release publishes hashes of its .pth files only, and the port renames
    and re-saves the tensors, so no byte-for-byte check exists; it is whatever that folder holds.
    ``"other"``: any other file (fine-tuned, re-saved, a stand-in).
    """
    path = Path(path).expanduser()
    if is_hf_checkpoint(path):
        return "huggingface"
    return "official" if is_official_release(path, variant) else "other"


# What a page or a command line says about weights loaded for a released variant, by
# checkpoint_provenance; nothing for the release itself.
PROVENANCE_NOTES = {
    "huggingface": "a Hugging Face checkpoint ({checkpoint}): the transformers port of DETR, "
                   "which cannot be checked byte for byte against the official release.",
    "other": "These weights ({checkpoint}) are not the official {variant} release (their "
             "SHA-256 differs), so {what} what these weights do, not what the published DETR "
             "detects.",
}


def weights_provenance(spec: ModelSpec) -> Provenance | None:
    """:func:`checkpoint_provenance` of the file a loaded model's weights came from
    (``spec.source``), or None where the question does not arise: a checkpoint that is not one
    of the released variants (fine-tuned, another family), or a model built without a file."""
    if not spec.official or not spec.source:
        return None
    return checkpoint_provenance(spec.source, spec.name)


def provenance_note(spec: ModelSpec, what: str = "the page shows") -> str | None:
    """The sentence to show beside results of a model loaded for a released variant from a
    file that is not that release ("other"), or from a Hugging Face port; else None.
    ``what`` names who shows the results ("the page shows", "these results show")."""
    return describe_provenance(weights_provenance(spec), spec.source, spec.name, what)


def describe_provenance(kind: Provenance | None, checkpoint: str, variant: str,
                        what: str) -> str | None:
    """The sentence :data:`PROVENANCE_NOTES` has for ``kind`` (None for the release itself,
    or where the question does not arise)."""
    if kind not in PROVENANCE_NOTES:
        return None
    return PROVENANCE_NOTES[kind].format(checkpoint=checkpoint, variant=variant, what=what)


def resolve_checkpoint(
    variant: str,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    *,
    download: bool | Downloader | None = None,
) -> Path:
    """The file (or Hugging Face checkpoint folder) :func:`load_model` reads, downloading the
    official file into the hub cache if no candidate exists (see :func:`load_model` for
    ``download``)."""
    name = get_variant(variant).checkpoint
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise WeightsUnavailableError(
                f"Checkpoint file {path} does not exist. Check the path, or leave the checkpoint "
                f"empty to use the official {name}."
            )
        return path
    found = find_checkpoint(variant)
    if found is not None:
        return found
    if download is False:
        raise WeightsUnavailableError(
            f"No checkpoint for {variant} was found, and downloads are off. detr-viz takes the "
            "first of:\n"
            f"{describe_sources(variant)}\n"
            + manual_advice(name, hub_checkpoint_dir())
            + " "
            + hf_advice(variant)
        )
    downloader = download_checkpoint if download is None or download is True else download
    try:
        return Path(downloader(checkpoint_url(variant), hub_checkpoint_dir() / name, progress))
    except WeightsUnavailableError as exc:
        raise WeightsUnavailableError(f"{exc} {hf_advice(variant)}") from exc


def load_checkpoint(path: str | os.PathLike[str], variant: str) -> dict[str, Tensor]:
    """The state dict in ``path``, vetted for ``variant``: file name, contents, shapes.

    Files in the hub cache are also checked against the SHA-256 prefix in their name; files
    the user points to (``checkpoint=`` or ``$DETR_VIZ_WEIGHTS``) are vetted by content only.
    A Hugging Face checkpoint (a folder, or a weights file beside its config.json) is vetted by
    its config.json (variant, classes, queries), then renamed to the official keys.
    """
    path = Path(path)
    if is_hf_checkpoint(path):
        return _load_hf_checkpoint(path, variant)
    owner = next((n for n, v in VARIANTS.items() if v.checkpoint == path.name), variant)
    if owner != variant:  # DC5 and non-DC5 have equal shapes: only the name tells them apart
        raise WrongVariantError(
            f"{path.name} is the official checkpoint of {owner}, not of {variant}. Choose "
            f"{owner}, or use {get_variant(variant).checkpoint} for {variant}."
        )
    if path.parent == hub_checkpoint_dir():  # what we (or torch hub) downloaded, as released
        verify_hash(path)
    return check_state_dict(read_checkpoint(path), variant, source=str(path))


def _load_hf_checkpoint(path: Path, variant: str) -> dict[str, Tensor]:
    hf = open_checkpoint(path)
    if hf.variant is None:
        raise WrongVariantError(
            f"{hf.folder} is a fine-tuned DETR (its config.json has other classes, queries or "
            f"sizes than the released {variant}); load it by its path alone: "
            "load_model(checkpoint=...), or pick it as a checkpoint on the page."
        )
    if hf.variant != variant:
        raise WrongVariantError(
            f"{hf.folder} is a Hugging Face checkpoint of {hf.variant} ({_label(hf.variant)}"
            f"{', DC5' if get_variant(hf.variant).dilation else ''}, says its config.json), "
            f"not of {variant}. Choose {hf.variant}, or use a checkpoint of {variant}."
        )
    is_safetensors = hf.weights.suffix == ".safetensors"
    raw = read_safetensors(hf.weights) if is_safetensors else read_checkpoint(hf.weights)
    state = to_detr_state_dict(raw, timm_backbone=hf.timm_backbone)
    return check_state_dict(state, variant, source=str(hf.weights))


def _shapes_of(variant: str) -> Shapes:
    """The state-dict keys and shapes of ``variant`` (shared, do not modify)."""
    spec = get_variant(variant)
    return _shapes(spec.backbone, spec.dilation)


@functools.cache
def _shapes(backbone: str, dilation: bool) -> Shapes:
    with torch.device("meta"):  # no memory, no init cost: R101 takes ~50 ms instead of ~1 s
        model = DETR(Variant("shapes", backbone, dilation, ""))
    return {k: tuple(t.shape) for k, t in model.state_dict().items()}


def check_state_dict(
    state: Mapping[str, Tensor], variant: str, source: str = "The checkpoint"
) -> dict[str, Tensor]:
    """``state`` without ``num_batches_tracked`` entries, if its keys and shapes are exactly
    ``variant``'s; otherwise :class:`WrongVariantError` (another backbone, or a DETR with other
    heads) or :class:`NotADetrCheckpointError`, naming ``source``."""
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    actual = {k: tuple(v.shape) for k, v in state.items()}
    if actual == _shapes_of(variant):
        return state
    fits = [name for name in VARIANTS if _shapes_of(name) == actual]
    if fits:
        theirs, ours = _label(fits[0]), _label(variant)
        raise WrongVariantError(
            f"{source} is for {' / '.join(fits)} ({theirs}), not {variant} ({ours}); choose "
            f"that backbone or use a {ours} checkpoint."
        )
    if not {"class_embed.weight", "query_embed.weight"} & actual.keys():
        examples = ", ".join(list(actual)[:3])
        hf = any(k.startswith(_HF_PREFIXES) for k in actual)  # transformers' names, no config
        raise NotADetrCheckpointError(
            f"{source} is not a DETR checkpoint: it holds {len(actual)} tensors such as "
            f"{examples}; {variant} needs keys such as transformer.encoder.layers.0.self_attn."
            "in_proj_weight and class_embed.weight."
            + (" Its names are Hugging Face transformers' ones: save it as pytorch_model.bin in "
               "a folder with the config.json of its repository, and load that folder."
               if hf else "")
        )
    raise WrongVariantError(_mismatch_message(source, variant, actual))


def _label(variant: str) -> str:
    return "ResNet-" + get_variant(variant).backbone.removeprefix("resnet")


def _mismatch_message(source: str, variant: str, actual: Shapes) -> str:
    """Name the closest supported variant and its first few differences from ``actual``."""
    closest = min(VARIANTS, key=lambda n: (len(_differences(actual, _shapes_of(n))), n != variant))
    diffs = _differences(actual, _shapes_of(closest))
    more = f"; and {len(diffs) - 5} more" if len(diffs) > 5 else ""
    return (
        f"{source} is a DETR checkpoint, but not one for {variant} or any variant detr-viz "
        f"supports (the released COCO models: 91 classes, 100 queries). Closest is {closest}: "
        + "; ".join(diffs[:5])
        + more
        + "."
    )


def _differences(actual: Shapes, expected: Shapes) -> list[str]:
    def fmt(shape: tuple[int, ...]) -> str:
        return "x".join(map(str, shape)) or "scalar"

    out = [
        f"{k} is {fmt(actual[k])} in the file, {fmt(s)} in the model"
        for k, s in expected.items()
        if k in actual and actual[k] != s
    ]
    out += [f"{k} is missing" for k in expected if k not in actual]
    return out + [f"{k} is unexpected" for k in actual if k not in expected]
