"""Enum-like config values (`Choice`) and `ConfigError`: what every config section's fields are checked against.

OmegaConf rejects any other value when a config is composed, listing the valid ones, so no module re-checks
them; `Choice.parse` does the same for code called without a composed config.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


class Choice(str, Enum):
    """An enum-like config value: compares equal to, prints as and is stored as its string."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def parse(cls, value: Any, key: str) -> Choice:
        """`value` as a member, for code called without a composed config; else a ConfigError naming `key`."""
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(m.value for m in cls)}.") from None


class WeightsSource(Choice):
    hub = "hub"
    file = "file"
    packaged = "packaged"
    none = "none"


class OnBadImage(Choice):
    error = "error"  # stop with a report of every bad file
    skip = "skip"  # drop and count them


class SamplerName(Choice):
    shuffle = "shuffle"
    balanced = "balanced"


class HeadType(Choice):
    linear = "linear"
    mlp = "mlp"


class FinetuneMode(Choice):
    frozen = "frozen"
    last_blocks = "last_blocks"
    full = "full"
    progressive = "progressive"
    lora = "lora"


class SchedName(Choice):
    cosine = "cosine"
    step = "step"
    onecycle = "onecycle"
    none = "none"


class SegHead(Choice):
    linear = "linear"  # DINOv2's linear evaluation head: BatchNorm + 1x1 conv on the last layer's patch tokens
    linear_ms = "linear_ms"  # the same on the last 4 layers' tokens, concatenated
    decoder = "decoder"  # a light progressive-upsampling decoder over the last 4 layers
    decoder_skip = "decoder_skip"  # the same, fused with a shallow conv stem on the image at 1/4 and 1/2 (U-Net skips)


class SegLoss(Choice):
    ce = "ce"
    dice = "dice"
    focal = "focal"
    ce_dice = "ce_dice"
    focal_dice = "focal_dice"


class LossName(Choice):
    ce = "ce"
    weighted_ce = "weighted_ce"
    focal = "focal"


class ResampleMethod(Choice):
    none = "none"
    smote = "smote"
    adasyn = "adasyn"
    borderline_smote = "borderline_smote"
    random_over = "random_over"
    random_under = "random_under"
    smote_tomek = "smote_tomek"


class AdaptMethod(Choice):
    none = "none"
    coral = "coral"  # align feature covariances of source and target batches while training (Sun & Saenko 2016)
    dann = "dann"  # a domain classifier behind gradient reversal while training (Ganin et al. 2016)
    self_training = "self_training"  # rounds of training on the source + confident, class-balanced pseudo-labels
    adabn = "adabn"  # BatchNorm statistics re-estimated on target images (Li et al. 2016); vfmtune adapt
    tent = "tent"  # entropy minimised on target images through the norm layers' affine parameters (Wang et al. 2021)


class LoggerName(Choice):
    csv = "csv"
    tensorboard = "tensorboard"
    none = "none"


class SplitName(Choice):
    train = "train"
    val = "val"
    test = "test"
    all = "all"


class FeatureLoss(Choice):
    cosine = "cosine"
    mse = "mse"


class DenseKD(Choice):
    pixel = "pixel"
    channel = "channel"


class StudentWeights(Choice):
    auto = "auto"  # packaged, else hub, else none
    packaged = "packaged"
    hub = "hub"
    none = "none"


class ExportFormat(Choice):
    onnx = "onnx"
    torchscript = "torchscript"


class Quantize(Choice):
    int8 = "int8"


class Precision(Choice):
    auto = "auto"  # bf16 where the CPU / GPU computes it natively, else fp32 (vfmtune.precision)
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"  # GPUs only


class SamPrompt(Choice):
    box = "box"  # a jittered box per instance
    point = "point"  # positive (and negative) points: ambiguous, so SAM's three masks decode and the best one trains
    mixed = "mixed"  # a box or points with equal probability per instance and step, as in SAM's own training


class OnBadBox(Choice):
    error = "error"  # stop before writing anything, listing every box with no area inside its image
    skip = "skip"  # drop them, count them and list them in review.csv


class Blend(Choice):
    none = "none"  # paste the pixels as they are
    gaussian = "gaussian"  # feather the object's edge with a Gaussian-blurred alpha (synth.sigma)
    poisson = "poisson"  # OpenCV's seamlessClone (Perez et al. 2003): gradients kept, colours matched to the background


class Projection(Choice):
    pca = "pca"
    tsne = "tsne"  # scikit-learn's t-SNE on the first 50 principal components
