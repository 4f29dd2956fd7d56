"""Where vfmtune keeps what it derives once and reuses: converted weights, embeddings, splits."""

from __future__ import annotations

import os
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
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
