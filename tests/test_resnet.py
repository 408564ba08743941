"""Our ResNet body against torchvision's (the official DETR's backbone), and a light start-up."""

from __future__ import annotations

import copy
import json
import logging
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
from detr_viz import resnet
from detr_viz.errors import ArgumentError
from detr_viz.model import build_model
from detr_viz.resnet import ResNet, _fused_kernels_work
from detr_viz.testing import recipe_input, recipe_state_dict

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


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "modules"])
@pytest.mark.parametrize("hw", [(64, 96), (65, 97)])  # odd sizes: padding and ceil strides
def test_features_equal_torchvision_in_float64(pair64, hw, fold, one_torch_thread):
    ours, oracle = pair64
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(hw[0]), dtype=torch.float64)
    with torch.inference_mode():
        got, want = ours.fold_norms(fold)(x), oracle(x)["0"]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # measured: 2e-15 relative


def test_unfolded_float32_is_torchvision_bit_for_bit(pair, one_torch_thread):
    # Same modules, kernels and order of operations: equal, not just close (measured); a
    # tolerance would only hide a reordered computation.
    ours, oracle = pair
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(ours.fold_norms(False)(x), oracle(x)["0"])


def test_folded_float32_is_as_close_to_float64_as_torchvision(pair, pair64, one_torch_thread):
    """Folding reorders float32 rounding; it must not add to it, and the channels-last
    convolutions (the default) may add at most a few times torchvision's own float32 error.
    Compared on the same CPU in the same test, so the bounds are ratios: mean |float32 -
    float64| folded / unfolded was 0.98-1.02 (R50, DC5, R101), folded + channels-last 1.26-1.35
    on an AMD EPYC and 1.9 on an earlier machine's kernels."""
    ours, _ = pair
    ours64, _ = pair64
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = ours64.fold_norms(False)(x.double())
        folded = ours.fold_norms(True, channels_last=False)(x).double()
        fast = ours.fold_norms(True)(x).double()
        modules = ours.fold_norms(False)(x).double()
    error = (modules - ref).abs().mean()
    assert (folded - ref).abs().mean() <= 1.25 * error
    assert (fast - ref).abs().mean() <= 3.0 * error


def test_channels_last_runs_inside_the_body_and_the_features_leave_in_the_usual_layout(
        one_torch_thread):
    body = build_model("detr_resnet50").backbone[-2].body
    seen = []
    hook = body.layer1.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        out = body(x)
        usual = body.fold_norms(True, channels_last=False)(x)
    hook.remove()
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    assert not seen[0].is_contiguous() and seen[1].is_contiguous()
    assert out.is_contiguous() and out.shape == usual.shape == (1, 2048, 2, 3)
    out.view(1, 2048, -1)  # a view, as notebooks take one, works on the features


def test_hooks_on_backbone_and_stages_see_the_same_features_folded_or_not(one_torch_thread):
    model = build_model("detr_resnet50")
    model.load_state_dict(recipe_state_dict(model))
    model.double()
    body = model.backbone[-2].body
    seen = {}
    hooks = [
        model.backbone[-2].register_forward_hook(
            lambda m, i, o: seen.setdefault("backbone", []).append(o["0"].tensors)
        ),
        body.layer4.register_forward_hook(lambda m, i, o: seen.setdefault("layer4", []).append(o)),
        body.layer2[0].register_forward_hook(
            lambda m, i, o: seen.setdefault("block", []).append(o)
        ),
    ]
    x = recipe_input(64, 96).double()
    with torch.inference_mode():
        for fold in (True, False):
            body.fold_norms(fold)
            model(x)
    for hook in hooks:
        hook.remove()
    body.fold_norms(True)
    for name, (folded, modules) in seen.items():
        torch.testing.assert_close(folded, modules, rtol=1e-12, atol=1e-12, msg=name)
    assert torch.equal(seen["backbone"][0], seen["layer4"][0])


needs_fused = pytest.mark.skipif(
    not _fused_kernels_work(),
    reason="this PyTorch build has no oneDNN fused convolutions (the body runs unfused)")


@needs_fused
def test_fused_epilogues_are_as_close_to_float64_as_the_unfused_convolutions(
        pair, pair64, one_torch_thread):
    """Fusing the ReLU and the residual sum into oneDNN's convolution changes where the sum is
    done, not the float32 arithmetic: as close to float64 as the unfused channels-last body
    (equal on an AMD EPYC, measured), on odd sizes too."""
    ours, _ = pair
    ours64, _ = pair64
    for hw in ((64, 96), (65, 97)):
        x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(hw[1]))
        with torch.inference_mode():
            ref = ours64.fold_norms(False)(x.double())
            fused = ours.fold_norms(True)(x).double()
            unfused = ours.fold_norms(True, fuse=False)(x).double()
        ours.fold_norms(True)
        assert fused.shape == ref.shape
        assert (fused - ref).abs().mean() <= 1.25 * (unfused - ref).abs().mean()
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_checking_the_fused_kernels_leaves_torchs_random_state_as_it_was():
    """The check runs at a model's first forward, in the user's process: a notebook seeding
    torch before it must draw the same numbers after it."""
    _fused_kernels_work.cache_clear()
    before = torch.random.get_rng_state()
    _fused_kernels_work()
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.fixture
def fresh_kernel_check():
    """The once-per-process kernel check run again; afterwards run once more, with whatever the
    test patched undone (this fixture is set up before monkeypatch, so torn down after it)."""
    _fused_kernels_work.cache_clear()
    yield
    _fused_kernels_work.cache_clear()
    _fused_kernels_work()


def test_a_pytorch_without_the_fused_kernels_runs_unfused_and_says_why(
        fresh_kernel_check, monkeypatch, caplog, one_torch_thread):
    def missing(*args, **kwargs):
        raise RuntimeError("no such operator")

    monkeypatch.setattr(resnet, "_conv_norm_relu", missing)
    body = ResNet("resnet50").eval()
    x = recipe_input(64, 96)
    with caplog.at_level(logging.INFO, logger="detr_viz"), torch.inference_mode():
        out = body(x)
        want = body.fold_norms(True, fuse=False)(x)
    torch.testing.assert_close(out, want, rtol=0, atol=0)  # the unfused path, bit for bit
    [record] = [r for r in caplog.records if "fused convolutions" in r.getMessage()]
    assert record.levelno == logging.INFO
    assert "failed in this PyTorch" in record.getMessage()
    assert "no such operator" in record.getMessage()


def test_fused_kernels_that_compute_something_else_are_not_used_and_warned_about(
        fresh_kernel_check, monkeypatch, caplog):
    original = resnet._conv_norm_add_relu

    def off_by_one(residual, conv, norm, x, in_place):
        return original(residual, conv, norm, x, in_place).add_(1)

    monkeypatch.setattr(resnet, "_conv_norm_add_relu", off_by_one)
    with caplog.at_level(logging.INFO, logger="detr_viz"):
        assert not _fused_kernels_work()
    [record] = [r for r in caplog.records if "fused convolutions" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "disagree with F.conv2d" in record.getMessage()


@needs_fused
def test_working_fused_kernels_log_nothing(fresh_kernel_check, caplog):
    with caplog.at_level(logging.INFO, logger="detr_viz"):
        assert _fused_kernels_work()
    assert not [r for r in caplog.records if "fused convolutions" in r.getMessage()]


@pytest.fixture
def sums(monkeypatch):
    """Whether each fused residual sum the body runs was written in place, in order."""
    calls = []
    _fused_kernels_work()  # its probe's sums are not the body's
    original = resnet._conv_norm_add_relu

    def counted(residual, conv, norm, x, in_place):
        calls.append(in_place)
        return original(residual, conv, norm, x, in_place)

    monkeypatch.setattr(resnet, "_conv_norm_add_relu", counted)
    return calls


@needs_fused
def test_without_gradients_every_block_sums_in_place_and_with_them_none_is_fused(
        sums, one_torch_thread):
    body = ResNet("resnet50").eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        body(x)
    assert sums == [True] * 16  # 3 + 4 + 6 + 3 bottlenecks: the downsample's or the input's
    sums.clear()
    with torch.no_grad():
        body(x)
    assert sums == [True] * 16
    sums.clear()
    out = body(x)  # gradients recorded: the unfused convolutions, which have a backward
    assert sums == [] and out.requires_grad


@needs_fused
@pytest.mark.parametrize("where", ["output of a block", "input of a block", "global"])
def test_a_hooked_tensor_is_never_overwritten_by_the_next_block(where, sums, one_torch_thread):
    """A block writes its sum into its input only if no hook can hold that tensor: what a
    notebook's hook saved stays what the block returned."""
    body = ResNet("resnet50").eval()
    body.load_state_dict(recipe_state_dict(body))
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        unhooked = body(x)
    saved = []

    def keep(module, args, output=None):
        tensor = args[0] if output is None else output
        saved.append((tensor, tensor.clone()))

    if where == "output of a block":
        hook = body.layer1[0].register_forward_hook(keep)
    elif where == "input of a block":
        hook = body.layer1[1].register_forward_pre_hook(keep)
    else:
        hook = torch.nn.modules.module.register_module_forward_hook(keep)
    sums.clear()
    try:
        with torch.inference_mode():
            hooked = body(x)
    finally:
        hook.remove()
    assert saved and all(torch.equal(kept, copy) for kept, copy in saved)
    assert torch.equal(hooked, unhooked)
    # the block after the hooked one got a new buffer; with a global hook every block did
    expected = [True] * 16
    if where == "global":
        expected = [not i for i in (0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1)]
    else:
        expected[1] = False
    assert sums == expected


@needs_fused
def test_a_module_put_in_a_blocks_place_runs_and_its_output_is_not_overwritten(
        sums, one_torch_thread):
    """A notebook may replace a block (pruning, an ablation): the stage calls it as
    nn.Sequential would, and the next block does not write into what it returned."""
    body = ResNet("resnet50").eval()
    body.load_state_dict(recipe_state_dict(body))
    kept = []

    class Keeps(torch.nn.Module):  # keeps what it returns, as a cache would
        def forward(self, x):
            kept.append((x, x.clone()))
            return x

    body.layer1[1] = Keeps()
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        fused = body(x)
        unfused = body.fold_norms(True, fuse=False)(x)
    assert torch.equal(kept[0][0], kept[0][1])
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5 * unfused.abs().max().item())
    assert sums[:2] == [True, False]  # layer1[0] (downsample), layer1[2] after the stand-in


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
    """Importing every module of detr_viz (what the app imports, and more) and loading a
    checkpoint stay light: no torchvision (its ``torchvision.ops`` imports ``torch._dynamo``,
    about 0.9 s), no dynamo."""
    modules = ["detr_viz"] + [f"detr_viz.{m.name}" for m in pkgutil.iter_modules(detr_viz.__path__)]
    assert {"detr_viz.analysis", "detr_viz.resnet", "detr_viz.model"} <= set(modules)
    code = (
        "import importlib, json, sys, tempfile, torch\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "from detr_viz import build_model, load_model\n"  # and loading weights (shape checks)
        "path = tempfile.mktemp(suffix='.pth')\n"
        "torch.save(build_model('detr_resnet50').state_dict(), path)\n"
        "load_model('detr_resnet50', checkpoint=path, download=False)\n"
        "print(json.dumps(sorted(m for m in sys.modules\n"
        "    if m.split('.')[0] == 'torchvision' or m.startswith('torch._dynamo'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout) == []
