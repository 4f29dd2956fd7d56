"""One way to write a file: readers see the old file or the new one, never half of one.

Every file vfmtune writes that a later run reads (checkpoints, caches, splits, metrics, converted
weights, predictions) goes through `atomic_path`: the content goes to a temporary file in the same
folder, is flushed to disk, and only then renamed over the target. A crash, a kill or a full disk
mid-write leaves the previous file intact and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path next to `path`; write it with any library, and on a clean exit it
    replaces `path` atomically (fsync of the file, `os.replace`, fsync of the folder).

    Args:
        path: the file to (re)place; its folder is created.
        mode: permission bits of the result (a shared cache stays readable like any download).

    Example:
        >>> with atomic_path("cache/weights.safetensors") as tmp:  # doctest: +SKIP
        ...     safetensors.torch.save_file(tensors, tmp)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
        _fsync_folder(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open a folder: the rename is still atomic
        return
    try:
        os.fsync(fd)  # makes the rename itself durable
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomic `Path.write_text` (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Atomic JSON write, indented with sorted keys (diff-friendly run reports)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """Atomic `torch.save`."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
