"""Which device the model runs on: CUDA, else Apple's MPS, else the CPU.

    device = resolve_device("auto")      # torch.device("cuda") on a GPU machine, else ...
    describe_device(device)              # "CUDA (NVIDIA H200)", "Apple MPS" or "CPU"

Only the model and its forward pass live on the device. Everything it hands back (an
``Analysis``, explanation maps, faithfulness scores) is on the CPU, as NumPy arrays or CPU
tensors, whatever the device.
"""

from __future__ import annotations

import torch

from detr_viz.errors import ArgumentError, DeviceUnavailableError

AUTO = "auto"
KINDS = ("cpu", "cuda", "mps")


def accelerator() -> str | None:
    """``"cuda"`` or ``"mps"`` if that accelerator can run torch here (CUDA first), else None."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return None


def resolve_device(device: str | torch.device | None = AUTO) -> torch.device:
    """The ``torch.device`` to run on: ``"auto"`` (or None) picks CUDA, else MPS, else the CPU;
    ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` (or a ``torch.device``) force one.

    A forced device that this machine cannot use raises :class:`DeviceUnavailableError`; a
    string that names no device raises :class:`ArgumentError`.
    """
    if device is None or device == AUTO:
        return torch.device(accelerator() or "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ArgumentError(f"Unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps.") \
            from exc
    if chosen.type not in KINDS:
        raise ArgumentError(f"Unsupported device {device!r}: use auto, cpu, cuda, cuda:N or mps.")
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceUnavailableError(
                f"Device {device!r} was asked for, but torch sees no CUDA GPU here (torch "
                f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}). Use "
                "device 'auto' or 'cpu', or install a CUDA build of torch on a GPU machine.")
        if chosen.index is not None and chosen.index >= count:
            raise DeviceUnavailableError(
                f"Device {device!r} was asked for, but only {count} CUDA GPU(s) are visible "
                f"(cuda:0..cuda:{count - 1}). Pick one of those, or 'auto'.")
    if chosen.type == "mps" and accelerator() != "mps":
        raise DeviceUnavailableError(
            f"Device {device!r} (Apple GPU) was asked for, but MPS is not available here: it "
            "needs an Apple silicon Mac and a torch build with MPS. Use device 'auto' or 'cpu'.")
    return chosen


def describe_device(device: str | torch.device) -> str:
    """A short human name: ``"CUDA (NVIDIA H200)"``, ``"Apple MPS"`` or ``"CPU"``."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"CUDA ({torch.cuda.get_device_name(device)})"
    return "Apple MPS" if device.type == "mps" else "CPU"


def model_device(model: torch.nn.Module) -> torch.device:
    """The device holding ``model``'s parameters."""
    return next(model.parameters()).device
