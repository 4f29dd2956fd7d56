"""vfmtune.subsample: smaller and harsher manifests of a dataset, read back by data.manifest."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_imagefolder, read_rows

import vfmtune
from vfmtune.data.images import DataError
from vfmtune.data.sources import from_manifest


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "images", {"cat": 40, "dog": 20, "owl": 20})


def test_subsample__per_class(folder: Path, tmp_path: Path) -> None:
    result = vfmtune.subsample(tmp_path / "small.csv", folder, per_class={"cat": 5, "dog": 3})
    assert result["counts"] == {"all": {"cat": 5, "dog": 3, "owl": 20}}
    table = from_manifest(tmp_path / "small.csv")
    assert table.class_counts() == {"cat": 5, "dog": 3, "owl": 20}
    again = vfmtune.subsample(tmp_path / "again.csv", folder, per_class={"cat": 5, "dog": 3})
    assert again["counts"] == result["counts"] and read_rows(tmp_path / "again.csv") == read_rows(tmp_path / "small.csv")
    other = vfmtune.subsample(tmp_path / "other.csv", folder, per_class=5, seed=1)
    assert read_rows(tmp_path / "other.csv") != read_rows(tmp_path / "small.csv") and other["counts"]["all"]["owl"] == 5


def test_subsample__ratio_keeps_test_and_cuts_minorities(folder: Path, tmp_path: Path) -> None:
    full = vfmtune.subsample(tmp_path / "full.csv", folder, ratio=1)
    harsh = vfmtune.subsample(tmp_path / "harsh.csv", folder, ratio=10, majority="cat")
    assert harsh["counts"]["test"] == full["counts"]["test"]
    train = harsh["counts"]["train"]
    assert train["cat"] == full["counts"]["train"]["cat"] and train["dog"] == train["cat"] // 10 == train["owl"]
    assert harsh["counts"]["val"]["dog"] == 1  # at least one image
    rows = read_rows(tmp_path / "harsh.csv")
    assert set(rows[0]) == {"path", "label", "split"} and len(rows) == sum(sum(c.values()) for c in harsh["counts"].values())


def test_subsample__bad_class_names(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="majority='fox'"):
        vfmtune.subsample(tmp_path / "x.csv", folder, ratio=10, majority="fox")
    with pytest.raises(DataError, match="per_class names"):
        vfmtune.subsample(tmp_path / "x.csv", folder, per_class={"fox": 3})


def test_subsample__exclude_gives_the_rest(folder: Path, tmp_path: Path) -> None:
    small = vfmtune.subsample(tmp_path / "small.csv", folder, per_class=5)
    rest = vfmtune.subsample(tmp_path / "rest.csv", folder, exclude=small["manifest"])
    assert rest["counts"]["all"] == {"cat": 35, "dog": 15, "owl": 15}
    assert not {r["path"] for r in read_rows(tmp_path / "rest.csv")} & {r["path"] for r in read_rows(tmp_path / "small.csv")}
