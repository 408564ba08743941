"""Typed errors for everything a user can cause.

Every error that a user can trigger (a bad file, no network, a wrong checkpoint, an
out-of-range query) derives from :class:`DetrVizError`, so an application can catch one
class and show ``str(error)``: the message always says what happened and what to do.
"""

from __future__ import annotations


class DetrVizError(Exception):
    """Base class of every error a user of detr-viz can cause."""


class ImageError(DetrVizError, ValueError):
    """The input is not an image we can use (empty, truncated, not an image, too large)."""


class WeightsError(DetrVizError):
    """Base class of checkpoint problems."""


class WeightsUnavailableError(WeightsError):
    """The checkpoint is not on disk and could not be downloaded (offline, say)."""


class CorruptCheckpointError(WeightsError):
    """The file is truncated, damaged, or fails its SHA-256 check."""


class UnsafeCheckpointError(WeightsError):
    """The file holds pickled code that ``torch.load(weights_only=True)`` refuses to run."""


class NotADetrCheckpointError(WeightsError):
    """The file loads, but it is not a DETR state dict."""


class WrongVariantError(WeightsError):
    """The checkpoint is a DETR state dict, but for another variant."""


class MissingDependencyError(DetrVizError):
    """A package a feature needs is not installed (transformers, for Conditional DETR)."""


class DeviceUnavailableError(DetrVizError):
    """The device asked for (a CUDA GPU, Apple's MPS) cannot be used on this machine."""


class ArgumentError(DetrVizError, ValueError):
    """An argument is out of range: a query index, a layer, a head, a point off the image."""
