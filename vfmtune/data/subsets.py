"""Smaller or harsher versions of a dataset, written as CSV manifests (`data.manifest=...`).

Notebooks, benchmarks and tests need "the same data, but less of it" (a 60-image smoke subset, a
stated full-size subset that fits a CPU budget) and "the same data, made imbalanced" (every defect
class cut to 1/20 of the majority in training and validation, the test split untouched so scores
stay comparable). Both are a manifest the ordinary `data.manifest` source reads: nothing else in the
pipeline knows the data was subsampled.
"""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vfmtune.data.images import DataError
from vfmtune.data.sources import SPLIT_NAMES, SampleTable, from_imagefolder, from_manifest, packaged_dataset
from vfmtune.data.splits import stratified_split
from vfmtune.io import atomic_path


def _table(data: str | os.PathLike[str]) -> SampleTable:
    """A packaged dataset name ("textile"), an ImageFolder or a CSV manifest."""
    source = Path(data)
    if source.suffix.lower() == ".csv":
        return from_manifest(source)
    if source.is_dir():
        return from_imagefolder(source)
    return from_imagefolder(packaged_dataset(str(data)))


def subsample(
    path: str | os.PathLike[str],
    data: str | os.PathLike[str] = "textile",
    *,
    per_class: int | Mapping[str, int] | None = None,
    exclude: str | os.PathLike[str] | None = None,
    ratio: float | None = None,
    majority: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Write a CSV manifest (`path,label[,split]`) holding a seeded subset of `data`.

    `exclude` (a manifest) leaves its images out, e.g. to use the rest of a dataset as unlabelled images
    (`data.unlabeled=CSV`). `per_class` keeps that many images of each class (a seeded shuffle, then
    the first N). `ratio`
    makes the data imbalanced the way a user's labelled data is: the data is first split (stratified,
    `val_fraction` / `test_fraction`, `split_seed`), then in train and val every class except
    `majority` is cut to `count(majority) // ratio` images (at least 1); the test split is left as it
    was, so scores stay comparable across ratios. With `ratio` the manifest carries the split column.

    Args:
        path: the manifest to write (atomically).
        data: a packaged dataset name, an ImageFolder or a manifest.
        per_class: images per class, one number or `{class: n}` (classes not named keep all).
        exclude: a manifest whose images are left out.
        ratio: majority : minority images in train and val, e.g. 20 or 100.
        majority: the class kept whole; default the largest.
        val_fraction, test_fraction, split_seed: the split made before subsampling (`ratio` only).
        seed: drives which images are kept.

    Returns:
        `{"manifest": path, "counts": {split or "all": {class: n}}}`.

    Raises:
        DataError: an unknown `majority` class, or `per_class` naming a class the data lacks.

    Example:
        >>> vfmtune.subsample("runs/smoke.csv", per_class=20)["counts"]
        {'all': {'global': 20, 'local': 20, 'nominal': 20}}
        >>> vfmtune.subsample("runs/textile_20to1.csv", ratio=20, majority="nominal", seed=1)
        >>> vfmtune.subsample("runs/rest.csv", exclude="runs/smoke.csv")  # the other 1,940 images
    """
    table = _table(data)
    classes = table.classes
    rng = random.Random(seed)
    rows = list(zip(table.paths, table.labels))
    if exclude is not None:
        left_out = {os.path.realpath(p) for p in from_manifest(exclude).paths}
        rows = [(p, y) for p, y in rows if os.path.realpath(p) not in left_out]
    if per_class is not None:
        limits = {c: per_class for c in classes} if isinstance(per_class, int) else dict(per_class)
        unknown = sorted(set(limits) - set(classes))
        if unknown:
            raise DataError(f"per_class names {unknown}, which the data does not have; its classes: {classes}.")
        kept = []
        for c, cls in enumerate(classes):
            paths = [p for p, y in rows if y == c]
            rng.shuffle(paths)
            kept += [(p, c) for p in paths[: limits.get(cls, len(paths))]]
        rows = kept
    if ratio is None:
        out = [(p, classes[y]) for p, y in rows]
        counts = {"all": {cls: sum(1 for _, y in rows if y == c) for c, cls in enumerate(classes)}}
        _write(path, ("path", "label"), out)
        return {"manifest": str(path), "counts": counts}

    major = classes.index(majority) if majority is not None and majority in classes else None
    if majority is not None and major is None:
        raise DataError(f"majority={majority!r} is not a class of the data; its classes: {classes}.")
    labels = [y for _, y in rows]
    if major is None:
        major = max(range(len(classes)), key=labels.count)
    splits = stratified_split(labels, val_fraction, test_fraction, seed=split_seed, classes=classes)
    out, counts = [], {s: {cls: 0 for cls in classes} for s in SPLIT_NAMES}
    for split in SPLIT_NAMES:
        n_major = sum(1 for y, s in zip(labels, splits) if y == major and s == split)
        for c, cls in enumerate(classes):
            paths = [p for (p, y), s in zip(rows, splits) if y == c and s == split]
            if split != "test" and c != major:
                paths = rng.sample(sorted(paths), min(len(paths), max(int(n_major // ratio), 1)))
            out += [(p, cls, split) for p in paths]
            counts[split][cls] = len(paths)
    _write(path, ("path", "label", "split"), out)
    return {"manifest": str(path), "counts": counts}


def _write(path: str | os.PathLike[str], header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
