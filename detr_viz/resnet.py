"""The ResNet-50/101 body of DETR's backbone, with frozen batch norm, without torchvision.

The module tree and the state dict (keys, shapes, order) are those of torchvision's
``resnet50``/``resnet101(norm_layer=FrozenBatchNorm2d, replace_stride_with_dilation=[False,
False, dilation])`` cut after ``layer4`` by ``IntermediateLayerGetter``, which is what the
official DETR builds: official checkpoints load unchanged, and the features are the same
(tests/test_resnet.py checks both against torchvision). Owning these lines spares every start
of the app the import of torchvision, whose ``torchvision.ops`` imports ``torch._dynamo``.

Blocks are torchvision's bottlenecks ("ResNet v1.5"): the stride sits in the 3x3 convolution.

Speed: by default every frozen norm is folded into the convolution before it, on the fly
(``_conv_norm``): one convolution with scaled weights and a bias instead of a convolution and
two passes over its output. The parameters and the state dict stay the official ones. In float64
the folded body equals the unfolded one to about 1e-15 relative; in float32 it is as far from
float64 as the unfolded body is (benchmarks/backbone.py measures both speed and agreement).
The folded convolutions run on channels-last activations (oneDNN's blocked kernels: the R50
body 0.64x the folded time on an AMD EPYC, 2026-12-07). Their float32 sums are rounded in
another order and land a little further from float64: 1.26-1.35x the unfolded body's mean
error there (1.9x on an earlier machine; tests/test_resnet.py allows 3x, measured on the same
CPU in the same test); float64 is unchanged. Where no gradient is recorded (``analyze``,
``torch.inference_mode``), each ReLU and residual sum also runs inside the convolution before it
(oneDNN post-ops; the sum written into the residual's buffer): the same float32 arithmetic, less
memory traffic (see ``_conv_norm_relu``). ``fold_norms(True, fuse=False)`` keeps them apart,
``fold_norms(True, channels_last=False)`` keeps the usual layout. ``ResNet.fold_norms(False)``
restores torchvision's order of operations bit for bit; only then do hooks on the individual
convolution and norm modules fire (hooks on the body, its stages and blocks, and on
``model.backbone[-2]``, fire either way, and see what they would see unfused: a block never
writes into a tensor a hook can hold).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as nn_module

from detr_viz.errors import ArgumentError

LOG = logging.getLogger("detr_viz")

DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}  # bottlenecks per stage
EXPANSION = 4  # a bottleneck's output has 4x the channels of its 3x3 convolution


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters, all of them buffers.

    The buffers, eps and arithmetic of torchvision's ``FrozenBatchNorm2d``:
    ``x * scale + shift``, ``scale = weight / sqrt(running_var + eps)``,
    ``shift = bias - running_mean * scale``. (B, C, H, W) -> (B, C, H, W), any float dtype.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints saved from a trainable BatchNorm2d carry a step counter we have no use for
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.scale_and_shift()
        return x * scale[:, None, None] + shift[:, None, None]

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        """The per-channel affine map this layer applies: (C,) scale and (C,) shift."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _folded(conv: nn.Conv2d, norm: FrozenBatchNorm2d, x: Tensor) -> tuple[Tensor, Tensor]:
    """The convolution's weights scaled per output channel by the norm, and the norm's shift as
    the bias: ``conv(x, weight, bias) == norm(conv(x))``."""
    scale, shift = norm.scale_and_shift()  # (C_out,) each
    weight = conv.weight * scale[:, None, None, None]  # (C_out, C_in, k, k)
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        weight = weight.contiguous(memory_format=torch.channels_last)  # no reorder per call
    return weight, shift


def _conv_norm(conv: nn.Conv2d, norm: FrozenBatchNorm2d, x: Tensor, fold: bool) -> Tensor:
    """``norm(conv(x))``; folded: one convolution, its weights scaled per output channel and
    the norm's shift as its bias."""
    if not fold:
        return norm(conv(x))
    weight, shift = _folded(conv, norm, x)
    return F.conv2d(x, weight, shift, conv.stride, conv.padding, conv.dilation, conv.groups)


# oneDNN's convolution with its epilogue fused (a ReLU, or a residual sum and a ReLU written
# into the residual's buffer): the operators torch.compile emits for a CPU. The same kernels as
# F.conv2d on channels-last activations, so the same float32 arithmetic; the gain is memory
# traffic. At the official size the R50 body writes 55 MB activations, and an unfused ReLU or
# sum reads and writes each once more; a fresh output that large is fresh pages from the kernel
# (page faults and zeroing). Measured (python -m benchmarks.backbone, AMD EPYC, 2026-12-07): the
# R50 body 0.88x the unfused time, DC5 0.93x, page faults per run 80k -> 27k; the output equal
# to the unfused one there. They are private operators without a backward, used only where no
# gradient is recorded; _fused_kernels_work() checks once that they exist and agree with
# F.conv2d.
def _conv_norm_relu(conv: nn.Conv2d, norm: FrozenBatchNorm2d, x: Tensor, relu: bool) -> Tensor:
    """``relu(norm(conv(x)))`` (or without the ReLU) in one oneDNN call; x channels-last."""
    weight, shift = _folded(conv, norm, x)
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, shift, list(conv.padding), list(conv.stride), list(conv.dilation),
        conv.groups, "relu" if relu else "none", [], "")


def _conv_norm_add_relu(residual: Tensor, conv: nn.Conv2d, norm: FrozenBatchNorm2d, x: Tensor,
                        in_place: bool) -> Tensor:
    """``relu(norm(conv(x)) + residual)`` in one oneDNN call; ``in_place``: written into
    ``residual`` (channels-last), which it returns."""
    weight, shift = _folded(conv, norm, x)
    geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    if in_place:
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            residual, x, weight, shift, *geometry, "add", 1.0, "relu", [], "")
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual, weight, shift, *geometry, "add", 1.0, "relu", [], "")


@functools.cache
def _fused_kernels_work() -> bool:
    """Whether this PyTorch has oneDNN's fused convolutions and they compute what F.conv2d +
    ReLU / + sum + ReLU computes (a 16-channel probe, once per process). A PyTorch without
    them, or one whose private operators changed, takes the unfused path: the same results,
    slower, and one log line on the ``detr_viz`` logger says why."""
    problem = _fused_kernels_problem()
    if problem is None:
        return True
    level, reason = problem
    LOG.log(level, "The ResNet body runs its ReLUs and residual sums apart from the "
            "convolutions (the same results, slower): oneDNN's fused convolutions %s.", reason)
    return False


def _fused_kernels_problem() -> tuple[int, str] | None:
    """Why the fused kernels cannot be used here, with a log level, or None when they can:
    missing is expected of some builds (info), wrong results mean PyTorch changed (warning)."""
    if not torch.backends.mkldnn.is_available():
        return logging.INFO, "are not in this PyTorch build (no oneDNN)"
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 6, 7, generator=generator).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(1, 16, 6, 7, generator=generator)
    # weights never drawn from torch's global generator: the caller's random state stays as is
    conv = nn.utils.skip_init(nn.Conv2d, 16, 16, 3, padding=1, bias=False)
    norm = FrozenBatchNorm2d(16)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / 12)
        want = _conv_norm(conv, norm, x, fold=True)
        try:
            relu = _conv_norm_relu(conv, norm, x, relu=True)
            apart = _conv_norm_add_relu(residual, conv, norm, x, in_place=False)
            into = residual.contiguous(memory_format=torch.channels_last)
            _conv_norm_add_relu(into, conv, norm, x, in_place=True)
        except (RuntimeError, TypeError, AttributeError, NotImplementedError) as error:
            return logging.INFO, (f"failed in this PyTorch {torch.__version__} "
                                  f"({type(error).__name__}: {error})")
        summed = (want + residual).relu()
        close = functools.partial(torch.allclose, rtol=1e-5, atol=1e-5)
        if close(relu, want.relu()) and close(apart, summed) and close(into, summed):
            return None
        return logging.WARNING, (f"disagree with F.conv2d in this PyTorch {torch.__version__} "
                                 "(a change to its private operators)")


def _fusable(x: Tensor) -> bool:
    """Whether the body may run ``x`` through the fused kernels: float32 channels-last on the
    CPU, no gradient recorded, oneDNN enabled (``torch.backends.mkldnn.flags``) and the
    kernels present (:func:`_fused_kernels_work`)."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()
            and torch.backends.mkldnn.enabled and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)
            and _fused_kernels_work())


def _unwatched(producer: nn.Module, block: nn.Module) -> bool:
    """No hook can hold the tensor ``producer`` returned and ``block`` takes: none on the
    producer's output, none on the block's input (its own hooks and pre-hooks), no global one.
    Then the block may write its sum into that tensor."""
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return False
    return not (producer._forward_hooks or block._forward_hooks or block._forward_pre_hooks)


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """Bias-free convolution, padded to keep the size (up to the stride)."""
    padding = dilation * (kernel - 1) // 2
    return nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, bias=False)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 convolutions, each frozen-normed, plus the skip.

    (B, c_in, H, W) -> (B, 4 * width, H / stride, W / stride). ``downsample`` (1x1 convolution
    and norm) maps the input to the output's shape when the two differ.
    """

    def __init__(self, c_in: int, width: int, stride: int, dilation: int, downsample: bool):
        super().__init__()
        self.conv1 = _conv(c_in, width, 1)
        self.bn1 = FrozenBatchNorm2d(width)
        self.conv2 = _conv(width, width, 3, stride, dilation)
        self.bn2 = FrozenBatchNorm2d(width)
        self.conv3 = _conv(width, width * EXPANSION, 1)
        self.bn3 = FrozenBatchNorm2d(width * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if downsample:
            self.downsample = nn.Sequential(
                _conv(c_in, width * EXPANSION, 1, stride), FrozenBatchNorm2d(width * EXPANSION)
            )
        self.fold = self.fuse = True  # see ResNet.fold_norms

    def forward(self, x: Tensor, reuse_input: bool = False) -> Tensor:
        """``reuse_input``: the block may write its output into ``x``'s buffer (its stage says
        so when nothing else can see ``x``; see :class:`Stage`)."""
        if self.fold and self.fuse and _fusable(x):
            out = _conv_norm_relu(self.conv1, self.bn1, x, relu=True)
            out = _conv_norm_relu(self.conv2, self.bn2, out, relu=True)
            if self.downsample is None:
                return _conv_norm_add_relu(x, self.conv3, self.bn3, out, in_place=reuse_input)
            residual = _conv_norm_relu(self.downsample[0], self.downsample[1], x, relu=False)
            return _conv_norm_add_relu(residual, self.conv3, self.bn3, out, in_place=True)
        out = self.relu(_conv_norm(self.conv1, self.bn1, x, self.fold))
        out = self.relu(_conv_norm(self.conv2, self.bn2, out, self.fold))
        out = _conv_norm(self.conv3, self.bn3, out, self.fold)
        if self.downsample is None:
            identity = x
        elif self.fold:
            identity = _conv_norm(self.downsample[0], self.downsample[1], x, fold=True)
        else:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Stage(nn.Sequential):
    """A stage's bottlenecks, run in order (an ``nn.Sequential``: the same state dict keys).

    Each block after the first may write its output into its input's buffer, which saves a
    fresh activation per block (55 MB each in the R50's first stage at the official size), unless
    a forward hook could hold that tensor: a hook on the block before (its output) or on the
    block itself (its input), or a global one. The first block's input (the stage's) is never
    written: its downsample path makes the residual a new tensor. Nor is what a module other
    than a bottleneck returned (one a notebook put in a block's place).
    """

    def forward(self, x: Tensor) -> Tensor:
        previous = None
        for block in self:
            if isinstance(block, Bottleneck):  # a module put in its place is called as is
                ours = isinstance(previous, Bottleneck)  # and what it returns never reused
                x = block(x, reuse_input=ours and _unwatched(previous, block))
            else:
                x = block(x)
            previous = block
        return x


def _stage(c_in: int, width: int, blocks: int, stride: int, dilation: int) -> Stage:
    """``blocks`` bottlenecks; the first one changes the shape (``stride`` 1 when dilated)."""
    first = Bottleneck(c_in, width, stride, 1, downsample=True)
    rest = (Bottleneck(width * EXPANSION, width, 1, dilation, False) for _ in range(blocks - 1))
    return Stage(first, *rest)


class ResNet(nn.Module):
    """ResNet-50 or -101 up to ``layer4``: (B, 3, H, W) -> (B, 2048, ceil(H/s), ceil(W/s)).

    s = 32; with ``dilation`` (DC5) layer4 keeps layer3's resolution, s = 16: its first block
    has stride 1 and the other blocks dilate their 3x3 convolution by 2, as torchvision's
    ``replace_stride_with_dilation=[False, False, True]``. No pooling, no classifier.
    """

    def __init__(self, name: str, dilation: bool = False):
        super().__init__()
        if name not in DEPTHS:
            known = ", ".join(DEPTHS)
            raise ArgumentError(f"Unknown ResNet {name!r}. Choose one of: {known}.")
        depths = DEPTHS[name]
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _stage(64, 64, depths[0], 1, 1)
        self.layer2 = _stage(256, 128, depths[1], 2, 1)
        self.layer3 = _stage(512, 256, depths[2], 2, 1)
        self.layer4 = _stage(1024, 512, depths[3], 1 if dilation else 2, 2 if dilation else 1)
        self.fold = self.fuse = self.channels_last = True

    def fold_norms(self, fold: bool = True, channels_last: bool = True,
                   fuse: bool = True) -> ResNet:
        """Fold each frozen norm into its convolution and run the folded convolutions on
        channels-last activations, their ReLU and residual sum fused into them where no
        gradient is recorded (the default: fastest, same parameters); without fusing
        (``fuse=False``); fold them only; or run the norms as modules, as torchvision does
        (``fold=False``: bit for bit its float32 output)."""
        self.channels_last = fold and channels_last
        for module in self.modules():
            if isinstance(module, (ResNet, Bottleneck)):
                module.fold, module.fuse = fold, self.channels_last and fuse
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:  # every activation follows the input's memory format
            x = x.contiguous(memory_format=torch.channels_last)
        if self.fold and self.fuse and _fusable(x):
            x = self.maxpool(_conv_norm_relu(self.conv1, self.bn1, x, relu=True))
        else:
            x = self.maxpool(self.relu(_conv_norm(self.conv1, self.bn1, x, self.fold)))
        # the features leave in the usual layout: views and hooks downstream see no difference
        return self.layer4(self.layer3(self.layer2(self.layer1(x)))).contiguous()
