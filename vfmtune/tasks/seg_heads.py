"""Segmentation heads on backbone feature maps: the DINOv2 linear probe and two light decoders.

Every head takes one tensor `[B, C, h, w]`: the feature maps of the chosen blocks, resized to the
finest one and concatenated along channels (`encode` in `vfmtune.tasks.segmenter`). A 1x1
convolution of that concatenation is the sum of one 1x1 convolution per block, so heads need not
know how many blocks fed them, and the patch-token cache stores exactly what a head reads.
`SkipDecoder` (`reads_image`) also takes the normalised images, so it cannot train on that cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


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


class ConvStem(nn.Module):
    """Images `[B, 3, S, S]` -> `[maps at S/2, maps at S/4]`, two conv-BN-ReLU pairs trained from scratch."""

    channels = (24, 48)

    def __init__(self) -> None:
        super().__init__()
        self.s2 = nn.Sequential(_conv_bn_relu(3, 24, stride=2), _conv_bn_relu(24, 24))
        self.s4 = nn.Sequential(_conv_bn_relu(24, 48, stride=2), _conv_bn_relu(48, 48))

    @override
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        s2 = self.s2(images)
        return [s2, self.s4(s2)]


class EncoderStem(nn.Module):
    """A timm CNN's first two feature levels (strides 2 and 4, `forward_intermediates`; the rest of the network
    pruned away) as skips. Images arrive normalised for the backbone and are re-normalised to the CNN's own
    mean / std (an affine map per channel) first.

    Args:
        cnn: a timm classification model with `forward_intermediates` (EfficientNet, MobileNetV3, ResNet, ...).
        mean, std: the backbone's normalisation, which the images arrive in.
    """

    def __init__(self, cnn: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        cnn.prune_intermediate_layers(indices=(0, 1), prune_head=True)
        self.cnn = cnn
        own_mean = torch.tensor(cnn.pretrained_cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1)
        own_std = torch.tensor(cnn.pretrained_cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1)
        self.register_buffer("scale", torch.tensor(std).view(1, 3, 1, 1) / own_std, persistent=False)
        self.register_buffer("shift", (torch.tensor(mean).view(1, 3, 1, 1) - own_mean) / own_std, persistent=False)
        was_training = cnn.training
        cnn.eval()  # a probe must not move BatchNorm statistics
        with torch.no_grad():
            maps = self(torch.zeros(1, 3, 64, 64))
        cnn.train(was_training)
        if [m.shape[-1] for m in maps] != [32, 16]:
            raise ValueError(f"segment.skip_encoder: its first two levels have strides {[64 // m.shape[-1] for m in maps]}, "
                             "not 2 and 4; use a CNN such as timm/tf_efficientnet_lite0 or timm/mobilenetv3_large_100.")
        self.channels = tuple(m.shape[1] for m in maps)

    @override
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.cnn.forward_intermediates(images * self.scale + self.shift, indices=(0, 1), intermediates_only=True)


class SkipDecoder(nn.Module):
    """Patch features decoded with U-Net skips from the image: `([B, C, h, w], [B, 3, S, S]) -> [B, K, S/2, S/2]`.

    A ViT's finest map is 1/14 of its input, so a 14-px patch paints objects a few pixels wide (roofs in
    0.5 m aerial tiles) as blobs; a CNN's U-Net recovers their edges from its own stride-2 and stride-4
    maps. Here a stem gives the decoder those maps of the image (edges and colour; the semantics stay the
    backbone's), in the spirit of ViT-Adapter's spatial prior (Chen et al. 2023,
    https://arxiv.org/abs/2205.08534): project and refine the patch map, then twice upsample, concatenate
    the stem's map of that scale, and conv-BN-ReLU.

    Args:
        in_channels: channels of the concatenated patch maps.
        num_classes: K.
        dim: width after projection; the 1/4 and 1/2 steps use dim/2 and dim/4.
        stem: `ConvStem` (from scratch, the default) or an `EncoderStem` (an ImageNet CNN's first levels).
    """

    reads_image = True

    def __init__(self, in_channels: int, num_classes: int, dim: int = 128, stem: ConvStem | EncoderStem | None = None) -> None:
        super().__init__()
        self.stem = stem or ConvStem()
        c2, c4 = self.stem.channels
        self.project = nn.Sequential(nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, dim, 1))
        self.refine = _conv_bn_relu(dim, dim)
        self.fuse4 = _conv_bn_relu(dim + c4, dim // 2)
        self.fuse2 = _conv_bn_relu(dim // 2 + c2, dim // 4)
        self.classifier = nn.Conv2d(dim // 4, num_classes, 1)

    @override
    def forward(self, x: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        s2, s4 = self.stem(images)
        x = self.refine(self.project(x))
        x = self.fuse4(torch.cat([F.interpolate(x, size=s4.shape[-2:], mode="bilinear", align_corners=False), s4], 1))
        x = self.fuse2(torch.cat([F.interpolate(x, size=s2.shape[-2:], mode="bilinear", align_corners=False), s2], 1))
        return self.classifier(x)


def build_seg_head(kind: SegHead, in_channels: int, num_classes: int, decoder_dim: int = 128,
                   stem: EncoderStem | None = None) -> nn.Module:
    """`segment.head`: linear and linear_ms are `LinearHead`s (on 1 or 4 blocks), decoder a `LightDecoder`,
    decoder_skip a `SkipDecoder` (on `stem`, else a `ConvStem`)."""
    if kind == SegHead.decoder:
        return LightDecoder(in_channels, num_classes, decoder_dim)
    if kind == SegHead.decoder_skip:
        return SkipDecoder(in_channels, num_classes, decoder_dim, stem)
    return LinearHead(in_channels, num_classes)


def default_layers(kind: SegHead, layers: int | None) -> int:
    """Blocks feeding the head: `segment.layers`, else 1 for `linear` and 4 for `linear_ms` / `decoder`."""
    return int(layers) if layers else (1 if kind == SegHead.linear else 4)
