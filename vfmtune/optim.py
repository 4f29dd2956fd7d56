"""Optimizers and lr schedules, shared by every task: timm's parameter groups and optimizer factory.

Norms, biases, tokens and position embeddings get no weight decay (timm's rules plus the model's
`no_weight_decay()`); backbone groups get `optim.lr x optim.backbone_lr_scale`, decayed by depth
with `optim.layer_decay` (BEiT, https://arxiv.org/abs/2106.08254, via timm's
`param_groups_layer_decay`). Schedules step per batch; `GroupCosineLR` lets groups that join
during training (progressive unfreezing) warm up from the step they joined.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from typing import Any

import lightning as L
import torch
from timm.optim import create_optimizer_v2
from timm.optim._param_groups import param_groups_layer_decay, param_groups_weight_decay
from torch import nn
from typing_extensions import override

from vfmtune.backbones import timm_model
from vfmtune.choices import ConfigError, SchedName
from vfmtune.config import OptimConfig, SchedConfig


def weight_decay_groups(module: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """`module`'s trainable parameters in timm's two groups (decay / no decay), each with `lr`."""
    return [{**g, "lr": lr} for g in param_groups_weight_decay(module, weight_decay) if g["params"]]


def backbone_param_groups(
    backbone: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float | None = None,
    only: Collection[nn.Parameter] | None = None,
) -> list[dict[str, Any]]:
    """Trainable backbone parameters as optimizer groups, each with an explicit `lr`.

    Args:
        backbone: a timm model, or a peft model wrapping one.
        lr: the backbone's base lr (the top layer's lr under layer decay).
        weight_decay: for weights that decay.
        layer_decay: e.g. 0.75: the lr of each layer is scaled by `layer_decay ** depth_below_top`;
            None for a flat lr.
        only: keep only these parameters (progressive unfreezing adds groups for the new ones).

    Example:
        >>> groups = backbone_param_groups(vit, lr=1e-4, weight_decay=0.05, layer_decay=0.75)
        >>> [round(g["lr"] / 1e-4, 3) for g in groups][:2]  # stem first: 0.75 ** 13 ...
    """
    model = timm_model(backbone)
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ConfigError(f"optim.layer_decay={layer_decay} must be in (0, 1]; 0.65-0.85 is usual for ViTs.")
    nwd = set(getattr(model, "no_weight_decay", lambda: set())())
    if layer_decay is None:
        groups = [{**g, "lr_scale": 1.0} for g in param_groups_weight_decay(model, weight_decay, no_weight_decay_list=nwd)]
    else:
        groups = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=nwd, layer_decay=layer_decay)
    keep = None if only is None else {id(p) for p in only}
    out = []
    for g in groups:
        params = [p for p in g["params"] if keep is None or id(p) in keep]
        if params:
            # torch optimizers ignore timm's "lr_scale" key; the lr itself carries it.
            out.append({"params": params, "weight_decay": g["weight_decay"], "lr": lr * g["lr_scale"]})
    return out


def build_optimizer(groups: Sequence[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """timm's optimizer factory over explicit groups; each group keeps its `lr` as `peak_lr` for the schedules."""
    groups = [{**g, "peak_lr": g["lr"]} for g in groups if g["params"]]
    return create_optimizer_v2(groups, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)


def optimizer_steps(trainer: L.Trainer) -> int:
    """The run's length in optimizer steps: Lightning's estimate in batches, times the steps in each batch when a
    batch is a whole epoch of cached embeddings (`vfmtune.data.datamodule.EpochBatches`)."""
    return max(int(trainer.estimated_stepping_batches), 1) * getattr(trainer.train_dataloader, "steps_per_item", 1)


def optimizer_steps_per_epoch(trainer: L.Trainer) -> int:
    return max(optimizer_steps(trainer) // max(trainer.max_epochs or 1, 1), 1)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: SchedConfig, module: L.LightningModule,
                   groups_join: bool = False) -> dict[str, Any] | torch.optim.Optimizer:
    """What `configure_optimizers` returns for `sched.name`.

    Args:
        optimizer: from `build_optimizer`.
        cfg: the `sched` section.
        module: the LightningModule; its trainer gives the run's length in steps and epochs.
        groups_join: parameter groups are added during training (progressive unfreezing, which allows
            only cosine and none): `GroupCosineLR` then warms each new group up from its join step.
    """
    if cfg.name == SchedName.none and not groups_join:
        return optimizer
    total, per_epoch = optimizer_steps(module.trainer), optimizer_steps_per_epoch(module.trainer)
    if cfg.name == SchedName.none:
        # Constant lrs; groups that progressive unfreezing adds still warm up from their join step.
        sched: Any = GroupCosineLR(optimizer, 0, 1, 1.0, flat=True)
    elif cfg.name == SchedName.step:
        sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_epochs, gamma=cfg.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
    elif cfg.name == SchedName.onecycle:
        sched = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total, pct_start=cfg.pct_start
        )
    else:
        sched = GroupCosineLR(optimizer, int(cfg.warmup_epochs * per_epoch), total, cfg.min_lr_ratio)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def cosine_with_warmup(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
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

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float,
                 flat: bool = False) -> None:
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
