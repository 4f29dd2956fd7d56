"""Per-pixel losses for semantic segmentation: cross-entropy, focal, soft Dice and their sums.

Logits are ``[B, K, H, W]``, targets ``[B, H, W]`` class ids with 255 = ignore. Class weights come
from the TRAINING split's pixel counts (`vfmtune.losses.class_weights`), never from val/test.
A batch whose crops hold no labelled pixel contributes a zero loss (not NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from vfmtune.choices import ConfigError, SegLoss
from vfmtune.config import SegmentConfig
from vfmtune.data.masks import IGNORE_INDEX
from vfmtune.losses import class_weights


def soft_dice(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice over the classes present in the batch's labelled pixels (Milletari et al. 2016).

    Classes absent from both the target and (almost) the prediction would add 0/0 terms; restricting
    the mean to classes present in the target keeps small objects from being drowned by empty classes.
    """
    valid = target != IGNORE_INDEX
    if not valid.any():
        return logits.sum() * 0
    probs = logits.float().softmax(1).permute(0, 2, 3, 1)[valid]  # [P, K]
    onehot = F.one_hot(target[valid], probs.shape[1]).float()  # [P, K]
    inter = (probs * onehot).sum(0)
    denom = probs.sum(0) + onehot.sum(0)
    dice = (2 * inter + eps) / (denom + eps)
    present = onehot.sum(0) > 0
    return 1 - dice[present].mean()


class SegmentationLoss(nn.Module):
    """`segment.loss`: ce | focal | dice | ce_dice | focal_dice, with optional per-class weights."""

    def __init__(self, name: SegLoss, weights: torch.Tensor | None = None, dice_weight: float = 1.0, gamma: float = 2.0) -> None:
        super().__init__()
        self.name, self.dice_weight, self.gamma = SegLoss(name), dice_weight, gamma
        self.register_buffer("weights", weights)

    def _pixelwise(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), target, weight=self.weights, ignore_index=IGNORE_INDEX, reduction="none")
        valid = target != IGNORE_INDEX
        if self.name in (SegLoss.focal, SegLoss.focal_dice):  # Lin et al. 2017, per pixel
            pt = torch.exp(-F.cross_entropy(logits.float(), target.clamp(max=logits.shape[1] - 1), reduction="none"))
            ce = (1 - pt).pow(self.gamma) * ce
        if self.weights is None:
            return ce[valid].mean()
        w = self.weights[target.clamp(max=len(self.weights) - 1)][valid]
        return ce[valid].sum() / w.sum().clamp(min=1e-12)

    @override
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not (target != IGNORE_INDEX).any():
            return logits.sum() * 0
        if self.name == SegLoss.dice:
            return soft_dice(logits, target)
        loss = self._pixelwise(logits, target)
        if self.name in (SegLoss.ce_dice, SegLoss.focal_dice):
            loss = loss + self.dice_weight * soft_dice(logits, target)
        return loss


def build_seg_loss(cfg: SegmentConfig, class_pixels: Sequence[int] | None) -> SegmentationLoss:
    """The training loss of `segment` from its config and the training split's pixels per class."""
    weights = None
    if cfg.class_weights is not None:
        if class_pixels is None:
            raise ConfigError("segment.class_weights needs the training split's pixel counts.")
        weights = class_weights(class_pixels, cfg.class_weights, key="segment.class_weights")
    if cfg.dice_weight < 0 or cfg.focal_gamma < 0:
        raise ConfigError("segment.dice_weight and segment.focal_gamma must be >= 0.")
    return SegmentationLoss(cfg.loss, weights, cfg.dice_weight, cfg.focal_gamma)
