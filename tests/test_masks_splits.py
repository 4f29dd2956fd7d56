"""Segmentation splits: stratified on class presence, rare classes in every split, persisted."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from vfmtune.data import mask_splits
from vfmtune.data.images import DataError
from vfmtune.data.mask_sources import SegmentationTable
from vfmtune.data.mask_splits import resolve_mask_splits, stratified_mask_split


def _presence(seed: int = 0) -> np.ndarray:
    """60 images: background everywhere, two common classes, a rare one (3 images), a singleton."""
    rng = np.random.default_rng(seed)
    p = np.zeros((60, 5), bool)
    p[:, 0] = True
    p[rng.permutation(60)[:30], 1] = True
    p[rng.permutation(60)[:20], 2] = True
    p[rng.permutation(60)[:3], 3] = True
    p[rng.permutation(60)[:1], 4] = True
    return p


@pytest.mark.parametrize("seed", range(5))
def test_stratified_mask_split__rare_class_reaches_every_split(seed: int) -> None:
    presence = _presence(seed)
    splits = np.array(stratified_mask_split(presence, 0.15, 0.15, seed=seed))
    for c in range(4):  # class 4 is in one image: it cannot be everywhere
        assert {str(s) for s in splits[presence[:, c]]} == {"train", "val", "test"}, f"class {c}"
    counts = {s: int((splits == s).sum()) for s in ("train", "val", "test")}
    assert abs(counts["val"] - 9) <= 2 and abs(counts["test"] - 9) <= 2, counts


def test_stratified_mask_split__deterministic_by_seed() -> None:
    presence = _presence()
    first = stratified_mask_split(presence, 0.2, 0.1, seed=3)
    assert stratified_mask_split(presence, 0.2, 0.1, seed=3) == first
    assert stratified_mask_split(presence, 0.2, 0.1, seed=4) != first


def test_stratified_mask_split__warns_about_classes_too_rare(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vfmtune.data.mask_splits"):
        stratified_mask_split(_presence(), 0.15, 0.15, seed=0, classes=["bg", "a", "b", "rare", "once"])
    assert "cannot reach every split: once (1 image)" in caplog.text


def test_stratified_mask_split__more_strata_than_held_out_images_merge() -> None:
    # 20 images of background + two of six classes: six strata, but val and test hold 3 images each.
    presence = np.zeros((20, 7), bool)
    presence[:, 0] = True
    for i in range(20):
        presence[i, [1 + i % 6, 1 + (i + 2) % 6]] = True
    splits = np.array(stratified_mask_split(presence, 0.15, 0.15, seed=0))
    for c in range(7):
        assert {str(s) for s in splits[presence[:, c]]} == {"train", "val", "test"}, f"class {c}"
    assert abs(int((splits == "val").sum()) - 3) <= 2 and abs(int((splits == "test").sum()) - 3) <= 2


def test_stratified_mask_split__too_few_images() -> None:
    with pytest.raises(DataError, match="2 images cannot fill train, val, test"):
        stratified_mask_split(np.ones((2, 2), bool), 0.3, 0.3, seed=0)


def test_resolve_mask_splits__saved_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    presence = _presence()
    table = SegmentationTable(paths=[str(tmp_path / f"{i}.png") for i in range(60)],
                              masks=[str(tmp_path / f"m{i}.png") for i in range(60)])
    first = resolve_mask_splits(table, presence, 0.15, 0.15, 0, tmp_path / "cache")
    [saved] = (tmp_path / "cache" / "splits").glob("seg-*.csv")
    assert saved.read_text().startswith("path,label,split")

    def fail(*args: object, **kwargs: object) -> list[str]:
        raise AssertionError("split computed again")

    monkeypatch.setattr(mask_splits, "stratified_mask_split", fail)
    assert resolve_mask_splits(table, presence, 0.15, 0.15, 0, tmp_path / "cache") == first
    table.splits = ["test"] * 60  # a manifest's own split column always wins
    assert resolve_mask_splits(table, presence, 0.15, 0.15, 0, tmp_path / "cache") == ["test"] * 60
