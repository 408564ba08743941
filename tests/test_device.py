"""Device choice: auto picks CUDA, else MPS, else the CPU; a forced device that is missing
fails with a typed error before any checkpoint is read; results come back on the CPU."""

from __future__ import annotations

import logging

import pytest
import torch

from detr_viz import analyze, load_model
from detr_viz.device import describe_device, model_device, resolve_device
from detr_viz.errors import ArgumentError, DetrVizError, DeviceUnavailableError
from detr_viz.model import VARIANTS
from detr_viz.weights import DEVICE_ENV

from conftest import photo


@pytest.fixture
def machine(monkeypatch):
    """Pretend which accelerators torch sees: ``machine(cuda=..., mps=...)``."""

    def pretend(cuda: int = 0, mps: bool = False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return pretend


@pytest.mark.parametrize(("cuda", "mps", "expected"), [
    (0, False, "cpu"), (0, True, "mps"), (1, False, "cuda"), (2, True, "cuda")])
def test_auto_prefers_cuda_then_mps_then_cpu(machine, cuda, mps, expected):
    machine(cuda, mps)
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected


def test_auto_here_is_what_torch_sees():
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "mps", torch.device("cuda")])
def test_forcing_a_missing_accelerator_says_what_to_do(machine, device):
    machine(cuda=0, mps=False)
    with pytest.raises(DeviceUnavailableError, match="'auto' or 'cpu'") as error:
        resolve_device(device)
    assert isinstance(error.value, DetrVizError)


def test_a_gpu_index_past_the_last_is_refused(machine):
    machine(cuda=2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DeviceUnavailableError, match=r"only 2 CUDA GPU\(s\).*cuda:0..cuda:1"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("device", ["gpu", "tpu:0", "", "xla"])
def test_unknown_devices_are_argument_errors(device):
    with pytest.raises(ArgumentError, match="auto, cpu, cuda, cuda:N or mps"):
        resolve_device(device)


def test_cpu_is_always_available(machine):
    machine(cuda=0, mps=False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert describe_device("cpu") == "CPU"
    assert describe_device("mps") == "Apple MPS"


def test_load_model_auto_on_a_cpu_machine_says_cpu(machine, weights_dir, caplog, monkeypatch):
    machine(cuda=0, mps=False)
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    path = weights_dir / VARIANTS["detr_resnet50"].checkpoint
    with caplog.at_level(logging.INFO, logger="detr_viz"):
        model = load_model("detr_resnet50", path, download=False, device="auto")
    assert model_device(model) == torch.device("cpu")
    assert "runs R50 (official COCO DETR R50) on CPU" in caplog.text
    analysis = analyze(model, photo(), short_side=96, max_size=128)
    assert analysis.inputs.src.device.type == "cpu"
    assert all(f.q.device.type == "cpu" for f in analysis.encoder + analysis.decoder)


def test_forced_missing_device_fails_before_reading_the_checkpoint(machine, tmp_path):
    machine(cuda=0, mps=False)
    missing = tmp_path / "not-there.pth"  # a weights error would come second
    with pytest.raises(DeviceUnavailableError):
        load_model("detr_resnet50", missing, download=False, device="cuda")


def test_device_from_the_environment(machine, monkeypatch, weights_dir):
    machine(cuda=0, mps=False)
    monkeypatch.setenv(DEVICE_ENV, "mps")
    path = weights_dir / VARIANTS["detr_resnet50"].checkpoint
    with pytest.raises(DeviceUnavailableError, match="MPS is not available"):
        load_model("detr_resnet50", path, download=False)
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert model_device(load_model("detr_resnet50", path, download=False)).type == "cpu"
