"""Splits: stratified, deterministic per seed, persisted and reused."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vfmtune.data.images import DataError
from vfmtune.data.sources import SampleTable, from_manifest
from vfmtune.data.splits import load_splits, resolve_splits, save_splits, split_key, stratified_split

LABELS = [0] * 120 + [1] * 60 + [2] * 20  # imbalanced 6:3:1


def _table(root: Path, labels: list[int] = LABELS) -> SampleTable:
    """Paths need not exist for splitting; only their names and labels matter."""
    classes = [f"c{i}" for i in range(max(labels) + 1)]
    paths = [str(root / classes[y] / f"{i:04d}.png") for i, y in enumerate(labels)]
    return SampleTable(paths=paths, labels=list(labels), classes=classes)


def test_stratified_split__sizes_and_class_ratios() -> None:
    splits = stratified_split(LABELS, 0.15, 0.15, seed=0)
    counts = Counter(splits)
    assert counts == {"train": 140, "val": 30, "test": 30}
    for name in ("train", "val", "test"):
        share = Counter(y for y, s in zip(LABELS, splits) if s == name)
        ratios = np.array([share[c] for c in range(3)]) / counts[name]
        assert np.allclose(ratios, [0.6, 0.3, 0.1], atol=0.04), (name, share)


def test_stratified_split__deterministic_per_seed_and_different_across_seeds() -> None:
    a = stratified_split(LABELS, 0.2, 0.1, seed=7)
    assert a == stratified_split(LABELS, 0.2, 0.1, seed=7)
    assert a != stratified_split(LABELS, 0.2, 0.1, seed=8)


@pytest.mark.parametrize(
    ("val", "test", "expected"),
    [(0.0, 0.0, {"train": 200}), (0.0, 0.25, {"train": 150, "test": 50}), (0.25, 0.0, {"train": 150, "val": 50})],
    ids=["no_holdout", "no_val", "no_test"],
)
def test_stratified_split__zero_fraction_leaves_split_empty(val: float, test: float, expected: dict) -> None:
    assert Counter(stratified_split(LABELS, val, test, seed=0)) == expected


def test_stratified_split__every_class_in_every_split() -> None:
    labels = [0] * 100 + [1] * 3  # rounding alone would leave class 1 out of val or test
    splits = stratified_split(labels, 0.1, 0.1, seed=0)
    assert {s for y, s in zip(labels, splits) if y == 1} == {"train", "val", "test"}


@pytest.mark.parametrize(
    ("val", "test", "need"),
    [(0.15, 0.15, 3), (0.2, 0.0, 2), (0.0, 0.2, 2)],
    ids=["val_and_test", "val_only", "test_only"],
)
def test_stratified_split__class_too_small_names_it(val: float, test: float, need: int) -> None:
    labels = [0] * 50 + [1] * (need - 1)
    with pytest.raises(DataError) as info:
        stratified_split(labels, val, test, seed=0, classes=["good", "scratch"])
    message = str(info.value)
    assert f"class 'scratch' has {need - 1} image" in message
    assert f"need at least {need} per class" in message and "Fix:" in message
    assert "'good'" not in message


def test_stratified_split__held_out_split_smaller_than_class_count() -> None:
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2]  # 0.1 * 9 -> 1 test image for 3 classes
    with pytest.raises(DataError, match="1 test images for 3 classes"):
        stratified_split(labels, 0.0, 0.1, seed=0)


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.1), (0.1, 1.0), (0.5, 0.5)], ids=["negative", "one", "sum_one"])
def test_stratified_split__bad_fractions(val: float, test: float) -> None:
    with pytest.raises(DataError, match="Fix:"):
        stratified_split(LABELS, val, test, seed=0)


def test_split_key__stable_and_sensitive(tmp_path: Path) -> None:
    t = _table(tmp_path / "a")
    key = split_key(t.paths, t.labels, 0.15, 0.15, 0)
    assert len(key) == 64
    assert key == split_key(t.paths[::-1], t.labels[::-1], 0.15, 0.15, 0)  # order does not matter
    moved = _table(tmp_path / "elsewhere" / "b")
    assert key == split_key(moved.paths, moved.labels, 0.15, 0.15, 0)  # location does not matter
    relabelled = [1 - y if i == 0 else y for i, y in enumerate(t.labels)]
    for other in (
        split_key(t.paths, t.labels, 0.15, 0.15, 1),
        split_key(t.paths, t.labels, 0.2, 0.15, 0),
        split_key(t.paths, t.labels, 0.15, 0.1, 0),
        split_key(t.paths[1:], t.labels[1:], 0.15, 0.15, 0),
        split_key(t.paths, relabelled, 0.15, 0.15, 0),
    ):
        assert other != key


def test_save_load_splits__round_trip_is_atomic_and_a_manifest(tmp_path: Path) -> None:
    t = _table(tmp_path / "data", [0, 0, 1, 1])
    for p in t.paths:  # real files so the saved CSV can be read back as a manifest
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        Path(p).write_bytes(b"")
    splits = ["train", "val", "train", "test"]
    out = tmp_path / "cache" / "s.csv"
    save_splits(out, t.paths, t.labels, t.classes, splits)
    assert load_splits(out) == dict(zip(t.paths, splits))
    assert [p.name for p in out.parent.iterdir()] == ["s.csv"]  # no temp file left behind
    assert from_manifest(out).splits == splits


def test_resolve_splits__computes_saves_and_reuses(tmp_path: Path) -> None:
    t = _table(tmp_path / "data")
    cache = tmp_path / "cache"
    first = resolve_splits(t, 0.15, 0.15, seed=0, cache_dir=cache)
    saved = cache / "splits" / f"{split_key(t.paths, t.labels, 0.15, 0.15, 0)}.csv"
    assert saved.is_file() and first == stratified_split(t.labels, 0.15, 0.15, 0)
    # Edit the saved file: a reused split must come from the file, not from recomputing.
    text = saved.read_text().splitlines()
    path0, label0, _ = text[1].split(",")
    text[1] = f"{path0},{label0},{'test' if first[0] != 'test' else 'val'}"
    saved.write_text("\n".join(text) + "\n")
    again = resolve_splits(t, 0.15, 0.15, seed=0, cache_dir=cache)
    assert again[0] != first[0] and again[1:] == first[1:]
    # Another seed is another key and another file; the first file stays.
    resolve_splits(t, 0.15, 0.15, seed=1, cache_dir=cache)
    assert len(list((cache / "splits").glob("*.csv"))) == 2 and saved.is_file()


def test_resolve_splits__reuses_split_after_dataset_moves(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = resolve_splits(_table(tmp_path / "old"), 0.1, 0.2, seed=3, cache_dir=cache)
    moved = resolve_splits(_table(tmp_path / "new" / "place"), 0.1, 0.2, seed=3, cache_dir=cache)
    assert moved == first
    assert len(list((cache / "splits").glob("*.csv"))) == 1


def test_resolve_splits__manifest_splits_win(tmp_path: Path) -> None:
    t = _table(tmp_path / "data", [0, 0, 1, 1])
    t.splits = ["test", "test", "train", "val"]
    assert resolve_splits(t, 0.15, 0.15, seed=0, cache_dir=tmp_path / "cache") == t.splits
    assert not (tmp_path / "cache").exists()
