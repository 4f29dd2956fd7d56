"""Edge segmentation students: a timm CNN's feature pyramid (`features_only`) plus an LR-ASPP head.

Why LR-ASPP (Howard et al. 2019, https://arxiv.org/abs/1905.02244, section 6.4) and not an FPN: it
was designed for exactly these encoders (MobileNetV3, and EfficientNet-Lite's inverted residuals).
It reads two levels only: the deepest (stride 32: context, gated by its own global average, a
squeeze-excite over the whole image) and stride 8 (detail, through a single 1x1 classifier), and adds
about `128 x (2 C_deep + K) + C_8 x K` weights: 0.08M on EfficientNet-Lite0's 3.0M-weight encoder.
Stride 8 is finer than a ViT teacher's patch grid (14 or 16 px), so the student can draw edges at
least as sharp as its teacher's; an FPN-lite would add a 3x3 convolution per level for detail the
teacher does not have. Every op (Conv, GlobalAveragePool, Sigmoid, Mul, Resize) exports
to ONNX and quantizes statically in onnxruntime.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from vfmtune.backbones import create_backbone, resolve_model_name
from vfmtune.weights import WeightsError

DETAIL_STRIDE = 8  # the level the head's detail branch reads; its logits come out at this stride
HEAD_DIM = 128  # LR-ASPP's width in the paper


class LRASPPHead(nn.Module):
    """Lite R-ASPP: `(detail [B, C_d, H/8, W/8], deep [B, C_h, H/32, W/32]) -> logits [B, K, H/8, W/8]`.

    Args:
        detail_channels: channels of the stride-8 map.
        deep_channels: channels of the deepest map.
        num_classes: K.
        dim: width of the context branch.
    """

    def __init__(self, detail_channels: int, deep_channels: int, num_classes: int, dim: int = HEAD_DIM) -> None:
        super().__init__()
        self.context = nn.Sequential(nn.Conv2d(deep_channels, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True))
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(deep_channels, dim, 1, bias=False), nn.Sigmoid())
        self.detail_classifier = nn.Conv2d(detail_channels, num_classes, 1)
        self.context_classifier = nn.Conv2d(dim, num_classes, 1)

    @override
    def forward(self, detail: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        context = self.context(deep) * self.gate(deep)
        context = F.interpolate(context, size=detail.shape[-2:], mode="bilinear", align_corners=False)
        return self.detail_classifier(detail) + self.context_classifier(context)


class SegStudent(nn.Module):
    """A timm CNN as a `features_only` encoder + `LRASPPHead`: images `[B, 3, S, S]` -> logits `[B, K, S/8, S/8]`.

    Args:
        name: "timm/<model>" (a CNN whose feature pyramid reaches stride 8 and beyond).
        num_classes: K.
        weights: "none" (random, deterministic), "packaged" or "hub": the classification model's ImageNet
            weights, mapped into the encoder (`load_encoder_weights`).

    Example:
        >>> student = SegStudent("timm/test_efficientnet", 3)
        >>> student(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 3, 8, 8])
    """

    def __init__(self, name: str, num_classes: int, weights: str = "none") -> None:
        super().__init__()
        self.encoder = create_encoder(name, weights)
        reductions = self.encoder.feature_info.reduction()
        if DETAIL_STRIDE not in reductions or max(reductions) <= DETAIL_STRIDE:
            raise ValueError(f"student {name}: its feature maps have strides {reductions}; a segmentation student needs "
                             f"one at stride {DETAIL_STRIDE} and a deeper one (a CNN such as efficientnet_lite0 or mobilenetv3).")
        self.detail_level = reductions.index(DETAIL_STRIDE)
        channels = self.encoder.feature_info.channels()
        self.head = LRASPPHead(channels[self.detail_level], channels[-1], num_classes)

    @override
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.encoder(images)
        return self.head(features[self.detail_level], features[-1])


def create_encoder(name: str, weights: str = "none") -> nn.Module:
    """timm `features_only` model of "timm/<model>"; with weights, the classification model's (`create_backbone`:
    strict, the packaged EfficientNet-Lite0 conversion verified) mapped into it by `load_encoder_weights`."""
    model_name = resolve_model_name(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # as create_backbone: random-init students are identical across calls
        encoder = timm.create_model(model_name, features_only=True, pretrained=False)
    if weights != "none":
        classifier = create_backbone(name, weights=weights)
        left = load_encoder_weights(encoder, classifier.state_dict(), f"{weights} {model_name}")
        print(f"student encoder: {len(encoder.state_dict())} tensors from {weights} {model_name} "
              f"(classifier-only layers left out: {', '.join(sorted({k.rsplit('.', 1)[0] for k in left})) or 'none'})")
    return encoder


def load_encoder_weights(encoder: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> list[str]:
    """Load a classification model's state dict into its `features_only` encoder, strictly.

    timm's feature models keep the classification model's parameter names, so every encoder tensor must
    be found by name with the same shape; what is left are the layers after the last stage that only
    the classifier uses (EfficientNet's `conv_head` / `bn2`, MobileNetV3's `conv_head`).

    Returns:
        The state dict's keys that the encoder does not use.

    Raises:
        WeightsError: an encoder tensor missing from the state dict, or of another shape.
    """
    target = encoder.state_dict()
    missing = [k for k in target if k not in state_dict]
    mismatched = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
                  if k in state_dict and state_dict[k].shape != v.shape]
    if missing or mismatched:
        raise WeightsError(f"{source} does not fit the {type(encoder).__name__} encoder: missing {missing[:5]}, "
                           f"shape mismatch {mismatched[:5]}.")
    encoder.load_state_dict({k: state_dict[k] for k in target}, strict=True)
    return sorted(set(state_dict) - set(target))
