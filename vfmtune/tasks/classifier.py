"""Image classification: a timm backbone plus a new head, as a LightningModule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import nn
from typing_extensions import override

from vfmtune.adapt.freeze import apply_finetune, is_frozen, keep_frozen_bn_eval
from vfmtune.adapt.lora import apply_lora
from vfmtune.backbones import create_backbone
from vfmtune.checkpoint import FROZEN_WEIGHTS, complete_checkpoints, fill_frozen, strip_frozen
from vfmtune.config import Config, ConfigError, FinetuneMode, HeadConfig, HeadType, to_container, typed
from vfmtune.embedding_cache import weights_digest
from vfmtune.losses import build_loss
from vfmtune.metrics import ClassMetrics
from vfmtune.optim import backbone_param_groups, build_optimizer, build_schedule, weight_decay_groups
from vfmtune.tasks.base import TaskModule


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


def build_classification_backbone(config: Config, load_weights: bool = True) -> nn.Module:
    """The configured backbone with its finetune mode applied: frozen / trainable parameters, gradient
    checkpointing, LoRA adapters (peft) — what every task that fine-tunes a backbone starts from."""
    b, ft = config.backbone, config.finetune
    backbone = create_backbone(b.name, weights=str(b.weights) if load_weights else "none", path=b.path, img_size=b.img_size,
                               drop_path_rate=b.drop_path_rate, global_pool=b.global_pool)
    apply_finetune(backbone, ft.mode, ft.n_blocks, ft.freeze, ft.unfreeze)
    if ft.grad_checkpointing:
        try:  # before peft wraps the model: timm's forward_features reads the flag on the model itself
            backbone.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError) as e:
            raise ConfigError(f"finetune.grad_checkpointing=true: {b.name} does not support it in timm ({e}).") from e
    if ft.mode == FinetuneMode.lora:
        backbone = apply_lora(backbone, ft)
    return backbone


class Classifier(TaskModule):
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
        self.backbone = build_classification_backbone(config, load_weights)
        self.head = build_head(self.backbone.num_features, len(classes), config.head)
        self.class_counts = counts
        # Without counts (a model built by hand, not by `vfmtune.train`) classes count as equal.
        self.loss_fn = build_loss(config.loss, counts or [1] * len(classes))
        # True when batches hold cached backbone embeddings [B, D] instead of images [B, 3, H, W].
        self.embeddings_input = False
        self._backbone_digest: str | None = None
        self.init_eval(ClassMetrics(), classes)

    @override
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> logits [B, num_classes]."""
        return self.head(self.backbone(images))

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(inputs) if self.embeddings_input else self(inputs)

    @override
    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        # A frozen backbone stays in eval mode: dropout / drop-path / BN statistics must not change
        # features that are meant to be fixed (and that the embedding cache assumes are).
        if mode and is_frozen(self.backbone):
            self.backbone.eval()
        elif mode and not self.config.finetune.train_bn:
            keep_frozen_bn_eval(self.backbone)  # partly frozen: frozen BatchNorms keep their statistics
        if mode and (self.progressive or not is_frozen(self.backbone)):
            # Features that move with the backbone leave the head's running statistics behind, and eval then
            # normalises with stale ones (DINOv2-S: one lr-1e-5 backbone step dropped val macro-F1 from 0.72
            # to 0.14; 0.61 with re-estimated statistics). So the head's feature norm stays a fixed map: the
            # probe's statistics with finetune.head_from, else the identity. It trains only on fixed features.
            for m in self.head.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self.logits(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
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

    def backbone_digest(self) -> str:
        """Digest of the backbone's weights; computed once, for a backbone that stays frozen (cached-embedding fits)."""
        if self._backbone_digest is None:
            self._backbone_digest = weights_digest(self.backbone)
        return self._backbone_digest

    # Training on cached embeddings, checkpoints hold the head and name the frozen backbone by digest (writing its
    # 88 MB every epoch was most of a linear probe's time); the files are completed when training ends.
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.embeddings_input:
            strip_frozen(checkpoint, "backbone.", self.backbone_digest())

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if FROZEN_WEIGHTS in checkpoint:
            fill_frozen(checkpoint, self.backbone, self.backbone_digest())

    @override
    def on_train_end(self) -> None:
        if self.embeddings_input:
            trainer = self.trainer
            if trainer.is_global_zero:
                paths = [p for cb in trainer.checkpoint_callbacks
                         for p in (cb.best_model_path, cb.last_model_path, *getattr(cb, "best_k_models", {}))]
                complete_checkpoints(paths, self.backbone, self.backbone_digest())
            trainer.strategy.barrier("vfmtune-complete-checkpoints")  # validate/test then load the complete files

    @property
    def progressive(self) -> bool:
        """True when a progressive unfreezing schedule adds param groups during training."""
        ft = self.config.finetune
        return ft.mode == FinetuneMode.progressive or bool(ft.schedule) or bool(ft.every)

    def backbone_param_groups(self, only: Any = None) -> list[dict[str, Any]]:
        """Trainable backbone parameters as optimizer groups: lr = optim.lr x backbone_lr_scale, decayed
        by depth when optim.layer_decay is set (progressive unfreezing adds groups the same way)."""
        o = self.config.optim
        return backbone_param_groups(self.backbone, o.lr * o.backbone_lr_scale, o.weight_decay, o.layer_decay, only)

    @override
    def configure_optimizers(self) -> OptimizerLRSchedulerConfig | torch.optim.Optimizer:
        o = self.config.optim
        optimizer = build_optimizer(weight_decay_groups(self.head, o.lr, o.weight_decay) + self.backbone_param_groups(), o)
        return build_schedule(optimizer, self.config.sched, self, groups_join=self.progressive)
