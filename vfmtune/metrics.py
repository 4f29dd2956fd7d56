"""Evaluation metrics (torchmetrics) and their flat names in metrics.json, one spec per kind of target.

A spec builds a task's `MetricCollection`, feeds it a batch of model outputs, and flattens the
computed values into `metrics.json` keys (`test/macro_f1`, `test/recall/<class>`, ...). Training
modules and the `evaluate` command use the same spec, so their figures cannot drift apart.
torchmetrics synchronises states across processes on `compute()`: DDP runs report metrics over
all ranks' samples, not rank 0's share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)


class MetricSpec(Protocol):
    """How one kind of target is scored."""

    #: the key shown in the progress bar (without its split prefix)
    headline: str

    def build(self, classes: Sequence[str]) -> MetricCollection: ...

    def update(self, metrics: MetricCollection, outputs: torch.Tensor, targets: torch.Tensor) -> None: ...

    def results(self, computed: dict[str, torch.Tensor], prefix: str, classes: Sequence[str]) -> dict[str, Any]: ...


class ClassMetrics:
    """Accuracy, balanced accuracy (macro recall), macro-F1, per-class P/R/F1 and the confusion matrix
    of logits [B, C] against labels [B]."""

    headline = "macro_f1"

    def build(self, classes: Sequence[str]) -> MetricCollection:
        n = len(classes)
        return MetricCollection(
            {
                "accuracy": MulticlassAccuracy(n, average="micro"),
                "balanced_accuracy": MulticlassRecall(n, average="macro"),
                "macro_f1": MulticlassF1Score(n, average="macro"),
                "precision": MulticlassPrecision(n, average=None),
                "recall": MulticlassRecall(n, average=None),
                "f1": MulticlassF1Score(n, average=None),
                "confusion_matrix": MulticlassConfusionMatrix(n),
            }
        )

    def update(self, metrics: MetricCollection, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        metrics.update(outputs.argmax(-1), targets)

    def results(self, computed: dict[str, torch.Tensor], prefix: str, classes: Sequence[str]) -> dict[str, Any]:
        return flatten(computed, prefix, classes)


def flatten(results: dict[str, torch.Tensor], prefix: str, classes: Sequence[str]) -> dict[str, Any]:
    """`{"macro_f1": t, "recall": [..]}` -> `{"test/macro_f1": .., "test/recall/<class>": ..}`; a
    confusion matrix stays a nested list under `<prefix>/confusion_matrix` (rows: true class)."""
    flat: dict[str, Any] = {}
    for name, value in results.items():
        if name == "confusion_matrix":
            flat[f"{prefix}/{name}"] = value.long().tolist()
        elif value.ndim == 0:
            flat[f"{prefix}/{name}"] = float(value)
        else:
            for cls, v in zip(classes, value.tolist()):
                flat[f"{prefix}/{name}/{cls}"] = float(v)
    return flat


class BoundaryIoU(Metric):
    """Boundary IoU per class (Cheng et al. 2021, https://arxiv.org/abs/2103.16562): IoU of the bands of
    width `d` inside the predicted and the true masks' contours, `d` = `dilation_ratio` x image diagonal.

    Region IoU barely moves when an object's outline is wrong but its bulk is right; boundary IoU does.
    Ignored pixels (255) are left out of both bands. Bands are found by erosion (a min-pool).
    """

    full_state_update = False

    def __init__(self, num_classes: int, dilation_ratio: float = 0.02, ignore_index: int = 255) -> None:
        super().__init__()
        self.num_classes, self.ratio, self.ignore_index = num_classes, dilation_ratio, ignore_index
        self.add_state("intersection", torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("union", torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def _band(self, mask: torch.Tensor, d: int) -> torch.Tensor:
        eroded = -torch.nn.functional.max_pool2d(-mask.float()[:, None], 2 * d + 1, stride=1, padding=d)[:, 0]
        return mask & (eroded < 0.5)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """preds, target: [B, H, W] class ids."""
        h, w = target.shape[-2:]
        d = max(1, round(self.ratio * (h * h + w * w) ** 0.5))
        valid = target != self.ignore_index
        # An ignored pixel takes the prediction's class, so it draws no contour of its own in the truth.
        target = torch.where(valid, target, preds)
        for k in range(self.num_classes):
            gt, pd = self._band(target == k, d) & valid, self._band(preds == k, d) & valid
            self.intersection[k] += (gt & pd).sum()
            self.union[k] += (gt | pd).sum()

    def compute(self) -> torch.Tensor:
        return torch.where(self.union > 0, self.intersection / self.union.clamp(min=1), torch.nan)


class MaskMetrics:
    """Per-class IoU, mean IoU, Dice, pixel accuracy and boundary IoU of logits [B, K, H, W] against
    masks [B, H, W] (255 = ignore), from one torchmetrics confusion matrix over all pixels of a split.

    Means skip classes with no pixel in the split's masks or predictions (their IoU is 0/0).
    """

    headline = "miou"

    def build(self, classes: Sequence[str]) -> MetricCollection:
        n = len(classes)
        return MetricCollection({"confusion_matrix": MulticlassConfusionMatrix(n, ignore_index=255),
                                 "boundary_iou": BoundaryIoU(n)})

    def update(self, metrics: MetricCollection, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        if outputs.shape[-2:] != targets.shape[-2:]:
            outputs = torch.nn.functional.interpolate(outputs.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False)
        metrics.update(outputs.argmax(1), targets)

    def results(self, computed: dict[str, torch.Tensor], prefix: str, classes: Sequence[str]) -> dict[str, Any]:
        cm = computed["confusion_matrix"].double()
        tp, fp, fn = cm.diag(), cm.sum(0) - cm.diag(), cm.sum(1) - cm.diag()
        seen = (tp + fp + fn) > 0
        iou = torch.where(seen, tp / (tp + fp + fn).clamp(min=1), torch.nan)
        dice = torch.where(seen, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.nan)
        boundary = computed["boundary_iou"]
        out: dict[str, Any] = {
            f"{prefix}/miou": _nanmean(iou), f"{prefix}/dice": _nanmean(dice),
            f"{prefix}/pixel_accuracy": float(tp.sum() / cm.sum().clamp(min=1)), f"{prefix}/boundary_iou": _nanmean(boundary),
            f"{prefix}/confusion_matrix": cm.long().tolist(),
        }
        for k, cls in enumerate(classes):
            out[f"{prefix}/iou/{cls}"], out[f"{prefix}/dice/{cls}"] = _value(iou[k]), _value(dice[k])
            out[f"{prefix}/boundary_iou/{cls}"] = _value(boundary[k])
        return out


def _nanmean(values: torch.Tensor) -> float:
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def _value(v: torch.Tensor) -> float | None:
    """A metric value for metrics.json: None where it is undefined (JSON has no NaN)."""
    return None if torch.isnan(v) else float(v)
