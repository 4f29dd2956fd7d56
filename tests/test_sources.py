"""Sample sources: ImageFolder trees and CSV manifests generated under tmp_path, plus the packaged set."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from PIL import Image

from vfmtune.data.images import DataError
from vfmtune.data.sources import PACKAGED_DATASETS, from_imagefolder, from_manifest, packaged_dataset


def _img(path: Path, colour: tuple[int, int, int] = (10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "pets"
    _img(root / "dog" / "b.png")
    _img(root / "dog" / "a.jpg")
    _img(root / "cat" / "1.PNG")
    _img(root / "cat" / "nested" / "deeper" / "2.webp")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".DS_Store").write_bytes(b"\0\0")
    (root / "dog" / "Thumbs.db").write_bytes(b"\0\0")
    _img(root / "dog" / ".hidden" / "x.png")  # hidden folders are not data
    (root / "README.md").write_text("loose file next to the class folders")
    return root


def test_from_imagefolder__classes_labels_and_paths(folder: Path) -> None:
    table = from_imagefolder(folder)
    assert table.classes == ["cat", "dog"]
    assert table.paths == [
        str(folder / "cat" / "1.PNG"),
        str(folder / "cat" / "nested" / "deeper" / "2.webp"),
        str(folder / "dog" / "a.jpg"),
        str(folder / "dog" / "b.png"),
    ]
    assert table.labels == [0, 0, 1, 1]
    assert table.splits is None
    assert all(os.path.isabs(p) for p in table.paths)
    assert table.class_counts() == {"cat": 2, "dog": 2}


def test_from_imagefolder__non_image_file_is_ignored_not_a_sample(folder: Path) -> None:
    table = from_imagefolder(folder)
    assert str(folder / "cat" / "notes.txt") in table.ignored
    assert str(folder / "cat" / "notes.txt") not in table.paths
    assert not any(".DS_Store" in p or "Thumbs.db" in p or ".hidden" in p for p in table.ignored + table.paths)


def test_from_imagefolder__relative_root_becomes_absolute(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(folder.parent)
    assert from_imagefolder("pets").paths[0] == str(folder / "cat" / "1.PNG")


def test_from_imagefolder__empty_class_folder(folder: Path) -> None:
    (folder / "bird").mkdir()
    (folder / "bird" / "readme.txt").write_text("images coming soon")
    with pytest.raises(DataError, match="no images") as info:
        from_imagefolder(folder)
    assert "'bird'" in str(info.value) and "Fix:" in str(info.value)


def test_from_imagefolder__no_class_folders(tmp_path: Path) -> None:
    _img(tmp_path / "flat" / "1.png")
    with pytest.raises(DataError, match="no class sub-folders"):
        from_imagefolder(tmp_path / "flat")


def test_from_imagefolder__missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="folder not found"):
        from_imagefolder(tmp_path / "absent")


def _manifest(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_from_manifest__relative_paths_resolve_against_csv_folder(folder: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    csv_path = _manifest(folder / "list.csv", ["path,label", "dog/a.jpg,dog", "cat/1.PNG,cat", "dog/b.png,dog"])
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    table = from_manifest(csv_path)
    assert table.paths == [str(folder / "dog" / "a.jpg"), str(folder / "cat" / "1.PNG"), str(folder / "dog" / "b.png")]
    assert table.classes == ["cat", "dog"]
    assert table.labels == [1, 0, 1]
    assert table.splits is None


def test_from_manifest__split_column_is_honoured(folder: Path) -> None:
    rows = ["path,label,split", f"{folder / 'dog' / 'a.jpg'},dog,train", "cat/1.PNG,cat,Val ", "dog/b.png,dog,test"]
    table = from_manifest(_manifest(folder / "m.csv", rows))
    assert table.splits == ["train", "val", "test"]


def test_from_manifest__rows_pointing_at_missing_files(folder: Path) -> None:
    rows = ["path,label", "dog/a.jpg,dog", "dog/gone.jpg,dog", "cat/1.PNG,cat", "cat/lost.png,cat"]
    with pytest.raises(DataError, match="2 rows point at missing files") as info:
        from_manifest(_manifest(folder / "m.csv", rows))
    message = str(info.value)
    assert f"row 3: {folder / 'dog' / 'gone.jpg'}" in message
    assert f"row 5: {folder / 'cat' / 'lost.png'}" in message
    assert "Fix:" in message


def test_from_manifest__bad_split_value(folder: Path) -> None:
    rows = ["path,label,split", "dog/a.jpg,dog,train", "cat/1.PNG,cat,validation"]
    with pytest.raises(DataError, match="bad split value") as info:
        from_manifest(_manifest(folder / "m.csv", rows))
    assert "row 3: 'validation'" in str(info.value)


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (["file,class", "dog/a.jpg,dog"], "header must name the columns"),
        (["path,label"], "no rows"),
        (["path,label", "cat/notes.txt,cat"], "non-image files"),
        (["path,label", "dog/a.jpg,"], "empty label"),
        (["path,label", "dog/a.jpg,dog", "./dog/a.jpg,dog"], "repeat a path"),
    ],
    ids=["wrong_header", "no_rows", "non_image", "empty_label", "duplicate"],
)
def test_from_manifest__malformed(folder: Path, rows: list[str], match: str) -> None:
    with pytest.raises(DataError, match=match):
        from_manifest(_manifest(folder / "m.csv", rows))


def test_packaged_dataset__unknown_name_lists_known() -> None:
    with pytest.raises(DataError) as info:
        packaged_dataset("imagenet")
    assert all(name in str(info.value) for name in PACKAGED_DATASETS)


def test_packaged_dataset__package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules is Python's own marker for "not importable"; find_spec honours it.
    monkeypatch.setitem(sys.modules, "conformal_clip_data", None)
    with pytest.raises(DataError, match=r'pip install "vfmtune\[offline\]"'):
        packaged_dataset("textile")


def test_packaged_dataset__textile_has_2000_images_in_3_classes() -> None:
    pytest.importorskip("conformal_clip_data")
    table = from_imagefolder(packaged_dataset("textile"))
    assert len(table) == 2000
    assert table.class_counts() == {"global": 500, "local": 500, "nominal": 1000}
    assert table.ignored == []
