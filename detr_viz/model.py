"""DETR, rebuilt module for module after facebookresearch/detr (``hubconf.py`` models).

The state dict (keys, shapes, order) and the module paths are the official ones, so a released
checkpoint loads with ``strict=True`` and code written against the official model, such as the
classic attention notebook's hooks on ``model.backbone[-2]``,
``model.transformer.encoder.layers[i].self_attn`` and
``model.transformer.decoder.layers[i].multihead_attn``, runs unchanged.

Only inference is supported: there is no dropout, no auxiliary loss and no criterion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detr_viz.attention import MultiheadAttention, observed
from detr_viz.errors import ArgumentError
from detr_viz.resnet import ResNet
from detr_viz.spec import ModelSpec


@dataclass(frozen=True)
class Variant:
    """One released DETR model: its backbone and where its official checkpoint lives."""

    name: str  # the official torch.hub entry point, e.g. "detr_resnet50_dc5"
    backbone: str  # torchvision ResNet name
    dilation: bool  # DC5: last stage dilated, stride 16 instead of 32
    checkpoint: str  # official file name under CHECKPOINT_URL

    @property
    def stride(self) -> int:
        """Nominal stride of the CNN feature map in model-input pixels."""
        return 16 if self.dilation else 32


CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/detr/"

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("detr_resnet50", "resnet50", False, "detr-r50-e632da11.pth"),
        Variant("detr_resnet50_dc5", "resnet50", True, "detr-r50-dc5-f0fb7ef5.pth"),
        Variant("detr_resnet101", "resnet101", False, "detr-r101-2c7b67e5.pth"),
        Variant("detr_resnet101_dc5", "resnet101", True, "detr-r101-dc5-a2e86def.pth"),
    )
}

DEFAULT_VARIANT = "detr_resnet50"


def get_variant(name: str) -> Variant:
    """The :class:`Variant` called ``name``; a clear error for unknown names."""
    try:
        return VARIANTS[name]
    except KeyError:
        known = ", ".join(VARIANTS)
        raise ArgumentError(f"Unknown DETR variant {name!r}. Choose one of: {known}.") from None


class NestedTensor:
    """A padded batch of images and its padding mask, as in the official code.

    ``tensors``: (B, C, H, W); ``mask``: (B, H, W) bool, True on padding.
    """

    def __init__(self, tensors: Tensor, mask: Tensor):
        self.tensors = tensors
        self.mask = mask

    def decompose(self) -> tuple[Tensor, Tensor]:
        return self.tensors, self.mask


def nested_tensor_from_tensor_list(images: list[Tensor] | Tensor) -> NestedTensor:
    """Pad (3, H_i, W_i) images to the largest H and W; the mask marks the padding."""
    max_h = max(img.shape[-2] for img in images)
    max_w = max(img.shape[-1] for img in images)
    first = images[0]
    tensor = first.new_zeros((len(images), first.shape[0], max_h, max_w))
    mask = torch.ones((len(images), max_h, max_w), dtype=torch.bool, device=first.device)
    for img, pad_img, m in zip(images, tensor, mask, strict=True):
        pad_img[:, : img.shape[1], : img.shape[2]].copy_(img)
        m[: img.shape[1], : img.shape[2]] = False
    return NestedTensor(tensor, mask)


class Backbone(nn.Module):
    """ResNet with frozen batch norm, returning ``{"0": NestedTensor}`` for layer4.

    Input: NestedTensor of (B, 3, H, W) images. Output: ``{"0": NestedTensor(features, mask)}``
    with features (B, 2048, ceil(H / s), ceil(W / s)), s = 32 (16 with DC5), and the
    padding mask nearest-resized to the feature grid.
    """

    def __init__(self, name: str, dilation: bool):
        super().__init__()
        self.body = ResNet(name, dilation)  # torchvision's module names: body.layer4, ...
        self.num_channels = 2048

    def forward(self, tensor_list: NestedTensor) -> dict[str, NestedTensor]:
        x = self.body(tensor_list.tensors)
        mask = F.interpolate(tensor_list.mask[None].float(), size=x.shape[-2:])
        return {"0": NestedTensor(x, mask.to(torch.bool)[0])}


class PositionEmbeddingSine(nn.Module):
    """Normalised sine/cosine position encoding: NestedTensor -> (B, 2 * num_pos_feats, H, W)."""

    def __init__(self, num_pos_feats: int = 128, temperature: int = 10000):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = 2 * math.pi

    def forward(self, tensor_list: NestedTensor) -> Tensor:
        not_mask = ~tensor_list.mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        eps = 1e-6
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=not_mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class Joiner(nn.Sequential):
    """``[backbone, position_embedding]``; ``model.backbone[-2]`` is the CNN."""

    def __init__(self, backbone: Backbone, position_embedding: PositionEmbeddingSine):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, tensor_list: NestedTensor) -> tuple[list[NestedTensor], list[Tensor]]:
        features = list(self[0](tensor_list).values())
        pos = [self[1](x).to(x.tensors.dtype) for x in features]
        return features, pos


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class TransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer. Sequence-first: src (HW, B, C), pos (HW, B, C)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, key_padding_mask: Tensor, pos: Tensor) -> Tensor:
        q = k = _with_pos(src, pos)
        # need_weights only when a hook may read output[1] (the head-averaged weights, as the
        # official call gives them); otherwise the fused path, which never builds the matrices
        attended = self.self_attn(q, k, value=src, key_padding_mask=key_padding_mask,
                                  need_weights=observed(self.self_attn))[0]
        src = self.norm1(src + attended)
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class TransformerDecoderLayer(nn.Module):
    """Post-norm decoder layer. tgt (Q, B, C); memory and pos (HW, B, C); query_pos (Q, B, C)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead)
        self.multihead_attn = MultiheadAttention(d_model, nhead)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self, tgt: Tensor, memory: Tensor, key_padding_mask: Tensor, pos: Tensor, query_pos: Tensor
    ) -> Tensor:
        q = k = _with_pos(tgt, query_pos)
        tgt = self.norm1(tgt + self.self_attn(q, k, value=tgt,
                                              need_weights=observed(self.self_attn))[0])
        tgt2 = self.multihead_attn(
            query=_with_pos(tgt, query_pos),
            key=_with_pos(memory, pos),
            value=memory,
            key_padding_mask=key_padding_mask,
            need_weights=observed(self.multihead_attn),
        )[0]
        tgt = self.norm2(tgt + tgt2)
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class TransformerEncoder(nn.Module):
    def __init__(self, num_layers: int, **layer_args):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(**layer_args) for _ in range(num_layers)
        )

    def forward(self, src: Tensor, src_key_padding_mask: Tensor, pos: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, src_key_padding_mask, pos)
        return src


class TransformerDecoder(nn.Module):
    """Returns the normalised output of every layer: (num_layers, Q, B, C)."""

    def __init__(self, num_layers: int, d_model: int, **layer_args):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(d_model=d_model, **layer_args) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Tensor, pos: Tensor,
        query_pos: Tensor,
    ) -> Tensor:
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask, pos, query_pos)
            intermediate.append(self.norm(tgt))
        return torch.stack(intermediate)


class Transformer(nn.Module):
    """DETR's encoder-decoder, post-norm (released models: d_model 256, 8 heads, 6 + 6 layers)."""

    def __init__(self, d_model=256, nhead=8, num_layers=6, dim_feedforward=2048,
                 num_decoder_layers: int | None = None):
        super().__init__()
        self.encoder = TransformerEncoder(
            num_layers, d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward
        )
        self.decoder = TransformerDecoder(
            num_layers if num_decoder_layers is None else num_decoder_layers, d_model,
            nhead=nhead, dim_feedforward=dim_feedforward,
        )
        self.d_model = d_model
        self.nhead = nhead

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor):
        """src (B, C, h, w), mask (B, h, w), query_embed (Q, C), pos_embed (B, C, h, w).

        Returns hs (layers, B, Q, C) and memory (B, C, h, w). Inside, sequences are
        (h * w, B, C) with positions in row-major (y, x) order.
        """
        bs, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        query_embed = query_embed.unsqueeze(1).repeat(1, bs, 1)
        mask = mask.flatten(1)
        tgt = torch.zeros_like(query_embed)
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed)
        hs = self.decoder(tgt, memory, mask, pos=pos_embed, query_pos=query_embed)
        return hs.transpose(1, 2), memory.permute(1, 2, 0).view(bs, c, h, w)


class MLP(nn.Module):
    """Feed-forward network with ReLU between its linear layers."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim], strict=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DETR(nn.Module):
    """The detector: backbone + transformer + class and box heads.

    Built from a :class:`~detr_viz.spec.ModelSpec` (any size the DETR code allows: classes,
    queries, layers, heads, hidden and feed-forward sizes, R50 or R101, DC5 or not), or from a
    released :class:`Variant` (91 COCO classes, 100 queries, 6 + 6 layers of 8 heads).
    """

    def __init__(self, spec: ModelSpec | Variant):
        super().__init__()
        if isinstance(spec, Variant):
            spec = ModelSpec(backbone=spec.backbone, dilation=spec.dilation, name=spec.name,
                             official=spec.name in VARIANTS)
        self.spec = spec
        self.variant = VARIANTS.get(spec.name) if spec.official else None
        if self.variant is None:
            self.variant = Variant(spec.name, spec.backbone, spec.dilation, "")
        num_queries = self.num_queries = spec.num_queries
        self.transformer = Transformer(spec.d_model, spec.heads, spec.encoder_layers,
                                       spec.ffn_dim, spec.decoder_layers)
        hidden_dim = self.transformer.d_model
        self.class_embed = nn.Linear(hidden_dim, spec.num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        # normal_ on the meta device (the shapes check of detr_viz.weights builds one there)
        # dispatches through torch._refs, which imports torch._dynamo: 1.4 s of a cold start
        queries = torch.empty(num_queries, hidden_dim)
        if queries.device.type != "meta":
            nn.init.normal_(queries)  # nn.Embedding's own initialisation
        self.query_embed = nn.Embedding(num_queries, hidden_dim, _weight=queries)
        backbone = Backbone(spec.backbone, spec.dilation)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = Joiner(backbone, PositionEmbeddingSine(hidden_dim // 2))

    @property
    def stride(self) -> int:
        """Input pixels per feature cell, read off the backbone's strided layers (16 with DC5)."""
        body = self.backbone[0].body
        stride = body.conv1.stride[0] * body.maxpool.stride
        for name in ("layer1", "layer2", "layer3", "layer4"):
            stride *= getattr(body, name)[0].conv2.stride[0]
        return stride

    def forward(self, samples: NestedTensor | Tensor | list[Tensor]) -> dict[str, Tensor]:
        """samples: (B, 3, H, W) normalised images, a list of (3, H_i, W_i), or a NestedTensor.

        Returns ``pred_logits`` (B, Q, C + 1; the last index is "no object"; Q queries and C
        classes, 100 and 91 for the released models) and ``pred_boxes`` (B, Q, 4; normalised
        cx, cy, w, h relative to the unpadded image).
        """
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        features, pos = self.backbone(samples)
        src, mask = features[-1].decompose()
        hs = self.transformer(self.input_proj(src), mask, self.query_embed.weight, pos[-1])[0]
        return {
            "pred_logits": self.class_embed(hs)[-1],
            "pred_boxes": self.bbox_embed(hs).sigmoid()[-1],
        }


def build_model(variant: str | ModelSpec = DEFAULT_VARIANT) -> DETR:
    """A randomly initialised DETR of the named variant (or of ``spec``, any size), in eval
    mode; never touches the network. Load real weights with :func:`detr_viz.load_model`.
    """
    model = DETR(variant if isinstance(variant, ModelSpec) else get_variant(variant))
    model.requires_grad_(False)
    return model.eval()
