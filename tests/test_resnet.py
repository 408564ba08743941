"""Our ResNet body against torchvision's (the official DETR's backbone), and a light start-up."""

from __future__ import annotations

import copy
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

import detr_viz
from detr_viz.errors import ArgumentError
from detr_viz.resnet import ResNet
from detr_viz.testing import recipe_state_dict

ROOT = Path(__file__).resolve().parents[1]
CASES = [("resnet50", False), ("resnet50", True), ("resnet101", False)]


def torchvision_body(name: str, dilation: bool) -> torch.nn.Module:
    """What the official DETR's ``Backbone`` builds: the oracle."""
    resnet = getattr(torchvision.models, name)(
        weights=None,
        replace_stride_with_dilation=[False, False, dilation],
        norm_layer=FrozenBatchNorm2d,
    )
    return IntermediateLayerGetter(resnet, return_layers={"layer4": "0"}).eval()


@pytest.fixture(scope="module", params=CASES, ids=["R50", "R50-DC5", "R101"])
def pair(request):
    """(ours, torchvision's) with the same recipe weights, float32."""
    oracle = torchvision_body(*request.param)
    oracle.load_state_dict(recipe_state_dict(oracle))
    ours = ResNet(*request.param).eval()
    ours.load_state_dict(oracle.state_dict(), strict=True)
    return ours, oracle


@pytest.fixture(scope="module")
def pair64(pair):
    return tuple(copy.deepcopy(m).double() for m in pair)


def test_state_dict_keys_shapes_and_order_equal_torchvision(pair):
    ours, oracle = pair
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in oracle.state_dict().items()
    ]


@pytest.mark.parametrize("hw", [(64, 96), (65, 97)])  # odd sizes: padding and ceil strides
def test_features_equal_torchvision_in_float64(pair64, hw, one_torch_thread):
    ours, oracle = pair64
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(hw[0]), dtype=torch.float64)
    with torch.inference_mode():
        got, want = ours(x), oracle(x)["0"]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_features_equal_torchvision_in_float32(pair, one_torch_thread):
    # Same modules, same kernels, same order of operations: float32 is bit-for-bit equal too
    # (measured); a tolerance would only hide a reordered computation.
    ours, oracle = pair
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(ours(x), oracle(x)["0"])


def test_dc5_dilates_like_torchvision():
    ours, oracle = ResNet("resnet50", dilation=True), torchvision_body("resnet50", True)
    convs = [(n, m) for n, m in ours.named_modules() if isinstance(m, torch.nn.Conv2d)]
    theirs = dict(oracle.named_modules())
    assert len(convs) == 53
    for name, conv in convs:
        ref = theirs[name]
        assert (conv.stride, conv.padding, conv.dilation) == (ref.stride, ref.padding, ref.dilation)


def test_frozen_batch_norm_drops_num_batches_tracked():
    ours = ResNet("resnet50")
    state = ours.state_dict()
    state["layer1.0.bn1.num_batches_tracked"] = torch.tensor(3)
    ours.load_state_dict(state, strict=True)
    assert not any(k.endswith("num_batches_tracked") for k in ours.state_dict())


def test_unknown_resnet_is_a_clear_error():
    with pytest.raises(ArgumentError, match="resnet101"):
        ResNet("resnet152")


def test_importing_the_library_imports_neither_torchvision_nor_dynamo():
    """Importing every module of detr_viz (what the app imports, and more) stays light: no
    torchvision (its ``torchvision.ops`` imports ``torch._dynamo``, about 0.9 s), no dynamo."""
    modules = ["detr_viz"] + [f"detr_viz.{m.name}" for m in pkgutil.iter_modules(detr_viz.__path__)]
    assert {"detr_viz.analysis", "detr_viz.resnet", "detr_viz.model"} <= set(modules)
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules\n"
        "    if m.split('.')[0] == 'torchvision' or m.startswith('torch._dynamo'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout) == []
