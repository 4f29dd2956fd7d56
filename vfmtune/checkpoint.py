"""Atomic checkpoint writes (`vfmtune.io`), safe (weights_only) checkpoint loading, and checkpoints that name a
frozen module by digest while a head trains on cached embeddings."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from vfmtune.faults import fault_point
from vfmtune.io import atomic_path, torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic writes (Lightning's own writes the target file in place)."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
            fault_point(f"checkpoint_write_{Path(path).stem}")


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt`, rewritten at the end of the first and the final training epoch and of every epoch that ends
    `min_seconds` or more after the previous write, whatever the validation cadence (Lightning's own save_last
    only follows improvements of the monitored metric, which would resume runs from a stale epoch, and its
    epoch-end saves wait for validation epochs). `min_seconds=0`: every epoch."""

    def __init__(self, dirpath: str | os.PathLike, min_seconds: float = 0.0) -> None:
        super().__init__(dirpath=dirpath, filename="last", monitor=None, save_top_k=1, enable_version_counter=False,
                         save_on_train_epoch_end=True)
        self.min_seconds = min_seconds
        self.written_at: float | None = None

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = time.monotonic()
        due = self.written_at is None or now - self.written_at >= self.min_seconds
        if due or trainer.current_epoch + 1 == trainer.max_epochs or trainer.should_stop:
            super().on_train_epoch_end(trainer, pl_module)
            self.written_at = now


def resolve_checkpoint(ckpt: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory (its `checkpoints/best.ckpt`, else `last.ckpt`)."""
    path = Path(ckpt).expanduser()
    if path.is_dir():
        for name in ("best.ckpt", "last.ckpt"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
        raise FileNotFoundError(f"{path}: no checkpoints/best.ckpt or checkpoints/last.ckpt in this run directory.")
    if not path.is_file():
        raise FileNotFoundError(f"ckpt={ckpt}: no such file. Pass a .ckpt file or a run directory.")
    return path


def load_checkpoint(ckpt: str | os.PathLike) -> dict[str, Any]:
    """Load a vfmtune checkpoint with `weights_only=True` (no arbitrary pickles are executed)."""
    path = resolve_checkpoint(ckpt)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a vfmtune checkpoint ({type(e).__name__}: {e}).") from e
    if "hyper_parameters" not in checkpoint or "config" not in checkpoint["hyper_parameters"]:
        raise ValueError(f"{path}: not a vfmtune checkpoint (no hyper_parameters.config).")
    return checkpoint


# Checkpoints written while a head trains on cached embeddings name the frozen backbone by its weights digest
# instead of holding its tensors: DINOv2-S is 88 MB of an 88 MB checkpoint, and rewriting it unchanged every
# epoch (~0.2 s with fsync) was most of a 300-epoch linear probe. `complete_checkpoints` puts the tensors back
# when training ends, so finished runs leave self-contained files as before; a run stopped mid-way leaves a
# file that resumes and loads with the backbone rebuilt from its config, checked against the digest.
FROZEN_WEIGHTS = "vfmtune_frozen_weights"  # checkpoint key: {"prefix": "backbone.", "digest": ...}


def strip_frozen(checkpoint: dict[str, Any], prefix: str, digest: str) -> None:
    """Drop the `prefix` tensors (a frozen module's) from a checkpoint being saved; record their digest."""
    state = checkpoint["state_dict"]
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]
    checkpoint[FROZEN_WEIGHTS] = {"prefix": prefix, "digest": digest}


def fill_frozen(checkpoint: dict[str, Any], module: torch.nn.Module, digest: str) -> None:
    """Put `module`'s tensors back into a checkpoint that `strip_frozen` wrote (no-op for complete ones).

    Raises:
        ValueError: `module` holds other weights than the run that wrote the checkpoint.
    """
    ref = checkpoint.pop(FROZEN_WEIGHTS, None)
    if ref is None:
        return
    if ref["digest"] != digest:
        raise ValueError(f"This checkpoint was written by a run whose frozen {ref['prefix'].rstrip('.')} had weights "
                         f"{ref['digest']}; the one built from its config has {digest}. Rebuild it with the same weights "
                         "(backbone.weights / backbone.path), or resume that run to completion (its files are completed then).")
    checkpoint["state_dict"].update({ref["prefix"] + k: v for k, v in module.state_dict().items()})


def complete_checkpoints(paths: Iterable[str | os.PathLike], module: torch.nn.Module, digest: str) -> None:
    """Rewrite (atomically) each checkpoint file in `paths` that `strip_frozen` wrote, with `module`'s tensors."""
    for path in {Path(p) for p in paths if p}:
        if not path.is_file():
            continue
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if FROZEN_WEIGHTS in checkpoint:
            fill_frozen(checkpoint, module, digest)
            torch_save(checkpoint, path)
