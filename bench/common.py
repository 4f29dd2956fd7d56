"""Shared helpers for the benchmarks: results files and stratified subsets of the textile set."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def write_results(name: str, figures: dict) -> Path:
    """Flat JSON with the figures plus the command, date, torch version and machine that produced them."""
    RESULTS.mkdir(exist_ok=True)
    data = {
        **figures,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    print(json.dumps(data, indent=2, sort_keys=True))
    return path


def textile_subset_manifest(path: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """A CSV manifest with the first-N (seeded shuffle) images of each textile class."""
    import vfmtune

    return Path(vfmtune.subsample(path, "textile", per_class=per_class, seed=seed)["manifest"])
