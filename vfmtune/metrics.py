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
from torchmetrics import MetricCollection
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
