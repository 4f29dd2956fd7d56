"""Per-process record of what trains: proof that every DDP rank unfroze the same groups and holds
the same weights. Add it as `callbacks=[{_target_: vfmtune.adapt.audit.TrainableAudit, path: DIR}]`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class TrainableAudit(Callback):
    """Append one JSON line per epoch and process to `DIR/trainable_rank{R}.jsonl`: the epoch, the
    trainable parameter names' digest and count, the optimizer's lrs, and a digest of all weights.

    Example:
        >>> vfmtune.train(overrides=["trainer=ddp_cpu", "finetune=progressive",
        ...     "callbacks=[{_target_: vfmtune.adapt.audit.TrainableAudit, path: audit}]"])
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, when: str) -> None:
        names = sorted(n for n, p in pl_module.named_parameters() if p.requires_grad)
        h = hashlib.sha256()
        for _, t in sorted(pl_module.state_dict().items()):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        row = {
            "when": when,
            "epoch": trainer.current_epoch,
            "rank": trainer.global_rank,
            "trainable": hashlib.sha256("\n".join(names).encode()).hexdigest()[:16],
            "n_trainable": len(names),
            "lrs": [round(g["lr"], 12) for g in trainer.optimizers[0].param_groups] if trainer.optimizers else [],
            "weights": h.hexdigest()[:16],
        }
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / f"trainable_rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, pl_module, "epoch_start")  # after this epoch's unfreezing (callback order)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, pl_module, "train_end")
