"""Atomic checkpoint writes (`vfmtune.io`) and safe (weights_only) checkpoint loading."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from vfmtune.faults import fault_point
from vfmtune.io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic writes (Lightning's own writes the target file in place)."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
            fault_point(f"checkpoint_write_{Path(path).stem}")


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
