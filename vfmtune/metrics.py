"""Classification metrics (torchmetrics) and their flat names in metrics.json."""

from __future__ import annotations

from typing import Sequence

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)


def classification_metrics(num_classes: int) -> MetricCollection:
    """Accuracy, balanced accuracy (macro recall), macro-F1, per-class P/R/F1 and the confusion matrix.

    torchmetrics synchronises the states across processes on `compute()`, so DDP runs report
    metrics over all ranks' samples, not rank 0's share.
    """
    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(num_classes, average="micro"),
            "balanced_accuracy": MulticlassRecall(num_classes, average="macro"),
            "macro_f1": MulticlassF1Score(num_classes, average="macro"),
            "precision": MulticlassPrecision(num_classes, average=None),
            "recall": MulticlassRecall(num_classes, average=None),
            "f1": MulticlassF1Score(num_classes, average=None),
            "confusion_matrix": MulticlassConfusionMatrix(num_classes),
        }
    )


def flatten(results: dict[str, torch.Tensor], prefix: str, classes: Sequence[str]) -> dict[str, float | list]:
    """`{"macro_f1": t, "recall": [..]}` -> `{"test/macro_f1": .., "test/recall/<class>": ..}`; the
    confusion matrix stays a nested list under `<prefix>/confusion_matrix` (rows: true class)."""
    flat: dict[str, float | list] = {}
    for name, value in results.items():
        if name == "confusion_matrix":
            flat[f"{prefix}/{name}"] = value.long().tolist()
        elif value.ndim == 0:
            flat[f"{prefix}/{name}"] = float(value)
        else:
            for cls, v in zip(classes, value.tolist()):
                flat[f"{prefix}/{name}/{cls}"] = float(v)
    return flat
