"""Atomic checkpoint writes and safe (weights_only) checkpoint loading."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file in the same folder, fsync, then `os.replace`.

    A crash or Ctrl-C mid-write leaves the previous file intact: readers see the old or the new
    checkpoint, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic writes (Lightning's own writes the target file in place)."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        atomic_torch_save(checkpoint, path)


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
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{path}: cannot be read as a vfmtune checkpoint ({type(e).__name__}: {e}).") from e
    if "hyper_parameters" not in checkpoint or "config" not in checkpoint["hyper_parameters"]:
        raise ValueError(f"{path}: not a vfmtune checkpoint (no hyper_parameters.config).")
    return checkpoint
