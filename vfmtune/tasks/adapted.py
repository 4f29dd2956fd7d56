"""A LightningModule with an adapted backbone and a new head: what Classifier and Segmenter share.

It keeps the frozen parts frozen in train mode, exposes the backbone's optimizer groups (so that
progressive unfreezing adds them the same way), and builds the optimizer and schedule from the
config. Subclasses set `config`, `backbone` and `head`, and say which of the head's normalisations
see backbone features (`feature_norms`) and whether training reads cached features (`cached_input`):
then checkpoints name the frozen backbone by digest until training ends (`vfmtune.checkpoint`).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import nn
from typing_extensions import override

from vfmtune.adapt.freeze import is_frozen, keep_frozen_bn_eval
from vfmtune.checkpoint import FROZEN_WEIGHTS, complete_checkpoints, fill_frozen, strip_frozen
from vfmtune.choices import FinetuneMode
from vfmtune.config import Config
from vfmtune.embedding_cache import weights_digest
from vfmtune.optim import backbone_param_groups, build_optimizer, build_schedule, weight_decay_groups
from vfmtune.tasks.base import TaskModule


class AdaptedModule(TaskModule):
    """Backbone (frozen, partly trained, LoRA or progressive) + head, trained with the run's optimiser."""

    config: Config
    backbone: nn.Module
    head: nn.Module

    def feature_norms(self) -> list[nn.Module]:
        """The head's normalisation layers that see backbone features directly."""
        return [m for m in self.head.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    @override
    def train(self, mode: bool = True) -> AdaptedModule:
        if self.cached_input:
            # Training on cached features: the frozen backbone never runs and stays in eval mode. Skipping its
            # hundreds of modules, here and in eval() before each validation, keeps a linear head's epochs cheap.
            self.training = mode
            for child in self._around_backbone():
                child.train(mode)
            if self.backbone.training:
                self.backbone.eval()
            return self
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
            for m in self.feature_norms():
                m.eval()
        return self

    @override
    def on_validation_model_zero_grad(self) -> None:
        if not self.cached_input:
            return super().on_validation_model_zero_grad()
        for child in self._around_backbone():  # the frozen backbone holds no gradients: not its hundreds of parameters
            child.zero_grad()

    def _around_backbone(self) -> list[nn.Module]:
        """The child modules other than the backbone (the head, and what a task adds beside it)."""
        return [child for child in self.children() if child is not self.backbone]

    @property
    def cached_input(self) -> bool:
        """True when training batches hold cached backbone features (the backbone is frozen and never runs)."""
        return False

    def backbone_digest(self) -> str:
        """Digest of the backbone's weights; computed once, for a backbone that stays frozen (cached-embedding fits)."""
        if getattr(self, "_backbone_digest", None) is None:
            self._backbone_digest = weights_digest(self.backbone)
        return self._backbone_digest

    # Training on cached embeddings, checkpoints hold the head and name the frozen backbone by digest (writing its
    # 88 MB every epoch was most of a linear probe's time); the files are completed when training ends.
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.cached_input:
            strip_frozen(checkpoint, "backbone.", self.backbone_digest())

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if FROZEN_WEIGHTS in checkpoint:
            fill_frozen(checkpoint, self.backbone, self.backbone_digest())

    @override
    def on_train_end(self) -> None:
        if self.cached_input:
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
        groups = weight_decay_groups(self.head, o.lr, o.weight_decay) + self.backbone_param_groups()
        if getattr(self, "domain", None) is not None:  # DANN's domain classifier learns at the head's lr
            groups += weight_decay_groups(self.domain, o.lr, o.weight_decay)
        optimizer = build_optimizer(groups, o)
        return build_schedule(optimizer, self.config.sched, self, groups_join=self.progressive)
