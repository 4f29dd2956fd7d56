"""SAM's training loss: focal + Dice on the mask logits, MSE on the predicted IoU.

Kirillov et al. 2023 (https://arxiv.org/abs/2304.02643, appendix A): "We supervise mask prediction with
a linear combination of focal loss and dice loss in a 20:1 ratio ... The IoU prediction head is trained
with mean-square-error loss between the IoU prediction and the predicted mask's IoU with the ground
truth mask." With several candidate masks (an ambiguous prompt) only the one with the lowest mask loss
is back-propagated. The focal term is torchvision's ``sigmoid_focal_loss`` (Lin et al. 2017).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import sigmoid_focal_loss
from typing_extensions import override


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - soft Dice`` per mask: logits ``[..., h, w]``, targets in [0, 1] -> ``[...]``."""
    p = logits.sigmoid().flatten(-2)
    t = target.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of ``logits > 0`` with ``target > 0.5`` per mask (``[..., h, w]`` -> ``[...]``); 1 when both are empty."""
    p, t = (logits > 0).flatten(-2), (target > 0.5).flatten(-2)
    inter, union = (p & t).sum(-1).float(), (p | t).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


class SamLoss(nn.Module):
    """``focal_weight * focal + dice_weight * dice`` of the best candidate + ``iou_weight * MSE(IoU head)``.

    Args:
        focal_weight: SAM's 20.
        dice_weight: SAM's 1.
        iou_weight: Weight of the IoU-prediction MSE.
        alpha: Focal loss class balance (torchvision's default 0.25).
        gamma: Focal loss focusing (2).

    Example:
        >>> loss, best = SamLoss()(torch.randn(4, 3, 32, 32), torch.rand(4, 3), torch.rand(4, 32, 32).round())
        >>> best.shape
        torch.Size([4])
    """

    def __init__(self, focal_weight: float = 20.0, dice_weight: float = 1.0, iou_weight: float = 1.0,
                 alpha: float = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        self.focal_weight, self.dice_weight, self.iou_weight = focal_weight, dice_weight, iou_weight
        self.alpha, self.gamma = alpha, gamma

    @override
    def forward(self, logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of ``K`` candidate masks per prompt.

        Args:
            logits: ``[N, K, h, w]`` mask logits.
            iou_pred: ``[N, K]`` the IoU head's output.
            target: ``[N, h, w]`` ground truth in [0, 1] (soft at resized edges).

        Returns:
            ``(scalar loss, best [N])``: ``best`` indexes each prompt's lowest-loss candidate.
        """
        logits = logits.float()
        t = target[:, None].expand_as(logits)
        focal = sigmoid_focal_loss(logits, t, alpha=self.alpha, gamma=self.gamma, reduction="none").flatten(-2).mean(-1)
        per_mask = self.focal_weight * focal + self.dice_weight * dice_loss(logits, t)  # [N, K]
        best = per_mask.detach().argmin(1)
        rows = torch.arange(len(best), device=best.device)
        iou_true = mask_iou(logits.detach(), t)
        loss = per_mask[rows, best].mean() + self.iou_weight * F.mse_loss(iou_pred.float(), iou_true)
        return loss, best
