"""Where vfmtune keeps what it derives once and reuses: converted weights, embeddings, splits."""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from pathlib import Path


def cache_dir(configured: str | None = None) -> Path:
    """vfmtune's cache folder, created on demand.

    `configured` (a run's `cache_dir` setting) if given, else `$VFMTUNE_CACHE`, else
    `$XDG_CACHE_HOME/vfmtune` (default `~/.cache/vfmtune`).

    Example:
        >>> cache_dir().is_dir()
        True
    """
    root = configured or os.environ.get("VFMTUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "vfmtune"
    return _usable(Path(root).expanduser())


@functools.lru_cache(maxsize=8)
def _usable(path: Path) -> Path:
    """`path`, or (once, with a warning) a temporary folder when `path` cannot be created or written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return path
    except OSError as e:
        fallback = Path(tempfile.mkdtemp(prefix="vfmtune-cache-"))
        warnings.warn(f"cache folder {path} is not writable ({e.strerror or e}); this run caches in {fallback}, "
                      "which later runs will not reuse. Fix: set VFMTUNE_CACHE or cache_dir= to a writable folder.",
                      stacklevel=3)
        return fallback
