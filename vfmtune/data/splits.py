"""Train/val/test splits: stratified, seeded, and saved so the same data trains on the same split.

A split is computed once per (data, fractions, seed) and written to
``<cache_dir>/splits/<split_key>.csv``; later runs on the same data reuse that file, so test images
never leak into training across runs. A manifest's own ``split`` column always wins.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import pathlib
from collections import Counter
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import train_test_split

from vfmtune.data.images import DataError
from vfmtune.data.sources import SPLIT_NAMES, SampleTable
from vfmtune.io import atomic_path

log = logging.getLogger(__name__)


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for key, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise DataError(f"data.{key}={f} is out of range. Fix: use a value in [0, 1), e.g. 0.15")
    if val_fraction + test_fraction >= 1.0:
        raise DataError(f"data.val_fraction={val_fraction} + data.test_fraction={test_fraction} leaves no "
                        "training images. Fix: make their sum less than 1, e.g. 0.15 + 0.15")


def _class_name(label: int, classes: Sequence[str] | None) -> str:
    return classes[label] if classes is not None and 0 <= label < len(classes) else str(label)


def stratified_split(
    labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int,
    classes: Sequence[str] | None = None,
) -> list[str]:
    """Assign ``"train"``, ``"val"`` or ``"test"`` to each sample, preserving class ratios.

    Uses ``sklearn.model_selection.train_test_split(stratify=...)`` twice (test off the whole set,
    then val off the rest) with ``ceil(fraction * n)`` images per held-out split. A fraction of 0
    leaves that split empty. Every class appears in every non-empty split: should rounding leave
    a rare class out of one, a single image of it moves there from the split holding the most.

    Args:
        labels: Class index per sample.
        val_fraction: Share of all samples for validation, in [0, 1).
        test_fraction: Share of all samples for test, in [0, 1).
        seed: Random seed; the same inputs and seed always give the same split.
        classes: Class names, used only to name classes in errors.

    Returns:
        The split name per sample, in input order.

    Raises:
        DataError: For bad fractions, or when a class (named) or the whole set is too small for
            the requested splits; checked before sklearn so the message says what to change.

    Example:
        >>> stratified_split([0] * 8 + [1] * 4, 0.25, 0.25, seed=0).count("test")
        3
    """
    _check_fractions(val_fraction, test_fraction)
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    held_out = [(name, f) for name, f in (("val", val_fraction), ("test", test_fraction)) if f > 0]
    if not held_out:
        return ["train"] * n
    counts = Counter(y.tolist())
    # One image per non-empty split; sklearn's stratification also refuses classes of 1.
    need = max(2, 1 + len(held_out))
    asked = " and ".join(f"data.{name}_fraction={f}" for name, f in held_out)
    small = sorted((c, k) for c, k in counts.items() if k < need)
    if small:
        listing = "; ".join(f"class '{_class_name(c, classes)}' has {k} image{'s' * (k != 1)}" for c, k in small)
        zero = " or ".join(f"data.{name}_fraction=0" for name, _ in held_out)
        raise DataError(f"{listing}; {asked} need at least {need} per class. "
                        f"Fix: add images to {'that class' if len(small) == 1 else 'those classes'}, "
                        f"remove {'it' if len(small) == 1 else 'them'} from the data, or set {zero}",
                        problem=f"{len(small)} classes too small to split")
    # The epsilon keeps float noise (0.15 * 20 = 3.0000000000000004) from adding an image.
    sizes = {name: math.ceil(f * n - 1e-9) for name, f in held_out}
    n_train = n - sum(sizes.values())
    for name, size in [*sizes.items(), ("train", n_train)]:
        if size < len(counts):
            raise DataError(f"{asked} of {n} images leave {size} {name} images for {len(counts)} classes; "
                            f"a stratified split needs at least one per class. Fix: add images, or "
                            f"{'lower' if name == 'train' else 'raise'} the fractions")
    out = np.full(n, "train", dtype=object)
    rest = np.arange(n)
    for name in sorted(sizes, key=("test", "val").index):  # test off the whole set, then val off the rest
        try:
            rest, picked = train_test_split(rest, test_size=sizes[name], stratify=y[rest], random_state=seed)
        except ValueError as e:  # extreme fractions can still starve a class in the second call
            raise DataError(f"cannot stratify {asked} over {n} images ({e}). Fix: add images to the "
                            "smallest classes, or use smaller fractions") from None
        out[picked] = name
    _ensure_every_class(out, y, [name for name, _ in held_out], seed)
    return out.tolist()


def _ensure_every_class(out: np.ndarray, y: np.ndarray, held_out: list[str], seed: int) -> None:
    """Move one image of a class into any non-empty split that rounding left without it."""
    rng = np.random.default_rng(seed)
    for c in np.unique(y):
        for name in ["train", *held_out]:
            if np.any((y == c) & (out == name)):
                continue
            # The class has >= 1 + len(held_out) images spread over the other splits, so the
            # largest holder has at least 2 and keeps one after giving one away.
            donor = max((s for s in ["train", *held_out] if s != name), key=lambda s: np.sum((y == c) & (out == s)))
            out[rng.choice(np.flatnonzero((y == c) & (out == donor)))] = name


def _relative_paths(paths: Sequence[str]) -> list[str]:
    """Paths relative to their common folder, '/'-separated, so a moved dataset keeps its key."""
    absolute = [os.path.abspath(os.fspath(p)) for p in paths]
    if not absolute:
        return []
    root = os.path.commonpath([os.path.dirname(p) for p in absolute])
    return [pathlib.PurePath(os.path.relpath(p, root)).as_posix() for p in absolute]


def split_key(
    paths: Sequence[str], labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int
) -> str:
    """Identify a split request: sha256 over the sorted (relative path, label) pairs, fractions and seed.

    Sample order and the dataset's location do not change the key; any added, removed or
    relabelled image, fraction or seed does.

    Example:
        >>> split_key(["/d/a/1.png", "/d/b/2.png"], [0, 1], 0.15, 0.15, seed=0)[:12]  # doctest: +SKIP
        '3f0c9b1e8a72'
    """
    payload = {
        "samples": sorted(zip(_relative_paths(paths), (int(v) for v in labels))),
        "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction),
        "seed": int(seed),
    }
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()


def save_splits(
    path: str | os.PathLike[str], paths: Sequence[str], labels: Sequence[int], classes: Sequence[str],
    splits: Sequence[str],
) -> None:
    """Write ``path,label,split`` rows (label = class name), atomically: a crash never leaves half a file.

    The file is itself a valid manifest for :func:`vfmtune.data.sources.from_manifest`.

    Example:
        >>> save_splits("runs/x/splits.csv", table.paths, table.labels, table.classes, splits)  # doctest: +SKIP
    """
    with atomic_path(os.path.abspath(os.fspath(path))) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        writer.writerows((os.path.abspath(p), classes[int(y)], s) for p, y, s in zip(paths, labels, splits))


def load_splits(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a file written by :func:`save_splits` into ``{absolute path: split}``.

    Example:
        >>> load_splits("runs/x/splits.csv")["/data/cat/1.jpg"]  # doctest: +SKIP
        'train'
    """
    src = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(src)
    try:
        with open(src, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as e:
        raise DataError.for_file(src, f"cannot read split file ({e.strerror})", "delete it to recompute") from None
    out: dict[str, str] = {}
    for n, r in enumerate(rows, start=2):
        p, s = (r.get("path") or "").strip(), (r.get("split") or "").strip().lower()
        if not p or s not in SPLIT_NAMES:
            raise DataError.for_file(src, f"row {n} is not 'path,label,split' with split in {SPLIT_NAMES}",
                                     "delete the file; it is recomputed on the next run")
        out[os.path.abspath(os.path.join(folder, p))] = s
    return out


def _lookup(saved: dict[str, str], paths: list[str]) -> list[str] | None:
    """Splits for ``paths`` from a saved file; by relative path if the dataset moved; None if stale."""
    if all(p in saved for p in paths):
        return [saved[p] for p in paths]
    by_rel = dict(zip(_relative_paths(list(saved)), saved.values()))
    rel = _relative_paths(paths)
    return [by_rel[r] for r in rel] if all(r in by_rel for r in rel) else None


def resolve_splits(
    table: SampleTable, val_fraction: float, test_fraction: float, seed: int, cache_dir: pathlib.Path
) -> list[str]:
    """The split of every sample: the manifest's, else a saved one for the same data, else a new one.

    New splits are saved to ``cache_dir/"splits"/f"{split_key}.csv"``; training the same data
    again with the same fractions and seed reuses that file.

    Args:
        table: The samples.
        val_fraction: Share for validation (ignored when the manifest fixes splits).
        test_fraction: Share for test (ignored when the manifest fixes splits).
        seed: Split seed.
        cache_dir: vfmtune's cache folder.

    Returns:
        ``"train"``/``"val"``/``"test"`` per sample, in table order.

    Example:
        >>> splits = resolve_splits(table, 0.15, 0.15, seed=0, cache_dir=pathlib.Path("~/.cache/vfmtune"))  # doctest: +SKIP
    """
    if table.splits is not None:
        return list(table.splits)
    key = split_key(table.paths, table.labels, val_fraction, test_fraction, seed)
    file = pathlib.Path(cache_dir).expanduser() / "splits" / f"{key}.csv"
    if file.is_file():
        found = _lookup(load_splits(file), table.paths)
        if found is not None:
            log.info("reusing split %s", file)
            return found
        log.warning("split file %s does not match the data; recomputing it", file)
    splits = stratified_split(table.labels, val_fraction, test_fraction, seed, classes=table.classes)
    save_splits(file, table.paths, table.labels, table.classes, splits)
    log.info("saved split %s", file)
    return splits
