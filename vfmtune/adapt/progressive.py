"""Progressive unfreezing: a Lightning `BaseFinetuning` callback driven by a readable schedule.

`finetune.schedule={0: head, 2: blocks.8-11, 4: all}` or `finetune.every=2 finetune.step=4` (4 more
blocks, last first, every 2 epochs). Newly unfrozen groups join the optimizer with lr = optim.lr x
optim.backbone_lr_scale (x layer_decay**depth when optim.layer_decay is set) and warm up linearly over
`finetune.warmup_epochs`. Fixes two known failures of Lightning's BackboneFinetuning: on resume the
groups unfrozen before the checkpoint get `requires_grad` back (Lightning #21901), and under DDP the
gradients of groups unfrozen after the model was wrapped are averaged across processes.
"""

from __future__ import annotations

import re
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from torch.optim import Optimizer
from typing_extensions import override

from vfmtune.adapt.freeze import named_groups, param_table
from vfmtune.backbones import timm_model
from vfmtune.choices import ConfigError, SchedName
from vfmtune.config import Config, FinetuneConfig
from vfmtune.optim import optimizer_steps_per_epoch

_RANGE = re.compile(r"^(\w+)\.(\d+)-(\d+)$")


def _expand(token: str, labels: list[str], epoch: int) -> list[str]:
    m = _RANGE.match(token)
    names = [f"{m.group(1)}.{i}" for i in range(int(m.group(2)), int(m.group(3)) + 1)] if m else [token]
    if token == "all":
        names = ["all"]
    blocks = [lb for lb in labels if "." in lb]
    valid = f"head, all, {', '.join(lb for lb in labels if '.' not in lb)}"
    if blocks:
        valid += f", {blocks[0]}..{blocks[-1]} (or ranges like {blocks[-1].split('.')[0]}.A-B)"
    for name in names:
        if name not in labels and name not in ("head", "all"):
            raise ConfigError(f"finetune.schedule[{epoch}]: unknown group {name!r}. Valid names: {valid}.")
    return names


def resolve_schedule(cfg: FinetuneConfig, backbone: torch.nn.Module) -> dict[int, list[str]]:
    """`finetune.schedule` or `every`/`step` -> {epoch: [group labels]}, validated against the backbone.

    Raises ConfigError for unknown names, epochs out of order or negative, and groups that are
    already trainable when their turn comes (listed twice, after "all", or trainable from the start).
    """
    labels = list(named_groups(backbone))
    sched, every, step = cfg.schedule, int(cfg.every or 0), int(cfg.step or 0)
    if not sched and (every or step):  # an explicit schedule takes precedence over every/step
        if every < 1 or step < 1:
            raise ConfigError(f"finetune.every={every} and finetune.step={step} must both be >= 1.")
        blocks = [lb for lb in labels[1:] if re.match(r"^(blocks|layers?|stages?)\.?\d+$", lb)]
        tail = labels[1 + len(blocks):]
        sched, k = {0: "head"}, 1
        while blocks:
            chunk, blocks = blocks[-step:], blocks[:-step]
            sched[k * every] = ",".join(chunk + (tail if k == 1 else []) + ([] if blocks else ["stem"]))
            k += 1
    if not sched:
        raise ConfigError("finetune=progressive needs finetune.schedule={0: head, 2: blocks.8-11, 4: all} "
                          "or finetune.every=K finetune.step=N.")
    params = dict(timm_model(backbone).named_parameters())
    groups = named_groups(backbone)
    trainable = {lb for lb, names in groups.items() if all(params[n].requires_grad for n in names)}
    out: dict[int, list[str]] = {}
    last = -1
    for epoch, spec in dict(sched).items():
        if not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"finetune.schedule key {epoch!r} must be an epoch number >= 0.")
        if epoch <= last:
            raise ConfigError(f"finetune.schedule epochs are out of order: {epoch} comes after {last}. Write them in increasing order.")
        last = epoch
        tokens = [t.strip() for t in (spec if isinstance(spec, (list, tuple)) else str(spec).split(",")) if t.strip()]
        names: list[str] = []
        for token in tokens:
            names += _expand(token, labels, epoch)
        if "head" in names and epoch != 0:
            raise ConfigError(f"finetune.schedule[{epoch}]: the head trains from epoch 0; list it at 0 or not at all.")
        names = [n for n in names if n != "head"]
        if "all" in names:
            names = [lb for lb in labels if lb not in trainable] or ["all"]
        for name in names:
            if name in trainable:
                raise ConfigError(f"finetune.schedule[{epoch}]: {name!r} is already trainable at that point (listed earlier, "
                                  "after 'all', or trained by finetune.mode).")
            trainable.add(name)
        if names:
            out[epoch] = names
    return out


class ProgressiveUnfreezing(BaseFinetuning):
    """Unfreeze backbone groups at the scheduled epochs; resumable and DDP-safe.

    Args:
        schedule: {epoch: [group labels]} from `resolve_schedule` (finetune.schedule wins over every/step).
        warmup_epochs: linear lr warm-up of each newly added group.

    Example:
        >>> cb = ProgressiveUnfreezing(resolve_schedule(FinetuneConfig(schedule={0: "head", 2: "blocks.4-5"}), model.backbone))
        >>> L.Trainer(callbacks=[cb]).fit(model, datamodule=data)
    """

    def __init__(self, schedule: dict[int, list[str]], warmup_epochs: float = 1.0) -> None:
        super().__init__()
        self.schedule = {int(k): list(v) for k, v in schedule.items()}
        self.warmup_epochs = warmup_epochs
        self.applied: list[int] = []  # scheduled epochs already carried out (saved in checkpoints)
        self._synced_by_ddp: set[int] | None = None

    @property
    @override
    def state_key(self) -> str:
        return "vfmtune.ProgressiveUnfreezing"  # stable: kwargs must not change the key (resume finds it)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "applied": list(self.applied)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.applied = [int(e) for e in state_dict.get("applied", [])]

    def _params(self, pl_module: L.LightningModule, epoch: int) -> list[torch.nn.Parameter]:
        groups = named_groups(pl_module.backbone)
        params = dict(timm_model(pl_module.backbone).named_parameters())
        return [params[n] for label in self.schedule[epoch] for n in groups[label]]

    @override
    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        # The Classifier already froze the backbone (finetune.mode); epoch 0's groups start trainable
        # so that they are in the optimizer from the first step.
        if 0 in self.schedule:
            for p in self._params(pl_module, 0):
                p.requires_grad_(True)
            if 0 not in self.applied:
                self.applied.append(0)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Parameters trainable now are the ones DDP (already wrapped by this hook) reduces itself.
        self._synced_by_ddp = {id(p) for p in pl_module.parameters() if p.requires_grad}
        super().on_fit_start(trainer, pl_module)  # restores the optimizer's param groups on resume
        for epoch in self.applied:  # ... and here requires_grad, which Lightning forgets (#21901)
            for p in self._params(pl_module, epoch):
                p.requires_grad_(True)

    @override
    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        if epoch not in self.schedule or epoch in self.applied:
            return
        new = [p for p in self._params(pl_module, epoch) if not p.requires_grad]
        for p in new:
            p.requires_grad_(True)
        trainer = pl_module.trainer
        per_epoch = optimizer_steps_per_epoch(trainer)
        for g in pl_module.backbone_param_groups(only=new):
            # GroupCosineLR reads these keys: each group ramps up from the step it joined.
            g.update(peak_lr=g["lr"], join_step=trainer.global_step, warmup_steps=int(self.warmup_epochs * per_epoch))
            g["lr"] = g["peak_lr"] / (g["warmup_steps"] + 1) if g["warmup_steps"] else g["peak_lr"]
            optimizer.add_param_group(g)
        self.applied.append(epoch)
        if trainer.is_global_zero:
            print(f"epoch {epoch}: unfroze {', '.join(self.schedule[epoch])} ({sum(p.numel() for p in new):,} parameters)")
            print(param_table(pl_module.backbone, pl_module.head))

    @override
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # DDP only reduces gradients of parameters that required grad when it wrapped the model;
        # average the later-unfrozen ones here so all processes take the same step.
        if trainer.world_size < 2 or self._synced_by_ddp is None or not torch.distributed.is_initialized():
            return
        grads = [p.grad for p in pl_module.parameters() if p.requires_grad and id(p) not in self._synced_by_ddp and p.grad is not None]
        if grads:
            flat = torch._utils._flatten_dense_tensors(grads)
            torch.distributed.all_reduce(flat)
            flat /= trainer.world_size
            for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)


def progressive_callback(cfg: Config, model: Any) -> ProgressiveUnfreezing | None:
    """The run's unfreezing callback, or None; validates the schedule before training starts."""
    if not model.progressive:
        return None
    if cfg.sched.name not in (SchedName.cosine, SchedName.none):
        raise ConfigError(f"Progressive unfreezing needs sched=cosine or sched=none (per-group warm-up), not sched={cfg.sched.name}.")
    return ProgressiveUnfreezing(resolve_schedule(cfg.finetune, model.backbone), cfg.finetune.warmup_epochs)
