"""Image classification: a timm backbone plus a new head, as a LightningModule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from vfmtune.adapt.backbone import adapted_backbone
from vfmtune.adapt.domain import DomainClassifier, coral_loss
from vfmtune.choices import AdaptMethod, HeadType
from vfmtune.compose import to_container, typed
from vfmtune.config import Config, HeadConfig
from vfmtune.data.datamodule import whole_epoch_steps
from vfmtune.losses import build_loss
from vfmtune.metrics import ClassMetrics
from vfmtune.optim import optimizer_steps
from vfmtune.tasks.adapted import AdaptedModule


def build_head(in_features: int, num_classes: int, cfg: HeadConfig) -> nn.Sequential:
    """Linear or MLP head over pooled backbone features of shape [B, in_features] -> logits [B, C]."""
    layers: list[nn.Module] = []
    if cfg.feature_norm:
        layers.append(nn.BatchNorm1d(in_features, affine=False))
    if cfg.type == HeadType.mlp:
        layers += [nn.Linear(in_features, cfg.hidden_dim), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden_dim, num_classes)]
    else:
        layers += [nn.Dropout(cfg.dropout), nn.Linear(in_features, num_classes)]
    return nn.Sequential(*layers)


class Classifier(AdaptedModule):
    """Backbone + head, trained with the run's optimiser, schedule and loss.

    Args:
        config: the run's config (or its plain-dict form); stored in the checkpoint as plain types,
            so that it loads with `torch.load(weights_only=True)`.
        classes: class names, index = label.
        load_weights: build the backbone with its configured weights; False when a checkpoint's
            state dict is about to replace them anyway (no hub or packaged lookup then).
        class_counts: training images per class (for class-weighted losses and logit adjustment);
            stored as a plain list so the checkpoint rebuilds the same loss.

    Example:
        >>> model = Classifier(Config(), ["ok", "defect"])
        >>> logits = model(torch.randn(2, 3, 224, 224))  # [2, 2]
    """

    def __init__(
        self,
        config: Config | dict[str, Any],
        classes: Sequence[str],
        load_weights: bool = True,
        class_counts: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        config = typed(config, Config)
        counts = None if class_counts is None else [int(n) for n in class_counts]
        self.save_hyperparameters({"task": "classify", "config": to_container(config), "classes": list(classes), "class_counts": counts})
        self.config = config
        self.backbone = adapted_backbone(config, load_weights)
        self.head = build_head(self.backbone.num_features, len(classes), config.head)
        self.class_counts = counts
        # Without counts (a model built by hand, not by `vfmtune.train`) classes count as equal.
        self.loss_fn = build_loss(config.loss, counts or [1] * len(classes))
        # True when batches hold cached backbone embeddings [B, D] instead of images [B, 3, H, W].
        self.embeddings_input = False
        method = config.adapt.method
        self.domain = DomainClassifier(self.backbone.num_features) if method == AdaptMethod.dann else None
        self.init_eval(ClassMetrics(), classes)

    @override
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> logits [B, num_classes]."""
        return self.head(self.backbone(images))

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(inputs) if self.embeddings_input else self(inputs)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if isinstance(batch, dict):  # source batch + unlabelled target batch: feature alignment
            return self._aligned_step(batch)
        if self.whole_epochs:
            return self._epoch_step(batch)
        x, y = batch
        loss = self.loss_fn(self.logits(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        return loss

    @property
    def whole_epochs(self) -> bool:
        """True when each training step gets a whole epoch of cached-embedding batches (`EpochBatches`)."""
        return self.embeddings_input and whole_epoch_steps(self._trainer)

    @property
    @override
    def automatic_optimization(self) -> bool:
        return not self.whole_epochs

    def _epoch_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One epoch of cached-embedding batches: per batch, the forward, zero_grad, backward, optimizer step and
        per-step lr update that automatic optimization would run, in the same order; per-epoch schedules step
        after the last batch. The epoch's mean loss is logged as `train/loss` like the per-batch path's."""
        optimizer = self.optimizers()
        schedules = self.trainer.lr_scheduler_configs
        total, count = torch.zeros((), device=self.device), 0
        for x, y in batches:
            loss = self.loss_fn(self.logits(x), y)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            for s in schedules:
                if s.interval == "step":
                    s.scheduler.step()
            total += loss.detach() * len(y)
            count += len(y)
        for s in schedules:
            if s.interval == "epoch":
                s.scheduler.step()
        self.log("train/loss", total / max(count, 1), on_step=True, on_epoch=True, prog_bar=True, batch_size=count)

    def _aligned_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """Task loss on the source batch + `adapt.weight` x CORAL or DANN loss between both batches' features."""
        (x, y), (xt, _) = batch["source"], batch["target"]
        features = self.backbone(torch.cat([x, xt]))
        fs, ft = features[: len(x)], features[len(x) :]
        task = self.loss_fn(self.head(fs), y)
        if self.domain is not None:
            self.domain.progress = self.global_step / optimizer_steps(self.trainer)
            align = self.domain.loss(fs, ft)
        else:
            align = coral_loss(fs, ft)
        loss = task + self.config.adapt.weight * align
        for name, value in (("loss", loss), ("task", task), ("align", align)):
            self.log(f"train/{name}", value, on_step=name == "loss", on_epoch=True, prog_bar=name == "loss", batch_size=len(y),
                     sync_dist=True)
        return loss

    @override
    def eval_outputs(self, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self.logits(x)
        return logits, y, self.loss_fn(logits, y)

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.logits(x).softmax(-1)

    @property
    @override
    def cached_input(self) -> bool:
        return self.embeddings_input

