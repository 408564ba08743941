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
CPU in the same test); float64 is unchanged. ``fold_norms(True, channels_last=False)`` keeps
the usual layout. ``ResNet.fold_norms(False)`` restores torchvision's order of operations bit
for bit; only then do hooks on the individual convolution and norm modules fire (hooks on the
body, its stages and blocks, and on ``model.backbone[-2]``, fire either way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr_viz.errors import ArgumentError

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


def _conv_norm(conv: nn.Conv2d, norm: FrozenBatchNorm2d, x: Tensor, fold: bool) -> Tensor:
    """``norm(conv(x))``; folded: one convolution, its weights scaled per output channel and
    the norm's shift as its bias."""
    if not fold:
        return norm(conv(x))
    scale, shift = norm.scale_and_shift()  # (C_out,) each
    weight = conv.weight * scale[:, None, None, None]  # (C_out, C_in, k, k)
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        weight = weight.contiguous(memory_format=torch.channels_last)  # no reorder per call
    return F.conv2d(x, weight, shift, conv.stride, conv.padding, conv.dilation, conv.groups)


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
        self.fold = True  # see ResNet.fold_norms

    def forward(self, x: Tensor) -> Tensor:
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


def _stage(c_in: int, width: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
    """``blocks`` bottlenecks; the first one changes the shape (``stride`` 1 when dilated)."""
    first = Bottleneck(c_in, width, stride, 1, downsample=True)
    rest = (Bottleneck(width * EXPANSION, width, 1, dilation, False) for _ in range(blocks - 1))
    return nn.Sequential(first, *rest)


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
        self.fold, self.channels_last = True, True

    def fold_norms(self, fold: bool = True, channels_last: bool = True) -> ResNet:
        """Fold each frozen norm into its convolution and run the folded convolutions on
        channels-last activations (the default: fastest, same parameters), fold them only, or
        run the norms as modules, as torchvision does (``fold=False``: bit for bit its float32
        output)."""
        for module in self.modules():
            if isinstance(module, (ResNet, Bottleneck)):
                module.fold = fold
        self.channels_last = fold and channels_last
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:  # every activation follows the input's memory format
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(_conv_norm(self.conv1, self.bn1, x, self.fold)))
        # the features leave in the usual layout: views and hooks downstream see no difference
        return self.layer4(self.layer3(self.layer2(self.layer1(x)))).contiguous()
