"""Stratified k-fold cross-validation: persisted folds, mean ± std of metrics, and the fold ensemble.

`vfmtune cv folds=5` pools the train and val splits, cuts them into k stratified folds
(scikit-learn `StratifiedKFold`), trains one model per fold (that fold validates, the others
train) and keeps the test split held out for every fold. The run directory holds `folds.csv`,
`cv.json` (which marks it as a cv run), `fold_<i>/` (a full training run each) and `metrics.json`
with `<metric>/mean` and `<metric>/std` over folds plus `ensemble/test/...`: the fold models'
averaged probabilities scored on the test split.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from vfmtune.choices import ConfigError
from vfmtune.data.images import DataError
from vfmtune.io import atomic_path

CV_MARKER = "cv.json"


def make_folds(labels: Sequence[int], splits: Sequence[str], k: int, seed: int, classes: Sequence[str]) -> list[int]:
    """Fold index (0..k-1) per sample of train+val, -1 for test samples (held out of every fold).

    Raises:
        DataError: when k is larger than the smallest class of train+val (a fold would lack it).

    Example:
        >>> make_folds([0, 0, 1, 1], ["train"] * 4, k=2, seed=0, classes=["a", "b"])
        [1, 0, 0, 1]
    """
    if k < 2:
        raise ConfigError(f"folds={k}: cross-validation needs at least 2 folds, e.g. folds=5.")
    pool = [i for i, s in enumerate(splits) if s != "test"]
    y = np.asarray([labels[i] for i in pool])
    counts = np.bincount(y, minlength=len(classes))
    smallest = int(np.argmin(counts))
    if counts[smallest] < k:
        raise DataError(
            f"folds={k} is larger than the smallest class: '{classes[smallest]}' has {counts[smallest]} train+val "
            f"images, so some folds would have none of it. Fix: folds={max(int(counts[smallest]), 2)} or fewer, or add images."
        )
    folds = [-1] * len(labels)
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, held) in enumerate(skf.split(np.zeros(len(y)), y)):
        for j in held:
            folds[pool[j]] = fold
    return folds


def fold_splits(splits: Sequence[str], folds: Sequence[int], fold: int) -> list[str]:
    """The train/val/test assignment of one fold: that fold validates, the other folds train."""
    return ["test" if s == "test" else ("val" if f == fold else "train") for s, f in zip(splits, folds)]


def save_folds(path: str | os.PathLike, paths: Sequence[str], labels: Sequence[int], classes: Sequence[str], folds: Sequence[int]) -> None:
    """`path,label,fold` rows (fold = test for the held-out split), so the folds can be audited and reused."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "fold"])
        writer.writerows((p, classes[y], "test" if k < 0 else k) for p, y, k in zip(paths, labels, folds))


def aggregate(fold_metrics: Sequence[dict[str, Any]]) -> dict[str, float]:
    """`<key>/mean` and `<key>/std` (population std over folds) of every scalar metric."""
    out: dict[str, float] = {}
    keys = [k for k, v in fold_metrics[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool) and "/" in k]
    for key in keys:
        values = np.asarray([m[key] for m in fold_metrics if key in m], dtype=float)
        out[f"{key}/mean"] = float(values.mean())
        out[f"{key}/std"] = float(values.std())
    return out


def is_cv_run(path: str | os.PathLike) -> bool:
    return (Path(path).expanduser() / CV_MARKER).is_file()


def fold_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The fold run directories of a cv run, from its `cv.json`."""
    root = Path(run_dir).expanduser()
    info = json.loads((root / CV_MARKER).read_text())
    return [root / d for d in info["fold_runs"]]
