"""Image classification: a timm backbone plus a new head, as a LightningModule."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from timm.optim import create_optimizer_v2
from timm.optim._param_groups import param_groups_weight_decay
from torch import nn
from typing_extensions import override

from vfmtune.adapt.freeze import apply_finetune, is_frozen, keep_frozen_bn_eval
from vfmtune.adapt.layer_decay import backbone_param_groups
from vfmtune.backbones import create_backbone
from vfmtune.config import ConfigError
from vfmtune.losses import build_loss
from vfmtune.tasks.base import ClassificationTask

SCHEDULERS = ("cosine", "step", "onecycle", "none")


def build_head(in_features: int, num_classes: int, cfg: dict[str, Any]) -> nn.Sequential:
    """Linear or MLP head over pooled backbone features of shape [B, in_features] -> logits [B, C]."""
    layers: list[nn.Module] = []
    if cfg.get("feature_norm", False):
        layers.append(nn.BatchNorm1d(in_features, affine=False))
    if cfg["type"] == "mlp":
        layers += [nn.Linear(in_features, cfg["hidden_dim"]), nn.GELU(), nn.Dropout(cfg["dropout"])]
        layers.append(nn.Linear(cfg["hidden_dim"], num_classes))
    elif cfg["type"] == "linear":
        layers += [nn.Dropout(cfg["dropout"]), nn.Linear(in_features, num_classes)]
    else:
        raise ConfigError(f"head.type={cfg['type']!r} is not one of linear, mlp.")
    return nn.Sequential(*layers)


class Classifier(ClassificationTask):
    """Backbone + head, trained with the run's optimiser, schedule and loss.

    Args:
        config: the run's config as plain Python types (see `vfmtune.config.Config`); stored in the
            checkpoint so that it loads with `torch.load(weights_only=True)`.
        classes: class names, index = label.
        load_weights: build the backbone with its configured weights; False when a checkpoint's
            state dict is about to replace them anyway (no hub or packaged lookup then).
        class_counts: training images per class (for class-weighted losses and logit adjustment);
            stored as a plain list so the checkpoint rebuilds the same loss.

    Example:
        >>> model = Classifier(to_container(Config()), ["ok", "defect"])
        >>> logits = model(torch.randn(2, 3, 224, 224))  # [2, 2]
    """

    def __init__(
        self,
        config: dict[str, Any],
        classes: Sequence[str],
        load_weights: bool = True,
        class_counts: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        counts = None if class_counts is None else [int(n) for n in class_counts]
        self.save_hyperparameters({"config": config, "classes": list(classes), "class_counts": counts})
        self.config = config
        self.classes = list(classes)
        b = config["backbone"]
        self.backbone = create_backbone(
            b["name"],
            weights=b["weights"] if load_weights else "none",
            path=b["path"],
            img_size=b["img_size"],
            drop_path_rate=b["drop_path_rate"],
            global_pool=b["global_pool"],
        )
        ft = config["finetune"]
        apply_finetune(self.backbone, ft["mode"], ft["n_blocks"], ft["freeze"], ft["unfreeze"])
        if ft.get("grad_checkpointing"):
            try:  # before peft wraps the model: timm's forward_features reads the flag on the model itself
                self.backbone.set_grad_checkpointing(True)
            except (AssertionError, NotImplementedError) as e:
                raise ConfigError(f"finetune.grad_checkpointing=true: {b['name']} does not support it in timm ({e}).") from e
        if ft["mode"] == "lora":
            from vfmtune.adapt.lora import apply_lora

            self.backbone = apply_lora(self.backbone, ft)
        self.head = build_head(self.backbone.num_features, len(self.classes), config["head"])
        self.class_counts = counts
        # Without counts (a model built by hand, not by `vfmtune.train`) classes count as equal.
        self.loss_fn = build_loss(config["loss"], counts or [1] * len(self.classes))
        # True when batches hold cached backbone embeddings [B, D] instead of images [B, 3, H, W].
        self.embeddings_input = False
        self.init_metrics(self.classes)

    @override
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> logits [B, num_classes]."""
        return self.head(self.backbone(images))

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(inputs) if self.embeddings_input else self(inputs)

    @override
    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        # A frozen backbone stays in eval mode: dropout / drop-path / BN statistics must not change
        # features that are meant to be fixed (and that the embedding cache assumes are).
        if mode and is_frozen(self.backbone):
            self.backbone.eval()
        elif mode and not self.config["finetune"].get("train_bn", False):
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

    @property
    def progressive(self) -> bool:
        """True when a progressive unfreezing schedule adds param groups during training."""
        ft = self.config["finetune"]
        return ft["mode"] == "progressive" or bool(ft.get("schedule")) or bool(ft.get("every"))

    def backbone_param_groups(self, only: Any = None) -> list[dict[str, Any]]:
        """Trainable backbone parameters as optimizer groups: lr = optim.lr x backbone_lr_scale, decayed
        by depth when optim.layer_decay is set (progressive unfreezing adds groups the same way)."""
        o = self.config["optim"]
        return backbone_param_groups(
            self.backbone, o["lr"] * o["backbone_lr_scale"], o["weight_decay"], o.get("layer_decay"), only
        )

    @override
    def configure_optimizers(self) -> OptimizerLRSchedulerConfig | torch.optim.Optimizer:
        o, s = self.config["optim"], self.config["sched"]
        # Norms, biases, tokens and position embeddings get no weight decay (timm's grouping).
        groups = [{**g, "lr": o["lr"]} for g in param_groups_weight_decay(self.head, o["weight_decay"])]
        groups += self.backbone_param_groups()
        groups = [{**g, "peak_lr": g["lr"]} for g in groups if g["params"]]
        optimizer = create_optimizer_v2(groups, opt=o["name"], lr=o["lr"], weight_decay=o["weight_decay"], momentum=o["momentum"])
        if s["name"] not in SCHEDULERS:
            raise ConfigError(f"sched.name={s['name']!r} is not one of {', '.join(SCHEDULERS)}.")
        if s["name"] == "none":
            # Constant lrs; groups that progressive unfreezing adds still warm up from their join step.
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": GroupCosineLR(optimizer, 0, 1, 1.0, flat=True), "interval": "step"}} if self.progressive else optimizer
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        per_epoch = max(total // max(self.trainer.max_epochs or 1, 1), 1)
        if s["name"] == "step":
            sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=s["step_epochs"], gamma=s["gamma"])
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        if s["name"] == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total, pct_start=s["pct_start"]
            )
        else:
            sched = GroupCosineLR(optimizer, int(s["warmup_epochs"] * per_epoch), total, s["min_lr_ratio"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def cosine_with_warmup(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to `min_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class GroupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """Warm-up + cosine (or flat) lr per param group, from each group's own `peak_lr`.

    Unlike `LambdaLR`, groups added during training (progressive unfreezing) follow the same schedule,
    each with its own linear warm-up from the step it joined (`join_step`, `warmup_steps` keys). All
    state is plain numbers in the param groups and here, so it resumes from a weights_only checkpoint.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float, flat: bool = False) -> None:
        self.warmup_steps, self.total_steps, self.min_ratio, self.flat = warmup_steps, total_steps, min_ratio, flat
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        return 1.0 if self.flat else cosine_with_warmup(self.warmup_steps, self.total_steps, self.min_ratio)(step)

    @override
    def get_lr(self) -> list[float]:
        step = max(self.last_epoch, 0)
        lrs = []
        for g in self.optimizer.param_groups:
            warm = 1.0
            if g.get("warmup_steps"):
                warm = min(1.0, (step - g["join_step"] + 1) / (g["warmup_steps"] + 1))
            lrs.append(g["peak_lr"] * self.factor(step) * warm)
        return lrs
