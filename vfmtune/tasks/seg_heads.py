"""Segmentation heads on backbone feature maps: the DINOv2 linear probe and a light decoder.

Every head takes one tensor `[B, C, h, w]`: the feature maps of the chosen blocks, resized to the
finest one and concatenated along channels (`encode` in `vfmtune.tasks.segmenter`). A 1x1
convolution of that concatenation is the sum of one 1x1 convolution per block, so heads need not
know how many blocks fed them, and the patch-token cache stores exactly what a head reads.
"""

from __future__ import annotations

import torch
from torch import nn
from typing_extensions import override

from vfmtune.choices import SegHead


class LinearHead(nn.Module):
    """BatchNorm + 1x1 convolution on patch tokens (DINOv2's linear evaluation head, Oquab et al. 2023,
    https://arxiv.org/abs/2304.07193): `[B, C, h, w] -> [B, K, h, w]`, upsampled by the caller."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.classifier = nn.Conv2d(in_channels, num_classes, 1)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(x))


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class LightDecoder(nn.Module):
    """Project, then two x2 upsampling steps of 3x3 conv-BN-ReLU (SETR's progressive upsampling, Zheng
    et al. 2021, https://arxiv.org/abs/2012.15840, at a fraction of its width): `[B, C, h, w] ->
    [B, K, 4h, 4w]`. Where the linear probe paints 14-px patches, this refines edges at 3.5 px.

    Args:
        in_channels: channels of the concatenated maps.
        num_classes: K.
        dim: width of the upsampling path.
    """

    def __init__(self, in_channels: int, num_classes: int, dim: int = 128) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, dim, 1))
        self.up = nn.Sequential(
            _conv_bn_relu(dim, dim), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            _conv_bn_relu(dim, dim), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            _conv_bn_relu(dim, dim // 2),
        )
        self.classifier = nn.Conv2d(dim // 2, num_classes, 1)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.up(self.project(x)))


def build_seg_head(kind: SegHead, in_channels: int, num_classes: int, decoder_dim: int = 128) -> nn.Module:
    """`segment.head`: linear and linear_ms are `LinearHead`s (on 1 or 4 blocks), decoder a `LightDecoder`."""
    if kind == SegHead.decoder:
        return LightDecoder(in_channels, num_classes, decoder_dim)
    return LinearHead(in_channels, num_classes)


def default_layers(kind: SegHead, layers: int | None) -> int:
    """Blocks feeding the head: `segment.layers`, else 1 for `linear` and 4 for `linear_ms` / `decoder`."""
    return int(layers) if layers else (1 if kind == SegHead.linear else 4)
