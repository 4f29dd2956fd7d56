"""Train/val/test splits for segmentation, stratified on which classes each image contains.

An image holds several classes, so there is no single label to stratify on. Each image is
labelled by the *rarest* class it contains (rarity = number of images containing the class), and
those labels go through :func:`vfmtune.data.splits.stratified_split` (sklearn's
``train_test_split(stratify=...)``). A rare class thus decides where its few images go, while
common classes spread anyway. Afterwards every class with enough images is checked to appear in
every split; where not, one image containing it moves there from the split with the most of them,
choosing an image that takes no class away from its old split.

Fallbacks: a class in fewer images than there are splits cannot reach every split; it is not used
as a label (logged as a warning). Strata too small to split, or more strata than the smallest
split has images, merge into one "mixed" stratum, smallest first.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
from collections import Counter
from collections.abc import Sequence

import numpy as np

from vfmtune.data.images import DataError
from vfmtune.data.mask_sources import SegmentationTable
from vfmtune.data.splits import _check_fractions, _lookup, load_splits, save_splits, split_key, stratified_split

log = logging.getLogger(__name__)
MIXED = "(mixed)"


def _strata(presence: np.ndarray, need: int, max_strata: int) -> np.ndarray:
    """``[N]`` stratum per image: its rarest splittable class, or -1 (mixed)."""
    per_class = presence.sum(axis=0)
    order = [c for c in np.argsort(per_class, kind="stable") if per_class[c] >= need]  # rarest first
    labels = np.full(len(presence), -1, np.int64)
    for c in reversed(order):  # the rarest class present is written last, so it wins
        labels[presence[:, c]] = c
    sizes = Counter(labels.tolist())
    small = [s for s, k in sizes.items() if s >= 0 and k < need]
    by_size = sorted((k, s) for s, k in sizes.items() if s >= 0 and k >= need)
    while len(by_size) + (sizes[-1] + sum(sizes[s] for s in small) > 0) > max_strata and by_size:
        small.append(by_size.pop(0)[1])  # too many strata for the smallest split: merge the smallest
    labels[np.isin(labels, small)] = -1
    mixed = int((labels == -1).sum())
    if 0 < mixed < need and by_size:  # a mixed stratum too small to split joins the largest one
        labels[labels == -1] = by_size[-1][1]
    return labels


def _spread(out: np.ndarray, presence: np.ndarray, names: list[str], seed: int) -> None:
    """Move one image into any split lacking a class that has enough images to be everywhere."""
    rng = np.random.default_rng(seed)
    per_class = presence.sum(axis=0)
    for c in np.argsort(per_class, kind="stable"):  # rarest first: later moves never undo them
        if per_class[c] < len(names):
            continue
        for name in names:
            if presence[out == name, c].any():
                continue
            holders = {s: int(presence[out == s, c].sum()) for s in names if s != name}
            donor = max(holders, key=lambda s: holders[s])
            if holders[donor] < 2:
                continue
            candidates = np.flatnonzero((out == donor) & presence[:, c])
            last = presence[out == donor].sum(axis=0) == 1  # classes the donor holds only once
            cost = (presence[candidates] & last).sum(axis=1)
            out[rng.choice(candidates[cost == cost.min()])] = name


def stratified_mask_split(
    presence: np.ndarray, val_fraction: float, test_fraction: float, seed: int,
    classes: Sequence[str] | None = None,
) -> list[str]:
    """Assign ``"train"``/``"val"``/``"test"`` so that every class reaches every split when it can.

    Args:
        presence: ``[N, K]`` bool, class ``k`` appears in image ``n``
            (:attr:`vfmtune.data.mask_scan.MaskScanReport.presence`).
        val_fraction: Share of images for validation, in [0, 1).
        test_fraction: Share of images for test, in [0, 1).
        seed: The same presence, fractions and seed always give the same split.
        classes: Class names, for the warning about classes too rare to split.

    Returns:
        The split name per image, in input order. Held-out sizes are ``ceil(fraction * N)``,
        give or take the few images moved so that classes reach every split.

    Raises:
        DataError: For bad fractions, or fewer images than non-empty splits.

    Example:
        >>> presence = np.array([[1, 0]] * 8 + [[1, 1]] * 4, dtype=bool)
        >>> splits = stratified_mask_split(presence, 0.25, 0.25, seed=0)
        >>> sorted({s for s, p in zip(splits, presence[:, 1]) if p})
        ['test', 'train', 'val']
    """
    _check_fractions(val_fraction, test_fraction)
    presence = np.asarray(presence, dtype=bool)
    n = len(presence)
    held_out = [(name, f) for name, f in (("val", val_fraction), ("test", test_fraction)) if f > 0]
    names = ["train", *(name for name, _ in held_out)]
    if not held_out:
        return ["train"] * n
    sizes = [math.ceil(f * n - 1e-9) for _, f in held_out]
    if n - sum(sizes) < 1 or n < len(names):
        raise DataError(f"{n} images cannot fill {', '.join(names)} with data.val_fraction={val_fraction} and "
                        f"data.test_fraction={test_fraction}. Fix: add images, or lower the fractions")
    need = max(2, len(names))
    per_class = presence.sum(axis=0).tolist()
    rare = [c for c, k in enumerate(per_class) if 0 < k < need]
    if rare:
        label = (lambda c: classes[c]) if classes is not None else (lambda c: f"class {c}")
        log.warning("classes in fewer than %d images cannot reach every split: %s", need,
                    ", ".join(f"{label(c)} ({per_class[c]} image{'s' * (per_class[c] != 1)})" for c in rare))
    strata = _strata(presence, need, max_strata=min(*sizes, n - sum(sizes)))
    if len(np.unique(strata)) == 1:
        strata[:] = 0  # one stratum: stratification is a plain random split
    ids, labels = np.unique(strata, return_inverse=True)
    stratum_names = [MIXED if s < 0 else (classes[s] if classes is not None else f"class {s}") for s in ids]
    out = np.array(stratified_split(labels.tolist(), val_fraction, test_fraction, seed, classes=stratum_names),
                   dtype=object)
    _spread(out, presence, names, seed)
    return out.tolist()


def resolve_mask_splits(
    table: SegmentationTable, presence: np.ndarray, val_fraction: float, test_fraction: float, seed: int,
    cache_dir: str | os.PathLike[str], classes: Sequence[str] | None = None,
) -> list[str]:
    """The split of every pair: the manifest's, else a saved one for the same data, else a new one.

    New splits are saved to ``cache_dir/"splits"/f"seg-{key}.csv"`` by
    :func:`vfmtune.data.splits.save_splits`, with the rarest class each image contains as its
    label (for a person reading the file; only path and split are read back). The key hashes the
    images and their class-presence sets (so relabelling a mask so that a class appears or
    disappears makes a new split), the fractions and the seed.

    Args:
        table: The pairs; its own ``splits`` (a manifest's column) are returned unchanged.
        presence: ``[N, K]`` bool class presence per pair (``MaskScanReport.presence``).
        val_fraction: Share for validation.
        test_fraction: Share for test.
        seed: Split seed.
        cache_dir: vfmtune's cache folder.
        classes: Class names, for the saved file and warnings.

    Returns:
        ``"train"``/``"val"``/``"test"`` per pair, in table order.

    Example:
        >>> splits = resolve_mask_splits(table, report.presence, 0.15, 0.15, 0, "~/.cache/vfmtune")  # doctest: +SKIP
    """
    if table.splits is not None:
        return list(table.splits)
    presence = np.asarray(presence, dtype=bool)
    bits = [sum(1 << int(c) for c in np.flatnonzero(row)) for row in presence]  # exact, any K
    key = split_key(table.paths, bits, val_fraction, test_fraction, seed)
    file = pathlib.Path(cache_dir).expanduser() / "splits" / f"seg-{key}.csv"
    if file.is_file():
        found = _lookup(load_splits(file), list(table.paths))
        if found is not None:
            log.info("reusing split %s", file)
            return found
        log.warning("split file %s does not match the data; recomputing it", file)
    splits = stratified_mask_split(presence, val_fraction, test_fraction, seed, classes=classes)
    per_class = presence.sum(axis=0)
    rarest = [int(np.flatnonzero(row)[np.argmin(per_class[row])]) if row.any() else -1 for row in presence]
    names = [*(classes or [f"class_{k}" for k in range(presence.shape[1])]), MIXED]
    save_splits(file, table.paths, rarest, names, splits)  # -1 indexes MIXED, the last name
    log.info("saved split %s", file)
    return splits
