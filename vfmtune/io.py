"""One way to write a file: readers see the old file or the new one, never half of one.

Every file vfmtune writes that a later run reads (checkpoints, caches, splits, metrics, converted
weights, predictions) goes through `atomic_path`: the content goes to a temporary file in the same
folder, is flushed to disk, and only then renamed over the target. A crash, a kill or a full disk
mid-write leaves the previous file intact; a full disk or an I/O error stops with `DiskError` (the
path, the free space, the fix) and no temporary file behind, and the temporary file of a writer
that was killed is swept away by the next write of the same file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Errors of the storage, not of the program: the user fixes them by freeing space or moving the folder.
_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS}


class DiskError(OSError):
    """A write failed for lack of space or an I/O error; the message names the file, the free space and the fix."""


def _storage_error(target: Path, error: OSError) -> DiskError:
    try:
        free = f"{shutil.disk_usage(target.parent).free / 2**20:,.0f} MB free there"
    except OSError:
        free = "free space unknown"
    return DiskError(error.errno, f"could not write {target}: {error.strerror or error} ({free}). "
                     f"The previous {target.name}, if any, is intact and no partial file was left. Fix: free disk "
                     "space or write elsewhere (hydra.run.dir=..., cache_dir=...), then run again (ckpt=.../last.ckpt resumes).")


def _sweep_stale(target: Path) -> None:
    """Delete temporary files of `target` left by writers that no longer run (killed mid-write)."""
    for tmp in target.parent.glob(f".{target.name}.*.tmp"):
        pid = tmp.name[len(target.name) + 2 :].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


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
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise (_storage_error(target, e) if e.errno in _STORAGE_ERRORS else e) from None
    _sweep_stale(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
        _fsync_folder(target.parent)
    except OSError as e:
        if e.errno in _STORAGE_ERRORS:
            raise _storage_error(target, e) from e
        raise
    except RuntimeError as e:  # torch.save wraps the OS error of a failed write in a RuntimeError
        cause = e.__cause__ or e.__context__
        if isinstance(cause, OSError) and cause.errno in _STORAGE_ERRORS:
            raise _storage_error(target, cause) from e
        raise
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


def file_digest(path: str | os.PathLike[str]) -> bytes:
    """sha256 of a file's bytes (content identity: renamed files match, edited ones do not)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.digest()


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
