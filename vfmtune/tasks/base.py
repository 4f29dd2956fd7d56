"""Validation and test shared by the classification tasks (Classifier, Distiller)."""

from __future__ import annotations

from typing import Any, Sequence

import lightning as L
import torch
from typing_extensions import override

from vfmtune.metrics import classification_metrics, flatten


class ClassificationTask(L.LightningModule):
    """Per-batch torchmetrics updates, flat scalars logged per epoch, and the full results
    (confusion matrix included) kept in `eval_results[prefix]` for metrics.json.

    Subclasses call `init_metrics(classes)` in `__init__` and implement `eval_outputs`.
    """

    def init_metrics(self, classes: Sequence[str]) -> None:
        self.classes = list(classes)
        self.val_metrics = classification_metrics(len(self.classes))
        self.test_metrics = classification_metrics(len(self.classes))
        self.eval_results: dict[str, dict[str, Any]] = {}  # last computed metrics per prefix

    def eval_outputs(self, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(logits [B, C], labels [B], loss)` of an evaluation batch."""
        raise NotImplementedError

    def _eval_step(self, batch: Sequence[torch.Tensor], prefix: str) -> None:
        logits, labels, loss = self.eval_outputs(batch)
        self.log(f"{prefix}/loss", loss, on_epoch=True, batch_size=len(labels), sync_dist=True)
        (self.val_metrics if prefix == "val" else self.test_metrics).update(logits.argmax(-1), labels)

    def _eval_epoch_end(self, prefix: str) -> None:
        metrics = self.val_metrics if prefix == "val" else self.test_metrics
        flat = flatten(metrics.compute(), prefix, self.classes)
        metrics.reset()
        # Values are already reduced across processes by torchmetrics, hence no sync_dist here.
        for key, value in flat.items():
            if not isinstance(value, list):
                self.log(key, value, prog_bar=key == f"{prefix}/macro_f1")
        self.eval_results[prefix] = flat

    @override
    def on_train_epoch_start(self) -> None:
        # Lightning never calls train() when fit starts (after validation it restores the modes it captured),
        # so the subclasses' train() rules (frozen parts in eval mode) are applied here, after the callbacks'
        # own epoch-start hooks (progressive unfreezing) have run.
        self.train()

    @override
    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    @override
    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    @override
    def test_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    @override
    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
